"""``qlorakit plan --nproc N`` against ``qlorakit train --nproc N``, through the commands a user runs.

For each N (``--nprocs``, default 1,2) and each round (``--rounds``, in turn, so that the shared
machine's slow and fast spells fall on every N): ``qlorakit plan --nproc N --json`` on a recipe
(real instruction data from ``../shared/data``, packed, sequence 512, LoRA r=16 on every linear,
dropout 0, ``--batch`` sequences per step shared by the N processes), then ``qlorakit train
--nproc N`` with the plan's own settings (the overrides its "to run it" line prints). The run's
``metrics.jsonl`` gives the measured step times (the median after ``--skip`` steps: the first ones
compile) and the first process's peak RSS during training (loading included); the evaluation after
training is turned off, so the predicted peak compared is the plan's loading and training peak.

    python bench/bench_plan_nproc.py                                   # writes bench/results/plan_nproc.md
    python bench/bench_plan_nproc.py --nprocs 2 --rounds 1 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import REPO, cpu_name, git_commit, settle, write_atomic  # noqa: E402

SHARED = Path(os.environ.get("QLORAKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = SHARED / "instruction" / "oasst1_val_en.jsonl"


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode not in (0, 1):  # plan exits 1 when nothing fits; the table says so
        raise SystemExit(f"{' '.join(cmd)} failed with exit {r.returncode}; its output is in {log}")
    return time.perf_counter() - t


def one(n: int, a: argparse.Namespace, work: Path, rnd: int) -> dict[str, Any]:
    if a.batch % n:
        raise SystemExit(f"--batch {a.batch} does not split into {n} processes")
    recipe = [f"data.train={DATA}", "data.max_seq_len=512", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
              f"train.micro_batch_size={a.batch // n}", "train.grad_accum=1", f"train.max_steps={a.steps}",
              "train.checkpoint_every=0", "train.progress=false", "eval.samples=0", "eval.suites=[]",
              "eval.gate.enabled=false", f"output_dir={work}", f"name=n{n}-r{rnd}"]
    plan_json = work / f"plan-n{n}-r{rnd}.json"
    settle(a.settle)
    plan_s = _run([sys.executable, "-m", "qlorakit", "plan", *recipe, "--nproc", str(n), "--budget-gb",
                   str(a.budget_gb), "--json", str(plan_json)], work / f"plan-n{n}-r{rnd}.log")
    p = json.loads(plan_json.read_text())
    settle(a.settle)
    train_s = _run([sys.executable, "-m", "qlorakit", "train", "--nproc", str(n), *recipe, *p["train_overrides"]],
                   work / f"train-n{n}-r{rnd}.log")
    metrics = [json.loads(x) for x in (work / f"n{n}-r{rnd}" / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_time_s"] for m in metrics[a.skip:]]
    step = statistics.median(times)
    tokens = (metrics[-1]["tokens"] - metrics[a.skip - 1]["tokens"]) if a.skip else metrics[-1]["tokens"]
    return {"nproc": n, "round": rnd, "settings": p["settings"], "threads": p["threads"],
            "predicted_step_s": p["step_s"], "measured_step_s": step, "step_s": times,
            "predicted_tokens_per_s": p["tokens_per_s"], "measured_tokens_per_s": tokens / sum(times),
            "predicted_peak_mb": max(p["load_peak_bytes"], sum(p["memory"].values())) / 2**20,
            "predicted_peak_with_eval_mb": p["peak_bytes"] / 2**20,
            "measured_peak_mb": max(m["peak_rss_mb"] for m in metrics),
            "plan_s": plan_s, "train_s": train_s}


def _table(rows: list[dict[str, Any]], cmd: str, started: str) -> str:
    def err(pred: float, meas: float) -> str:
        return f"{100 * (pred - meas) / meas:+.0f}%"

    out = ["# The planner against `qlorakit train`, in one process and several (`--nproc`)", "",
           f"Command: `{cmd}` ({started}, commit {git_commit()}, {cpu_name()}). Each process's predicted "
           "and measured values: the step time of one optimizer step (all processes at once), trained tokens/s "
           "of all processes, and the first process's peak RSS in training (loading included).", "",
           "| processes | threads each | micro-batch x seq | predicted step | measured step (median) | error | "
           "predicted tokens/s | measured tokens/s | predicted peak | measured peak | error |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r["nproc"] for r in rows}):
        rs = [r for r in rows if r["nproc"] == n]
        s = rs[0]["settings"]
        ps = statistics.median(r["predicted_step_s"] for r in rs)
        ms = statistics.median(r["measured_step_s"] for r in rs)
        pp = statistics.median(r["predicted_peak_mb"] for r in rs)
        mp = statistics.median(r["measured_peak_mb"] for r in rs)
        out.append(f"| {n} | {rs[0]['threads']} | {s['micro_batch']} x {s['seq_len']} | {ps:.2f} s | {ms:.2f} s "
                   f"({', '.join(f'{x:.2f}' for x in [r['measured_step_s'] for r in rs])}) | {err(ps, ms)} | "
                   f"{statistics.median(r['predicted_tokens_per_s'] for r in rs):.0f} | "
                   f"{statistics.median(r['measured_tokens_per_s'] for r in rs):.0f} | {pp:.0f} MB | {mp:.0f} MB | "
                   f"{err(pp, mp)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--batch", type=int, default=4, help="sequences per optimizer step, shared by the processes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (compiling)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    ap.add_argument("--settle", type=float, default=60.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plan_nproc.md"))
    a = ap.parse_args(argv)
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: the benchmark's data is missing (set QLORAKIT_SHARED_DATA to the shared data folder)")
    cmd = "python bench/bench_plan_nproc.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-nproc-") as tmp:
        for rnd in range(a.rounds):
            for n in (int(x) for x in a.nprocs.split(",")):
                r = one(n, a, Path(tmp), rnd)
                print(json.dumps(r), flush=True)
                rows.append(r)
    write_atomic(Path(a.out), _table(rows, cmd.strip(), started))
    write_atomic(REPO / "bench" / "out" / (Path(a.out).stem + ".json"),
                 json.dumps({"command": cmd.strip(), "started": started, "rows": rows}, indent=2) + "\n")
    print(Path(a.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
