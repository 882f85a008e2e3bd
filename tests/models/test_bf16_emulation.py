"""bf16 products as fp32 products of bf16 values (qlorakit.quant.bf16): the values of torch's own
bf16 matmul, on any CPU."""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.quant.bf16 import emulate_bf16_linears, emulates_bf16, linear_bf16

BF16 = torch.bfloat16


def test_emulated_product_is_torch_bf16_product_up_to_summation_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g)
    w = torch.randn(1536, 576, generator=g) * 0.05
    b = torch.randn(1536, generator=g)
    native = linear_bf16(x, w.to(BF16), b.to(BF16), emulate=False)
    emulated = linear_bf16(x, w.to(BF16), b.to(BF16), emulate=True)
    assert native.dtype == emulated.dtype == BF16
    # the fp32 sums differ only in order: the results agree to a bf16 rounding step of each value,
    # or of the sum's scale where terms cancel
    scale = (x.abs() @ w.to(BF16).float().abs().t()) * 2 ** -16
    diff = (native.float() - emulated.float()).abs()
    assert bool((diff <= native.float().abs() * 2 ** -7 + scale).all())
    assert float((native == emulated).float().mean()) > 0.97
    # and it is not merely close to the fp32 product: rounding x to bf16 first matters
    fp32 = torch.nn.functional.linear(x, w.to(BF16).float(), b.to(BF16).float()).to(BF16)
    assert float((fp32 != emulated).float().mean()) > 0.05


def test_emulated_linears_give_the_bf16_modules_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 192), nn.SiLU(), nn.Linear(192, 64, bias=False)).to(BF16).eval()
    x = torch.randn(8, 96).to(BF16)
    with torch.no_grad():
        ref = model(x)
    assert emulate_bf16_linears(model, always=True) == 2
    assert emulate_bf16_linears(model, always=True) == 0  # once only
    with torch.no_grad():
        out = model(x)
    assert out.dtype == BF16
    rel = ((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-2)).max()
    assert float(rel) < 2 ** -7  # within a bf16 rounding step or two
    # a forward that needs gradients goes through the module's own path
    model[0].weight.requires_grad_(True)
    y = model(x).float().sum()
    y.backward()
    assert model[0].weight.grad is not None


def test_emulation_is_chosen_only_where_the_cpu_lacks_bf16_instructions():
    from qlorakit.quant import cpu_supports_bf16

    assert emulates_bf16("cpu") == (not cpu_supports_bf16())
    assert not emulates_bf16("meta")
