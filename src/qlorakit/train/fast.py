"""The fast training path for Llama-style decoders (Llama, SmolLM2, Mistral, Qwen2), on the CPU and on CUDA.

Same maths as the plain path (a test compares losses and gradients), computed differently:

- **bf16 matmuls without autocast.** Each frozen base weight is dequantized to bf16 once and
  held (or dequantized per use when memory is short, see :mod:`qlorakit.quant.fast_linear`);
  q/k/v and gate/up are one matmul each; LoRA runs in the same bf16 matmuls with a hand-written
  backward that never computes a gradient for a frozen weight.
- **No padding.** The batch is one flat stream of tokens; the padding tail of a packed row is
  dropped before the first layer, and attention runs per packed example (causal, no mask tensor).
- **Fused elementwise chains** (RMSNorm, rotary embedding, SiLU gate, attention softmax and its
  backward, cross-entropy), compiled with inductor when a C++ compiler is there.
- **Native code for two pieces** on CPUs with bf16 instructions (:mod:`qlorakit.train.native`,
  built on first use): the attention backward's loop over packed segments, and the cross-entropy
  with its gradient (one exp a logit).
- **The output head and cross-entropy in chunks**, only at positions with a label, with the
  gradient computed in the same pass, so the (tokens, vocab) logits never exist at once.
- **LoRA dropout in one fused pass per adapted linear**, its mask a hash of the element's position
  and a key (:mod:`qlorakit.lora.dropout`), regenerated in the backward instead of kept; the plain
  path's adapters draw the same keys, so both paths drop the same elements.
- **Activation recomputation only when asked** (the planner turns it on when memory requires it).

On CUDA (:func:`cuda_fast_options`), attention is PyTorch's fused kernel per packed example and
the elementwise chains run eager.

On CPUs without bf16 instructions (AVX2 only), where the loader computes in fp32 because a bf16
matmul runs several times slower than an fp32 one there, the same path runs with fp32 in place of
bf16 (``FastOptions.dtype``): fp32 weight copies, activations and logits; it then agrees with the
plain fp32 path to fp32 rounding (a test).

The HF model is left as it is (no module is replaced): :class:`FastModel` reads its weights and
its LoRA parameters, so saving, evaluation, generation and resume see the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.templating import IGNORE_INDEX
from ..quant.fast_linear import (
    FrozenWeight,
    LoraGroup,
    LoraMember,
    WeightMode,
    group_backward,
    group_forward,
    lora_group_matmul,
)
from .attention import Workspace, segment_attention, segments_from_positions
from .kernels import kernel
from .loss import shift_labels
from .memory import current_rss_bytes, release_free_memory

__all__ = ["FastOptions", "FastModel", "FastUnsupported", "cuda_fast_options", "fast_supported", "fast_path_runs",
           "prepare_fast", "fused_head_loss"]

log = logging.getLogger(__name__)
BF16 = torch.bfloat16
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
LOSS_CHUNK = 2048  # 1024 rows run the (chunk, V) x (V, H) gradient matmul at half the rate (measured)
# the head's matmuls run on row counts rounded up to a multiple of this (zero rows added). oneDNN
# keeps a compiled kernel (about 0.6 MB, measured) for every matmul shape it meets, up to its cache's
# capacity; the count of loss tokens differs from batch to batch, and unrounded, every step added two
# shapes: the training process grew by about 1.5 MB a step (135M, 4 x 512 tokens: +113 MB over 70 steps)
HEAD_ROW_STEP = 64


class FastUnsupported(ValueError):
    """The model's architecture is not one the fast path implements; the plain path is used."""


@dataclass
class FastOptions:
    weights: WeightMode = "cache"  # bf16 copy of the base held for the run, or dequantized per use
    dtype: torch.dtype = BF16  # of the matmuls: bf16, or fp32 on CPUs without bf16 instructions
    checkpointing: bool = False  # recompute each layer's activations in the backward pass
    compile: bool = True  # fuse the elementwise chains with inductor
    loss_chunk: int = LOSS_CHUNK  # positions per output-head chunk
    token_multiple: int = 128  # round the tokens run per micro-batch up to a multiple of this
    trim_above: float | None = None  # bytes of RSS above which freed heap memory goes back to the OS


# --------------------------------------------------------------------------------------------
# autograd functions around the elementwise kernels


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, compiled: bool,
                dtype: torch.dtype = BF16) -> torch.Tensor:
        y, rstd = kernel("rms_fwd", compiled)(x, w, eps, dtype)
        ctx.compiled = compiled
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        return kernel("rms_bwd", ctx.compiled)(dy, x, w, rstd), None, None, None, None


class _AddNorm(torch.autograd.Function):
    """``s = x + y`` (the residual add of a sublayer's output y) and the RMSNorm of s, as one kernel
    each way: the backward adds the residual stream's gradient to the norm's and hands y its share
    already in y's dtype, where autograd would add in one pass and cast in another."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float, compiled: bool,
                dtype: torch.dtype = BF16) -> tuple[torch.Tensor, torch.Tensor]:
        s, h, rstd = kernel("add_rms_fwd", compiled)(x, y, w, eps, dtype)
        ctx.compiled, ctx.y_dtype = compiled, y.dtype
        ctx.save_for_backward(s, w, rstd)
        ctx.set_materialize_grads(False)
        return s, h

    @staticmethod
    def backward(ctx, g: torch.Tensor | None, dh: torch.Tensor | None):
        s, w, rstd = ctx.saved_tensors
        if dh is None:  # the norm's output took no part in the loss
            return g, None if g is None else g.to(ctx.y_dtype), None, None, None, None
        if g is None:  # s itself is used only through the norm (the final one)
            t = kernel("rms_bwd", ctx.compiled)(dh, s, w, rstd)
            return t, t.to(ctx.y_dtype), None, None, None, None
        if ctx.y_dtype == torch.float32:
            t = g + kernel("rms_bwd", ctx.compiled)(dh, s, w, rstd)
            return t, t, None, None, None, None
        t, ty = kernel("add_rms_bwd", ctx.compiled)(g, dh, s, w, rstd, ctx.y_dtype)
        return t, ty, None, None, None, None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int,
                compiled: bool):
        q, k, v = kernel("rope_fwd", compiled)(qkv, cos, sin, n_q, n_kv)
        ctx.compiled = compiled
        ctx.save_for_backward(cos, sin)
        return q, k, v

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dqkv = kernel("rope_bwd", ctx.compiled)(dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin)
        return dqkv, None, None, None, None, None


class _GateUpSilu(torch.autograd.Function):
    """silu(x W_gate^T + LoRA) * (x W_up^T + LoRA) with the gate and up linears as one group; the
    backward hands the gate and up gradients to the group separately (no concatenation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: LoraGroup, training: bool, compiled: bool,
                *params: torch.Tensor) -> torch.Tensor:
        gu, sv = group_forward(x, group, training, params)
        ctx.group, ctx.sv, ctx.compiled = group, sv, compiled
        ctx.save_for_backward(gu, sv.x, *([sv.xa] if sv.xa is not None else []))
        sv.x = sv.xa = None
        return kernel("silu_mul_fwd", compiled)(gu)

    @staticmethod
    def backward(ctx, dm: torch.Tensor):
        gu, x, *xa = ctx.saved_tensors
        sv = replace(ctx.sv, x=x, xa=xa[0] if xa else None)  # local: see _LoraGroupFn.backward
        dg, du = kernel("silu_mul_bwd", ctx.compiled)(dm.contiguous(), gu)
        dx, grads = group_backward(ctx.group, sv, [dg, du], need_dx=ctx.needs_input_grad[0])
        return (dx, None, None, None, *grads)


class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``h W^T`` in chunks; the gradient is computed in the same pass.

    The (chunk, vocabulary) logits live in one reused buffer, the gradient overwrites them in place,
    and ``dh`` is written straight into its rows: no large tensor is allocated per chunk.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int, compiled: bool,
                workspace: torch.Tensor | None) -> torch.Tensor:
        want_grad = h.requires_grad
        n, vocab = h.shape[0], w.shape[0]
        n_pad = head_rows(n)
        if n_pad != n:
            # zero rows: their logits are exactly 0, no loss is taken over them, and their gradient
            # rows (0 @ w) are dropped below
            hp = h.new_zeros(n_pad, h.shape[1])
            hp[:n] = h
        else:
            hp = h
        workspace = head_workspace(n, chunk, vocab, h.device, workspace, w.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = h.new_empty(n_pad, h.shape[1]) if want_grad else None
        fn = kernel("ce_fwd_bwd_" if want_grad else "ce_fwd", compiled)
        for s in range(0, n, chunk):
            e = min(n_pad, s + chunk)  # the last chunk runs its padded rows
            valid = min(n, e) - s
            logits = workspace[:e - s]
            torch.mm(hp[s:e], w.t(), out=logits)  # (c, V) in w's dtype
            total += fn(logits[:valid], target[s:s + valid])
            if want_grad:
                torch.mm(logits, w, out=dh[s:e])  # logits now hold d loss / d logits (0 in padded rows)
        ctx.save_for_backward(dh[:n] if dh is not None else torch.empty(0))
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (dh,) = ctx.saved_tensors
        return (dh * g.to(dh.dtype)), None, None, None, None, None


def head_rows(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`HEAD_ROW_STEP`: the row count the head's matmuls run."""
    return -(-n // HEAD_ROW_STEP) * HEAD_ROW_STEP


def head_workspace(n: int, chunk: int, vocab: int, device: torch.device | str,
                   current: torch.Tensor | None = None, dtype: torch.dtype = BF16) -> torch.Tensor:
    """The (rows, vocab) logits buffer the head's loss over ``n`` rows needs: ``current`` when it is
    large enough, else a new one of at least 256 rows (up to ``chunk``), so that the small batches of a
    run do not grow it again and again."""
    rows = min(chunk, head_rows(n))
    if current is not None and current.shape[0] >= rows and current.shape[1] == vocab and current.dtype == dtype:
        return current
    return torch.empty(min(chunk, max(rows, 256)), vocab, dtype=dtype, device=device)


def fused_head_loss(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, chunk: int = LOSS_CHUNK,
                    compiled: bool = False, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(h @ w^T, target); h (n, H), w (V, H), both bf16 or both fp32.

    ``workspace``: an optional reusable (chunk, V) buffer for the logits, in their dtype.
    """
    return _HeadLoss.apply(h, w, target, chunk, compiled, workspace)


# --------------------------------------------------------------------------------------------
# the model


def fast_supported(model: nn.Module) -> str | None:
    """None when the fast path can run ``model``; otherwise the reason it cannot."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model type {mtype!r} (the fast path implements {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (expected 'silu')"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    if getattr(cfg, "use_sliding_window", False) or (mtype == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder stack at model.model.layers"
    layer = inner.layers[0]
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        try:
            layer.get_submodule(path)
        except AttributeError:
            return f"decoder layer has no {path}"
    if hasattr(layer.self_attn, "q_norm"):
        return "q/k norms in attention"
    return None


def _member(mod: nn.Module) -> tuple[nn.Module, LoraMember]:
    from ..lora import LoraLinear

    if isinstance(mod, LoraLinear):
        drop = mod.dropout.p if isinstance(mod.dropout, nn.Dropout) else 0.0
        return mod.base, LoraMember(mod.out_features, mod.lora_A.weight, mod.lora_B.weight, mod.scaling, drop, mod)
    return mod, LoraMember(mod.out_features)


def _group(mods: list[nn.Module], mode: WeightMode, buffers: dict[tuple[int, int], torch.Tensor],
           compiled: bool, dtype: torch.dtype) -> LoraGroup:
    bases, members = zip(*(_member(m) for m in mods))
    return LoraGroup(FrozenWeight(list(bases), mode, buffers, dtype), list(members), compiled)


@dataclass
class _Layer:
    in_w: torch.Tensor
    post_w: torch.Tensor
    eps: float
    qkv: LoraGroup
    o: LoraGroup
    gu: LoraGroup
    down: LoraGroup


class FastModel:
    """The fast forward of a Llama-style HF model (with LoRA layers attached), read in place."""

    def __init__(self, model: nn.Module, options: FastOptions | None = None, pad_token_id: int | None = None):
        why = fast_supported(model)
        if why is not None:
            raise FastUnsupported(f"the fast path does not support this model: {why}")
        self.model = model
        self.options = options or FastOptions()
        self.pad_token_id = pad_token_id
        cfg = model.config
        self.n_q = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_q
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q
        self.scale = self.head_dim ** -0.5
        inner = model.model
        mode, c, dt = self.options.weights, self.options.compile, self.options.dtype
        if dt not in (BF16, torch.float32):
            raise ValueError(f"the fast path computes in bf16 or fp32, not {dt}")
        self.dtype = dt
        # per-use stacked weights are written into one reused buffer per shape (see FrozenWeight)
        self._weight_buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                in_w=layer.input_layernorm.weight.detach().float(),
                post_w=layer.post_attention_layernorm.weight.detach().float(),
                eps=float(getattr(layer.input_layernorm, "variance_epsilon", getattr(layer.input_layernorm, "eps", 1e-6))),
                qkv=_group([at.q_proj, at.k_proj, at.v_proj], mode, self._weight_buffers, c, dt),
                o=_group([at.o_proj], mode, self._weight_buffers, c, dt),
                gu=_group([mlp.gate_proj, mlp.up_proj], mode, self._weight_buffers, c, dt),
                down=_group([mlp.down_proj], mode, self._weight_buffers, c, dt),
            ))
        self.norm_w = inner.norm.weight.detach().float()
        self.norm_eps = float(getattr(inner.norm, "variance_epsilon", getattr(inner.norm, "eps", 1e-6)))
        self.embed = model.get_input_embeddings().weight
        self.head = FrozenWeight([model.get_output_embeddings()], "cache", dtype=dt)
        self.rotary = inner.rotary_emb
        self._workspace: torch.Tensor | None = None  # reused (chunk, vocabulary) logits buffer
        self._attn_ws = Workspace()  # reused score-sized buffers of the attention backward

    def release(self) -> None:
        """Drop the bf16 weight copies and the reused buffers (at the end of training, before the
        evaluation); the model itself is untouched. The object cannot run afterwards."""
        self.layers = []
        self.head = None
        self._weight_buffers.clear()
        self._workspace = None
        self._attn_ws = Workspace()

    # -- sizes, for the planner -------------------------------------------------------------
    def cached_weight_bytes(self) -> int:
        n = self.head.nbytes_cached() if self.head is not None else 0
        for L in self.layers:
            n += sum(g.weight.nbytes_cached() for g in (L.qkv, L.o, L.gu, L.down))
        return n

    # -- forward -------------------------------------------------------------------------------
    def _keep(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Flat indices of the tokens to run (None: all): the padding tail of each row is dropped,
        except as many padding tokens as round the count up to a multiple of ``token_multiple``.

        Rounding keeps the sizes of the step's large tensors to a few values, so that malloc reuses
        its freed blocks step after step instead of fragmenting its heap (measured: without it the
        RSS of a run on variable-length rows kept growing by ~150 MB a step).
        """
        if self.pad_token_id is None:
            return None
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        b, t = ids.shape
        keep = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        tails: list[tuple[int, int]] = []  # (row, start of the dropped padding tail)
        for r in range(b):
            starts = (pos[r] == 0).nonzero().squeeze(1)
            if starts.numel() < 2:
                continue
            s = int(starts[-1])
            if bool((ids[r, s:] == self.pad_token_id).all()) and bool((labels[r, s:] == IGNORE_INDEX).all()):
                keep[r, s:] = False
                tails.append((r, s))
        if not tails:
            return None
        mult = self.options.token_multiple
        extra = (-int(keep.sum())) % mult if mult > 1 else 0
        for r, s in reversed(tails):  # give back the first tokens of the tails: a shorter padding segment
            if extra <= 0:
                break
            n = min(extra, t - s)
            keep[r, s:s + n] = True
            extra -= n
        return keep.reshape(-1).nonzero().squeeze(1)

    def _layer(self, x: torch.Tensor, y: torch.Tensor | None, i: int, cos: torch.Tensor, sin: torch.Tensor,
               segments: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` on the residual stream ``x + y`` (y: the previous layer's MLP output, not yet
        added; None when x is the whole stream) -> the same pair for the next layer: each residual
        add runs in one kernel with the norm after it (:class:`_AddNorm`)."""
        L, c, tr = self.layers[i], self.options.compile, self.model.training
        if y is None:
            h = _RMSNorm.apply(x, L.in_w, L.eps, c, self.dtype)
        else:
            x, h = _AddNorm.apply(x, y, L.in_w, L.eps, c, self.dtype)
        q, k, v = _Rope.apply(lora_group_matmul(h, L.qkv, tr), cos, sin, self.n_q, self.n_kv, c)
        a = segment_attention(q, k, v, segments, self.scale, c, self._attn_ws)
        x, h = _AddNorm.apply(x, lora_group_matmul(a, L.o, tr), L.post_w, L.eps, c, self.dtype)
        m = _GateUpSilu.apply(h, L.gu, tr, c, *L.gu.params())
        return x, lora_group_matmul(m, L.down, tr)

    def _whole_layer(self, x: torch.Tensor, i: int, cos: torch.Tensor, sin: torch.Tensor,
                     segments: list[tuple[int, int]]) -> torch.Tensor:
        """Layer ``i`` from and to the whole residual stream: the unit of recomputation, whose kept
        input is then one fp32 (N, H) tensor."""
        # recomputation's transients land between the kept layer inputs, and malloc's heap grows
        # past them layer after layer: near the budget, give the freed blocks back at every layer
        # (measured on the packaged model, 4 x 1024 tokens, trimming at every layer: peak RSS 2.0
        # against 2.5 GB, step 13.2 against 11.3 s; so only above ``trim_above``)
        self._trim()
        x, y = self._layer(x, None, i, cos, sin, segments)
        return x + y

    def hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states (N, H) of the kept tokens (in the fast path's dtype), and their
        shifted targets (N,)."""
        ids, pos = batch["input_ids"], batch["position_ids"]
        target = shift_labels(batch["labels"]).reshape(-1)
        keep = self._keep(batch)
        flat_ids, flat_pos = ids.reshape(-1), pos.reshape(-1)
        if keep is not None:
            flat_ids, flat_pos, target = flat_ids[keep], flat_pos[keep], target[keep]
        segments = segments_from_positions(flat_pos)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            x = F.embedding(flat_ids, self.embed).float()  # (N, H) fp32 residual stream
            cos, sin = self.rotary(x[None], flat_pos[None])
            cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()  # (N, D)
            use_ckpt = self.options.checkpointing and torch.is_grad_enabled()
            y = None
            for i in range(len(self.layers)):
                if use_ckpt:
                    x = checkpoint(self._whole_layer, x, i, cos, sin, segments, use_reentrant=False)
                else:
                    x, y = self._layer(x, y, i, cos, sin, segments)
            if y is None:
                h = _RMSNorm.apply(x, self.norm_w, self.norm_eps, self.options.compile, self.dtype)
            else:
                _, h = _AddNorm.apply(x, y, self.norm_w, self.norm_eps, self.options.compile, self.dtype)
        return h, target

    def _trim(self) -> None:
        """Give malloc's retained free memory back to the OS when the process nears its budget.

        Between micro-batches the previous one's activations are free, but glibc keeps them in its
        heap for reuse, and blocks of shifting sizes fragment it: RSS creeps up over a run. Trimming
        costs the next step its page faults, so it happens only above ``trim_above``.
        """
        limit = self.options.trim_above
        if limit is None or current_rss_bytes() <= limit:
            return
        if not release_free_memory():
            self.options.trim_above = None  # not glibc: nothing to trim with

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of token losses, number of loss tokens), as :func:`qlorakit.train.loss.plain_loss`."""
        if self.head is None:
            raise RuntimeError("this fast path was released (FastModel.release); prepare a new one")
        self._trim()
        h, target = self.hidden(batch)
        sel = (target != IGNORE_INDEX).nonzero().squeeze(1)
        n = int(sel.numel())
        if n == 0:
            return h.float().sum() * 0.0, 0
        w = self.head.get()
        self._workspace = head_workspace(n, self.options.loss_chunk, w.shape[0], h.device, self._workspace, w.dtype)
        with torch.autocast("cpu", enabled=False):
            total = fused_head_loss(h.index_select(0, sel), w, target.index_select(0, sel),
                                    self.options.loss_chunk, self.options.compile, self._workspace)
        return total, n

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The loss-function signature the training loop uses: ``loss_fn(model, batch)``."""
        if model is not self.model:
            raise ValueError("this fast path was prepared for another model")
        return self.loss(batch)


def cuda_fast_options(model: nn.Module, *, checkpointing: bool, free_bytes: int | None = None) -> FastOptions:
    """The fast path's settings on a CUDA device: the bf16 copy of the base when it takes at most
    half the free device memory (``free_bytes``, read from the device when None), else per-use
    dequantization. Measured on an H200 (bench/results/gpu.md): the copy ran 1.06x (1.7B shape)
    and 1.12x (8B) the HF stack's tokens/s, per use 0.66x and 1.05x. The elementwise kernels stay
    eager: inductor's GPU kernels have not been measured here.
    """
    from .memory import ModelShape

    copy = 2 * ModelShape.from_config(model.config).linear_params  # as the memory estimate counts it
    if free_bytes is None:
        device = next(p.device for p in model.parameters())
        free_bytes = torch.cuda.mem_get_info(device)[0]
    weights: WeightMode = "cache" if copy <= 0.5 * free_bytes else "per-use"
    return FastOptions(weights=weights, checkpointing=checkpointing, compile=False)


def _device_supported(loaded: Any) -> bool:
    """bf16 on the CPU or CUDA; fp32 on the CPU (what CPUs without bf16 instructions compute in)."""
    if loaded.device.type == "cpu":
        return loaded.compute_dtype in (BF16, torch.float32)
    return loaded.device.type == "cuda" and loaded.compute_dtype == BF16


def fast_path_runs(model: nn.Module, loaded: Any) -> bool:
    """Whether :func:`prepare_fast` gives the fast path for ``model`` as ``loaded`` (else it falls back)."""
    return _device_supported(loaded) and fast_supported(model) is None


def prepare_fast(model: nn.Module, recipe: Any, loaded: Any, *, checkpointing: bool = False,
                 options: FastOptions | None = None, weights: WeightMode | None = None,
                 total_steps: int | None = None) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]:
    """A loss function ``(model, batch) -> (loss sum, n tokens)`` on the fast path for ``model``.

    Falls back to :func:`qlorakit.train.loss.chunked_loss` (and says why in the log) for models
    the fast path does not implement, compute dtypes other than bf16 (and fp32 on the CPU), and
    devices other than the CPU and CUDA. On the CPU, ``weights`` (the base weights' form, when the caller chose it with the
    checkpointing) and ``total_steps`` (whether compiling pays) go to :func:`choose_fast_options`.
    """
    from .loss import chunked_loss

    if not _device_supported(loaded):
        log.info("fast path: bf16 on CPU or CUDA, or fp32 on CPU, only; using the chunked loss on %s/%s", loaded.device,
                 loaded.compute_dtype)
        return chunked_loss
    why = fast_supported(model)
    if why is not None:
        log.warning("fast path unavailable (%s); using the plain forward with the chunked loss", why)
        return chunked_loss
    if options is None:
        if loaded.device.type == "cuda":
            options = cuda_fast_options(model, checkpointing=checkpointing)
        else:
            from .plan import choose_fast_options

            options = choose_fast_options(recipe, model, checkpointing=checkpointing, weights=weights,
                                          total_steps=total_steps)
    fm = FastModel(model, options, pad_token_id=loaded.tokenizer.pad_token_id)
    log.info("fast path: weights=%s checkpointing=%s compile=%s", options.weights, options.checkpointing, options.compile)
    return fm
