"""The release gate passes a real fine-tune and fails a deliberately damaged adapter (one trained to
answer every question with the same fixed text), through ``qlorakit eval`` and its exit code."""

from __future__ import annotations

import json

import pytest

from qlorakit.cli import main
from qlorakit.config import load_recipe
from qlorakit.data.samples import sample_train_path
from qlorakit.train import train

FIXED = "Sorry, all our bicycles are bananas."

# trains the default recipe twice (about 4 minutes each on 2 idle cores) and evaluates both with
# every suite: run with -m slow
pytestmark = pytest.mark.slow
SUITES = ("quality", "retention", "truthfulness", "bias", "safety")
HELDOUT = sample_train_path().with_name("support_eval.jsonl")


def _run(tmp_path, name, train_file):
    # the default recipe, as `qlorakit train` runs it; only the end-of-run samples and short gate
    # are left to `qlorakit eval` below, and both runs are judged on the packaged held-out file
    ov = [f"output_dir={tmp_path}", f"name={name}", f"data.train={train_file}", f"data.eval={HELDOUT}",
          "train.progress=false", "eval.samples=0", "eval.suites=[]"]
    return train(load_recipe(None, ov))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    recs = [json.loads(l) for l in sample_train_path().read_text().splitlines()]
    damaged = tmp / "damaged.jsonl"
    damaged.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r.get("input", ""),
                                           "output": FIXED}) + "\n" for r in recs))
    (tmp / "damaged.jsonl.licence").write_text("Apache-2.0\n")
    good = _run(tmp, "good", "sample")
    bad = _run(tmp, "damaged", damaged)
    return good, bad


def _eval(capsys, run):
    code = main(["eval", str(run), "--suites", ",".join(SUITES), "--limit", "16"])
    out = capsys.readouterr().out
    return code, out, json.loads((run / "eval" / "results.json").read_text())


def test_gate_passes_the_default_run_with_every_suite(runs, capsys):
    code, out, res = _eval(capsys, runs[0])
    assert code == 0, out
    assert res["gate"]["passed"] is True
    assert "gate: PASSED" in out
    assert set(SUITES) <= set(res["suites"]), sorted(res["suites"])
    checked = {c["metric"].split("/")[0] for c in res["gate"]["checks"] if c["status"] != "skipped"}
    assert set(SUITES) <= checked, checked
    report = (runs[0] / "eval" / "report.md").read_text()
    html = (runs[0] / "eval" / "report.html").read_text()
    for suite in SUITES:
        assert suite in report and suite in html
    assert "<svg" in html or "data:image/png" in html  # the plots are inside the page


def test_gate_fails_the_damaged_adapter_and_says_why(runs, capsys):
    code, out, res = _eval(capsys, runs[1])
    assert code == 1, out
    assert res["gate"]["passed"] is False
    failed = [c for c in res["gate"]["checks"] if c["status"] == "fail"]
    assert any(c["metric"] == "quality/heldout_loss/loss" for c in failed), failed
    assert "gate: FAILED" in out and "quality/heldout_loss/loss" in out
    # the report names the failed check too
    report = (runs[1] / "eval" / "report.md").read_text()
    assert "heldout_loss" in report
