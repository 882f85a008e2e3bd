"""``qlorakit plan``: the predicted peak memory, step time, tokens/s and total time of a run on
this machine, and the settings that fit a memory budget, before the run starts.

Memory comes from the model's configuration and counts what the fast path keeps
(:func:`qlorakit.train.memory.estimate_memory`), plus this machine's process baseline measured
here; the peak is the highest of loading, training and the evaluation that ``qlorakit train`` runs
after training in the same process (which sizes its buffers to what training took). Time comes from a short calibration on this machine: one and six decoder layers of the
model's exact shape (random weights, quantized to NF4, LoRA attached as the recipe says) run
forward and backward on micro-batches taken from the recipe's own data, so packing and segment
lengths are the real ones; the output head with the real vocabulary and the optimizer step are
timed on their own. The step time is ``fixed + layers x per-layer + head + optimizer``.

Settings are tried from the fastest to the leanest until the predicted peak fits the budget:
keep every activation, then recompute them (checkpointing), then dequantize the base weights per
use instead of holding a bf16 copy, then smaller micro-batches (more accumulation, same tokens per
step), then shorter sequences.

    qlorakit plan                                   # the default recipe
    qlorakit plan my.yaml train.micro_batch_size=8 --budget-gb 4
    qlorakit plan --nproc 2                         # data parallel in 2 processes (qlorakit train --nproc 2)

With ``--nproc N`` the settings are one process's: each gets its share of the budget and of the
cores (its thread count is what the calibration runs with) and trains ``train.grad_accum``
micro-batches of every step, so a step holds N times the tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .memory import (
    LINEAR_KINDS,
    MemoryEstimate,
    ModelShape,
    adapted_linears,
    current_rss_bytes,
    estimate_memory,
    memory_budget_bytes,
)

__all__ = [
    "Settings",
    "Calibration",
    "Plan",
    "choose_fast_options",
    "choose_memory_settings",
    "MemoryChoice",
    "calibrate",
    "predict_step_time",
    "plan_run",
    "plan_recipe",
    "plan_main",
    "compile_pays",
    "model_precision",
    "lora_sites",
]

log = logging.getLogger(__name__)
GB = 2**30
COMPILE_SECONDS = 60.0  # first-time inductor compile of the fast path's kernels on a 2-core CPU
CALIBRATION_LAYERS = 6  # the calibration times 1 and at least this many decoder layers
# ... and the model's full depth when one call of it is predicted to take at most this long: a
# difference of two timings is multiplied by depth / (layers timed - 1) in the prediction, so the
# machine's jitter in a 6-layer calibration of a 30-layer model came back five times over
# (predicted steps of the same 135M model at seq 256/512/1024: 3.42, 3.19, 4.00 s). 12 s keeps
# the 360M shape (about 7 s a call at seq 1024) clear of the edge: at 8 s, one layer x 32 came out
# on either side of it from run to run, and the two ways of calibrating took turns.
FULL_DEPTH_CALL_SECONDS = 12.0
WARMUP_CALLS = 2  # calls of a fresh calibration model left out of its timing (see _time)
PAIRED_REPEATS = 5  # pairs of (1 layer, CALIBRATION_LAYERS layers) calls when the depth is extrapolated
CALIBRATION_SAMPLE_ROWS = 256  # rows the calibration micro-batch is chosen from


# the fast path's matmul precisions: bf16, or fp32 on CPUs without bf16 instructions
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _precision(dtype: torch.dtype) -> str:
    """The fast path's precision for a compute dtype ("fp32" for fp32, else "bf16")."""
    return "fp32" if dtype == torch.float32 else "bf16"


@dataclass(frozen=True)
class Settings:
    micro_batch: int
    grad_accum: int
    seq_len: int
    checkpointing: bool
    weights: str  # "cache" | "per-use"
    compile: bool
    precision: str = "bf16"  # of the fast path's matmuls: "bf16", or "fp32" on CPUs without bf16 instructions

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x {self.seq_len} tokens, grad-accum {self.grad_accum}, "
                f"checkpointing {'on' if self.checkpointing else 'off'}, base weights "
                f"{self.precision + ' copy' if self.weights == 'cache' else 'dequantized per use'}, "
                f"compile {'on' if self.compile else 'off'}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]

    @property
    def act_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8


@dataclass
class Calibration:
    """Measured seconds per micro-batch on this machine for one set of shapes and settings."""

    fixed_s: float  # embedding, rotary tables, segments, final norm (per micro-batch)
    layer_s: float  # one decoder layer, forward and backward
    head_s: float  # output head and cross-entropy, forward and backward
    optimizer_s: float  # clipping and one AdamW step over every LoRA parameter
    tokens: int  # tokens per micro-batch measured
    loss_tokens: int
    compile_s: float = 0.0  # first-call overhead seen in the calibration (compiling)


@dataclass
class Plan:
    model: str
    shape: dict[str, Any]
    settings: Settings
    budget_bytes: float
    memory: dict[str, float]
    peak_bytes: float
    load_peak_bytes: float
    fits: bool
    eval_peak_bytes: float = 0.0
    step_s: float | None = None
    tokens_per_step: float = 0.0
    tokens_per_s: float | None = None
    total_steps: int = 0
    total_s: float | None = None
    calibration: dict[str, Any] | None = None
    tried: list[str] = field(default_factory=list)
    asked_seq_len: int = 0  # the sequence length planned for (the chosen one may be shorter)
    # data parallel training (``qlorakit train --nproc N``): each of ``processes`` processes on this
    # machine trains ``settings`` (its share of every step) within ``budget_bytes / processes`` and
    # ``threads`` threads; memory figures are one process's, tokens per step and per second all of them
    processes: int = 1
    threads: int = 0

    @property
    def process_budget_bytes(self) -> float:
        return self.budget_bytes / self.processes

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["settings"] = asdict(self.settings)
        d["train_overrides"] = self.train_overrides()
        return d

    def train_overrides(self) -> list[str]:
        """The ``qlorakit train`` settings that run this plan: micro-batch, accumulation, checkpointing,
        the budget (from which the run chooses the base weights' form as the plan did) and, when the
        plan had to shorten it, the sequence length."""
        s = self.settings
        out = [f"train.micro_batch_size={s.micro_batch}", f"train.grad_accum={s.grad_accum}",
               f"train.gradient_checkpointing={'on' if s.checkpointing else 'off'}",
               f"train.memory_budget_gb={_budget_text(self.budget_bytes)}"]
        if self.asked_seq_len and s.seq_len < self.asked_seq_len:
            out.insert(0, f"data.max_seq_len={s.seq_len}")
        return out


def _budget_text(budget_bytes: float) -> str:
    """The budget in GB as ``train.memory_budget_gb`` takes it: rounded down (never above the budget
    the plan was made for, never to 0) to the kB, without float noise or trailing zeros."""
    gb = max(1, math.floor(budget_bytes / GB * 1e6)) / 1e6
    return f"{gb:.6f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------------------------
# calibration


def _calibration_model(shape: ModelShape, layers: int, r: int, alpha: float, dropout: float, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, adapted: dict[str, int] | None = None):
    """A random ``layers``-layer Llama of ``shape`` with an NF4 base and LoRA on the linears that
    ``adapted`` (:func:`qlorakit.train.memory.adapted_linears`) counts in any layer, in every layer
    (None, or none counted: every linear)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..config import LoraConfig
    from ..lora import attach_lora, lora_parameters
    from ..quant import quantize_decoder_linears

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_hidden_layers=layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                      vocab_size=256, tie_word_embeddings=True, max_position_embeddings=1 << 16)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)  # fp32, as the loader leaves norms and embeddings
    quantize_decoder_linears(model, compute_dtype=dtype)
    model.config.use_cache = False
    kinds = [k for k in LINEAR_KINDS if (adapted or {}).get(k, 0) > 0]
    attach_lora(model, LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=kinds or ["all-linear"]))
    params = lora_parameters(model)
    for p in params:
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(True)
    model.train()
    return model, params


def lora_sites(config: Any, targets: Any) -> dict[str, int]:
    """:func:`qlorakit.train.memory.adapted_linears` for ``lora.targets`` on a model of ``config``:
    the targets are matched by :func:`qlorakit.lora.attach_lora` itself, on the model built on the
    meta device (no memory, no weights), so the planner adapts what a run adapts, and a target list
    that matches nothing gets the run's own error."""
    from transformers import AutoModelForCausalLM

    from ..config import LoraConfig
    from ..lora import attach_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return adapted_linears(attach_lora(model, LoraConfig(r=1, targets=list(targets))), config.num_hidden_layers)


def _lora_shapes(shape: ModelShape, r: int, adapted: dict[str, int] | None = None) -> list[tuple[int, int]]:
    """(rows, cols) of every LoRA A and B of the model: on the linears ``adapted`` counts (None:
    q, k, v, o, gate, up, down in every layer)."""
    adapted = adapted if adapted is not None else dict.fromkeys(LINEAR_KINDS, shape.layers)
    return [dims for kind, (fan_in, fan_out) in shape.linear_dims().items() for _ in range(adapted.get(kind, 0))
            for dims in ((r, fan_in), (fan_out, r))]


def _once(fn: Any) -> float:
    """Seconds of one call of ``fn``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _time(fn: Any, repeats: int, warmup: int = WARMUP_CALLS) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` calls after ``warmup`` calls). The median, not the
    best: a run's steps meet the machine as it is, and the best of a few calls predicted steps 10-20%
    short. Two calls are left out, not one: the second call of a fresh model is still about half as
    slow again as the later ones (360M, seq 1024, full depth: 15.1, 10.1, then 6.7-7.7 s), as a
    run's second step is, and a median of three that took it in came out high."""
    skip = max(1, warmup)  # the first call is always left out: it compiles
    times = [_once(fn) for _ in range(skip + repeats)]
    rest = sorted(times[skip:])
    return times[0], rest[len(rest) // 2]


def _paired_layer_time(run_few: Any, run_more: Any, extra_layers: int, pairs: int) -> tuple[float, float, float, float]:
    """(first call of ``run_more``, seconds per extra layer, median ``run_few``, median ``run_more``)
    from ``pairs`` calls of each in turn, after two warmup calls of ``run_more`` (``run_few`` is
    warm already). The layer time is the median of the pairs' differences."""
    first = _once(run_more)
    for _ in range(WARMUP_CALLS - 1):  # the second call is slow too (see _time)
        _once(run_more)
    few_s, more_s = [], []
    for _ in range(pairs):
        few_s.append(_once(run_few))
        more_s.append(_once(run_more))
    layer_s = max(0.0, statistics.median((b - a) / extra_layers for a, b in zip(few_s, more_s)))
    return first, layer_s, statistics.median(few_s), statistics.median(more_s)


def _fast_options(settings: Settings) -> Any:
    from .fast import FastOptions

    return FastOptions(weights=settings.weights, checkpointing=settings.checkpointing, compile=settings.compile,
                       dtype=settings.dtype)


def _layers_run(shape: ModelShape, n_layers: int, batch: dict[str, torch.Tensor], r: int, alpha: float,
                dropout: float, settings: Settings, adapted: dict[str, int] | None, seed: int = 0) -> Any:
    """A call that runs ``n_layers`` layers of a fresh calibration model forward and backward on ``batch``."""
    from .fast import FastModel

    model, _ = _calibration_model(shape, n_layers, r, alpha, dropout, seed=seed, dtype=settings.dtype, adapted=adapted)
    fm = FastModel(model, _fast_options(settings), pad_token_id=None)
    vocab_batch = dict(batch, input_ids=batch["input_ids"] % 256)  # the calibration model's vocabulary

    def run() -> None:
        h, _ = fm.hidden(vocab_batch)
        h.float().sum().backward()

    return run


def _loss_positions(batch: dict[str, torch.Tensor]) -> int:
    from ..data.templating import IGNORE_INDEX
    from .loss import shift_labels

    return int((shift_labels(batch["labels"]).reshape(-1) != IGNORE_INDEX).sum())


def _head_run(shape: ModelShape, n_loss: int, settings: Settings) -> Any:
    """A call that runs the output head (the real vocabulary) and its loss over ``n_loss`` positions
    forward and backward."""
    from .fast import fused_head_loss, head_workspace

    chunk = _fast_options(settings).loss_chunk
    n = max(1, n_loss)
    torch.manual_seed(0)
    w = (torch.randn(shape.vocab, shape.hidden) * 0.02).to(settings.dtype)
    h = torch.randn(n, shape.hidden).to(settings.dtype).requires_grad_(True)
    tgt = torch.randint(0, shape.vocab, (n,))
    # the logits buffer is reused from call to call, as the training step reuses it (a fresh one
    # per call costs the kernel's page mapping, about a tenth of the head's time)
    logits = head_workspace(n, chunk, shape.vocab, "cpu", dtype=settings.dtype)

    def run() -> None:
        fused_head_loss(h, w, tgt, chunk, compiled=settings.compile, workspace=logits).backward()

    return run


def calibrate(shape: ModelShape, batches: list[dict[str, torch.Tensor]], *, r: int, alpha: float, dropout: float,
              settings: Settings, repeats: int = 3, adapted: dict[str, int] | None = None) -> Calibration:
    """Time the fast path's pieces for ``shape`` on ``batches`` (one micro-batch each, real data);
    ``adapted``: the linears with LoRA (:func:`qlorakit.train.memory.adapted_linears`; None: all)."""
    batch = batches[0]

    def layers_fn(n_layers: int):
        return _layers_run(shape, n_layers, batch, r, alpha, dropout, settings, adapted)

    # the full depth when it is quick enough (see FULL_DEPTH_CALL_SECONDS), so nothing is extrapolated;
    # otherwise the difference of 1 and CALIBRATION_LAYERS layers: it divides the timing noise, and the
    # layers' working set then outgrows the caches as the real depth does (3 layers predicted 135M
    # steps 15-29% short)
    few, more = 1, min(CALIBRATION_LAYERS, max(2, shape.layers))
    run_few = layers_fn(few)
    first, per_few = _time(run_few, repeats)
    if per_few * shape.layers <= FULL_DEPTH_CALL_SECONDS:
        more = max(more, shape.layers)
        del run_few
        first_more, per_more = _time(layers_fn(more), repeats)
        layer_s = max(0.0, (per_more - per_few) / (more - few))
    else:
        # the two models are timed in turn, and the layer time is the median of the pairs'
        # differences: a drift of the shared machine's speed during the calibration then falls on
        # both sides of each difference, where timing one model and then the other put it on one
        # side only, times depth / (more - few) in the prediction (1.7B, the same configuration
        # planned twice minutes apart: 58.8 and 42.8 s, against 44.0 and 39.4 s measured)
        first_more, layer_s, per_few, per_more = _paired_layer_time(run_few, layers_fn(more), more - few,
                                                                     max(repeats, PAIRED_REPEATS))
        del run_few
    compile_s = max(0.0, first - per_few, first_more - per_more)
    fixed_s = max(0.0, per_few - few * layer_s)

    # the output head: the real vocabulary, the real number of loss positions
    n_loss = _loss_positions(batch)
    _, head_s = _time(_head_run(shape, n_loss, settings), repeats)

    # the optimizer: clipping and AdamW over every LoRA tensor of the full model, in their real
    # shapes (one flat tensor of the same size took a quarter of the time: the per-tensor work is
    # most of it at these sizes)
    params = [torch.nn.Parameter(torch.zeros(rows, cols)) for rows, cols in _lora_shapes(shape, r, adapted)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()

    _, opt_s = _time(step, repeats)
    del params, opt
    tokens = int(batch["input_ids"].numel())
    return Calibration(fixed_s, layer_s, head_s, opt_s, tokens, n_loss, compile_s)


OTHER_PROCESS_READY_S = 600.0  # how long the calibration waits for the other processes' first step


def _other_process(shape: ModelShape, batch: dict[str, torch.Tensor], r: int, alpha: float, dropout: float,
                   settings: Settings, adapted: dict[str, int] | None, threads: int, ready: Any, stop: Any) -> None:
    """The work of one more training process of a data parallel run, for as long as the calibration
    times the first: the model's layers (up to :data:`CALIBRATION_LAYERS` of them) and the output
    head, forward and backward, on the same micro-batch with the same threads. ``ready`` is set once
    the first round has run (the model is built and its kernels warm)."""
    torch.set_num_threads(threads)
    layers = _layers_run(shape, min(CALIBRATION_LAYERS, shape.layers), batch, r, alpha, dropout, settings, adapted,
                         seed=1)
    head = _head_run(shape, _loss_positions(batch), settings)
    while not stop.is_set():
        layers()
        head()
        ready.set()


class _OtherProcesses:
    """``count`` more processes doing a training process's work (:func:`_other_process`) while the
    block runs: processes of one machine contend for its memory bandwidth and caches (and, where its
    cores are hyperthreads, for the cores themselves), so one process timed alone on an idle machine
    predicted the step of two processes on a 2-core machine 27% short."""

    def __init__(self, count: int, *args: Any) -> None:
        self.count, self.args, self.procs = count, args, []

    def __enter__(self) -> "_OtherProcesses":
        import multiprocessing

        if self.count < 1:
            return self
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        readies = []
        for _ in range(self.count):
            ready = ctx.Event()
            proc = ctx.Process(target=_other_process, args=(*self.args, ready, self.stop), daemon=True)
            proc.start()
            self.procs.append(proc)
            readies.append(ready)
        deadline = time.monotonic() + OTHER_PROCESS_READY_S
        for proc, ready in zip(self.procs, readies):
            while not ready.wait(1.0):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    why = (f"exited with code {proc.exitcode}" if not proc.is_alive()
                           else f"did not start within {OTHER_PROCESS_READY_S:.0f} s")
                    raise RuntimeError(f"the calibration's other training process {why}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.procs:
            return
        self.stop.set()
        for proc in self.procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs = []


def predict_step_time(shape: ModelShape, cal: Calibration, grad_accum: int) -> float:
    """Seconds per optimizer step: ``grad_accum`` micro-batches and one optimizer step (of one
    process, when several train data parallel: each runs its share at the same time)."""
    micro = cal.fixed_s + shape.layers * cal.layer_s + cal.head_s
    return grad_accum * micro + cal.optimizer_s


# --------------------------------------------------------------------------------------------
# choosing settings


def _candidates(mbs: int, seq: int, accum: int, gc_mode: str, compile_: bool, precision: str = "bf16") -> list[Settings]:
    """From the fastest to the leanest."""
    out: list[Settings] = []
    gcs = {"on": [True], "off": [False]}.get(gc_mode, [False, True])
    m, a = mbs, accum
    s = seq
    while True:
        for weights in ("cache", "per-use"):
            for gc in gcs:
                out.append(Settings(m, a, s, gc, weights, compile_, precision))
        if m > 1:  # smaller micro-batches, more of them: the same tokens per optimizer step
            m, a = (m // 2, a * 2) if m % 2 == 0 else (1, a * m)
        elif s > 128:
            s //= 2
        else:
            return out


def compile_pays(shape: ModelShape, tokens_total: float) -> bool:
    """Whether to compile the fast path's elementwise kernels with inductor.

    Uncompiled, those chains run as one slow pass per op (bf16 elementwise ops are several times
    slower than fp32 ones in eager PyTorch on CPUs): measured on the packaged model, the eager fast
    path takes about twice as long per step. Compiling costs about a minute the first time and a few
    seconds once inductor's on-disk cache holds the kernels, so it pays for any real model; only toy
    models (hidden size below 256, as in tests) and very short runs stay eager.
    """
    from .kernels import compile_available

    if not compile_available() or shape.hidden < 256:
        return False
    seconds = tokens_total * 4 * shape.matmul_params / 2e12  # the run's matmul work at ~2 TFLOP/s
    return seconds > 10.0


def model_precision(model: Any) -> str:
    """The fast path's matmul precision for ``model``: "fp32" when its 4-bit linears compute in fp32
    (what the loader picks on CPUs without bf16 instructions), else "bf16"."""
    from ..quant import is_linear4bit

    for m in model.modules():
        if is_linear4bit(m):
            return _precision(m.compute_dtype)
    return "bf16"


@dataclass
class MemoryChoice:
    """Checkpointing and the base weights' form for a run's own micro-batch and sequence length."""

    checkpointing: bool
    weights: str  # "cache" | "per-use"
    estimate: MemoryEstimate
    budget_bytes: float
    fits: bool


def choose_memory_settings(recipe: Any, model: Any, *, seq_len: int | None = None, baseline: float | None = None,
                           folder: Path | None = None, total_steps: int | None = None,
                           fast: bool = True, checkpointing: bool | None = None) -> MemoryChoice:
    """What ``qlorakit train`` runs with: of the planner's candidates at the recipe's own micro-batch
    and sequence length (``seq_len``: the longest training row, default ``data.max_seq_len``), the
    first, fastest first, whose predicted peak fits the memory budget; the leanest when none does.
    ``gradient_checkpointing`` 'on' or 'off' is kept as the recipe says (``checkpointing``, when
    given, in place of the recipe's setting).

    With ``baseline`` (the process before the base model loaded, as ``qlorakit plan`` measures it)
    and ``folder`` (the base model's files) the estimate is the planner's own, so that a run makes
    the choice its plan showed. Without them the process as it is now stands in for the baseline,
    the loaded model already in it: a larger estimate, so never a choice that fits less.
    """
    from ..lora import lora_layers

    shape = ModelShape.from_config(model.config)
    t = recipe.train
    seq = seq_len or recipe.data.max_seq_len
    # the adapters the run attached (or, before they are, the ones the recipe's targets give)
    attached = [name for name, _ in lora_layers(model)]
    adapted = (adapted_linears(attached, shape.layers) if attached
               else lora_sites(model.config, recipe.lora.targets))
    steps = total_steps or t.max_steps or 100
    compile_ = compile_pays(shape, steps * t.micro_batch_size * seq * t.grad_accum)
    file_bytes = _file_bytes(folder) if folder is not None else 0.0
    base = float(current_rss_bytes()) if baseline is None else baseline
    budget = memory_budget_bytes(recipe)
    gc_mode = t.gradient_checkpointing if checkpointing is None else ("on" if checkpointing else "off")
    precision = model_precision(model)
    cands = [c for c in _candidates(t.micro_batch_size, seq, t.grad_accum, gc_mode, compile_, precision)
             if c.micro_batch == t.micro_batch_size and c.seq_len == seq and (fast or c.weights == "cache")]
    for c in cands:
        e = estimate_memory(shape, micro_batch=c.micro_batch, seq_len=seq, r=recipe.lora.r, checkpointing=c.checkpointing,
                            weights=c.weights, fast=fast, baseline=base, file_bytes=file_bytes,
                            compiled=c.compile, act_bytes=c.act_bytes,
                            adapted=adapted)
        if e.peak <= budget:
            return MemoryChoice(c.checkpointing, c.weights, e, budget, True)
    return MemoryChoice(c.checkpointing, c.weights, e, budget, False)


def choose_fast_options(recipe: Any, model: Any, *, checkpointing: bool, weights: str | None = None,
                        total_steps: int | None = None) -> Any:
    """The fast path's settings for a run that is about to start (used by :func:`prepare_fast`).

    ``weights``: the base weights' form chosen with the checkpointing; when None, it is chosen here the
    same way (:func:`choose_memory_settings`, with this checkpointing). The elementwise kernels are
    compiled when the run is long enough to pay for it.
    """
    from .fast import FastOptions

    shape = ModelShape.from_config(model.config)
    t = recipe.train
    tokens_step = t.micro_batch_size * recipe.data.max_seq_len * t.grad_accum
    steps = total_steps or t.max_steps or 100
    budget = memory_budget_bytes(recipe)
    if weights is None:
        weights = choose_memory_settings(recipe, model, checkpointing=checkpointing, total_steps=total_steps).weights
    dtype = PRECISION_DTYPES[model_precision(model)]
    return FastOptions(weights=weights, checkpointing=checkpointing, compile=compile_pays(shape, steps * tokens_step),
                       trim_above=0.9 * budget, dtype=dtype)


# --------------------------------------------------------------------------------------------
# the plan


def _file_bytes(folder: Path) -> float:
    """Bytes of the weight files the loader reads whole: a ``.bin`` checkpoint's (safetensors files,
    which transformers prefers where both are, are read tensor by tensor)."""
    if any(folder.glob("*.safetensors")):
        return 0.0
    return float(sum(p.stat().st_size for p in folder.glob("*.bin")))


def _baseline_bytes() -> float:
    """The process before the base model loads: interpreter, torch, transformers, peft, bitsandbytes."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    return float(current_rss_bytes())


def _memory(shape: ModelShape, s: Settings, r: int, baseline: float, file_bytes: float,
            adapted: dict[str, int] | None = None) -> MemoryEstimate:
    return estimate_memory(shape, micro_batch=s.micro_batch, seq_len=s.seq_len, r=r,
                           checkpointing=s.checkpointing, weights=s.weights, baseline=baseline,
                           file_bytes=file_bytes, compiled=s.compile, act_bytes=s.act_bytes, adapted=adapted)


def _segment_work(position_ids: torch.Tensor) -> int:
    """Attention work of one row: the sum of its packed segments' squared lengths."""
    from .attention import segments_from_positions

    return sum((e - s) ** 2 for s, e in segments_from_positions(position_ids))


def _trim(batch: dict[str, torch.Tensor], micro_batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A calibration micro-batch of the chosen shape from a larger or longer real one.

    From more rows than a micro-batch it takes the rows whose mean attention work (squared segment
    lengths, which vary with the packing far more than token counts do) is closest to the mean of
    the whole sample: a run's typical micro-batch, not its first.
    """
    rows = batch["input_ids"].shape[0]
    pos = batch.get("position_ids")
    if rows > micro_batch and pos is not None:
        work = [_segment_work(pos[i, :seq_len]) for i in range(rows)]
        order = sorted(range(rows), key=lambda i: work[i])
        mean = sum(work) / rows
        best = min(range(rows - micro_batch + 1),
                   key=lambda s: abs(sum(work[i] for i in order[s:s + micro_batch]) / micro_batch - mean))
        pick = torch.tensor(sorted(order[best:best + micro_batch]))
        batch = {k: v[pick] for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        v = v[:micro_batch, :seq_len]
        if v.shape[0] < micro_batch:  # repeat rows to reach the micro-batch
            reps = math.ceil(micro_batch / v.shape[0])
            v = v.repeat(reps, 1)[:micro_batch]
        out[k] = v.contiguous()
    return out


def plan_run(shape: ModelShape, *, model_name: str, micro_batch: int, seq_len: int, grad_accum: int, r: int,
             alpha: float, dropout: float, budget_bytes: float, sample: dict[str, torch.Tensor] | None,
             total_steps: int = 0, tokens_per_step: float | None = None, gradient_checkpointing: str = "auto",
             compile_: bool | None = None, calibrate_time: bool = True, file_bytes: float = 0.0,
             baseline: float | None = None, precision: str = "bf16", adapted: dict[str, int] | None = None,
             processes: int = 1, threads: int | None = None) -> Plan:
    """Choose settings that fit ``budget_bytes`` and predict memory and time for them.

    ``sample`` is real data (input_ids, labels, position_ids) at the requested sequence length, one
    micro-batch or more rows (a typical micro-batch of them is taken, see :func:`_trim`), used for
    the time calibration; ``tokens_per_step`` is the real (non-padding) tokens of one
    optimizer step at the requested size (default: every position); ``precision`` the fast path's
    matmul precision, "bf16" or "fp32" (CPUs without bf16 instructions); ``adapted`` the linears
    with LoRA (:func:`lora_sites` of the recipe's ``lora.targets``; None: every linear), which the
    LoRA weights, their optimizer state and activations, and the calibration model's adapters follow.

    ``processes``: training processes on this machine (``qlorakit train --nproc``); each gets
    ``budget_bytes / processes`` and trains ``grad_accum`` micro-batches of every step (with
    ``tokens_per_step`` one process's share), calibrated with ``threads`` threads (default: its
    share of the cores, as the run takes them) while ``processes - 1`` more processes do the same
    work (:class:`_OtherProcesses`).
    """
    from .distributed import cores_per_process

    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    threads = threads or cores_per_process(processes)
    total_budget, budget_bytes = budget_bytes, budget_bytes / processes
    base = _baseline_bytes() if baseline is None else baseline
    want_tokens = micro_batch * seq_len * grad_accum
    real_step = float(tokens_per_step if tokens_per_step is not None else want_tokens)
    if compile_ is None:
        compile_ = compile_pays(shape, max(1, total_steps or 100) * want_tokens)
    tried: list[str] = []
    chosen: Settings | None = None
    est: MemoryEstimate | None = None
    for s in _candidates(micro_batch, seq_len, grad_accum, gradient_checkpointing, compile_, precision):
        e = _memory(shape, s, r, base, file_bytes, adapted)
        tried.append(f"{s.describe()}: {e.peak / GB:.2f} GB")
        if e.peak <= budget_bytes:
            chosen, est = s, e
            break
    fits = chosen is not None
    if chosen is None:  # nothing fits: report the leanest
        chosen = _candidates(micro_batch, seq_len, grad_accum, gradient_checkpointing, compile_, precision)[-1]
        est = _memory(shape, chosen, r, base, file_bytes, adapted)
    plan = Plan(model=model_name, shape=asdict(shape), settings=chosen, budget_bytes=total_budget,
                memory=dict(est.parts), peak_bytes=est.peak, load_peak_bytes=est.load_peak, fits=fits, eval_peak_bytes=est.eval_peak,
                total_steps=total_steps, tried=tried, asked_seq_len=seq_len, processes=processes, threads=threads)
    # tokens per optimizer step stay what was asked for, unless the sequence had to be shortened
    plan.tokens_per_step = processes * real_step * (chosen.seq_len / seq_len)
    if calibrate_time and sample is not None:
        cal_batch = _trim(sample, chosen.micro_batch, chosen.seq_len)
        # with checkpointing the calibration's layers recompute their forward too: it is in layer_s
        was = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            # the other processes of a data parallel run train alongside, as they will
            with _OtherProcesses(processes - 1, shape, cal_batch, r, alpha, dropout, chosen, adapted, threads):
                cal = calibrate(shape, [cal_batch], r=r, alpha=alpha, dropout=dropout, settings=chosen, adapted=adapted)
        finally:
            torch.set_num_threads(was)
        plan.step_s = predict_step_time(shape, cal, chosen.grad_accum)
        plan.tokens_per_s = plan.tokens_per_step / plan.step_s
        plan.total_s = plan.step_s * total_steps if total_steps else None
        plan.calibration = asdict(cal)
    return plan


def plan_recipe(recipe: Any, *, budget_bytes: float | None = None, calibrate_time: bool = True,
                processes: int = 1) -> Plan:
    """Plan the run ``recipe`` describes: its model, its data, its settings; ``processes``: run
    data parallel in that many processes on this machine (``qlorakit train --nproc``)."""
    from transformers import AutoConfig

    from ..data import prepare_data
    from ..data.packing import BatchSchedule, collate
    from ..models import load_tokenizer, resolve_base
    from .loop import TrainError

    folder, name = resolve_base(recipe.model.base)
    cfg = AutoConfig.from_pretrained(str(folder))
    shape = ModelShape.from_config(cfg)
    tok = load_tokenizer(folder)
    data = prepare_data(recipe.data, tok, recipe.seed)
    rows = data.train_rows
    if not rows:
        raise TrainError("data.train: no training rows after preparation; nothing to plan")
    t = recipe.train
    sched = BatchSchedule(len(rows), t.micro_batch_size, recipe.seed)
    # a step takes grad_accum micro-batches in each process (the training loop's count)
    per_step = t.grad_accum * processes
    total = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(sched.batches_per_epoch / per_step)))
    real_per_row = sum(r.n_real for r in rows) / len(rows)
    tokens_per_step = real_per_row * t.micro_batch_size * t.grad_accum
    # the calibration sample: rows of the longest length, as the run's slowest micro-batches (packed
    # rows all have it); the calibration takes a micro-batch of typical attention work among them
    top = max(len(r.input_ids) for r in rows)
    longest = [r for r in rows if len(r.input_ids) == top][:CALIBRATION_SAMPLE_ROWS]
    if len(longest) < t.micro_batch_size:
        longest = sorted(rows, key=lambda r: -len(r.input_ids))[:t.micro_batch_size]
    sample = collate(longest, tok.pad_token_id)
    seq = sample["input_ids"].shape[1]
    budget = budget_bytes if budget_bytes is not None else memory_budget_bytes(recipe)  # this machine's, all processes'
    from ..models.loader import pick_compute_dtype

    precision = _precision(pick_compute_dtype(recipe.model, torch.device("cpu")))
    return plan_run(shape, model_name=name, micro_batch=t.micro_batch_size, seq_len=max(seq, 1),
                    grad_accum=t.grad_accum, r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                    budget_bytes=budget, sample=sample, total_steps=total, tokens_per_step=tokens_per_step,
                    gradient_checkpointing=t.gradient_checkpointing, calibrate_time=calibrate_time,
                    file_bytes=_file_bytes(folder), precision=precision,
                    adapted=lora_sites(cfg, recipe.lora.targets), processes=processes, threads=t.threads)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_plan(p: Plan, recipe_path: str | None = None, overrides: list[str] = ()) -> str:
    """The plan as text; ``recipe_path`` and ``overrides`` (what the plan was asked for) go into the
    ``qlorakit train`` command that runs it, the plan's own settings replacing overrides of the same keys."""
    ours = p.train_overrides()
    keys = {o.split("=", 1)[0] for o in ours}
    args = [*([recipe_path] if recipe_path else []), *(o for o in overrides if o.split("=", 1)[0] not in keys), *ours]
    several = p.processes > 1
    run = " ".join(["qlorakit train", *([f"--nproc {p.processes}"] if several else []), *(shlex.quote(a) for a in args)])
    lines = [f"plan for {p.model} ({p.shape['layers']} layers, hidden {p.shape['hidden']}, vocab {p.shape['vocab']})",
             f"  settings      {p.settings.describe()}"
             + (f", in each of {p.processes} processes ({p.threads} thread{'s' if p.threads > 1 else ''} each)"
                if several else ""),
             f"  to run it     {run}",
             f"  memory        predicted peak {p.peak_bytes / GB:.2f} GB{' per process' if several else ''} "
             f"(training {sum(p.memory.values()) / GB:.2f} GB, "
             f"loading {p.load_peak_bytes / GB:.2f} GB, evaluation after training {p.eval_peak_bytes / GB:.2f} GB), "
             + (f"budget {p.process_budget_bytes / GB:.2f} GB per process; {p.processes} processes "
                f"{p.processes * p.peak_bytes / GB:.2f} GB in all, budget {p.budget_bytes / GB:.2f} GB"
                if several else f"budget {p.budget_bytes / GB:.2f} GB")
             + ("" if p.fits else "  -- DOES NOT FIT even with the leanest settings")]
    for k, v in p.memory.items():
        lines.append(f"      {v / 2**20:9.0f} MB  {k}")
    if p.step_s is not None:
        lines += [f"  step time     {p.step_s:.2f} s ({p.tokens_per_step:.0f} tokens per step"
                  + (", all processes; one gradient all-reduce per step not counted)" if several else ")"),
                  f"  throughput    {p.tokens_per_s:.0f} tokens/s",
                  f"  total         {_fmt_s(p.total_s)} for {p.total_steps} steps"
                  + (f" (+ about {_fmt_s(p.calibration['compile_s'])} compiling once)"
                     if p.calibration and p.calibration.get("compile_s", 0) > 5 else "")]
    else:
        lines.append(f"  time          not calibrated ({p.total_steps} steps)")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    """``qlorakit plan [RECIPE.yaml] [key=value ...] [--budget-gb X] [--nproc N] [--no-calibrate] [--json FILE]``."""
    from ..config import load_recipe

    ap = argparse.ArgumentParser(prog="qlorakit plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="a recipe file and/or key=value overrides")
    ap.add_argument("--budget-gb", type=float, help="memory budget in GB (default: train.memory_budget_gb, else 80%% of available RAM)")
    ap.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="plan 'qlorakit train --nproc N': N processes share the budget and the cores, each trains "
                    "train.grad_accum micro-batches of every step (default 1)")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the time calibration (memory only)")
    ap.add_argument("--json", help="also write the plan as JSON to this file")
    a = ap.parse_args(argv)
    path = next((x for x in a.args if "=" not in x), None)
    overrides = [x for x in a.args if "=" in x]
    if sum(1 for x in a.args if "=" not in x) > 1:
        print("qlorakit plan: at most one recipe file; other arguments must be key=value", file=sys.stderr)
        return 2
    if a.budget_gb is not None and a.budget_gb <= 0:
        print(f"qlorakit plan: --budget-gb must be positive, got {a.budget_gb}", file=sys.stderr)
        return 2
    if a.nproc < 1:
        print(f"qlorakit plan: --nproc must be at least 1, got {a.nproc}", file=sys.stderr)
        return 2
    recipe = load_recipe(path, overrides)
    p = plan_recipe(recipe, budget_bytes=a.budget_gb * GB if a.budget_gb else None, calibrate_time=not a.no_calibrate,
                    processes=a.nproc)
    print(format_plan(p, path, overrides))
    if a.json:
        from .checkpoint import write_atomic

        write_atomic(Path(a.json), json.dumps(p.to_json(), indent=2) + "\n")
    return 0 if p.fits else 1
