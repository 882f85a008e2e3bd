"""Elementwise kernels of the fast path: RMSNorm, rotary embedding, SiLU-gate, attention and
cross-entropy pieces, each written once as a plain tensor function, and the LoRA dropout's
(:mod:`qlorakit.lora.dropout`, which both training paths call through :func:`kernel`).

Eager PyTorch runs a chain of elementwise ops as one pass over memory per op, and bf16 elementwise
ops are several times slower than fp32 ones on CPUs; these chains are short and fixed, so the fast
path compiles each of them with inductor (one fused, vectorised loop per chain) when a C++
compiler is available, and runs the same functions eagerly otherwise. :func:`kernel` returns the
compiled or the eager form; both compute the same values.

Shapes: ``N`` tokens (flattened, no padding), ``H`` hidden size, ``D`` head size, ``I`` MLP width.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..lora.dropout import dropout_apply, dropout_backward_

__all__ = [
    "kernel",
    "compile_available",
    "native_kernel_available",
    "rms_fwd",
    "rms_bwd",
    "add_rms_fwd",
    "add_rms_bwd",
    "rope_fwd",
    "rope_bwd",
    "silu_mul_fwd",
    "silu_mul_bwd",
    "attn_dscores",
    "attn_dscores_",
    "attn_probs_shifted",
    "attn_probs_shifted_",
    "attn_delta",
    "ce_fwd_bwd",
    "ce_fwd_bwd_",
    "ce_fwd",
    "dropout_apply",
    "dropout_backward_",
]

log = logging.getLogger(__name__)
BF16 = torch.bfloat16


def rms_fwd(x: torch.Tensor, w: torch.Tensor, eps: float,
            dtype: torch.dtype = BF16) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H) fp32 -> (w * x / rms(x) as ``dtype`` (N, H), 1 / rms(x) (N, 1) fp32)."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (w * (x * rstd)).to(dtype), rstd


def rms_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`rms_fwd` with respect to x (the weight is frozen); fp32 (N, H)."""
    g = dy.float() * w
    xhat = x * rstd
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))


def add_rms_fwd(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float,
                dtype: torch.dtype = BF16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it in one pass: x (N, H) fp32 residual stream, y (N, H)
    a sublayer's output -> (s = x + y fp32, :func:`rms_fwd` of s as ``dtype``, 1 / rms(s) fp32)."""
    s = x + y.float()
    rstd = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return s, (w * (s * rstd)).to(dtype), rstd


def add_rms_bwd(g: torch.Tensor, dy: torch.Tensor, s: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
                dtype: torch.dtype = BF16) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient at s of :func:`add_rms_fwd`: g (N, H) fp32 from the residual stream plus the norm's
    from dy; fp32 (for x) and as ``dtype`` (for y), in one pass."""
    t = g + rms_bwd(dy, s, w, rstd)
    return t, t.to(dtype)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_t(g: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_rotate` (its inverse): (-x2, x1) -> (x1, x2)."""
    half = g.shape[-1] // 2
    return torch.cat((g[..., half:], -g[..., :half]), dim=-1)


def rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int,
             n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (N, (n_q + 2 n_kv) D) bf16 or fp32 -> rotated q (n_kv, N, G, D), rotated k (n_kv, N, D), v (n_kv, N, D).

    G = n_q / n_kv query heads share each kv head (query head j G + g uses kv head j). The rotation
    is computed in fp32 and rounded once, as the plain path does. The layout makes each packed
    segment of a kv group one contiguous (L G, D) block.
    """
    n, d = qkv.shape[0], cos.shape[-1]
    t = qkv.view(n, n_q + 2 * n_kv, d)
    c, s = cos[:, None, :], sin[:, None, :]
    qk = t[:, :n_q + n_kv].float()
    qk = qk * c + _rotate(qk) * s
    q = qk[:, :n_q].reshape(n, n_kv, n_q // n_kv, d).permute(1, 0, 2, 3).to(qkv.dtype).contiguous()
    k = qk[:, n_q:].transpose(0, 1).to(qkv.dtype).contiguous()
    v = t[:, n_q + n_kv:].transpose(0, 1).contiguous()
    return q, k, v


def rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`rope_fwd`: the grads in its layouts back to one (N, (n_q + 2 n_kv) D), as dv."""
    n_kv, n, g, d = dq.shape
    c, s = cos[:, None, :], sin[:, None, :]
    dqk = torch.cat((dq.permute(1, 0, 2, 3).reshape(n, n_kv * g, d), dk.transpose(0, 1)), dim=1).float()
    dqk = dqk * c + _rotate_t(dqk * s)
    out = torch.cat((dqk.to(dv.dtype), dv.transpose(0, 1)), dim=1)
    return out.reshape(n, -1)


def silu_mul_fwd(gu: torch.Tensor) -> torch.Tensor:
    """gu (N, 2I) holding [gate | up] -> silu(gate) * up (N, I), in gu's dtype."""
    i = gu.shape[1] // 2
    g, u = gu[:, :i].float(), gu[:, i:].float()
    return (F.silu(g) * u).to(gu.dtype)


def silu_mul_bwd(dm: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of :func:`silu_mul_fwd` as (d gate, d up), (N, I) each in gu's dtype.

    Two outputs rather than one concatenated tensor: a concatenation inside the fused loop keeps
    inductor from vectorising it (measured 6x slower).
    """
    i = gu.shape[1] // 2
    g, u = gu[:, :i].float(), gu[:, i:].float()
    dmf = dm.float()
    sg = torch.sigmoid(g)
    dg = dmf * u * sg * (1.0 + g * (1.0 - sg))
    du = dmf * g * sg
    return dg.to(gu.dtype), du.to(gu.dtype)


def _silu_mul_fwd_eager(gu: torch.Tensor) -> torch.Tensor:
    i = gu.shape[1] // 2
    gf = gu.float()  # one contiguous conversion, then in-place fp32 ops
    return F.silu(gf[:, :i]).mul_(gf[:, i:]).to(gu.dtype)


def _silu_mul_bwd_eager(dm: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = gu.shape[1] // 2
    gf = gu.float()
    g, u = gf[:, :i], gf[:, i:]
    d = dm.float()
    sg = torch.sigmoid(g)
    du = (g * sg).mul_(d)
    dg = (1.0 - sg).mul_(g).add_(1.0).mul_(sg).mul_(u).mul_(d)
    return dg.to(gu.dtype), du.to(gu.dtype)


def attn_probs_shifted(x: torch.Tensor, scale: float, groups: int, valid: int) -> torch.Tensor:
    """Attention probabilities from shifted scores x = s - lse / scale (n_kv, L G, L), in x's dtype:
    exp(x * scale) on and below the diagonal, 0 above it and on the rows of query tokens at or past
    ``valid`` (padding). Row r is query token r // G."""
    rows, n = x.shape[-2], x.shape[-1]
    qpos = torch.arange(rows, device=x.device) // groups
    kpos = torch.arange(n, device=x.device)
    keep = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] < valid)
    return torch.where(keep, torch.exp(x.float() * scale), 0.0).to(x.dtype)


def attn_probs_shifted_(x: torch.Tensor, scale: float, groups: int, valid: int) -> None:
    """:func:`attn_probs_shifted` written over ``x`` in place."""
    x.copy_(attn_probs_shifted(x, scale, groups, valid))


def attn_delta(do: torch.Tensor, o: torch.Tensor, heads: int) -> torch.Tensor:
    """rowsum(do * o) per token and query head in fp32: do, o (N, heads D) -> (N, heads)."""
    n = do.shape[0]
    return (do.float() * o.float()).view(n, heads, -1).sum(-1)


def attn_dscores(p: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax backward p * (dp - delta) * scale from x = dp - delta (delta = rowsum(do * o), taken
    off inside the d-probabilities matmul); (n_kv, L G, L) in x's dtype."""
    return (p.float() * x.float() * scale).to(x.dtype)


def attn_dscores_(p: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """:func:`attn_dscores` written over ``x`` in place."""
    x.copy_(attn_dscores(p, x, scale))


def ce_fwd_bwd(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, V), target (n,) -> (summed cross-entropy fp32, d loss / d logits in the logits' dtype)."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    hit = torch.arange(lf.shape[1], device=lf.device)[None, :] == target[:, None]
    picked = torch.where(hit, lf, 0.0).sum(-1, keepdim=True)
    grad = torch.exp(lf - lse) - hit.float()
    return (lse - picked).sum(), grad.to(logits.dtype)


def ce_fwd_bwd_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`ce_fwd_bwd` writing the gradient over ``logits`` in place; returns the summed loss.

    A reused logits buffer costs no fresh pages: a new (chunk, vocabulary) tensor per chunk is
    mapped and zero-filled by the kernel page by page every time (measured: a third of the head's
    time on a 2-core VM).
    """
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    hit = torch.arange(lf.shape[1], device=lf.device)[None, :] == target[:, None]
    picked = torch.where(hit, lf, 0.0).sum(-1, keepdim=True)
    logits.copy_((torch.exp(lf - lse) - hit.float()).to(logits.dtype))
    return (lse - picked).sum()


def _ce_fwd_bwd_inplace_eager(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss, grad = _ce_fwd_bwd_eager(logits, target)
    logits.copy_(grad)
    return loss


def _ce_fwd_bwd_eager(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ce_fwd_bwd` in few eager passes: ATen's fused log-softmax, then exp in place."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(logp.shape[0], device=logp.device)
    loss = -logp[rows, target].sum()
    grad = logp.exp_()
    grad[rows, target] -= 1.0
    return loss, grad.to(logits.dtype)


def ce_fwd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy only (no gradient), fp32."""
    lf = logits.float()
    return (torch.logsumexp(lf, dim=-1) - lf.gather(1, target[:, None]).squeeze(1)).sum()


_EAGER: dict[str, Callable[..., Any]] = {
    "rms_fwd": rms_fwd,
    "rms_bwd": rms_bwd,
    "add_rms_fwd": add_rms_fwd,
    "add_rms_bwd": add_rms_bwd,
    "rope_fwd": rope_fwd,
    "rope_bwd": rope_bwd,
    "silu_mul_fwd": silu_mul_fwd,
    "silu_mul_bwd": silu_mul_bwd,
    "attn_dscores": attn_dscores,
    "attn_probs_shifted": attn_probs_shifted,
    "attn_delta": attn_delta,
    "attn_probs_shifted_": attn_probs_shifted_,
    "attn_dscores_": attn_dscores_,
    "ce_fwd_bwd": ce_fwd_bwd,
    "ce_fwd_bwd_": ce_fwd_bwd_,
    "ce_fwd": ce_fwd,
    "dropout_apply": dropout_apply,
    "dropout_backward_": dropout_backward_,
}
# eager forms where the fused-loop form is slow when run op by op
_EAGER_ONLY: dict[str, Callable[..., Any]] = {
    "ce_fwd_bwd": _ce_fwd_bwd_eager,
    "ce_fwd_bwd_": _ce_fwd_bwd_inplace_eager,
    "silu_mul_fwd": _silu_mul_fwd_eager,
    "silu_mul_bwd": _silu_mul_bwd_eager,
}


@functools.lru_cache(maxsize=1)
def compile_available() -> bool:
    """Inductor needs a C++ compiler on CPU."""
    return shutil.which("g++") is not None or shutil.which("c++") is not None or shutil.which("clang++") is not None


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Callable[..., Any]:
    return torch.compile(_EAGER[name], fullgraph=True)  # sizes that change become dynamic


# kernels with a native form (qlorakit.train.native) for contiguous bf16 CPU tensors, used where the
# native library is built whether or not inductor compiles the rest (as the native attention
# backward is): name -> the native.py accessor of its op namespace; the op has the kernel's name
_NATIVE: dict[str, str] = {
    "ce_fwd_bwd_": "cross_entropy_ops",  # csrc/cross_entropy.cpp: one exp a logit where the fused loop takes two
}


@functools.lru_cache(maxsize=None)
def _native_or(name: str, fallback: Callable[..., Any]) -> Callable[..., Any]:
    """The native form of ``name`` for a contiguous bf16 CPU first argument, ``fallback`` otherwise."""
    from . import native

    ops = getattr(native, _NATIVE[name])()
    if ops is None:
        return fallback
    op = getattr(ops, name)

    def run(x: torch.Tensor, *args: Any) -> Any:
        if x.dtype == BF16 and x.device.type == "cpu" and x.is_contiguous():
            return op(x, *args)
        return fallback(x, *args)

    return run


def native_kernel_available(name: str) -> bool:
    """Whether ``name`` runs in native code here (for bf16 CPU tensors)."""
    from . import native

    return name in _NATIVE and getattr(native, _NATIVE[name])() is not None


def kernel(name: str, compiled: bool) -> Callable[..., Any]:
    """The named kernel: its native form where it has one and it is built (bf16 CPU tensors), else
    compiled with inductor when ``compiled`` and a compiler exists, else eager."""
    if name not in _EAGER:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(_EAGER)}")
    if compiled and compile_available():
        base = _compiled(name)
    else:
        base = _EAGER_ONLY.get(name, _EAGER[name])
    return _native_or(name, base) if name in _NATIVE else base
