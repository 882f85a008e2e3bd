"""Frozen 4-bit linears with LoRA for the fast path: bf16 matmuls without autocast, and several
linears that read the same input (q/k/v, gate/up) fused into one matmul.

A frozen base weight reaches the matmul as bf16 in one of two ways (:class:`FrozenWeight`):

- ``cache``: dequantized once, when the fast path is prepared, and held as bf16 for the run. The
  base never changes, so every later forward and backward reads the same bf16 copy: no
  dequantization and no dtype cast per step, at 2 bytes per base parameter of memory.
- ``per-use``: the NF4 weight stays the only copy; it is dequantized straight to bf16 in the
  forward and again in the backward, so the bf16 copy lives only while one layer computes.

The values are those the plain path multiplies with: under bf16 autocast it dequantizes to fp32
and autocast rounds that to bf16, which is what both modes hold. On CPUs without bf16
instructions the compute dtype is fp32 (bf16 products run several times slower than fp32 there):
everything here then holds with fp32 in place of bf16 (``FrozenWeight(dtype=torch.float32)``).

:class:`LoraGroup` computes ``y_i = x W_i^T + s_i dropout_i(x) A_i^T B_i^T`` for every member ``i``
of a group in one base matmul and one low-rank matmul pair, with a hand-written backward that
computes no gradient for the frozen weights and saves only the input and the (N, r) LoRA
activations. Dropout uses the hash masks of :mod:`qlorakit.lora.dropout`: each member's mask is
regenerated from its key in the backward, not kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from ..lora.dropout import draw_key, dropped, dropped_backward_
from .nf4 import dequantize, is_linear4bit

__all__ = ["FrozenWeight", "LoraMember", "LoraGroup", "lora_group_matmul", "WeightMode", "cache_bf16_weights",
           "drop_bf16_weights", "GroupSaved", "group_forward", "group_backward"]

BF16 = torch.bfloat16
WeightMode = Literal["cache", "per-use"]


class FrozenWeight:
    """The bf16 weight of one or more frozen linears stacked along the output dimension.

    4-bit weights are dequantized straight to bf16 (bitsandbytes computes each value in fp32 and
    rounds it once, so the values are those of dequantizing to fp32 and casting; a test pins this),
    three times faster than going through an fp32 copy. In ``per-use`` mode the weights of a model
    may share ``buffers`` (one bf16 tensor per stacked shape): a group's stacked weight is then
    written into memory that is reused layer after layer, instead of fresh pages the kernel has to
    map and zero at every use. On the 1.7B shape (seq 1024, recomputation on) system time, nearly
    all of it page faults, was a third of a six-layer forward and backward; these two changes took
    the faults from 1.8 to 0.7 million a call and the system time from 4 to 2 s. A shared buffer
    holds a weight only until the next :meth:`get` of the same shape: the caller uses it at once
    and keeps no reference.
    """

    def __init__(self, linears: Sequence[nn.Module], mode: WeightMode,
                 buffers: dict[tuple[int, int], torch.Tensor] | None = None, dtype: torch.dtype = BF16):
        if mode not in ("cache", "per-use"):
            raise ValueError(f"weight mode must be 'cache' or 'per-use', got {mode!r}")
        self.linears = list(linears)
        self.mode = mode
        self.dtype = dtype  # bf16, or fp32 on CPUs without bf16 instructions
        self.out_features = sum(m.out_features for m in self.linears)
        self.in_features = self.linears[0].in_features
        bias = [getattr(m, "bias", None) for m in self.linears]
        self.bias = (torch.cat([b.detach().to(dtype) if b is not None else torch.zeros(m.out_features, dtype=dtype, device=m.weight.device)
                                for b, m in zip(bias, self.linears)]) if any(b is not None for b in bias) else None)
        self._buffers = buffers if mode == "per-use" and len(self.linears) > 1 else None
        self._cached = self._dequantize() if mode == "cache" else None

    def _dequantize(self) -> torch.Tensor:
        parts = [dequantize(m, self.dtype) for m in self.linears]
        if len(parts) == 1:
            return parts[0].contiguous()
        if self._buffers is None:
            return torch.cat(parts, dim=0)
        shape = (self.out_features, self.in_features)
        buf = self._buffers.get(shape)
        if buf is None or buf.device != parts[0].device or buf.dtype != self.dtype:
            buf = self._buffers[shape] = torch.empty(shape, dtype=self.dtype, device=parts[0].device)
        return torch.cat(parts, dim=0, out=buf)

    def get(self) -> torch.Tensor:
        """(out_features, in_features) in ``dtype``."""
        return self._cached if self._cached is not None else self._dequantize()

    def nbytes_cached(self) -> int:
        return 0 if self._cached is None else self._cached.numel() * self._cached.element_size()


@dataclass
class LoraMember:
    """One linear of a group: its output width and, when adapted, its LoRA factors."""

    out_features: int
    a: nn.Parameter | None = None  # (r, in) fp32
    b: nn.Parameter | None = None  # (out, r) fp32
    scaling: float = 1.0
    dropout: float = 0.0
    source: object | None = None  # the adapter module; its ``enabled`` flag switches the member off

    @property
    def active(self) -> bool:
        return self.a is not None and bool(getattr(self.source, "enabled", True))


@dataclass
class LoraGroup:
    weight: FrozenWeight
    members: list[LoraMember]
    compiled: bool = False  # fuse the dropout with inductor (CPU)
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for m in self.members:
            self.offsets.append(self.offsets[-1] + m.out_features)
        if self.offsets[-1] != self.weight.out_features:
            raise ValueError(f"group members give {self.offsets[-1]} outputs, the weight has {self.weight.out_features}")

    @property
    def adapted(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.active]

    def params(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in self.adapted:
            out += [self.members[i].a, self.members[i].b]
        return out


def _factors(group: LoraGroup, idx: list[int], params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stacked A (R, in) and the block matrix B (out_total, R) holding s_i B_i, both in the
    group's dtype."""
    dt = group.weight.dtype
    ranks = [int(params[2 * j].shape[0]) for j in range(len(idx))]
    a_cat = torch.cat([params[2 * j].detach() for j in range(len(idx))], dim=0).to(dt)
    b_full = torch.zeros(group.weight.out_features, sum(ranks), dtype=dt, device=a_cat.device)
    col = 0
    for j, i in enumerate(idx):
        b_full[group.offsets[i]:group.offsets[i + 1], col:col + ranks[j]] = params[2 * j + 1].detach() * group.members[i].scaling
        col += ranks[j]
    return a_cat, b_full, ranks


@dataclass
class GroupSaved:
    """What a group's backward needs from its forward."""

    x: torch.Tensor  # (N, in) bf16 input
    xa: torch.Tensor | None  # (N, R) LoRA activations of the adapted members, side by side
    idx: list[int]  # the adapted members
    keys: list[torch.Tensor | None] | None  # their dropout keys (the masks are regenerated), None without dropout
    ranks: list[int]


def group_forward(x: torch.Tensor, group: LoraGroup, training: bool,
                  params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, GroupSaved]:
    """y (N, out_total) bf16 for every member at once, and what the backward needs."""
    w = group.weight.get()
    y = x @ w.t()
    if group.weight.bias is not None:
        y += group.weight.bias
    idx = group.adapted
    if len(params) != 2 * len(idx):
        raise ValueError(f"expected {2 * len(idx)} LoRA tensors for this group, got {len(params)}")
    drop = [group.members[i].dropout if training else 0.0 for i in idx]
    if not idx:
        return y, GroupSaved(x, None, idx, None, [])
    a_cat, b_full, ranks = _factors(group, idx, params)
    if not any(drop):
        xa = x @ a_cat.t()  # (N, R): one matmul for every member
        y.addmm_(xa, b_full.t())
        return y, GroupSaved(x, xa, idx, None, ranks)
    # dropout: each member draws its own key, in member order, as the plain path's adapters do
    keys: list[torch.Tensor | None] = []
    parts, col = [], 0
    for j, p in enumerate(drop):
        a_j = a_cat[col:col + ranks[j]]
        col += ranks[j]
        if p > 0:
            keys.append(draw_key(p))
            parts.append(dropped(x, keys[-1], group.compiled) @ a_j.t())
        else:
            keys.append(None)
            parts.append(x @ a_j.t())
    xa = torch.cat(parts, dim=1)
    y.addmm_(xa, b_full.t())
    return y, GroupSaved(x, xa, idx, keys, ranks)


def group_backward(group: LoraGroup, sv: GroupSaved, dy: torch.Tensor | Sequence[torch.Tensor],
                   need_dx: bool = True) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(dx, [dA, dB per adapted member]) from the gradient of the group's output.

    ``dy`` is either the whole (N, out_total) gradient or one (N, out_i) gradient per member, so
    that a caller whose gradients come out per member (the SiLU gate) needs no concatenation.
    """
    w = group.weight.get()
    if isinstance(dy, torch.Tensor):
        dy = dy.to(w.dtype).contiguous()
        parts = [dy[:, group.offsets[i]:group.offsets[i + 1]] for i in range(len(group.members))]
        dx = dy @ w if need_dx else None
    else:
        parts = [d.to(w.dtype).contiguous() for d in dy]
        dx = None
        if need_dx:
            for i, d in enumerate(parts):
                wi = w[group.offsets[i]:group.offsets[i + 1]]
                dx = d @ wi if dx is None else dx.addmm_(d, wi)
    if not sv.idx:
        return dx, []
    params = [t for i in sv.idx for t in (group.members[i].a, group.members[i].b)]
    a_cat, b_full, ranks = _factors(group, sv.idx, params)
    x, xa = sv.x, sv.xa
    if isinstance(dy, torch.Tensor):
        g = dy @ b_full  # (N, R): s_i dy_i B_i side by side, one matmul
    else:
        g = None
        for i, d in enumerate(parts):
            bi = b_full[group.offsets[i]:group.offsets[i + 1]]
            g = d @ bi if g is None else g.addmm_(d, bi)
    grads: list[torch.Tensor] = []
    # no dropout: every member's dA from one (R, N) x (N, in) matmul and, with the whole dy, every dB
    # from one (out_total, N) x (N, R) whose diagonal blocks are the members' (the packaged model's
    # q/k/v group, 2048 tokens: 0.7 against 1.1 ms for per-member products, which run at a fraction
    # of the matmul rate with 16 output rows); with dropout each member's input is its own
    da = (g.t() @ x).float() if sv.keys is None else None
    db = (dy.t() @ xa).float() if sv.keys is None and isinstance(dy, torch.Tensor) else None
    col = 0
    for j, i in enumerate(sv.idx):
        m, r = group.members[i], ranks[j]
        gj = g[:, col:col + r]
        key = None if sv.keys is None else sv.keys[j]
        if key is None:
            xd = x
            if dx is not None and sv.keys is not None:
                dx.addmm_(gj, a_cat[col:col + r])
        elif dx is not None:  # the forward's mask, regenerated once for the input and for dx
            xd = dropped_backward_(x, gj @ a_cat[col:col + r], dx, key, group.compiled)
        else:
            xd = dropped(x, key, group.compiled)
        grads.append(da[col:col + r] if da is not None else (gj.t() @ xd).float())
        if db is not None:
            db_i = db[group.offsets[i]:group.offsets[i + 1], col:col + r]
        else:
            db_i = parts[i].t() @ xa[:, col:col + r]
        grads.append(db_i.float() * m.scaling)
        col += r
    if dx is not None and sv.keys is None:
        dx.addmm_(g, a_cat)
    return dx, grads


class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: LoraGroup, training: bool, *params: torch.Tensor) -> torch.Tensor:
        y, sv = group_forward(x, group, training, params)
        ctx.group, ctx.sv = group, sv
        ctx.save_for_backward(sv.x, *([sv.xa] if sv.xa is not None else []))
        sv.x = sv.xa = None  # held by save_for_backward (freed with the graph)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        # a local copy holds the saved tensors: set on ctx.sv they would live until the whole backward
        # pass ends (ctx outlives its node's backward), a layer's inputs each for every layer
        sv = replace(ctx.sv, x=saved[0], xa=saved[1] if len(saved) > 1 else None)
        dx, grads = group_backward(ctx.group, sv, dy, need_dx=ctx.needs_input_grad[0])
        return (dx, None, None, *grads)


def lora_group_matmul(x: torch.Tensor, group: LoraGroup, training: bool) -> torch.Tensor:
    """x (N, in) bf16 -> (N, sum of the members' out_features) bf16; see the module docstring."""
    return _LoraGroupFn.apply(x, group, training, *group.params())


# --------------------------------------------------------------------------------------------
# inference: a bf16 copy of each 4-bit weight, used by its no-grad forward


def _cached_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` with the dequantized bf16 weight read from the cache (no-grad only).

    The values are those of bitsandbytes' own dequantize-then-matmul path: input rounded to the
    compute dtype, weight dequantized and rounded to it, output cast back to the input's dtype.
    """
    w16 = getattr(self, "_qlk_w16", None)
    if w16 is None or (torch.is_grad_enabled() and x.requires_grad):
        return type(self).forward(self, x)
    dt = w16.dtype
    bias = self.bias.to(dt) if self.bias is not None else None
    w32 = getattr(self, "_qlk_w32", None)
    if w32 is not None and x.shape[:-1].numel() == 1:
        # one token (a decode step): the same bf16 values in an fp32 matrix-vector product, rounded to
        # bf16 as the bf16 product is (products of bf16 numbers are exact in fp32; only the order of
        # the fp32 sum may differ); on CPUs a bf16 product with one row runs 2-3x slower than fp32
        out = torch.nn.functional.linear(x.to(dt).float(), w32, bias.float() if bias is not None else None)
        return out.to(dt).to(x.dtype)
    return torch.nn.functional.linear(x.to(dt), w16, bias).to(x.dtype)


def cache_bf16_weights(model: nn.Module, max_bytes: float | None = None, *, decode_fp32: bool = True) -> int:
    """Give every 4-bit linear of ``model`` a bf16 copy of its weight for no-grad forwards.

    Generation then reads each weight once per token as bf16 instead of dequantizing it per token.
    The 4-bit weight stays the stored format (state dicts, exports and training are unchanged; a
    forward that needs gradients takes bitsandbytes' own path). Skips the cache, returning 0, when
    it would take more than ``max_bytes``. Returns the bytes cached (0 if already cached).

    ``decode_fp32``: on a CPU, also keep the same values as fp32 for one-token forwards (decode
    steps), where an fp32 matrix-vector product runs 2-3x faster than a bf16 one; only when both
    copies fit in ``max_bytes``. The result is rounded to bf16 as the bf16 product's is.
    """
    mods = [m for m in model.modules() if is_linear4bit(m) and getattr(m, "_qlk_w16", None) is None]
    dts = [m.compute_dtype if m.compute_dtype in (torch.bfloat16, torch.float16, torch.float32) else BF16 for m in mods]
    need = sum(torch.finfo(dt).bits // 8 * m.in_features * m.out_features for m, dt in zip(mods, dts))
    if not mods or (max_bytes is not None and need > max_bytes):
        return 0
    wide = [decode_fp32 and dt != torch.float32 and m.weight.device.type == "cpu" for m, dt in zip(mods, dts)]
    n32 = sum(4 * m.in_features * m.out_features for m, w in zip(mods, wide) if w)
    if max_bytes is not None and need + n32 > max_bytes:  # no room for both copies: bf16 only
        wide, n32 = [False] * len(mods), 0
    import types

    for m, dt, w32 in zip(mods, dts, wide):
        w = dequantize(m, dt).contiguous()
        m.register_buffer("_qlk_w16", w, persistent=False)
        if w32:
            m.register_buffer("_qlk_w32", w.float(), persistent=False)
        m.forward = types.MethodType(_cached_forward, m)
    return need + n32


def drop_bf16_weights(model: nn.Module) -> None:
    """Undo :func:`cache_bf16_weights`."""
    for m in model.modules():
        if getattr(m, "_qlk_w16", None) is not None:
            del m._buffers["_qlk_w16"]
            m._buffers.pop("_qlk_w32", None)
            if "forward" in m.__dict__:
                del m.__dict__["forward"]
