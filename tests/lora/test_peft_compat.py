"""A saved adapter loads with peft.PeftModel.from_pretrained over the same 4-bit base, and its
logits match qlorakit's own model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qlorakit.config import LoraConfig, ModelConfig
from qlorakit.lora import adapters_disabled, attach_lora, load_adapter, lora_layers, save_adapter
from qlorakit.models import load_base_model, resolve_base
from qlorakit.quant import guard_linear4bit


def _hf_4bit(folder, compute=torch.float32):
    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))


def _ours_with_random_adapter(base: str, tmp_path, r=8):
    loaded = load_base_model(ModelConfig(base=base, compute_dtype="fp32"))
    torch.manual_seed(0)
    attach_lora(loaded.model, LoraConfig(r=r, alpha=16, dropout=0.0))
    with torch.no_grad():
        for _, lay in lora_layers(loaded.model):
            lay.lora_B.weight.normal_(0, 0.02)
    out = save_adapter(loaded.model, tmp_path / "adapter", LoraConfig(r=r, alpha=16), base_name="test-base",
                       metadata={"licence_terms": "test"})
    return loaded, out


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_peft_loads_adapter_and_logits_match(which, tiny_model_dir, tmp_path):
    from peft import PeftModel

    base = str(tiny_model_dir) if which == "tiny" else "default"
    folder = tiny_model_dir if which == "tiny" else resolve_base("default")[0]
    loaded, adapter_dir = _ours_with_random_adapter(base, tmp_path)
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8 and conf["lora_alpha"] == 16

    peft_model = PeftModel.from_pretrained(_hf_4bit(folder), str(adapter_dir))
    peft_model.eval()
    loaded.model.eval()
    ids = torch.tensor([[1, 9690, 198, 4093, 198, 26843, 30, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits
        with adapters_disabled(loaded.model):
            base_logits = loaded.model(input_ids=ids).logits
    # the adapter changes the output, and peft reproduces exactly that change. The peft model is
    # guarded like ours: unguarded, bitsandbytes repacks its weights for a bf16 CPU kernel in a
    # no-grad pass, which rounds differently (and breaks later LoRA gradients).
    assert (ours - base_logits).abs().max() > 1e-3
    guard_linear4bit(peft_model)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)


def test_load_adapter_round_trip_and_key_check(tiny_model_dir, tmp_path):
    loaded, adapter_dir = _ours_with_random_adapter(str(tiny_model_dir), tmp_path, r=4)
    other = load_base_model(ModelConfig(base=str(tiny_model_dir), compute_dtype="fp32"))
    load_adapter(other.model, adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(other.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    # an adapter for a different shape is refused with the offending key named
    from safetensors.torch import load_file, save_file

    from qlorakit.lora import AdapterError, load_lora_state_dict

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = sorted(state)[0]
    state.pop(key)
    with pytest.raises(AdapterError, match="missing key"):
        load_lora_state_dict(other.model, state)
