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

# trains the default model twice (a few minutes on 2 idle cores): run with -m slow
pytestmark = pytest.mark.slow


def _run(tmp_path, name, train_file, steps, lr):
    ov = [f"output_dir={tmp_path}", f"name={name}", f"data.train={train_file}", "data.max_seq_len=256",
          "train.micro_batch_size=4", f"train.max_steps={steps}", f"train.lr={lr}", "train.warmup_ratio=0",
          "train.progress=false", "train.checkpoint_every=0", "eval.samples=0", "eval.suites=[]"]
    if name != "good":
        # the held-out part of the packaged sample data, so both runs are judged on the same items
        ov.append(f"data.eval={sample_train_path().with_name('support_eval.jsonl')}")
    else:
        ov.append("data.eval=auto")
    return train(load_recipe(None, ov))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    recs = [json.loads(l) for l in sample_train_path().read_text().splitlines()]
    damaged = tmp / "damaged.jsonl"
    damaged.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r.get("input", ""),
                                           "output": FIXED}) + "\n" for r in recs))
    (tmp / "damaged.jsonl.licence").write_text("Apache-2.0\n")
    good = _run(tmp, "good", "sample", steps=8, lr=1e-3)
    bad = _run(tmp, "damaged", damaged, steps=8, lr=2e-3)
    return good, bad


def _eval(capsys, run):
    code = main(["eval", str(run), "--suites", "quality", "--limit", "12"])
    out = capsys.readouterr().out
    return code, out, json.loads((run / "eval" / "results.json").read_text())


def test_gate_passes_the_fine_tune(runs, capsys):
    code, out, res = _eval(capsys, runs[0])
    assert code == 0, out
    assert res["gate"]["passed"] is True
    assert "gate: PASSED" in out


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
