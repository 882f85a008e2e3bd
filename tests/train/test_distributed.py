"""Data parallel training through torchrun: two processes train what one process trains with twice
the gradient accumulation, only the first writes the run folder, and a run killed in the middle
resumes exactly (with the number of processes it was trained with)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def _overrides(model_dir: Path, out: Path, name: str, *, accum: int, dropout: float, steps: int) -> list[str]:
    return [f"model.base={model_dir}", "model.compute_dtype=fp32", f"output_dir={out}", f"name={name}",
            "data.max_seq_len=256", "train.micro_batch_size=2", f"train.grad_accum={accum}",
            f"train.max_steps={steps}", "train.checkpoint_every=2", "train.progress=false", "lora.r=4",
            f"lora.dropout={dropout}", "train.lr=1e-3"]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")


def _torchrun(script: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(script)], env=_env(), capture_output=True, text=True, timeout=600)


SHORT_EVAL = ["eval.samples=1", "eval.max_new_tokens=8", "eval.gate.enabled=false"]


def _qlorakit(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlorakit", *argv], env=_env(), capture_output=True, text=True,
                          timeout=600)


def _driver(path: Path, *, overrides: list[str] | None = None, resume: Path | None = None,
            kill_after_step: int | None = None) -> Path:
    """A training program for torchrun; the first process SIGKILLs itself after the given step."""
    path.write_text(textwrap.dedent(f"""
        import os, signal
        from qlorakit.config import load_recipe
        from qlorakit.train import train
        def on_step(state):
            if state.step == {kill_after_step!r} and os.environ["RANK"] == "0":
                os.kill(os.getpid(), signal.SIGKILL)
        if {None if resume is None else str(resume)!r} is None:
            train(load_recipe(None, {overrides!r}), on_step=on_step, finish=False)
        else:
            train(resume={str(resume)!r}, on_step=on_step, finish=False)
    """))
    return path


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_with_twice_the_accumulation(tiny_model_dir, tmp_path):
    """`qlorakit train --nproc 2` with grad_accum 1 takes the micro-batches one process takes with
    grad_accum 2, sums the same gradients and ends with the same adapter; the first process alone
    writes the run folder and evaluates."""
    from qlorakit.config import load_recipe
    from qlorakit.train import train

    two = _qlorakit("train", "--nproc", "2", *_overrides(tiny_model_dir, tmp_path, "two", accum=1, dropout=0.0, steps=4),
                    *SHORT_EVAL)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(load_recipe(None, _overrides(tiny_model_dir, tmp_path, "one", accum=2, dropout=0.0, steps=4)),
                finish=False)
    run = tmp_path / "two"
    diff = _max_diff(_adapter(one), _adapter(run))
    assert diff < 1e-6, f"two processes' adapter differs from one process's by {diff:.3g}"
    assert _max_diff(_adapter(one), load_file(str(run / "checkpoints" / "step-2" / "adapter_model.safetensors"))) > 1e-4
    m1, m2 = _metrics(one), _metrics(run)
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # one line per step: one process writes
    for a, b in zip(m1, m2):
        assert b["tokens"] == a["tokens"]  # the tokens of both processes' micro-batches
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert json.loads((run / "eval" / "results.json").read_text())["train"]["processes"] == 2
    assert "data parallel in 2 processes" in (run / "MODEL_CARD.md").read_text()
    assert two.stdout.count("run folder:") == 1  # the evaluation's summary, from the first process only
    state = torch.load(run / "checkpoints" / "step-2" / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["train_state"]["micro"] == 4


def test_killed_two_process_run_resumes_exactly_with_two(tiny_model_dir, tmp_path):
    """With LoRA dropout each process draws its own keys; a checkpoint keeps both processes' random
    states, so a run killed after step 3 and resumed from step 2 ends with the uninterrupted run's
    adapter. Resuming it with another number of processes is refused, naming the one it needs."""
    from qlorakit.train import CheckpointError, train

    ov = lambda name: _overrides(tiny_model_dir, tmp_path, name, accum=1, dropout=0.1, steps=6)  # noqa: E731
    full = _torchrun(_driver(tmp_path / "full.py", overrides=ov("full")))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _torchrun(_driver(tmp_path / "killed.py", overrides=ov("cut"), kill_after_step=3))
    assert killed.returncode != 0
    run = tmp_path / "cut"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-2" and not (run / "adapter").exists()
    state = torch.load(run / "checkpoints" / "step-2" / "state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])

    with pytest.raises(CheckpointError, match=r"trained by 2 process\(es\), resumed by 1.*--nproc 2 --resume"):
        train(resume=run, finish=False)

    resumed = _qlorakit("train", "--nproc", "2", "--resume", str(run), *SHORT_EVAL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "MODEL_CARD.md").is_file()
    diff = _max_diff(_adapter(tmp_path / "full"), _adapter(run))
    assert diff < 1e-6, f"resumed adapter differs from the uninterrupted one by {diff:.3g}"
    assert [m["step"] for m in _metrics(run)] == list(range(1, 7))


def test_a_failed_process_is_reported_in_one_line(tiny_model_dir, tmp_path):
    """Bad data under --nproc: each process names the file and line, the launcher says which process
    failed with the processes' exit status (2, a user error), and there is no torchrun traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n')
    out = _qlorakit("train", "--nproc", "2", f"model.base={tiny_model_dir}", f"data.train={bad}",
                    f"output_dir={tmp_path / 'runs'}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.count(f"{bad}:2: malformed JSON") == 2
    assert "qlorakit train (process 1): error:" in out.stderr
    assert "of 2 failed (exit status 2)" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
