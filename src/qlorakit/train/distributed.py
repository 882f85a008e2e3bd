"""Data parallel training over several processes, started by ``torchrun`` (or ``qlorakit train --nproc N``).

Every process holds the 4-bit base and the adapters and trains on its own share of each optimizer
step's micro-batches; after the backward, one all-reduce sums the adapters' gradients (and the
step's loss) over the processes, so every process clips and steps on the same gradient and the
adapters stay equal without being sent. A step takes ``grad_accum`` micro-batches on each of the N
processes: with N processes it is the step of one process with N x ``grad_accum`` (the same
micro-batches, the same normalisation by the step's answer tokens). Only the first process writes
the run folder (recipe, ledger, metrics, checkpoints, adapter) and runs the evaluation after
training. Each process draws its own LoRA dropout keys; a checkpoint keeps every process's random
state, so a resumed run continues exactly, with the same number of processes.

The backend is gloo on the CPU and NCCL on CUDA (each process on the GPU of its local rank).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistributedError", "ProcessGroup", "world_from_env", "local_world_size", "cores_per_process", "launch"]


class DistributedError(RuntimeError):
    """The process group cannot be set up as the environment describes it."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r}: expected an integer (torchrun sets it)") from None


def local_world_size() -> int:
    """Processes of this run on this machine (1 outside torchrun)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1)))


def cores_per_process(nproc: int | None = None) -> int:
    """This machine's cores shared equally by ``nproc`` processes (default: this run's processes here)."""
    return max(1, (os.cpu_count() or 1) // (nproc or local_world_size()))


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def start(self, want_cuda: bool) -> None:
        """Join the process group (gloo on the CPU, NCCL on CUDA); on CUDA, take the local rank's GPU
        first, so that the model loads there."""
        if not self.active:
            return
        import torch.distributed as dist

        if want_cuda:
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise DistributedError(f"process {self.rank} has local rank {self.local_rank}, but this machine has "
                                       f"{n} CUDA device(s); start at most {n} processes per machine")
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """The first process's ``obj``, on every process."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_grads_(self, params: Sequence[torch.Tensor], values: Sequence[float]) -> list[float]:
        """Sum the parameters' gradients over the processes in place (one all-reduce, fp32), and
        ``values`` with them; the summed values are returned. A parameter without a gradient here
        counts as a zero gradient; every parameter has one after the call."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        device = params[0].device
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        flat = torch.cat(parts + [torch.tensor(list(values), dtype=torch.float32, device=device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p in params:
            n = p.numel()
            g = flat[off:off + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n
        return [float(x) for x in flat[off:].tolist()]


def world_from_env() -> ProcessGroup:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one
    process without them."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return ProcessGroup(rank=rank, world=world, local_rank=local)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``qlorakit <argv>`` in ``nproc`` processes on this machine, as ``torchrun --standalone
    --nproc-per-node N -m qlorakit ...`` does; the exit status of the first process that failed, or 0.

    Each process gets an equal share of the cores (``OMP_NUM_THREADS``) unless the environment sets
    it. A failure is reported in one line (each process prints its own error), not as torchrun's
    traceback.
    """
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    os.environ.setdefault("OMP_NUM_THREADS", str(cores_per_process(nproc)))
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "qlorakit", *argv])
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, cmd, cmd_args = config_from_args(args)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own notes on a failure
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # a signal: 128 + its number
        print(f"qlorakit {argv[0] if argv else ''}: process {rank} of {nproc} failed (exit status {code}); "
              "the others were stopped", file=sys.stderr)
        return code
    return 0
