"""Causal attention over packed segments for the fast path.

Tokens of a batch are one flat stream; each packed example is a segment ``[start, end)`` that
attends only to itself, causally. Working per segment does ``sum(L_i^2)`` instead of ``T^2``
work per row and needs no mask tensor.

On CPUs with AMX (where the native library is built), forward and backward run on AMX tiles
through oneDNN's batch-reduce GEMM micro-kernel (csrc/amx_attention.cpp): blocks of 32 query
tokens against the keys up to the causal diagonal, scores and the softmax in fp32, the
probabilities and d-scores rounded to bf16 only as operands of the next product. On the packaged
model's heads and a batch's packed lengths, a layer's attention takes 1.7 ms forward and 3.5 ms
backward there, against 4.1 and 12 ms for the path below.

Elsewhere the forward pass is PyTorch's flash-attention CPU kernel (fp32 accumulation); the backward
recomputes the probabilities from the saved q, k and the forward's log-sum-exp in one bf16 matmul
whose fp32 accumulator also subtracts the log-sum-exp (only the shifted score is rounded, see the
backward), and uses batched bf16 matmuls for the rest, several times faster than the CPU flash
kernel's own backward at these sizes. Two more steps keep its gradients as precise as bf16 SDPA's
with autograd where queries and keys share a large common part (k_proj / q_proj biases): dp - delta
comes out of its matmul's accumulator the same way, and dq is taken against the keys less their
segment mean (a test pins both; the AMX kernels take dq against them too). Grouped-query attention
is handled by broadcasting k/v over the group in the forward (no copy) and by laying out q as (kv
head, token, group) so that one batched matmul per kv head covers its whole group in the backward.
On CPUs without bf16 instructions everything here runs in fp32 instead (the fast path's dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .kernels import kernel
from .native import amx_attention_ops, attention_ops

__all__ = ["segment_attention", "segments_from_positions", "Workspace"]

LENGTH_STEP = 32  # segment lengths are rounded up to a multiple of this in the backward


def segments_from_positions(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of positions that restarts at 0, over the flattened tokens."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [int(flat.numel())]
    return list(zip(starts, ends))


class Workspace:
    """Grow-only flat buffers, one per name and dtype, handed out as views of the needed shape.

    Buffers of the same few sizes reused for every segment and layer: a fresh (L G, L) tensor per
    segment (sizes vary with every packed example) fragments malloc's heap, and the training
    process's memory then grows step after step.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def view(self, name: str, dtype: torch.dtype, capacity: int, shape: tuple[int, ...],
             device: torch.device | str = "cpu") -> torch.Tensor:
        numel = 1
        for x in shape:
            numel *= x
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < max(capacity, numel):
            buf = torch.empty(max(capacity, numel), dtype=dtype, device=device)
            self._bufs[(name, dtype)] = buf
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _padded_rows(shape: tuple[int, ...], pad: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``pad`` more rows (dim 1), those rows zero."""
    out = torch.empty(shape[0], shape[1] + pad, *shape[2:], dtype=dtype, device=device)
    out[:, shape[1]:] = 0
    return out


def _segment_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int,
                   e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segment ``[s, e)`` as (1, heads, length, D) q, k, v, query head j G + g, k/v repeated per group."""
    n_kv, _, groups, d = q.shape
    hq, length = n_kv * groups, e - s
    qs = q[:, s:e].permute(0, 2, 1, 3).reshape(1, hq, length, d)
    ks = k[:, None, s:e].expand(n_kv, groups, length, d).reshape(1, hq, length, d)
    vs = v[:, None, s:e].expand(n_kv, groups, length, d).reshape(1, hq, length, d)
    return qs, ks, vs


def _with_shift(x: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """x (Hkv, N, ..., D) bf16 with ``pad`` zero rows more and three more columns holding -shift
    (Hkv, N, ...) fp32 split exactly into three bf16 parts: against :func:`_with_ones`, a bf16
    matmul then yields x.y - shift with the subtraction inside its fp32 accumulator. In fp32 the
    first part holds the whole shift and the other two are zero."""
    d, dt = x.shape[-1], x.dtype
    out = _padded_rows((*x.shape[:-1], d + 3), pad, dt, x.device)
    n = x.shape[1]
    out[:, :n, ..., :d] = x
    hi = shift.to(dt)
    r = shift - hi.float()
    mid = r.to(dt)
    out[:, :n, ..., d] = -hi
    out[:, :n, ..., d + 1] = -mid
    out[:, :n, ..., d + 2] = -(r - mid.float()).to(dt)
    return out


def _with_ones(y: torch.Tensor, pad: int) -> torch.Tensor:
    """y (Hkv, N, D) with ``pad`` zero rows more and three more columns of ones."""
    n, d = y.shape[1], y.shape[-1]
    out = _padded_rows((y.shape[0], n, d + 3), pad, y.dtype, y.device)
    out[:, :n, :d] = y
    out[:, :n, d:] = 1.0
    return out


def native_scratch_numel(n_kv: int, groups: int, d: int, longest: int) -> int:
    """Elements of the native backward's scratch buffer for segments up to ``longest`` (padded)
    tokens: each segment's operands, score matrices and results (csrc/segment_attention.cpp)."""
    d3, rows, keys = d + 3, n_kv * longest * groups, n_kv * longest
    return 2 * rows * d3 + 4 * keys * d3 + keys * d + 2 * rows * longest + rows * d


IMPLS = ("best", "amx", "native", "python")


def _amx_ops(impl: str, q: torch.Tensor):
    """The AMX kernels where ``impl`` allows them, they are built, and they take these tensors (bf16
    on the CPU, head size a multiple of 32), else None."""
    ok = impl in ("best", "amx") and q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[-1] % 32 == 0
    ops = amx_attention_ops() if ok else None
    if impl == "amx" and ops is None:
        raise ValueError("segment_attention: impl='amx' needs the native library built on a CPU with AMX "
                         "and bf16 CPU tensors with a head size that is a multiple of 32")
    return ops


def _amx_scratch(ops, ws: Workspace | None, q: torch.Tensor, segments: Sequence[tuple[int, int]]) -> torch.Tensor:
    n_kv, _, groups, d = q.shape
    need = ops.scratch_numel(n_kv, groups, d, max(e - s for s, e in segments))
    return (ws or Workspace()).view("amx", q.dtype, need, (need,), q.device)


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[tuple[int, int]],
                scale: float, compiled: bool, workspace: Workspace | None, impl: str) -> torch.Tensor:
        # q (Hkv, N, G, D), k/v (Hkv, N, D) bf16 -> o (N, Hkv G D) bf16, query head j G + g at [j G + g]
        n_kv, n, groups, d = q.shape
        hq = n_kv * groups
        amx = _amx_ops(impl, q)
        o = torch.empty(n, n_kv, groups, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_kv, n, groups, dtype=torch.float32, device=q.device)  # of scores * scale
        if amx is not None:  # forward and backward on AMX tiles (csrc/amx_attention.cpp)
            amx.forward(q, k, v, [s for s, _ in segments], [e for _, e in segments], scale, o, lse,
                        _amx_scratch(amx, workspace, q, segments))
        else:
            for s, e in segments:
                length = e - s
                # views, no copies: the kernel reads any strides but the last, so a segment runs as batch
                # Hkv x heads G, with k/v broadcast over the group (stride 0) instead of repeated
                qs = q[:, s:e].permute(0, 2, 1, 3)  # (Hkv, G, L, D)
                ks = k[:, None, s:e].expand(n_kv, groups, length, d)
                vs = v[:, None, s:e].expand(n_kv, groups, length, d)
                out, lse_s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, True,
                                                                                         scale=scale)[:2]
                o[s:e] = out.permute(2, 0, 1, 3)  # (Hkv, G, L, D) -> (L, Hkv, G, D)
                lse[:, s:e] = lse_s.transpose(1, 2)  # (Hkv, G, L) -> (Hkv, L, G)
        o = o.view(n, hq * d)
        ctx.segments = list(segments)
        ctx.amx = amx
        ctx.workspace = workspace
        ctx.scale = scale
        ctx.compiled = compiled
        ctx.native = impl in ("best", "native")
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        n_kv, n, groups, d = q.shape
        scale = ctx.scale
        ws: Workspace = ctx.workspace or Workspace()
        # every segment is processed at its length rounded up to LENGTH_STEP: the matmul shapes then
        # take a few values (each new shape costs oneDNN a new cached kernel, ~1 MB, and time). The
        # extra keys lie beyond the segment, so the causal mask removes them; the extra query rows
        # get probability 0 and their results are dropped.
        pad = LENGTH_STEP
        longest = -(-max(e - s for s, e in ctx.segments) // pad) * pad
        dt = q.dtype  # bf16, or fp32 on CPUs without bf16 instructions
        do = do.to(dt).contiguous()
        # delta = rowsum(do * o) per query token and head, laid out as q is: (Hkv, N, G)
        delta = kernel("attn_delta", ctx.compiled)(do, o, n_kv * groups)
        if ctx.amx is not None:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            ctx.amx.backward(q, k, v, do, lse, delta, [s for s, _ in ctx.segments], [e for _, e in ctx.segments],
                             scale, dq, dk, dv, _amx_scratch(ctx.amx, ws, q, ctx.segments))
            return dq, dk, dv, None, None, None, None, None
        ops = attention_ops() if ctx.native and dt == torch.bfloat16 else None
        if ops is not None:
            # the same values from native code (csrc/segment_attention.cpp): it builds each segment's
            # operands below into contiguous blocks of one reused buffer and runs the same products
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            need = native_scratch_numel(n_kv, groups, d, longest)
            scratch = ws.view("native", dt, need, (need,), q.device)
            ops.segment_attention_backward(q, k, v, do, (lse / scale).contiguous(), delta,
                                           [s for s, _ in ctx.segments], [e for _, e in ctx.segments],
                                           scale, pad, dq, dk, dv, scratch)
            return dq, dk, dv, None, None, None, None, None
        delta = delta.view(n, n_kv, groups).permute(1, 0, 2)
        probs = kernel("attn_probs_shifted_", ctx.compiled)
        dscores = kernel("attn_dscores_", ctx.compiled)
        size = n_kv * longest * groups * longest
        # Shifted scores x = q.k - lse / scale from one bf16 matmul: q gets three more columns holding
        # -lse / scale split exactly into three bf16 parts, k three columns of ones. The products and
        # their sum are fp32 inside the matmul, and only x is rounded to bf16: where a probability
        # matters x is near 0, so the rounding costs |log p| * 2^-9 relative in p (scores rounded
        # before the shift would cost |s| * scale * 2^-9, several times more). The d-probabilities
        # take delta off the same way (do and v get the columns), so dp - delta, which the softmax
        # backward needs and which is small where dp and delta nearly cancel, is rounded once
        # rather than computed from a rounded dp.
        # do goes from (N, Hkv, G, D) to (Hkv, N, G, D), as q is: a segment of a kv group is then one
        # (L G, D + 3) block
        qa = _with_shift(q, lse / scale, pad)
        ka = _with_ones(k, pad)
        doa = _with_shift(do.view(n, n_kv, groups, d).permute(1, 0, 2, 3), delta, pad)
        va = _with_ones(v, pad)
        # k less its mean over each segment, for dq = d scores @ k: each row of d scores sums to zero,
        # so dq does not change when a segment's keys all move by one vector. Less their mean, the
        # keys lose what they share (large where k_proj has a bias), which the rounding of d scores
        # would otherwise carry into dq.
        kp = _padded_rows((n_kv, n, d), pad, dt, k.device)
        lengths = torch.tensor([e - s for s, e in ctx.segments], device=k.device)
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=k.device), lengths, output_size=n)
        kf = k.float()
        kmean = torch.zeros(n_kv, len(lengths), d, device=k.device).index_add_(1, seg, kf) / lengths[:, None]
        kp[:, :n] = kf - kmean[:, seg]
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        for s, e in ctx.segments:
            length = e - s
            lp = -(-length // pad) * pad
            t = s + lp
            # views; the products with q and do read their d + 3 columns (rows of d would be copied
            # by the batched matmul at every use) and drop the three extra results
            qs = qa[:, s:t].reshape(n_kv, lp * groups, d + 3)
            dos = doa[:, s:t].reshape(n_kv, lp * groups, d + 3)
            ks = kp[:, s:t]
            # the (L G, L) matrices live in reused buffers, are only ever read untransposed, and are
            # overwritten in place; small operands are transposed
            shape = (n_kv, lp * groups, lp)
            p = ws.view("probs", dt, size, shape, q.device)
            ds = ws.view("dscores", dt, size, shape, q.device)
            torch.bmm(qs, ka[:, s:t].transpose(1, 2), out=p)
            probs(p, scale, groups, length)
            dv[:, s:e] = torch.bmm(dos.transpose(1, 2), p)[:, :d, :length].transpose(1, 2)  # sums over the group
            # dp - delta, then d scores in place
            torch.bmm(dos, va[:, s:t].transpose(1, 2), out=ds)
            dscores(p, ds, scale)
            dq[:, s:e] = torch.bmm(ds, ks).view(n_kv, lp, groups, d)[:, :length]
            dk[:, s:e] = torch.bmm(qs.transpose(1, 2), ds)[:, :d, :length].transpose(1, 2)
        return dq, dk, dv, None, None, None, None, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[tuple[int, int]],
                      scale: float, compiled: bool = False, workspace: Workspace | None = None,
                      impl: str = "best") -> torch.Tensor:
    """Causal attention within each segment: q (Hkv, N, G, D), k/v (Hkv, N, D) -> (N, Hkv G D), all
    bf16 (or all fp32 on CPUs without bf16 instructions).

    ``workspace`` holds the buffers of the native code and of the backward's Python loop across calls
    (one per model is enough). ``impl`` picks the CPU implementation (bf16):

    - ``"amx"``: forward and backward on AMX tiles (csrc/amx_attention.cpp); head size a multiple of
      32, on CPUs with AMX where the native library is built;
    - ``"native"``: PyTorch's flash kernel forward, the backward's segment loop in native code
      (csrc/segment_attention.cpp) where the library is built;
    - ``"python"``: the flash kernel forward and the backward's loop in Python (the reference);
    - ``"best"``: the first of these that runs here.

    On devices other than the CPU, each segment runs PyTorch's fused attention with its own backward.
    """
    if impl not in IMPLS:
        raise ValueError(f"segment_attention: impl {impl!r} is not one of {', '.join(IMPLS)}")
    if q.device.type != "cpu":
        return _fused_segments(q, k, v, segments, scale)
    return _SegmentAttention.apply(q, k, v, segments, scale, compiled, workspace, impl)


def _fused_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[tuple[int, int]],
                    scale: float) -> torch.Tensor:
    """:func:`segment_attention` through ``F.scaled_dot_product_attention`` per segment (flash
    attention on a GPU), differentiated by autograd; same layouts."""
    n_kv, _, groups, d = q.shape
    hq = n_kv * groups
    outs = []
    for s, e in segments:
        length = e - s
        qs, ks, vs = _segment_heads(q, k, v, s, e)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(out[0].view(n_kv, groups, length, d).permute(2, 0, 1, 3).reshape(length, hq * d))
    return torch.cat(outs)
