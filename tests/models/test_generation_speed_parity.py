"""Forwards through the bf16 weight cache (and its fp32 copy for one-token products) give the same
logits and generated tokens as bitsandbytes' own dequantize-then-matmul path, with an adapter on and
off, and leave training and saved state untouched (parity only: no timing). The cache serves
``generate`` where the fast decoder does not run a model and prompts longer than the decoder's packed
products take; here transformers' own ``generate`` runs over the cached modules."""

from __future__ import annotations

import torch

from qlorakit.config import LoraConfig, load_recipe
from qlorakit.lora import adapters_disabled, attach_lora, lora_parameters, lora_state_dict
from qlorakit.models import generate, load_base_model
from qlorakit.quant import is_linear4bit
from qlorakit.quant.fast_linear import cache_bf16_weights, drop_bf16_weights


def _loaded(model_dir):
    loaded = load_base_model(load_recipe(None, [f"model.base={model_dir}", "model.compute_dtype=bf16"]).model)
    torch.manual_seed(0)
    attach_lora(loaded.model, LoraConfig(r=8, alpha=16))
    with torch.no_grad():
        for p in lora_parameters(loaded.model):
            p.normal_(0, 0.05)
    return loaded


def _hf_text(model, tok, prompt: str, n: int = 24) -> str:
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _tokens(loaded, prompt: str) -> list[int]:
    enc = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model(**enc, use_cache=False).logits
    return out[0].argmax(-1).tolist()


def test_cached_weights_give_the_same_logits_and_generations(tiny_model_dir):
    loaded = _loaded(tiny_model_dir)
    model, tok = loaded.model, loaded.tokenizer
    prompt = "The shop opens at nine on weekdays and"
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ref_logits = model(**enc, use_cache=False).logits
    ref_text = _hf_text(model, tok, prompt)
    with adapters_disabled(model):
        ref_base = _hf_text(model, tok, prompt)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    n_sd = len(model.state_dict())

    added = cache_bf16_weights(model)
    n4 = [m for m in model.modules() if is_linear4bit(m)]
    # bf16 copies, and on the CPU fp32 copies of the same values for one-token (decode) products
    assert added == sum(6 * m.in_features * m.out_features for m in n4) > 0
    assert all(torch.equal(m._qlk_w32, m._qlk_w16.float()) for m in n4)
    with torch.no_grad():
        logits = model(**enc, use_cache=False).logits
    assert torch.equal(logits, ref_logits)  # the same bf16 values through the same matmul shapes
    assert _hf_text(model, tok, prompt) == ref_text
    with adapters_disabled(model):
        assert _hf_text(model, tok, prompt) == ref_base
    assert ref_text != ref_base  # the adapter changes the output, so the comparison means something
    # the cache is not state: the state dict and the adapter are unchanged
    assert len(model.state_dict()) == n_sd
    assert all(torch.equal(v, state[k]) for k, v in lora_state_dict(model).items())
    drop_bf16_weights(model)
    assert all(getattr(m, "_qlk_w16", None) is None and getattr(m, "_qlk_w32", None) is None for m in n4)
    # without room for both copies, only the bf16 one is kept
    assert cache_bf16_weights(model, max_bytes=sum(3 * m.in_features * m.out_features for m in n4)) == sum(
        2 * m.in_features * m.out_features for m in n4
    )
    assert all(getattr(m, "_qlk_w32", None) is None for m in n4)
    assert _hf_text(model, tok, prompt) == ref_text
    drop_bf16_weights(model)


def test_forward_with_gradients_keeps_the_bitsandbytes_path(tiny_model_dir):
    loaded = _loaded(tiny_model_dir)
    model, tok = loaded.model, loaded.tokenizer
    enc = tok("A short line of text to train on.", return_tensors="pt", add_special_tokens=False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)

    def grads():
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**enc, labels=enc["input_ids"], use_cache=False).loss.backward()
        return [p.grad.clone() for p in params]

    before = grads()
    cache_bf16_weights(model)
    after = grads()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert generate(model, tok, "Hello", max_new_tokens=4).completion_tokens >= 1
    drop_bf16_weights(model)
