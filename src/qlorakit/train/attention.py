"""Causal attention over packed segments for the fast CPU path.

Tokens of a batch are one flat stream; each packed example is a segment ``[start, end)`` that
attends only to itself, causally. Working per segment does ``sum(L_i^2)`` instead of ``T^2``
work per row and needs no mask tensor. The forward pass is PyTorch's flash-attention CPU kernel
(fp32 accumulation); the backward recomputes the probabilities from the saved q, k (scores in
fp32, softmax in fp32) and uses batched bf16 matmuls, several times faster than the CPU flash
kernel's own backward at these sizes; the probabilities come back in one pass from the forward's
log-sum-exp. Grouped-query attention is handled by repeating k/v for the
forward and by laying out q as (kv head, token, group) so that one batched matmul per kv head covers
its whole group in the backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .kernels import kernel

__all__ = ["segment_attention", "segments_from_positions"]

BF16 = torch.bfloat16


def segments_from_positions(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of positions that restarts at 0, over the flattened tokens."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [int(flat.numel())]
    return list(zip(starts, ends))


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[tuple[int, int]],
                scale: float, compiled: bool) -> torch.Tensor:
        # q (Hkv, N, G, D), k/v (Hkv, N, D) bf16 -> o (N, Hkv G D) bf16, query head j G + g at [j G + g]
        n_kv, n, groups, d = q.shape
        hq = n_kv * groups
        o = torch.empty(n, n_kv, groups, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(n_kv, n, groups, dtype=torch.float32, device=q.device)  # of scores * scale
        for s, e in segments:
            length = e - s
            qs = q[:, s:e].permute(0, 2, 1, 3).reshape(1, hq, length, d)
            ks = k[:, None, s:e].expand(n_kv, groups, length, d).reshape(1, hq, length, d)
            vs = v[:, None, s:e].expand(n_kv, groups, length, d).reshape(1, hq, length, d)
            out, lse_s = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, True, scale=scale)[:2]
            o[s:e] = out[0].view(n_kv, groups, length, d).permute(2, 0, 1, 3)  # -> (L, Hkv, G, D)
            lse[:, s:e] = lse_s[0].view(n_kv, groups, length).transpose(1, 2)
        o = o.view(n, hq * d)
        ctx.segments = segments
        ctx.scale = scale
        ctx.compiled = compiled
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        n_kv, n, groups, d = q.shape
        scale = ctx.scale
        probs = kernel("attn_probs", ctx.compiled)
        dscores = kernel("attn_dscores", ctx.compiled)
        do = do.to(BF16).contiguous()
        # delta = rowsum(do * o) per query token and head, laid out as q is: (Hkv, N, G)
        delta = (do.view(n, n_kv * groups, d).float() * o.view(n, n_kv * groups, d).float()).sum(-1)
        delta = delta.view(n, n_kv, groups).permute(1, 0, 2).contiguous()
        # (N, Hkv, G, D) -> (Hkv, N, G, D): a segment of a kv group is then one (L G, D) block
        do4 = do.view(n, n_kv, groups, d).permute(1, 0, 2, 3).contiguous()
        qf, kf = q.float(), k.float()  # scores in fp32: bf16-rounded scores cost ~5x the gradient error
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        for s, e in ctx.segments:
            length = e - s
            qs = q[:, s:e].reshape(n_kv, length * groups, d)
            dos = do4[:, s:e].reshape(n_kv, length * groups, d)
            ks, vs = k[:, s:e], v[:, s:e]
            rows = (n_kv, length * groups, 1)
            # the large (L G, L) operands are only ever read untransposed; small ones are transposed
            scores = torch.bmm(qf[:, s:e].reshape(n_kv, length * groups, d), kf[:, s:e].transpose(1, 2))
            p = probs(scores, lse[:, s:e].reshape(rows), scale, groups)
            dv[:, s:e] = torch.bmm(dos.transpose(1, 2), p).transpose(1, 2)  # sums over the group
            ds = dscores(p, torch.bmm(dos, vs.transpose(1, 2)), delta[:, s:e].reshape(rows), scale)
            dq[:, s:e] = torch.bmm(ds, ks).view(n_kv, length, groups, d)
            dk[:, s:e] = torch.bmm(qs.transpose(1, 2), ds).transpose(1, 2)
        return dq, dk, dv, None, None, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Sequence[tuple[int, int]],
                      scale: float, compiled: bool = False) -> torch.Tensor:
    """Causal attention within each segment: q (Hkv, N, G, D), k/v (Hkv, N, D) bf16 -> (N, Hkv G D) bf16."""
    return _SegmentAttention.apply(q, k, v, segments, scale, compiled)
