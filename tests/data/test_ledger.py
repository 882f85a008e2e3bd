"""The run's ledger: sources, hashes, findings, effective terms; the licence gate; card and metadata."""

from __future__ import annotations

import json
import logging
import time

import pytest

from qlorakit.config import DataConfig, SourceConfig, load_recipe
from qlorakit.data import prepare_data, sha256_path
from qlorakit.data.ledger import LicenceError, adapter_metadata, build_ledger, licence_gate, terms_markdown

SUPPORT = [{"instruction": f"question number {i} about my order", "input": "",
            "output": f"answer {i}: write to me at person{i}@gmail.com"} for i in range(12)]


def _nc_file(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "support.jsonl", SUPPORT)
    (tmp_path / "support.jsonl.licence").write_text("CC-BY-NC-4.0\ninternal support archive\n", encoding="utf-8")
    return path


def _ledger(cfg, tokenizer):
    prepared = prepare_data(cfg, tokenizer, seed=1)
    return build_ledger(cfg, prepared), prepared


def test_share_alike_and_non_commercial_sources(shared, tmp_path, tiny_tokenizer, write_jsonl):
    sgd = shared / "dialogue" / "sgd_train_first2_per_file.json"
    nc = _nc_file(tmp_path, write_jsonl)
    cfg = DataConfig(sources=[SourceConfig(path=str(sgd), weight=0.5),
                              SourceConfig(path=str(nc), origin="ticket export", weight=2.0)],
                     eval=None, max_seq_len=256)
    ledger, prepared = _ledger(cfg, tiny_tokenizer)
    by_name = {s["path"].rsplit("/", 1)[-1]: s for s in ledger["sources"]}
    s_sgd, s_nc = by_name["sgd_train_first2_per_file.json"], by_name["support.jsonl"]
    assert s_sgd["sha256"] == sha256_path(sgd) and s_nc["sha256"] == sha256_path(nc)
    assert (s_sgd["licence"], s_sgd["licence_from"]) == ("CC-BY-SA-4.0", "manifest")
    assert (s_nc["licence"], s_nc["licence_from"], s_nc["origin"]) == ("CC-BY-NC-4.0", "sidecar", "ticket export")
    # the validation split is held out of the records first; the weights then apply to the rest
    assert s_sgd["rows"] == 192 and s_nc["rows"] == 12
    held = s_sgd["rows_held_out"] + s_nc["rows_held_out"]
    assert held == len(prepared.val_examples) == round(204 * cfg.val_fraction)
    assert s_sgd["rows_used"] == round(0.5 * (192 - s_sgd["rows_held_out"]))
    assert s_nc["rows_used"] == 2 * (12 - s_nc["rows_held_out"])
    assert len(prepared.train_examples) == s_sgd["rows_used"] + s_nc["rows_used"]
    assert (s_sgd["weight"], s_nc["weight"]) == (0.5, 2.0)
    # findings counted on the training examples, each once although weight 2 repeats them
    n_nc_train = len({id(e) for e in prepared.train_examples if e.source == str(nc)})
    assert s_nc["findings"]["pii"] == {"email": n_nc_train}
    assert s_sgd["findings"]["pii"]["phone"] > 0
    t = ledger["effective_terms"]
    assert t["commercial_use"] is False and t["share_alike"] is True
    assert t["licences"] == ["CC-BY-NC-4.0", "CC-BY-SA-4.0"]
    assert t["attribution_required"] is True and t["adapter_licence"] == "CC-BY-SA-4.0"
    assert any("non-commercial" in n for n in t["notes"]) and any("share-alike" in n for n in t["notes"])
    json.dumps(ledger)  # the ledger is plain JSON

    card = terms_markdown(ledger)
    assert "**Commercial use:** not allowed" in card
    assert "must be shared under CC-BY-SA-4.0" in card
    assert "support.jsonl" in card and "CC-BY-NC-4.0 (sidecar)" in card
    assert s_sgd["rows_held_out"] > 0
    assert f"| {s_sgd['rows_used']} of 192 (weight 0.5, {s_sgd['rows_held_out']} held out for validation) |" in card
    meta = adapter_metadata(ledger)
    assert meta["data_commercial_use"] == "false" and meta["data_share_alike"] == "true"
    assert meta["adapter_licence"] == "CC-BY-SA-4.0"
    assert all(isinstance(v, str) and len(v) <= 1000 for v in meta.values())

    with pytest.raises(LicenceError) as e:
        licence_gate(ledger, "block")
    msg = str(e.value)
    assert "CC-BY-NC-4.0 is non-commercial" in msg and "CC-BY-SA-4.0 is share-alike" in msg
    assert "data.licence_policy=warn" in msg


def _key(ex):
    return json.dumps([ex.text, ex.messages], sort_keys=True)


def test_weighted_sources_never_train_on_a_held_out_record(tmp_path, tiny_tokenizer, write_jsonl):
    """A weight repeats training records only: the validation split is drawn from the distinct
    records before, and copies of one record (in the data itself) stay on one side."""
    recs = [{"instruction": f"how do I reset device {i}?", "output": f"hold button {i} for ten seconds"}
            for i in range(40)]
    recs += recs[:5]  # five records twice in the file
    path = write_jsonl(tmp_path / "w.jsonl", recs)
    for weight in (3.0, 2.5, 1.0, 0.5):
        cfg = DataConfig(sources=[SourceConfig(path=str(path), weight=weight, licence="MIT")], eval=None,
                         max_seq_len=128, val_fraction=0.3)
        prepared = prepare_data(cfg, tiny_tokenizer, seed=3)
        train_keys = {_key(e) for e in prepared.train_examples}
        val_keys = {_key(e) for e in prepared.val_examples}
        assert val_keys and not (train_keys & val_keys), weight
        if weight >= 1:
            assert len(train_keys) + len(val_keys) == 40
        info = prepared.sources[0]
        assert info.rows == 45 and info.rows_held_out == len(prepared.val_examples) >= round(45 * 0.3)
        assert info.rows_used == len(prepared.train_examples)
        kept = 45 - info.rows_held_out
        assert info.rows_used == int(weight) * kept + round((weight - int(weight)) * kept)
        ledger = build_ledger(cfg, prepared)
        assert ledger["sources"][0]["rows_used"] == info.rows_used
        assert ledger["sources"][0]["rows_held_out"] == info.rows_held_out


def test_warn_policy_logs_and_goes_on(tmp_path, tiny_tokenizer, write_jsonl, caplog):
    cfg = DataConfig(sources=[SourceConfig(path=str(_nc_file(tmp_path, write_jsonl)))], eval=None)
    ledger, _ = _ledger(cfg, tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="qlorakit.data.ledger"):
        licence_gate(ledger, "warn")
    assert "non-commercial" in caplog.text


def test_permissive_sources_pass_the_gate(shared, tiny_tokenizer):
    cfg = DataConfig(train=str(shared / "instruction" / "self_instruct_seed_tasks.jsonl"), eval=None)
    ledger, _ = _ledger(cfg, tiny_tokenizer)
    licence_gate(ledger, "block")
    t = ledger["effective_terms"]
    assert t["commercial_use"] is True and t["share_alike"] is False and t["adapter_licence"] == "Apache-2.0"
    assert "**Commercial use:** allowed" in terms_markdown(ledger)


def test_missing_licence_blocks(tmp_path, tiny_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "mine.jsonl", SUPPORT)
    ledger, _ = _ledger(DataConfig(train=str(path), eval=None, licence_policy="block"), tiny_tokenizer)
    assert ledger["effective_terms"]["commercial_use"] is False
    with pytest.raises(LicenceError, match="no licence given"):
        licence_gate(ledger, "block")


def test_default_sample_checks_are_fast_and_clean(tiny_tokenizer):
    pytest.importorskip("qlorakit.data.samples")
    cfg = load_recipe(None).data
    build_ledger(cfg, prepare_data(cfg, tiny_tokenizer, seed=0))  # warm the evaluation-set index
    prepared = prepare_data(cfg, tiny_tokenizer, seed=0)
    t0 = time.perf_counter()
    ledger = build_ledger(cfg, prepared)
    assert time.perf_counter() - t0 < 2.0
    c = ledger["findings"]["counts"]
    # the fictional shop's contact details are placeholders, not personal data; no evaluation overlap
    assert c["pii_records"] == 0 and c["placeholders"] > 0 and c["contaminated_records"] == 0
    assert ledger["effective_terms"]["commercial_use"] is True
    assert [s["role"] for s in ledger["sources"]] == ["train", "eval"]


def test_held_out_examples_that_do_not_fit_are_an_error_not_a_perfect_score(tmp_path, tiny_tokenizer, write_jsonl):
    short = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "what is it", "output": "it is"}] * 4)
    long_q = " ".join(["what is the a an of to and"] * 12)
    held = write_jsonl(tmp_path / "held.jsonl", [{"instruction": long_q, "output": "it is"}] * 3)
    cfg = DataConfig(train=str(short), eval=str(held), max_seq_len=16)
    from qlorakit.data import DataError

    with pytest.raises(DataError) as e:
        prepare_data(cfg, tiny_tokenizer, seed=0)
    assert f"{held}: no held-out example has answer tokens within data.max_seq_len=16" in str(e.value)
    ok = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": long_q, "output": "it is"},
                                                {"instruction": "what is it", "output": "it is"}])
    prepared = prepare_data(DataConfig(train=str(short), eval=str(ok), max_seq_len=16), tiny_tokenizer, seed=0)
    assert len(prepared.val_examples) == 2 and len(prepared.val_tokens) == 1
