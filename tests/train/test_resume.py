"""A run killed with SIGKILL and resumed ends with the same adapter as an uninterrupted run, and a
checkpoint is never left half written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _overrides(model_dir: Path, out: Path, name: str, compute: str) -> list[str]:
    return [f"model.base={model_dir}", f"model.compute_dtype={compute}", f"output_dir={out}", f"name={name}",
            "data.max_seq_len=256", "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=8",
            "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.progress=false", "lora.r=4",
            "lora.dropout=0.1", "train.lr=1e-3", "train.threads=1"]


def _driver(overrides: list[str], *, kill_after_step: int | None = None, kill_in_checkpoint: int | None = None,
            finish: bool = False, kill_in_eval: bool = False) -> str:
    """A Python program that trains and SIGKILLs itself at the given moment."""
    return textwrap.dedent(f"""
        import os, signal
        import qlorakit.train.checkpoint as ck
        import qlorakit.train.report as report
        if {kill_in_eval!r}:
            def killed(*a, **k):  # the evaluation after training: held-out losses done, samples not
                os.kill(os.getpid(), signal.SIGKILL)
            report.sample_generations = killed
        from qlorakit.config import load_recipe
        from qlorakit.train import train
        kill_after, kill_in = {kill_after_step!r}, {kill_in_checkpoint!r}
        if kill_in is not None:
            real_save = ck.torch.save
            def save(obj, path, *a, **k):
                # die after the adapter is written but before state.pt: a half-written checkpoint
                if f".step-{{kill_in}}.tmp" in str(path):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_save(obj, path, *a, **k)
            ck.torch.save = save
        def on_step(state):
            if kill_after is not None and state.step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        train(load_recipe(None, {overrides!r}), on_step=on_step, finish={finish!r})
    """)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _resume(run_dir: Path, finish: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    code = f"from qlorakit.train import train; train(resume={str(run_dir)!r}, finish={finish!r})"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _bf16_param() -> object:
    """bf16 in the default run where the CPU computes bf16 natively; elsewhere (AVX2 only, where
    torch's bf16 matmuls are several times slower than fp32 and `auto` trains in fp32) with -m slow."""
    from qlorakit.quant import cpu_supports_bf16

    return pytest.param("bf16", 1e-3, marks=() if cpu_supports_bf16() else pytest.mark.slow)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs of the tests' settings, per compute dtype (made on first use): the
    reference every interrupted run must end equal to (the run's name does not change its training)."""
    root = tmp_path_factory.mktemp("uninterrupted")

    class Runs(dict):
        def __missing__(self, compute: str) -> Path:
            full = _run(_driver(_overrides(tiny_model_dir, root, f"full-{compute}", compute)))
            assert full.returncode == 0, full.stderr[-3000:]
            self[compute] = root / f"full-{compute}"
            return self[compute]

    return Runs()


@pytest.mark.parametrize("compute,tol", [("fp32", 1e-5), _bf16_param()])
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, compute, tol,
                                                                     uninterrupted):
    """fp32: max abs diff below 1e-5. bf16: the same bound is met in practice (the path is
    deterministic); the stated bf16 tolerance is 1e-3, one bf16 rounding step of the largest weights."""

    killed = _run(_driver(_overrides(tiny_model_dir, tmp_path, "killed", compute), kill_after_step=5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "killed"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-4"
    assert not (run / "adapter").exists()

    resumed = _resume(run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diff = _max_diff(_adapter(uninterrupted[compute]), _adapter(run))
    assert diff < tol, f"resumed adapter differs from the uninterrupted one by {diff:.3g}"
    # metrics of the resumed run continue the killed run's history without duplicates
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_kill_while_writing_checkpoint_leaves_previous_one_usable(tiny_model_dir, tmp_path, uninterrupted):
    ov = _overrides(tiny_model_dir, tmp_path, "torn", "fp32")
    torn = _run(_driver(ov, kill_in_checkpoint=4))
    assert torn.returncode == -signal.SIGKILL, torn.stderr[-3000:]
    ck = tmp_path / "torn" / "checkpoints"
    # LATEST still names the last complete checkpoint; the torn one is only a temporary folder
    assert (ck / "LATEST").read_text().strip() == "step-2"
    assert (ck / "step-2" / "state.pt").is_file() and (ck / "step-2" / "adapter_model.safetensors").is_file()
    assert not (ck / "step-4").exists()
    assert (ck / ".step-4.tmp").is_dir() and not (ck / ".step-4.tmp" / "state.pt").exists()

    resumed = _resume(tmp_path / "torn")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _max_diff(_adapter(uninterrupted["fp32"]), _adapter(tmp_path / "torn")) < 1e-5
    assert not (ck / ".step-4.tmp").exists()


def test_resume_finishes_a_run_killed_in_its_final_evaluation_and_refuses_a_finished_one(tiny_model_dir, tmp_path,
                                                                                        capsys):
    """Killed after training, in the evaluation after it: --resume runs that evaluation (no training)
    and writes what an uninterrupted run writes; a finished run is refused."""
    import json

    from qlorakit.config import load_recipe
    from qlorakit.train import TrainError, train

    short = ["eval.samples=1", "eval.max_new_tokens=8", "eval.gate.enabled=false"]  # the gate's suites take ~25 s
    train(load_recipe(None, _overrides(tiny_model_dir, tmp_path, "whole", "fp32") + short))  # uninterrupted
    cut = _run(_driver(_overrides(tiny_model_dir, tmp_path, "cut", "fp32") + short, finish=True, kill_in_eval=True))
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    run = tmp_path / "cut"
    assert (run / "adapter").is_dir() and (run / "train_state.json").is_file()
    assert (run / "checkpoints" / "LATEST").is_file() and not (run / "MODEL_CARD.md").exists()
    metrics_before = (run / "metrics.jsonl").read_text()
    adapter_before = _adapter(run)
    # finish=False (tests, benchmarks) would leave nothing to do: refused, and told how to evaluate it
    with pytest.raises(TrainError, match="already finished") as e:
        train(resume=run, finish=False)
    assert "no MODEL_CARD.md" in str(e.value) and f"qlorakit eval {run}" in str(e.value)

    capsys.readouterr()
    train(resume=run)
    assert "held-out loss: base" in capsys.readouterr().out  # the evaluation's summary
    assert (run / "MODEL_CARD.md").is_file()
    assert (run / "metrics.jsonl").read_text() == metrics_before  # no step was trained again
    assert _max_diff(adapter_before, _adapter(run)) == 0.0
    got, want = (json.loads((tmp_path / n / "eval" / "results.json").read_text()) for n in ("cut", "whole"))
    assert got["train"]["steps"] == want["train"]["steps"] == 8
    assert got["train"]["tokens"] == want["train"]["tokens"] > 0
    for k in ("base_loss", "tuned_loss", "examples"):
        assert got["heldout"][k] == pytest.approx(want["heldout"][k], rel=1e-5), k
    assert got["heldout"]["tuned_loss"] != got["heldout"]["base_loss"]  # the trained adapter was loaded
    assert got["samples"] == want["samples"]

    with pytest.raises(TrainError, match="already finished") as e:
        train(resume=run)
    assert "qlorakit eval" not in str(e.value)


def test_resume_takes_only_settings_that_leave_the_training_unchanged(tiny_model_dir, tmp_path):
    from qlorakit.config import load_recipe
    from qlorakit.train import CheckpointError, TrainError, train

    killed = _run(_driver(_overrides(tiny_model_dir, tmp_path, "cut", "fp32"), kill_after_step=5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "cut"
    before = (run / "recipe.yaml").read_text()
    # a new learning rate or batch size would change what a resumed run trains: refused, nothing written
    for override in (["train.lr=0.005"], ["train.micro_batch_size=4", "train.log_every=2"]):
        with pytest.raises(TrainError) as e:
            train(resume=run, overrides=override, finish=False)
        assert override[0].split("=")[0] in str(e.value) and "start a new run" in str(e.value)
        assert (run / "recipe.yaml").read_text() == before
    # a truncated checkpoint adapter: named, with the older checkpoint pointed out
    adapter = run / "checkpoints" / "step-4" / "adapter_model.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match=r"step-4/adapter_model\.safetensors: cannot be read .*step-2"):
        train(resume=run, finish=False)
    adapter.write_bytes(good)
    # how the run logs and evaluates may change; the run folder's recipe records it
    resumed = subprocess.run(
        [sys.executable, "-c", f"from qlorakit.train import train; train(resume={str(run)!r}, "
                               "overrides=['train.log_every=3', 'eval.samples=1'], finish=False)"],
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src")), capture_output=True, text=True,
        timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    saved = load_recipe(run / "recipe.yaml")
    assert (saved.train.log_every, saved.eval.samples, saved.train.lr) == (3, 1, 1e-3)
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 6, 8]  # every step before the cut, then every third and the last


def test_logged_learning_rate_is_the_one_each_step_used(tiny_model_dir, tmp_path):
    import json

    from qlorakit.config import load_recipe
    from qlorakit.train import train

    ov = _overrides(tiny_model_dir, tmp_path, "lr", "fp32") + ["train.warmup_ratio=0", "train.schedule=linear",
                                                              "train.checkpoint_every=0", "train.max_steps=4"]
    run = train(load_recipe(None, ov), finish=False)
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # linear decay from 1e-3 over 4 steps
