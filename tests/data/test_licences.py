"""Licence table, where a file's licence comes from, and the findings a licence gives."""

from __future__ import annotations

import json

import pytest

from qlorakit.data.check import CheckOptions, load_source, run_checks
from qlorakit.data.cli import data_main
from qlorakit.data.licences import licence_findings, lookup_licence, normalise_spdx, resolve_licence


@pytest.mark.parametrize("text,spdx", [
    ("Apache-2.0", "Apache-2.0"), ("apache 2.0", "Apache-2.0"), ("Apache License, Version 2.0", "Apache-2.0"),
    ("cc-by-sa 4.0", "CC-BY-SA-4.0"), ("CC BY-NC-SA 4.0", "CC-BY-NC-SA-4.0"), ("GPL-3.0", "GPL-3.0-only"),
    ("Apache-2.0 (oasst1 data); repo MIT", "Apache-2.0"), ("MIT (MMLU hendrycks/test MIT; qlora repo MIT)", "MIT"),
    ("llama3", "other"), ("", ""), ("  ", ""),
    # several licences named: the most restrictive stands for them all, as all of them apply
    ("Apache-2.0 and CC-BY-NC-4.0", "CC-BY-NC-4.0"), ("MIT; data CC-BY-NC-4.0", "CC-BY-NC-4.0"),
    ("MIT (code), CC-BY-NC-SA-4.0 (data)", "CC-BY-NC-SA-4.0"), ("(MIT OR Apache-2.0) AND CC-BY-SA-4.0", "CC-BY-SA-4.0"),
    ("CC-BY-4.0 with a CC-BY-ND-4.0 appendix", "CC-BY-ND-4.0"),
    # a choice between licences: the least restrictive one may be taken
    ("MIT OR GPL-3.0", "MIT"), ("CC-BY-NC-4.0 or CC-BY-4.0", "CC-BY-4.0"),
])
def test_normalise(text, spdx):
    assert normalise_spdx(text) == spdx


def test_flags():
    sa, nc, nd = lookup_licence("CC-BY-SA-4.0"), lookup_licence("CC-BY-NC-4.0"), lookup_licence("CC-BY-ND-4.0")
    assert sa.share_alike and sa.commercial and sa.attribution
    assert not nc.commercial and not nc.share_alike
    assert nd.no_derivatives
    assert lookup_licence("GPL-3.0-only").copyleft and lookup_licence("GPL-3.0-only").share_alike
    assert not lookup_licence("MIT").attribution and lookup_licence("MIT").commercial
    assert lookup_licence("") is None
    odd = lookup_licence("Some-Custom-1.0")
    assert not odd.known and not odd.commercial


def _kinds(sources, base="Apache-2.0"):
    return sorted((f["kind"], f["severity"]) for f in licence_findings(sources, base))


def test_findings_per_licence():
    assert _kinds([{"path": "a", "licence": "Apache-2.0"}]) == []
    assert _kinds([{"path": "a", "licence": ""}]) == [("missing", "block")]
    assert _kinds([{"path": "a", "licence": "CC-BY-NC-4.0"}]) == [("attribution", "info"), ("non_commercial", "block")]
    assert _kinds([{"path": "a", "licence": "CC-BY-SA-4.0"}]) == [("attribution", "info"), ("share_alike", "block")]
    assert ("no_derivatives", "block") in _kinds([{"path": "a", "licence": "CC-BY-ND-4.0"}])
    # GPL-2.0-only cannot be combined with an Apache-2.0 base; GPL-3.0 can (it is share-alike, no conflict)
    assert ("conflict", "block") in _kinds([{"path": "a", "licence": "GPL-2.0-only"}])
    assert ("conflict", "block") not in _kinds([{"path": "a", "licence": "GPL-3.0-only"}])
    # share-alike data cannot adapt a base under custom terms
    assert ("conflict", "block") in _kinds([{"path": "a", "licence": "CC-BY-SA-4.0"}], base="other")
    # two different share-alike licences cannot both be carried
    two = _kinds([{"path": "a", "licence": "CC-BY-SA-4.0"}, {"path": "b", "licence": "GPL-3.0-only"}])
    assert ("conflict", "block") in two
    # a declared commercial agreement overrides the NC flag, and says so
    assert ("non_commercial_overridden", "info") in _kinds(
        [{"path": "a", "licence": "CC-BY-NC-4.0", "commercial_use": True}])
    assert ("non_commercial_declared", "block") in _kinds([{"path": "a", "licence": "MIT", "commercial_use": False}])


def test_licence_from_manifest_sidecar_and_flag(shared, tmp_path):
    sgd = shared / "dialogue" / "sgd_train_first2_per_file.json"
    spdx, origin, how = resolve_licence(sgd)
    assert (spdx, how) == ("CC-BY-SA-4.0", "manifest")
    assert "dstc8-schema-guided-dialogue" in origin
    assert resolve_licence(shared / "instruction" / "oasst1_val_en.jsonl")[0] == "Apache-2.0"
    assert resolve_licence(sgd, "MIT")[0:3:2] == ("MIT", "declared")
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "hello"}\n', encoding="utf-8")
    assert resolve_licence(f) == ("", "", "")
    (tmp_path / "mine.jsonl.licence").write_text("cc-by-nc 4.0\nour support team\n", encoding="utf-8")
    assert resolve_licence(f) == ("CC-BY-NC-4.0", "our support team", "sidecar")


def test_check_on_real_sets_reports_terms(shared, capsys):
    files = [shared / "instruction" / "oasst1_val_en.jsonl", shared / "instruction" / "self_instruct_seed_tasks.jsonl",
             shared / "dialogue" / "sgd_train_first2_per_file.json"]
    assert data_main(["check", *map(str, files), "--json", "--no-contamination"]) == 0
    out = json.loads(capsys.readouterr().out)
    lic = {s["path"].rsplit("/", 1)[-1]: (s["licence"], s["licence_from"]) for s in out["sources"]}
    assert lic == {"oasst1_val_en.jsonl": ("Apache-2.0", "manifest"),
                   "self_instruct_seed_tasks.jsonl": ("Apache-2.0", "manifest"),
                   "sgd_train_first2_per_file.json": ("CC-BY-SA-4.0", "manifest")}
    flagged = [(f["kind"], f["source"].rsplit("/", 1)[-1]) for f in out["findings"] if f["check"] == "licence"]
    assert ("share_alike", "sgd_train_first2_per_file.json") in flagged
    assert all(src == "sgd_train_first2_per_file.json" for _, src in flagged)
    # the same check under policy block exits 1 and says why
    assert data_main(["check", *map(str, files), "--policy", "block", "--no-contamination"]) == 1
    text = capsys.readouterr().out
    assert "BLOCK" in text and "CC-BY-SA-4.0 is share-alike" in text


def test_missing_licence_blocks_under_block(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello there"}])
    report = run_checks([load_source(path)], CheckOptions(policy="block", contamination=False))
    assert [f["kind"] for f in report.blocking] == ["missing"]
    assert "no licence given" in report.blocking[0]["message"]
    assert run_checks([load_source(path)], CheckOptions(contamination=False)).blocking == []


def test_check_a_recipe_uses_its_sources_and_policy(shared, tmp_path, write_jsonl, capsys):
    nc = write_jsonl(tmp_path / "tickets.jsonl", [{"prompt": "reset password?", "response": "use the link"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data:\n  licence_policy: block\n  sources:\n"
        f"    - path: {shared / 'dialogue' / 'sgd_train_first2_per_file.json'}\n      weight: 0.5\n"
        f"    - path: {nc}\n      licence: cc-by-nc 4.0\n      origin: ticket export\n", encoding="utf-8")
    assert data_main(["check", "--recipe", str(recipe), "--no-contamination", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [(s["licence"], s["licence_from"]) for s in out["sources"]] == [
        ("CC-BY-SA-4.0", "manifest"), ("CC-BY-NC-4.0", "declared")]
    assert sorted(f["kind"] for f in out["findings"] if f["blocking"]) == ["non_commercial", "share_alike"]
    # --policy on the command line overrides the recipe's
    assert data_main(["check", "--recipe", str(recipe), "--no-contamination", "--policy", "warn"]) == 0


def test_a_licence_text_naming_a_non_commercial_licence_second_is_not_waved_through(tmp_path, write_jsonl, capsys):
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "reset my password?", "output": "use the link"}])
    for text in ("Apache-2.0 and CC-BY-NC-4.0", "MIT; data CC-BY-NC-4.0"):
        assert data_main(["check", str(path), "--licence", text, "--policy", "block", "--no-contamination",
                          "--json"]) == 1
        out = json.loads(capsys.readouterr().out)
        assert out["sources"][0]["licence"] == "CC-BY-NC-4.0"
        assert [f["kind"] for f in out["findings"] if f["blocking"]] == ["non_commercial"]
