"""A run trained on share-alike and non-commercial data says so in its ledger, model card and adapter;
under licence policy ``block`` it refuses to start and says why (a tiny local base model)."""

from __future__ import annotations

import json

import pytest

from qlorakit.config import load_recipe


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                      bos_token_id=tiny_tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tiny_tokenizer.save_pretrained(str(folder))
    return folder


def _recipe(tmp_path, base, sources, policy):
    import yaml

    data = {
        "name": "terms", "output_dir": str(tmp_path / "runs"), "seed": 1,
        "model": {"base": str(base), "compute_dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"sources": sources, "eval": None, "max_seq_len": 64, "licence_policy": policy},
        "train": {"max_steps": 1, "micro_batch_size": 2, "checkpoint_every": 0, "progress": False},
        "eval": {"samples": 1, "max_new_tokens": 2, "suites": [], "gate": {"enabled": False}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_recipe(path)


@pytest.fixture()
def sources(shared, tmp_path, write_jsonl):
    nc = write_jsonl(tmp_path / "tickets.jsonl", [
        {"instruction": f"how do i reset my password {i}", "input": "", "output": "click the reset link on the page"}
        for i in range(16)])
    return [{"path": str(shared / "dialogue" / "sgd_train_first2_per_file.json"), "weight": 0.1},
            {"path": str(nc), "licence": "CC-BY-NC-4.0", "origin": "our ticket export"}]


def test_run_states_the_terms(tmp_path, tiny_base, sources):
    train = pytest.importorskip("qlorakit.train").train
    from safetensors import safe_open

    run = train(_recipe(tmp_path, tiny_base, sources, "warn"))
    ledger = json.loads((run / "data_manifest.json").read_text(encoding="utf-8"))
    terms = ledger["effective_terms"]
    assert terms["commercial_use"] is False and terms["share_alike"] is True
    assert terms["adapter_licence"] == "CC-BY-SA-4.0"
    assert {s["licence"] for s in ledger["sources"]} == {"CC-BY-SA-4.0", "CC-BY-NC-4.0"}
    card = (run / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "**Commercial use:** not allowed" in card
    assert "must be shared under CC-BY-SA-4.0" in card
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert conf["qlorakit"]["data_commercial_use"] == "false"
    assert conf["qlorakit"]["data_share_alike"] == "true"
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["adapter_licence"] == "CC-BY-SA-4.0" and meta["data_commercial_use"] == "false"


def test_block_policy_refuses_to_start(tmp_path, tiny_base, sources):
    train = pytest.importorskip("qlorakit.train").train
    from qlorakit.data.ledger import LicenceError

    with pytest.raises(LicenceError) as e:
        train(_recipe(tmp_path, tiny_base, sources, "block"))
    assert "CC-BY-NC-4.0 is non-commercial" in str(e.value) and "CC-BY-SA-4.0 is share-alike" in str(e.value)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # no run folder was started
