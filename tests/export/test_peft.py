"""The PEFT export: the adapter folder as peft (and vLLM) load it, checked through peft itself."""

from __future__ import annotations

import json

import torch

from qlorakit.export import export_run


def test_peft_export_loads_in_peft_and_passes(run_copy, export_source, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "peft"
    res = export_run(run_copy, "peft", out, measure=False)
    assert res.passed, res.reasons
    (rep,) = res.reports
    assert rep.runtime.startswith("peft") and rep.token_agreement == 1.0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] == export_source.adapter_config["r"]
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    # vLLM and peft read these names: base_model.model.<module>.lora_A.weight
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    assert "vllm serve" in (out / "README.md").read_text()
    # peft's own LoRA layers carry the same weights as the run's adapter
    from qlorakit.export.source import build_model, full_precision_state, plain_config

    base = build_model(plain_config(export_source.loaded), full_precision_state(export_source.loaded.model, merge=False))
    model = PeftModel.from_pretrained(base, str(out))
    sd = model.state_dict()
    src = load_file(str(export_source.adapter_dir / "adapter_model.safetensors"))
    k = next(iter(src))
    assert torch.equal(sd[k.replace(".lora_A.weight", ".lora_A.default.weight")
                          .replace(".lora_B.weight", ".lora_B.default.weight")], src[k])


def test_the_readme_lines_load_the_tuned_model(run_copy, tmp_path):
    """The PEFT export's README says how to load it; done literally, it answers as `generate` does."""
    import re

    from qlorakit.models import chat_prompt, generate
    from qlorakit.train import load_run

    out = tmp_path / "peft"
    assert export_run(run_copy, "peft", out, measure=False, check=False).passed
    readme = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1).replace("THIS_FOLDER", repr(str(out)))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own lines
    model = scope["model"].eval()
    loaded, _ = load_run(run_copy)
    prompt = chat_prompt(loaded.tokenizer, [{"role": "user", "content": "Where is my order?"}])
    ours = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=8)
    enc = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        theirs = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert loaded.tokenizer.decode(theirs, skip_special_tokens=True) == ours.text
