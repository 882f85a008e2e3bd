"""Memory estimates used by 'auto' choices (gradient checkpointing, the fast path's weight mode)
and by ``qlorakit plan``.

The fast path's numbers are counted from what it actually keeps: per token and layer, the tensors
its autograd functions save (see :mod:`qlorakit.train.fast`), plus the transients of one layer's
backward pass and of one output-head chunk. The plain path's numbers are a rougher per-layer
count of what the Hugging Face forward keeps under autocast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "activation_bytes",
    "release_free_memory",
    "set_mmap_threshold",
    "mmap_threshold",
    "memory_budget_bytes",
    "available_memory_bytes",
    "current_rss_bytes",
    "ModelShape",
    "MemoryEstimate",
    "estimate_memory",
    "stacked_buffer_bytes",
    "NF4_BYTES_PER_PARAM",
    "LINEAR_KINDS",
    "adapted_linears",
]

# freed memory malloc keeps resident, as a fraction of the step's working set (activations kept
# and one layer's transients): blocks of varying sizes (segment lengths, chunk tails) fragment its
# heap. Measured on the packaged model without recomputation: about a third.
ALLOCATOR_SLACK = 0.35
# ... with recomputation, where the kept layer inputs sit between each layer's transients and the
# heap grows past them layer after layer. `qlorakit train` on the packaged model, recomputation on,
# its peak RSS against this estimate without slack: 2 x 512 needed 0.49 of the working set, 4 x 1024
# 0.78, 4 x 2048 1.04. Near the budget the fast path gives freed memory back at every layer instead
# (FastModel._whole_layer), which holds the peak under the budget where this falls short.
ALLOCATOR_SLACK_RECOMPUTE = 0.8
# ... in fp32 (CPUs without bf16 instructions), where malloc keeps far less of the freed blocks.
# Measured on an AVX2-only AMD EPYC (bench/results/plan_avx2.md, 4 x 512-token steps), peak RSS
# against the estimate without slack: 135M without recomputation 0.07, 0.10 and 0.15 of the working
# set at sequence 256, 512 and 1024; the 360M shape with recomputation 0.24, 0.23 and 0.56. With the
# bf16 fractions above the estimate was 12-18% high there
ALLOCATOR_SLACK_FP32 = 0.2
ALLOCATOR_SLACK_RECOMPUTE_FP32 = 0.6
# the attention backward's score-sized buffers per (query head, query, key) of the longest segment:
# probabilities and d-scores in bf16 (attention.py), and room for the matmuls' own workspace
ATTENTION_BYTES = 6
# loading: each tensor is read (and converted to fp32), then quantized or kept; the peak lies above
# the kept weights by this fraction of the largest tensor (the embedding, in fp32). Measured, read
# tensor by tensor (peak RSS of loading less the process before it, the NF4 weights and the fp32
# embeddings and norms): the packaged model from fp32 files 1.45 (163 MB), the SmolLM2 360M shape
# from bf16 files 0.42 (61 MB), the 1.7B shape 0.76 (293 MB)
LOAD_SLACK = 1.5

# what the evaluation after training adds to the model and the decoder's copies at its smallest
# batches: what training left resident (compiled kernels, heap), oneDNN's kernels for the new shapes,
# a 256-token log-likelihood batch's logits. Measured: `qlorakit train` on the packaged model with
# a 1 GB budget (128 tokens x 1, recomputation, 10 steps), whole-process peak 1342 MB, 557 MB above
# the process baseline, the weights and the copies
EVAL_OVERHEAD = 560 * 2**20

# 4 bits per weight + one 8-bit absmax per 64 weights + one fp32 per 256 absmax (double quantization)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``); False where there is none.

    After a large model loads, the freed fp32 conversion buffers stay in malloc's heap, and how much
    of it stays resident varies from run to run (measured on the 1.7B shape: 1.8 to 3.9 GB after
    loading, for a 1.7 GB model); trimming brings it back to what the model holds."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc: blocks of at least ``nbytes`` come from their own mappings, returned to the OS when
    freed (fixes the threshold, which glibc otherwise raises as blocks are freed, up to 32 MiB)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


MMAP_THRESHOLD_LOADING = 1 << 20
MMAP_THRESHOLD_RUN = 32 << 20  # glibc's own ceiling for its moving threshold: where a long run settles
# the evaluation after a budgeted run: its logits and activations come from their own mappings
MMAP_THRESHOLD_EVAL = 4 << 20


@contextlib.contextmanager
def mmap_threshold(nbytes: int) -> Iterator[None]:
    """Within the block, blocks of at least ``nbytes`` come from their own mappings (returned to the
    OS when freed); afterwards the threshold is :data:`MMAP_THRESHOLD_RUN`, also on an exception."""
    set_mmap_threshold(nbytes)
    try:
        yield
    finally:
        set_mmap_threshold(MMAP_THRESHOLD_RUN)


def memory_budget_bytes(recipe: Any) -> float:
    """The budget of one training process: ``train.memory_budget_gb`` (or 0.8 of the memory available
    now), shared equally by the training processes on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    from .distributed import local_world_size

    gb = recipe.train.memory_budget_gb
    return (gb * 2**30 if gb else 0.8 * available_memory_bytes()) / local_world_size()


def activation_bytes(config: Any, micro_batch: int, seq_len: int, bytes_per: int = 2) -> float:
    """Activations the plain (Hugging Face) forward keeps for the backward of one micro-batch.

    Per layer and token, a Llama-style block keeps about 16 hidden-sized and 3 intermediate-sized
    tensors (norm inputs, q/k/v/o, attention output, gate/up/act products); attention with an
    explicit mask adds heads x seq_len scores.
    """
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    tokens = micro_batch * seq_len
    per_layer = tokens * (16 * h + 3 * inter) * bytes_per + micro_batch * heads * seq_len * seq_len * bytes_per
    return float(layers * per_layer)


# the linears of a Llama-style decoder layer, as ``lora.targets`` names them
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapted_linears(names: Any, layers: int) -> dict[str, int]:
    """How many of the ``layers`` decoder layers have a LoRA adapter on each linear of
    :data:`LINEAR_KINDS`, from the names of the modules LoRA is attached to (what
    :func:`qlorakit.lora.attach_lora` returns); names of other modules (the head) count nothing here."""
    counts = dict.fromkeys(LINEAR_KINDS, 0)
    for name in names:
        leaf = str(name).rsplit(".", 1)[-1]
        if leaf in counts:
            counts[leaf] += 1
    return {k: min(v, layers) for k, v in counts.items()}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory and time depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Any) -> ModelShape:
        heads = cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            inter=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        h = self.hidden
        return h * self.q_out * 2 + h * self.kv_out * 2 + 3 * h * self.inter

    @property
    def linear_params(self) -> int:
        """Parameters of the quantized linears (the decoder's; the output head stays unquantized)."""
        return self.layers * self.layer_linear_params

    @property
    def matmul_params(self) -> int:
        """Parameters taking part in a matmul per token: the decoder's linears and the output head."""
        return self.linear_params + self.vocab * self.hidden

    @property
    def other_params(self) -> int:
        """Unquantized parameters: embeddings, the untied head, norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def stacked_weights(self) -> tuple[int, int]:
        """Elements of the weights the fast path stacks per layer: [q | k | v] and [gate | up]."""
        h = self.hidden
        return h * (self.q_out + 2 * self.kv_out), h * 2 * self.inter

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of :data:`LINEAR_KINDS`."""
        h = self.hidden
        return {"q_proj": (h, self.q_out), "k_proj": (h, self.kv_out), "v_proj": (h, self.kv_out),
                "o_proj": (self.q_out, h), "gate_proj": (h, self.inter), "up_proj": (h, self.inter),
                "down_proj": (self.inter, h)}

    def lora_params(self, r: int, adapted: dict[str, int] | None = None) -> int:
        """LoRA parameters at rank ``r`` on the linears ``adapted`` counts (:func:`adapted_linears`;
        None: every linear of every layer)."""
        adapted = adapted if adapted is not None else dict.fromkeys(LINEAR_KINDS, self.layers)
        return sum(adapted.get(k, 0) * r * (fan_in + fan_out) for k, (fan_in, fan_out) in self.linear_dims().items())


@dataclass
class MemoryEstimate:
    """Predicted resident memory of a training process, in bytes, by part."""

    parts: dict[str, float] = field(default_factory=dict)
    load_peak: float = 0.0  # while the base loads and quantizes
    eval_peak: float = 0.0  # the evaluation after training, in the same process

    @property
    def train_peak(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.load_peak, self.eval_peak)


def _fast_saved_per_token_layer(s: ModelShape, r: int, act_bytes: int = 2,
                                adapted: dict[str, int] | None = None) -> float:
    """Bytes the fast path's autograd functions keep per token and layer (no recomputation, the
    LoRA activations averaged over the layers); ``act_bytes`` per element of the matmuls' dtype (2
    for bf16, 4 for fp32); ``adapted`` as in :meth:`ModelShape.lora_params`.

    Dropout adds nothing: its masks are regenerated from their keys in the backward."""
    h, i, b = s.hidden, s.inter, act_bytes
    adapted = adapted if adapted is not None else dict.fromkeys(LINEAR_KINDS, s.layers)

    def lora(*kinds: str) -> float:  # (N, r) LoRA activations per adapted linear of a group, per layer
        return b * r * sum(adapted.get(k, 0) for k in kinds) / max(1, s.layers)

    saved = 0.0
    saved += 4 * h + 4  # RMSNorm 1: the fp32 residual and 1/rms
    saved += b * h + lora("q_proj", "k_proj", "v_proj")  # q/k/v group: its bf16 input and LoRA activations
    saved += b * (s.q_out + 2 * s.kv_out)  # attention: rotated q, k and v (bf16)
    saved += b * s.q_out  # attention output (also the o group's input)
    saved += lora("o_proj")  # o group LoRA activations
    saved += 4 * h + 4  # RMSNorm 2: the new residual and 1/rms
    saved += b * h + lora("gate_proj", "up_proj")  # gate/up group input and LoRA activations
    saved += b * 2 * i  # [gate | up] kept by the SiLU gate
    saved += b * i + lora("down_proj")  # down group input and LoRA activations
    return saved


def stacked_buffer_bytes(shape: ModelShape, act_bytes: int = 2) -> float:
    """Bytes of the buffers the fast path dequantizes its stacked weights into in ``per-use`` mode
    (:class:`qlorakit.quant.fast_linear.FrozenWeight`): one per stacked shape, reused layer after
    layer and held for the run, [q | k | v] and [gate | up]. The single weights (o, down) are
    dequantized into fresh tensors, counted with the transients."""
    return act_bytes * sum(shape.stacked_weights())


def _head_bytes_per_logit(compiled: bool, b: int) -> int:
    """Bytes per (position, vocabulary) logit of the head's chunk: the logits in the matmul dtype
    (``b`` bytes) and what the cross-entropy kernel takes beyond them (the native one, for bf16
    where it is built, nothing)."""
    from .kernels import native_kernel_available

    if b == 2 and native_kernel_available("ce_fwd_bwd_"):
        return b
    return (4 if compiled else 10) + b - 2


def estimate_memory(shape: ModelShape, *, micro_batch: int, seq_len: int, r: int,
                    checkpointing: bool = False, weights: str = "cache", fast: bool = True,
                    loss_chunk: int = 2048, baseline: float = 0.0, file_bytes: float = 0.0,
                    compiled: bool = True, act_bytes: int = 2, adapted: dict[str, int] | None = None) -> MemoryEstimate:
    """Peak resident memory of a training run; ``baseline`` is the process before the model loads
    (interpreter and libraries), ``file_bytes`` the size of the weight files the loader reads whole
    (``.bin`` checkpoints; safetensors files are read tensor by tensor and never resident, see
    :func:`qlorakit.models.loader._files_read_not_mapped`).

    The LoRA dropout adds nothing: it keeps no mask (each is regenerated from a key in the backward,
    :mod:`qlorakit.lora.dropout`). ``act_bytes``: bytes per element of the fast path's matmuls, 2
    in bf16, 4 in fp32 (CPUs without bf16 instructions). ``adapted``: the linears with LoRA
    (:func:`adapted_linears`; None: every one)."""
    s, b = shape, act_bytes
    copy = "bf16" if b == 2 else "fp32"
    tokens = micro_batch * seq_len
    est = MemoryEstimate()
    p = est.parts
    p["process (interpreter, libraries)"] = baseline
    p["base weights, NF4"] = s.linear_params * NF4_BYTES_PER_PARAM
    p["embeddings, norms, head (fp32)"] = s.other_params * 4
    lora = s.lora_params(r, adapted)
    p["LoRA weights, gradients, AdamW state"] = lora * 4 * 4
    if fast:
        if weights == "cache":
            p[f"{copy} copy of the base weights"] = s.linear_params * b
        else:
            p[f"{copy} buffers of the stacked weights (per use)"] = stacked_buffer_bytes(s, b)
        p[f"{copy} copy of the output head"] = s.vocab * s.hidden * b
        if checkpointing:
            kept = s.layers * tokens * 4 * s.hidden + tokens * _fast_saved_per_token_layer(s, r, b, adapted)
        else:
            kept = s.layers * tokens * _fast_saved_per_token_layer(s, r, b, adapted)
        p["activations kept for the backward"] = kept
        # one layer's backward at a time: gradients of its activations, attention scores of the
        # longest segment, and per use the largest stacked group's freshly dequantized parts (before
        # they are copied into its buffer)
        grad_tr = tokens * (4 * s.hidden * 3 + b * 2 * s.inter * 2 + b * (s.q_out + 2 * s.kv_out) * 2)
        attn_tr = s.heads * seq_len * seq_len * ATTENTION_BYTES * b / 2
        deq_tr = b * max(s.stacked_weights()) if weights == "per-use" else 0
        chunk = min(loss_chunk, tokens)
        # the (chunk, vocabulary) logits in bf16 and, eager, the fp32 log-softmax and the gradient's
        # conversions (measured: 8.1 bytes per logit above the bf16 buffer on a 2048 x 49152 chunk);
        # the native kernel (bf16 on the CPU, where it is built) converts a row at a time and adds
        # nothing per logit
        head_tr = chunk * s.vocab * (_head_bytes_per_logit(compiled, b)) + tokens * s.hidden * b * 2
        p["transients (one layer's backward, one head chunk)"] = max(grad_tr + attn_tr + deq_tr, head_tr)
    else:
        p["activations kept for the backward"] = (activation_bytes(_Cfg(s), micro_batch, seq_len)
                                                  if not checkpointing else s.layers * tokens * 4 * s.hidden)
        p["transients (full logits and their gradient)"] = tokens * s.vocab * (2 + 4 + 4 + 4)
    # what malloc keeps of freed blocks (see ALLOCATOR_SLACK)
    if b == 4 and fast:
        slack = ALLOCATOR_SLACK_RECOMPUTE_FP32 if checkpointing else ALLOCATOR_SLACK_FP32
    else:
        slack = ALLOCATOR_SLACK_RECOMPUTE if checkpointing else ALLOCATOR_SLACK
    p["allocator slack (freed blocks malloc keeps)"] = slack * (
        p["activations kept for the backward"] + max(v for k, v in p.items() if k.startswith("transients")))
    # loading: each tensor is read, converted to fp32 and quantized (or kept), malloc keeping part of
    # the largest conversion buffer; a .bin checkpoint is read whole first
    est.load_peak = (baseline + file_bytes + p["base weights, NF4"] + s.other_params * 4
                     + LOAD_SLACK * s.vocab * s.hidden * 4)
    # the evaluation after training, which sizes its buffers to what training took (or the budget),
    # needs at least: the model and adapter, the generation decoder's packed copy of the 4-bit
    # weights and int8 copy of the head, and EVAL_OVERHEAD
    est.eval_peak = (baseline + 2 * p["base weights, NF4"] + s.other_params * 4 + lora * 4
                     + s.vocab * s.hidden + EVAL_OVERHEAD)
    return est


class _Cfg:
    def __init__(self, s: ModelShape):
        self.hidden_size = s.hidden
        self.intermediate_size = s.inter
        self.num_hidden_layers = s.layers
        self.num_attention_heads = s.heads
