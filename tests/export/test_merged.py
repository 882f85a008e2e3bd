"""The merged export: the adapter merged in fp32 into the dequantized base, checked against the tuned model."""

from __future__ import annotations

import json

import pytest
import torch

from qlorakit.data import no_pack, prepare_data
from qlorakit.export import REPORT_NAME, export_run, merged_model, tuned_full_precision
from qlorakit.export.source import fp32_compute
from qlorakit.lora import lora_layers

# fp32 merge vs unmerged fp32 LoRA: the same sums in another order, so only float rounding differs
FP32_ATOL = 1e-4


def _heldout_ids(source, n=3):
    data = prepare_data(source.recipe.data, source.loaded.tokenizer, source.recipe.seed)
    rows = no_pack(data.val_tokens[:n], source.recipe.data.max_seq_len, source.loaded.tokenizer.pad_token_id)
    return [torch.tensor([r.input_ids]) for r in rows]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_delta_is_not_trivial(export_source):
    # a merge test on an adapter whose B is still zero would prove nothing
    deltas = [float((m.lora_B.weight @ m.lora_A.weight).abs().max()) * m.scaling
              for _, m in lora_layers(export_source.loaded.model)]
    assert max(deltas) > 1e-3


def test_reference_equals_the_4bit_model(export_source):
    """The parity reference (NF4 weights dequantized once + LoRA, fp32) computes what the 4-bit model
    computes with fp32 activations."""
    ref = tuned_full_precision(export_source)
    for ids in _heldout_ids(export_source, 2):
        with fp32_compute(export_source.loaded.model):
            want = _logits(export_source.loaded.model, ids)
        got = _logits(ref, ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


def test_merge_works_on_a_copy(export_source):
    model = export_source.loaded.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    merged_model(export_source)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


@pytest.fixture(scope="module")
def merged_fp32(tiny_run, tmp_path_factory):
    import shutil

    run = tmp_path_factory.mktemp("merged") / "run"
    shutil.copytree(tiny_run, run)
    out = run.parent / "out-fp32"
    res = export_run_fn(run, "merged", out, dtype="fp32")
    return run, out, res


def export_run_fn(run, fmt, out, **kw):
    return export_run(run, fmt, out, measure=False, **kw)


def test_merged_fp32_logits_match_tuned_full_precision(merged_fp32, export_source):
    from transformers import AutoModelForCausalLM

    _, out, res = merged_fp32
    assert res.passed, res.reasons
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = tuned_full_precision(export_source)
    for ids in _heldout_ids(export_source):
        want, got = _logits(ref, ids), _logits(exported, ids)
        assert torch.allclose(got, want, atol=FP32_ATOL, rtol=0), float((got - want).abs().max())


def test_merged_folder_is_a_complete_hf_model(merged_fp32, export_source):
    _, out, _ = merged_fp32
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", REPORT_NAME,
            "README.md"} <= names
    terms = export_source.adapter_config["qlorakit"]
    readme = (out / "README.md").read_text()
    assert f"**Licence:** {terms['adapter_licence']}" in readme and terms["data_terms"] in readme
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == export_source.loaded.tokenizer.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos


def test_heldout_loss_recorded_next_to_tuned(merged_fp32):
    run, out, res = merged_fp32
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["status"] == "passed"
    (p,) = report["parity"]
    assert abs(p["export_loss"] - p["source_loss"]) < 1e-3
    assert p["loss_increase"] == pytest.approx(p["export_loss"] - p["source_loss"])
    card = (run / "MODEL_CARD.md").read_text()
    assert "<!-- qlorakit:exports:start -->" in card
    assert f"{p['source_loss']:.4f} -> {p['export_loss']:.4f}" in card
    reg = json.loads((run / "exports.json").read_text())
    assert reg[-1]["out"] == str(out.resolve()) and reg[-1]["status"] == "passed"


def test_merged_bf16_close_to_full_precision(run_copy, export_source, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out-bf16"
    # a random tiny model has near-flat logits, so greedy tokens flip under bf16 rounding: this test
    # checks the weights, with the agreement threshold relaxed
    res = export_run_fn(run_copy, "merged", out, overrides=["export.max_token_disagreement=1.0"])
    assert res.passed, res.reasons
    assert json.loads((out / "config.json").read_text()).get("dtype") == "bfloat16"
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = tuned_full_precision(export_source)
    for ids in _heldout_ids(export_source, 2):
        want, got = _logits(ref, ids), _logits(exported, ids)
        rel = float((got - want).norm() / want.norm())
        assert rel < 2e-2, rel  # bf16 keeps 8 bits of mantissa: ~0.4% per weight


def test_merge_into_nf4_warns_with_measured_loss(run_copy, tmp_path):
    out = tmp_path / "out-nf4"
    res = export_run_fn(run_copy, "merged", out, dtype="nf4",
                        overrides=["export.lossy_max_token_disagreement=1.0", "export.lossy_max_loss_increase=10"])
    assert res.passed, res.reasons
    (rep,) = res.reports
    (warning,) = res.warnings
    assert "lossy" in warning and f"{rep.source_loss:.4f}" in warning and f"{rep.export_loss:.4f}" in warning
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_on_device_figures_are_measured_and_carded(run_copy, tmp_path):
    out = tmp_path / "out-measured"
    res = export_run(run_copy, "merged", out, dtype="fp32", measure=True)
    assert res.passed, res.reasons
    items = res.report["on_device"]["items"]
    assert [i["what"] for i in items] == ["exported merged folder", "adapter served by qlorakit (4-bit base + LoRA)"]
    for item in items:
        m = item["measured"]
        assert "error" not in m, m
        assert m["tokens_per_s"] > 0 and m["peak_rss_mb"] > m["runtime_rss_mb"] > 0
        assert all(size > 0 for size in item["files"].values())
    card = (run_copy / "MODEL_CARD.md").read_text()
    section = card[card.index("## On-device"):]
    assert f"{items[1]['measured']['tokens_per_s']:.1f}" in section and "adapter served by qlorakit" in section
