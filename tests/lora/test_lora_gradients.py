"""LoRA gradients on the 4-bit base equal those of a full-precision model with the dequantized
weights, also right after an evaluation (no-grad) pass — the pass after which bitsandbytes 0.50
repacks Linear4bit weights in place on AVX512-BF16 CPUs unless guarded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlorakit.config import LoraConfig, ModelConfig
from qlorakit.lora import attach_lora, lora_layers
from qlorakit.models import load_base_model
from qlorakit.quant import dequantize, is_linear4bit
from qlorakit.train.loss import plain_loss


def _reference(model4: nn.Module) -> nn.Module:
    """A copy of the 4-bit model whose base linears are plain fp32 linears holding the dequantized weights."""
    ref = copy.deepcopy(model4)
    for name, m in list(ref.named_modules()):
        if is_linear4bit(m):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = dequantize(m).float().clone()
            if m.bias is not None:
                lin.bias.data = m.bias.data.float().clone()
            parent_name, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent_name), leaf, lin)
    ref.requires_grad_(False)
    for _, lay in lora_layers(ref):
        lay.lora_A.weight.requires_grad_(True)
        lay.lora_B.weight.requires_grad_(True)
    return ref


def _grads(model: nn.Module, batch: dict, autocast: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        s, n = plain_loss(model, batch)
    (s / n).backward()
    return float(s / n), {f"{k}.{ab}": getattr(m, f"lora_{ab}").weight.grad.clone()
                          for k, m in lora_layers(model) for ab in "AB"}


def _setup(tiny_model_dir, compute: str):
    loaded = load_base_model(ModelConfig(base=str(tiny_model_dir), compute_dtype=compute))
    model = loaded.model
    torch.manual_seed(0)
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for _, lay in lora_layers(model):  # B = 0 at init would make dL/dA zero: give it values
            lay.lora_B.weight.normal_(0, 0.05)
            lay.lora_A.weight.requires_grad_(True)
            lay.lora_B.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(24).expand(2, 24).clone()}
    return model, batch


@pytest.mark.parametrize("compute,rtol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_lora_gradients_match_dequantized_reference_after_eval_pass(tiny_model_dir, compute, rtol):
    model, batch = _setup(tiny_model_dir, compute)
    ref = _reference(model)
    autocast = torch.bfloat16 if compute == "bf16" else None

    # every 4-bit layer carries the repack guard
    layers4 = [m for m in model.modules() if is_linear4bit(m)]
    assert layers4 and all(m.support_avx512bf16_for_cpu is False for m in layers4)

    loss_ref, g_ref = _grads(ref, batch, autocast)
    loss_a, g_a = _grads(model, batch, autocast)

    # an evaluation pass: eval mode, no grad, inputs without grad (the condition for the repack)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        model(input_ids=batch["input_ids"])
    loss_b, g_b = _grads(model, batch, autocast)

    assert loss_a == pytest.approx(loss_ref, rel=rtol)
    assert loss_b == pytest.approx(loss_ref, rel=rtol)
    for k in g_ref:
        ref_norm = g_ref[k].norm()
        assert ref_norm > 0, k
        for g in (g_a, g_b):
            err = (g[k].float() - g_ref[k].float()).norm() / ref_norm
            assert err < rtol, f"{k}: relative gradient error {err:.2e} (tolerance {rtol})"


def test_gradients_flow_only_to_lora(tiny_model_dir):
    model, batch = _setup(tiny_model_dir, "fp32")
    _grads(model, batch, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
