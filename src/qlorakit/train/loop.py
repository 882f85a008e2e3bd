"""The training loop: one plain loop, no framework Trainer.

Gradient accumulation normalised by the answer tokens of the whole step, clipping, warmup and a
schedule, bf16 autocast where the hardware has it, atomic checkpoints with everything an exact resume
needs, ``metrics.jsonl``, and a progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import Recipe, dump_recipe, load_recipe, recipe_to_dict
from ..data import BatchSchedule, Row, collate, prepare_data
from ..lora import attach_lora, lora_parameters, save_adapter
from ..models import LoadedModel, load_base_model, load_tokenizer, resolve_base
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic,
)
from .loss import chunked_loss, plain_loss

__all__ = ["TrainError", "TrainState", "train", "make_scheduler", "heldout_loss", "peak_rss_mb",
           "data_fingerprint", "choose_checkpointing", "autocast_ctx", "loss_fn_for"]

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches consumed (the data position)
    tokens: int = 0  # real (non-padding) tokens seen
    elapsed: float = 0.0  # seconds of training so far, across resumes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def make_scheduler(opt: torch.optim.Optimizer, total: int, warmup: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def data_fingerprint(rows: list[Row]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(r.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def autocast_ctx(loaded: LoadedModel) -> Any:
    return torch.autocast(loaded.device.type, dtype=loaded.compute_dtype,
                          enabled=loaded.compute_dtype != torch.float32)


def loss_fn_for(recipe: Recipe) -> Callable[..., tuple[torch.Tensor, int]]:
    return chunked_loss if recipe.train.fast else plain_loss


def choose_checkpointing(recipe: Recipe, model: torch.nn.Module) -> bool:
    """'auto': recompute activations only when the run would not fit the memory budget without
    (:func:`qlorakit.train.plan.choose_memory_settings`, the process as it is now as the baseline)."""
    mode = recipe.train.gradient_checkpointing
    if mode != "auto":
        return mode == "on"
    from .fast import fast_supported
    from .plan import choose_memory_settings

    return choose_memory_settings(recipe, model, fast=recipe.train.fast and fast_supported(model) is None).checkpointing


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, loaded: LoadedModel, rows: list[Row], batch_size: int,
                 loss_fn: Callable[..., tuple[torch.Tensor, int]] = chunked_loss) -> float:
    """Mean loss per answer token over held-out rows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    pad = loaded.tokenizer.pad_token_id
    try:
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(loaded.device) for k, v in collate(rows[i:i + batch_size], pad).items()}
            with autocast_ctx(loaded):
                s, n = loss_fn(model, batch)
            total += float(s)
            count += n
    finally:
        model.train(was)
    return total / max(1, count)


def _set_threads(recipe: Recipe) -> None:
    """``train.threads``, or the cores shared equally among this machine's training processes."""
    from .distributed import cores_per_process

    torch.set_num_threads(recipe.train.threads or cores_per_process())


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_name(recipe: Recipe, base_name: str) -> str:
    if recipe.name:
        return recipe.name
    return f"{base_name.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _append_metrics(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """A resumed run rewrites history past its checkpoint: drop lines logged after it."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    write_atomic(path, "".join(ln + "\n" for ln in keep))


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


# recipe keys a resumed run may take new values of: they do not change what is trained, only how
# the run reports, saves, evaluates at its end and uses the machine (the fast and plain paths
# compute the same maths; a test pins their agreement)
RESUME_MAY_CHANGE = ("train.progress", "train.threads", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.memory_budget_gb", "train.gradient_checkpointing",
                     "train.fast", "eval.", "export.")
# the state at the end of training, written before the final adapter: a run interrupted in the
# evaluation after training is finished by `--resume` from it (no checkpoint holds that state)
FINISHED_STATE = "train_state.json"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _changed_keys(before: Recipe, after: Recipe) -> list[str]:
    a, b = _flat(recipe_to_dict(before)), _flat(recipe_to_dict(after))
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _finished_state(run_dir: Path) -> dict[str, Any] | None:
    """What :data:`FINISHED_STATE` holds (the train state at the end of training, the data's
    fingerprint), or None when the run has none (written before the file existed)."""
    path = run_dir / FINISHED_STATE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        obj["train_state"] = {k: obj["train_state"][k] for k in TrainState.__dataclass_fields__}
        if not isinstance(obj["data_fingerprint"], str):
            raise TypeError(f"data_fingerprint is {type(obj['data_fingerprint']).__name__}, not a string")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable end-of-training state ({type(e).__name__}: {e}); expected "
                              "the JSON written at the end of training (train_state, data_fingerprint)") from e
    return obj


def resumed_recipe(run_dir: Path, overrides: list[str] = ()) -> Recipe:
    """The recipe a resumed run follows: the run folder's, with ``overrides``."""
    rpath = Path(run_dir) / "recipe.yaml"
    if not rpath.is_file():
        raise TrainError(f"--resume {run_dir}: no recipe.yaml there; expected a run folder")
    return load_recipe(rpath, overrides)


def check_output_dir(recipe: Recipe) -> None:
    """Fail before any work when the run folder cannot be made, or (with a fixed name) is taken."""
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"output_dir={recipe.output_dir}: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"output_dir={recipe.output_dir}: the folder cannot be made ({e.strerror or e})") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise TrainError(f"output_dir={recipe.output_dir}: {out} is not writable")
    if recipe.name:
        run_dir = out / recipe.name
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise TrainError(f"{run_dir} exists; pick another name or continue it with --resume {run_dir}")


def train(recipe: Recipe | None = None, *, resume: str | Path | None = None, overrides: list[str] = (),
          on_step: Callable[[TrainState], None] | None = None, finish: bool = True) -> Path:
    """Fine-tune; return the run folder. ``resume`` continues the run folder's latest checkpoint.

    ``finish=False`` skips the end-of-run evaluation and report (used by tests and benchmarks).

    Started by torchrun (``WORLD_SIZE`` > 1), the processes train data parallel
    (:mod:`qlorakit.train.distributed`): a step takes ``grad_accum`` micro-batches on each process,
    and only the first process writes the run folder and evaluates. Other processes return the run
    folder when training ends.
    """
    from .distributed import cores_per_process, world_from_env

    group = world_from_env()
    if resume is not None:
        run_dir = Path(resume)
        rpath = run_dir / "recipe.yaml"
        recipe = resumed_recipe(run_dir, overrides)
        saved = load_recipe(rpath)
        changed = _changed_keys(saved, recipe)
        fixed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
        if fixed:
            raise TrainError(
                f"--resume {run_dir}: {', '.join(fixed)} would change the training itself, which a resumed run "
                f"continues exactly; start a new run for other settings (on resume only these may change: "
                f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUME_MAY_CHANGE)})")
        finished = None  # the state at the end of training, when only the evaluation after it is left
        if (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            if (run_dir / "MODEL_CARD.md").is_file():
                raise TrainError(f"--resume {run_dir}: the run already finished (adapter/ and MODEL_CARD.md exist); "
                                 "nothing to resume")
            finished = _finished_state(run_dir)
            if finished is None or not finish:
                why = (f"it has no {FINISHED_STATE} (runs trained by earlier versions of qlorakit do not)"
                       if finished is None else "the evaluation was not asked for (finish=False)")
                raise TrainError(f"--resume {run_dir}: the run's training already finished (adapter/ exists), the "
                                 f"evaluation after it did not (no MODEL_CARD.md), and {why}; `qlorakit eval {run_dir}` "
                                 "evaluates the trained adapter against the base")
            ckpt = None
        else:
            ckpt = latest_checkpoint(run_dir / "checkpoints")
            if ckpt is None:
                raise TrainError(f"--resume {run_dir}: no checkpoint yet (checkpoints/LATEST is missing); start it again")
        if changed and group.main:  # the run folder's recipe is the one the rest of the run follows
            log.warning("resuming %s with %s changed", run_dir, ", ".join(changed))
            write_atomic(rpath, dump_recipe(recipe))
    else:
        recipe = recipe or load_recipe(None, overrides)
        run_dir = None
        ckpt = finished = None
        if group.main:  # the others wait for its run folder (below)
            check_output_dir(recipe)

    from ..models.loader import pick_device

    group.start(want_cuda=pick_device(recipe.model).type == "cuda")
    _set_threads(recipe)
    _seed_all(recipe.seed)
    # a .gguf base is converted once per machine, by its first process, while the others wait
    first_here = group.local_rank == 0
    if first_here:
        folder, _ = resolve_base(recipe.model.base)
    group.barrier()
    if not first_here:
        folder, _ = resolve_base(recipe.model.base)
    # data first: bad data or a blocking licence fails in seconds, before the model loads
    data = prepare_data(recipe.data, load_tokenizer(folder), recipe.seed)

    from ..data.ledger_hook import build_run_ledger

    ledger = build_run_ledger(recipe, data)  # raises when the licence policy blocks the run
    from .memory import current_rss_bytes

    baseline = float(current_rss_bytes())  # the process before the base loads, as `qlorakit plan` measures it
    loaded = load_base_model(recipe.model)
    model = loaded.model
    torch.manual_seed(recipe.seed)  # LoRA initialisation depends on the seed only
    targets = attach_lora(model, recipe.lora)
    if group.rank:  # every other process draws its own dropout keys (the first one those of a single process)
        _seed_all(recipe.seed + 7919 * group.rank)

    if run_dir is None:
        if group.main:
            run_dir = Path(recipe.output_dir) / _run_name(recipe, loaded.name)
            if run_dir.exists() and any(run_dir.iterdir()):
                raise TrainError(f"{run_dir} exists; pick another name or continue it with --resume {run_dir}")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
            write_atomic(run_dir / "data_manifest.json", json.dumps(ledger, indent=2, default=str) + "\n")
        run_dir = Path(group.broadcast(str(run_dir) if run_dir is not None else None))

    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    t = recipe.train
    sched_data = BatchSchedule(len(data.train_rows), t.micro_batch_size, recipe.seed)
    per_step = t.grad_accum * group.world  # micro-batches an optimizer step takes, over all processes
    steps_per_epoch = math.ceil(sched_data.batches_per_epoch / per_step)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    # checkpointing and the base weights' form: the choice `qlorakit plan` shows for these settings
    from .fast import fast_path_runs
    from .plan import choose_memory_settings

    mem = choose_memory_settings(recipe, model, seq_len=max((len(r.input_ids) for r in data.train_rows), default=None),
                                 baseline=baseline, folder=loaded.folder, total_steps=total_steps,
                                 fast=t.fast and fast_path_runs(model, loaded))
    if not mem.fits:
        log.warning("predicted peak memory %.2f GB is over the budget of %.2f GB even with the leanest settings for "
                    "micro-batch %d x %d tokens; `qlorakit plan` shows a micro-batch and sequence length that fit",
                    mem.estimate.peak / 2**30, mem.budget_bytes / 2**30, t.micro_batch_size, recipe.data.max_seq_len)
    use_gc = mem.checkpointing
    if use_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    warmup = int(round(t.warmup_ratio * total_steps))
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = make_scheduler(opt, total_steps, warmup, t.schedule)
    state = TrainState()
    fingerprint = data_fingerprint(data.train_rows)
    metrics_path = run_dir / "metrics.jsonl"
    loss_fn = loss_fn_for(recipe)
    if t.fast:  # the fast path (train/fast.py, CPU and CUDA); it falls back to loss_fn_for's choice where unsupported
        from .fast import prepare_fast

        loss_fn = prepare_fast(model, recipe, loaded, checkpointing=use_gc, weights=mem.weights, total_steps=total_steps)

    if ckpt is not None:
        from ..lora import AdapterError, load_lora_state_dict, read_adapter_weights

        st = load_checkpoint_state(ckpt)
        if st.get("world_size", 1) != group.world:
            raise CheckpointError(
                f"{ckpt}: trained by {st.get('world_size', 1)} process(es), resumed by {group.world}; a step's "
                f"batch depends on the number of processes, so resume it with {st.get('world_size', 1)} "
                f"(qlorakit train --nproc {st.get('world_size', 1)} --resume {run_dir})")
        if st["data_fingerprint"] != fingerprint:
            raise CheckpointError(
                f"{ckpt}: the training data differs from the data this checkpoint was trained on; "
                "resume needs the same data files and data settings"
            )
        try:
            ckpt_lora = read_adapter_weights(ckpt / "adapter_model.safetensors")
        except AdapterError as e:
            older = sorted(p.name for p in ckpt.parent.glob("step-*") if p != ckpt and (p / "state.pt").is_file())
            hint = (f"; an older checkpoint is there ({', '.join(older)}): point {ckpt.parent / 'LATEST'} at it to "
                    "resume from it") if older else ""
            raise CheckpointError(f"{e}{hint}") from e
        load_lora_state_dict(model, ckpt_lora, where=str(ckpt))
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        state = TrainState(**st["train_state"])
        set_rng_state(st["rng_ranks"][group.rank] if "rng_ranks" in st else st["rng"])
        if group.main:
            _truncate_metrics(metrics_path, state.step)
        log.info("resumed %s at step %d", ckpt, state.step)

    if finished is not None:
        # training finished before the interruption: the final adapter and the state at its end, then
        # only the evaluation after training (below)
        from ..lora import load_lora_state_dict, read_adapter_weights

        if finished["data_fingerprint"] != fingerprint:
            raise CheckpointError(
                f"{run_dir / FINISHED_STATE}: the training data differs from the data this run was trained on; "
                "its evaluation needs the same data files and data settings")
        load_lora_state_dict(model, read_adapter_weights(run_dir / "adapter" / "adapter_model.safetensors"),
                             where=str(run_dir / "adapter"))
        state = TrainState(**finished["train_state"])
        total_steps = state.step
        log.info("%s: training finished at step %d; running the evaluation after it", run_dir, state.step)

    def write_adapter(folder: Path) -> None:
        save_adapter(model, folder, recipe.lora, base_name=loaded.name, metadata=ledger.get("adapter_metadata"))

    pad = loaded.tokenizer.pad_token_id
    bar = _progress(total_steps, state.step, t.progress and group.main)
    window_t, window_tok = time.perf_counter(), 0
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            micro = [sched_data.batch(state.micro + k) for k in range(per_step)]
            rows = [[data.train_rows[i] for i in idx] for idx in micro]  # the step's, over all processes
            n_loss = sum(r.n_loss_tokens for rs in rows for r in rs)
            step_loss = 0.0
            for rs in rows[group.rank * t.grad_accum:(group.rank + 1) * t.grad_accum]:  # this process's share
                batch = {k: v.to(loaded.device) for k, v in collate(rs, pad).items()}
                with autocast_ctx(loaded):
                    s, _ = loss_fn(model, batch)
                (s / max(1, n_loss)).backward()
                step_loss += float(s.detach())
            (step_loss,) = group.sum_grads_(params, [step_loss])
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
            lr = float(opt.param_groups[0]["lr"])  # the rate this step uses (the scheduler then sets the next)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            real = sum(r.n_real for rs in rows for r in rs)
            state.step += 1
            state.micro += per_step
            state.tokens += real
            dt = time.perf_counter() - t0
            state.elapsed += dt
            window_tok += real
            loss = step_loss / max(1, n_loss)
            if group.main and (state.step % t.log_every == 0 or state.step == total_steps):
                now = time.perf_counter()
                tps = window_tok / max(1e-9, now - window_t)
                window_t, window_tok = now, 0
                _append_metrics(metrics_path, {
                    "step": state.step, "loss": round(loss, 6), "lr": lr,
                    "grad_norm": round(gnorm, 6), "tokens": state.tokens, "tokens_per_s": round(tps, 1),
                    "step_time_s": round(dt, 4), "elapsed_s": round(state.elapsed, 2),
                    "epoch": round(state.micro / sched_data.batches_per_epoch, 4),
                    "rss_mb": round(current_rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                })
                bar.set_postfix_str(f"loss {loss:.3f}, {tps:.0f} tok/s", refresh=False)
            bar.update(1)
            if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < total_steps:
                rngs = group.gather(rng_state())  # every process's, to resume each exactly
                if group.main:
                    save_checkpoint(run_dir / "checkpoints", state.step, write_adapter, {
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "train_state": state.__dict__.copy(), "rng": rngs[0],
                        **({"rng_ranks": rngs} if group.active else {}), "world_size": group.world,
                        "data_fingerprint": fingerprint, "total_steps": total_steps,
                    }, t.keep_checkpoints)
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()

    if group.active:
        group.barrier()  # every process has trained every step
        group.close()
        if not group.main:
            return run_dir
        # the others are done: the evaluation after training takes this machine's cores
        torch.set_num_threads(recipe.train.threads or cores_per_process(1))
    if use_gc:
        model.gradient_checkpointing_disable()
    if finished is None:
        # the state at the end of training, with which `--resume` can still run the evaluation after it,
        # then the final adapter: written complete under a temporary name, then renamed
        write_atomic(run_dir / FINISHED_STATE, json.dumps({
            "train_state": state.__dict__.copy(), "data_fingerprint": fingerprint, "total_steps": total_steps}, indent=2) + "\n")
        tmp = run_dir / ".adapter.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        write_adapter(tmp)
        final = run_dir / "adapter"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)

    if finish:
        from .report import finish_run

        # the evaluation after training keeps within the memory training took (and the budget):
        # the optimizer's state goes first, and the evaluation sizes its buffers to what is left
        cap = min(mem.budget_bytes, max(mem.estimate.peak, peak_rss_mb() * 2**20))
        del opt, sched
        finish_run(run_dir, recipe, loaded, model, data, ledger, state, targets, loss_fn=loss_fn, memory_cap=cap,
                   processes=group.world)
    return run_dir
