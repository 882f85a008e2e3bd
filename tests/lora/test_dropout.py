"""The LoRA dropout's hash masks: the hash against a Python reference, the drop rate and the
independence of the masks, the backward, and the same values eager and compiled."""

from __future__ import annotations

import pytest
import torch

from qlorakit.lora.dropout import KEEP_BITS, HashDropout, draw_key, dropped, hash_dropout, keep_mask, threshold
from qlorakit.train.kernels import compile_available

MASK32 = (1 << 32) - 1


def _lowbias32_ref(z: int) -> int:
    z &= MASK32
    z ^= z >> 16
    z = (z * 0x7FEB352D) & MASK32
    z ^= z >> 15
    z = (z * 0x846CA68B) & MASK32
    z ^= z >> 16
    return z


def _keep_ref(j: int, key: tuple[int, int], p: float) -> bool:
    z = _lowbias32_ref(_lowbias32_ref(j + key[0]) ^ (key[1] & MASK32))
    return (z >> (32 - KEEP_BITS)) >= round(p * (1 << KEEP_BITS))


@pytest.mark.parametrize("key", [(0, 0), (123456789, -987654321), (-(1 << 31), (1 << 31) - 1)])
def test_keep_mask_is_the_reference_hash_in_modular_arithmetic(key):
    """Element j of the flattened mask is the unsigned 32-bit hash of (j, key): the int32 tensor
    arithmetic wraps around as arithmetic modulo 2^32 does."""
    k = torch.tensor([*key, threshold(0.3)], dtype=torch.int32)
    rows, cols = 7, 13
    got = keep_mask(rows, cols, k).flatten().tolist()
    assert got == [_keep_ref(j, key, 0.3) for j in range(rows * cols)]


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_independence(p):
    n = 1 << 20
    t = threshold(p)
    a = keep_mask(1024, 1024, torch.tensor([1, 2, t], dtype=torch.int32)).flatten().float()
    b = keep_mask(1024, 1024, torch.tensor([1, 3, t], dtype=torch.int32)).flatten().float()
    c = keep_mask(1024, 1024, torch.tensor([2, 2, t], dtype=torch.int32)).flatten().float()
    sigma = (p * (1 - p) / n) ** 0.5
    for m in (a, b, c):
        assert abs((1 - m.mean().item()) - p) < 5 * sigma
    # pairs of masks and neighbouring elements are independent: P(both dropped) = p^2
    sigma2 = (p * p * (1 - p * p) / n) ** 0.5
    for x, y in ((a, b), (a, c), (a[:-1], a[1:]), (a[:-1024], a[1024:])):
        both = ((1 - x) * (1 - y)).mean().item()
        assert abs(both - p * p) < 6 * sigma2, both


def test_dropout_keeps_scales_and_its_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 48, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(5)
    y = hash_dropout(x, 0.25, compiled=False)
    torch.manual_seed(5)
    key = draw_key(0.25)
    mask = keep_mask(64, 48, key)
    scale = torch.tensor(1.0) / (1.0 - torch.tensor(threshold(0.25) / 2 ** KEEP_BITS, dtype=torch.float32))
    assert abs(float(scale) - 1 / 0.75) < 1e-6
    assert torch.equal(y.detach(), torch.where(mask, x.detach() * scale, 0.0))
    g = torch.randn(64, 48)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(mask, g * scale, 0.0))
    # another draw, another mask
    assert not torch.equal(hash_dropout(x, 0.25, compiled=False), y)


def test_module_is_identity_in_eval_mode_and_keeps_leading_dims():
    m = HashDropout(0.5)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.5
    x = torch.randn(2, 5, 8)
    m.eval()
    assert m(x) is x
    m.train()
    y = m(x)
    assert y.shape == x.shape and 0 < int((y == 0).sum()) < x.numel()
    assert torch.allclose(y[y != 0], (x * 2)[y != 0])


@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_dropout_equals_eager(dtype):
    for p in (0.1, 0.05, 0.3):  # the rate is data, not a constant: no recompilation per rate
        key = torch.tensor([77, -5, threshold(p)], dtype=torch.int32)
        for rows, cols in ((96, 64), (130, 64), (31, 200)):  # a second shape recompiles with dynamic sizes
            x = torch.randn(rows, cols).to(dtype)
            assert torch.equal(dropped(x, key, True), dropped(x, key, False))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not compile_available(), reason="inductor needs a C++ compiler"))])
def test_fused_backward_pass_uses_the_forward_mask(compiled):
    """The fast path's backward regenerates a member's mask once for its dropped input and for the
    gradient through the dropout: the same values as two separate passes, up to dx's one rounding."""
    from qlorakit.lora.dropout import dropped_backward_

    torch.manual_seed(3)
    key = torch.tensor([11, -12, threshold(0.2)], dtype=torch.int32)
    x, t = torch.randn(70, 48).to(torch.bfloat16), torch.randn(70, 48).to(torch.bfloat16)
    dx = torch.randn(70, 48).to(torch.bfloat16)
    expect_dx = (dx.float() + dropped(t.float(), key, False)).to(torch.bfloat16)
    out = dx.clone()
    xd = dropped_backward_(x, t, out, key, compiled)
    assert torch.equal(xd, dropped(x, key, False))
    assert torch.equal(out, expect_dx)


def test_generator_mask_off_the_cpu_is_a_function_of_the_key():
    """The mask used on GPUs (the device's generator seeded with the key), run here on the CPU."""
    from qlorakit.lora.dropout import generator_keep_mask

    key = draw_key(0.1)
    a = generator_keep_mask(512, 512, key, "cpu")
    assert torch.equal(a, generator_keep_mask(512, 512, key, "cpu"))
    other = generator_keep_mask(512, 512, draw_key(0.1), "cpu")
    n = a.numel()
    for m in (a, other):
        assert abs((1 - m.float().mean().item()) - 0.1) < 5 * (0.09 / n) ** 0.5
    both = ((~a) & (~other)).float().mean().item()
    assert abs(both - 0.01) < 6 * (0.01 * 0.99 / n) ** 0.5

