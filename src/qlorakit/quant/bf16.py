"""bf16 matrix products on CPUs without bf16 instructions.

On CPUs with AVX512-BF16 or AMX, torch runs a bf16 matmul natively. On the others (AVX2 only: most
laptops and desktops, AMD Zen 2 and 3) its bf16 matmul runs several times slower than fp32: measured
on an AMD EPYC (Zen 3, AVX2), a (512, 576) x (576, 1536) product ran at 7.4 GFLOP/s in bf16 against
35 in fp32. A bf16 product multiplies bf16 numbers exactly, sums in fp32 and rounds the result to
bf16; the same bf16 values held as fp32 give the same exact products, so an fp32 product of them,
rounded to bf16, gives the same result up to the order of the fp32 sum (a test pins this).

Models whose numbers were fixed in bf16 (the guards' encoders, trained on bf16 features) run their
linear layers this way on such CPUs, and keep bf16's values without its cost.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import cpu_supports_bf16

__all__ = ["emulates_bf16", "linear_bf16", "emulate_bf16_linears"]

BF16 = torch.bfloat16


def emulates_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 products on ``device`` are better computed as fp32 products of bf16 values:
    a CPU without native bf16 matmul instructions."""
    return torch.device(device).type == "cpu" and not cpu_supports_bf16()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                emulate: bool | None = None) -> torch.Tensor:
    """``F.linear`` with bf16 operands and a bf16 result: x is rounded to bf16; ``weight`` and
    ``bias`` hold bf16 values (as bf16, or as fp32 already rounded to bf16). With ``emulate`` (by
    default: on CPUs without bf16 instructions) the product runs in fp32 on those values."""
    if emulate is None:
        emulate = emulates_bf16(x.device)
    if not emulate:
        return F.linear(x.to(BF16), weight.to(BF16), bias.to(BF16) if bias is not None else None)
    xb = x.to(BF16).float()
    w = weight.float()
    b = bias.float() if bias is not None else None
    return F.linear(xb, w, b).to(BF16)


def _emulated_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return type(self).forward(self, x)  # training goes through the module's own bf16 path
    return linear_bf16(x, self._qlk_w32, self._qlk_b32, emulate=True).to(x.dtype)


def emulate_bf16_linears(model: nn.Module, *, always: bool = False) -> int:
    """On a CPU without bf16 instructions (or anywhere with ``always``), run every bf16
    ``nn.Linear`` of ``model`` as an fp32 product of its bf16 values, rounded to bf16 (no-grad
    forwards only); returns the number of linears changed (0 on CPUs with bf16 instructions).
    Each keeps an fp32 copy of its weight."""
    n = 0
    for m in model.modules():
        if type(m) is not nn.Linear or m.weight.dtype != BF16:
            continue
        if not (always or emulates_bf16(m.weight.device)):
            continue
        if "_qlk_w32" in m._buffers:
            continue
        m.register_buffer("_qlk_w32", m.weight.detach().float(), persistent=False)
        m.register_buffer("_qlk_b32", m.bias.detach().float() if m.bias is not None else None, persistent=False)
        m.forward = types.MethodType(_emulated_forward, m)
        n += 1
    return n
