"""Memory budgets: does a run with the settings `qlorakit plan` chooses stay within the budget given?

For each case ``SEQ:MICRO_BATCH:BUDGET_GB`` (the packaged model and its sample data), two fresh
processes, as a user would run them:

1. ``qlorakit plan data.max_seq_len=SEQ train.micro_batch_size=MB train.max_steps=N --budget-gb B``
   chooses the settings and prints the ``qlorakit train`` command that runs them;
2. that command's settings go to qlorakit's ``train()`` (the function ``qlorakit train`` runs),
   stopped after ``--steps`` optimizer steps; the process's peak RSS, loading included, is measured.

The table gives the chosen settings, the settings the run actually took (from its log), the
predicted and the measured peak, and whether the run stayed within the budget.

    python bench/bench_budget.py                  # writes bench/results/budget.md
    python bench/bench_budget.py --cases 1024:4:2.2,512:4:1.8 --steps 4

With ``--finish`` the plan and the run are told ``--steps`` as the run's length, and the run goes
to its end: the final adapter, the held-out loss of base and tuned, the sample generations and the
short release gate, in the same process, as ``qlorakit train`` runs them; the table then gives the
peak of the training steps and of the whole run.

    python bench/bench_budget.py --finish --steps 10 --cases 512:4:1.4,1024:4:1.8 --out bench/results/budget_finish.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import REPO, cpu_name, run_worker, write_atomic  # noqa: E402

DEFAULT_CASES = "512:4:16,1024:4:1.8,512:4:1.4,2048:4:2.6,1024:8:2.2,256:16:2.0"
PLANNED_STEPS = 40  # the run length both the plan and the run are told (it decides whether compiling pays);
# a longer --steps plans one step more than it runs, so the run is stopped before its end (no final
# evaluation or save) as the short runs are


def train_worker(a: argparse.Namespace) -> dict[str, Any]:
    """Run qlorakit's train() with the plan's overrides for ``a.steps`` steps; peak RSS and the settings taken."""
    import logging
    import resource

    from qlorakit.train import loop

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    taken: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("fast path: weights="):
                taken.append(msg[len("fast path: "):])

    logging.getLogger("qlorakit.train.fast").addHandler(_Grab())

    class _Stop(Exception):
        pass

    def on_step(state: Any) -> None:
        if state.step >= a.steps:
            raise _Stop

    steps: list[float] = []
    train_peak: list[float] = []

    def at_step(state: Any) -> None:
        train_peak.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    with tempfile.TemporaryDirectory() as out:
        overrides = [*json.loads(a.overrides), f"output_dir={out}", "train.progress=false"]
        if a.finish:  # to the end, evaluation included
            loop.train(overrides=overrides, on_step=at_step, finish=True)
        else:
            try:
                loop.train(overrides=overrides, on_step=on_step, finish=False)
                stopped = False
            except _Stop:
                stopped = True
            if not stopped:
                raise RuntimeError(f"the run ended before {a.steps} steps; give it more data or fewer --steps")
        for f in Path(out).glob("*/metrics.jsonl"):
            steps = [json.loads(ln)["step_time_s"] for ln in f.read_text().splitlines() if ln.strip()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": peak, "train_peak_rss_mb": train_peak[-1] if train_peak else peak,
            "taken": taken[-1] if taken else "?", "step_s": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="SEQ:MICRO_BATCH:BUDGET_GB, comma-separated")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps each run takes before it is stopped")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "budget.md"))
    ap.add_argument("--finish", action="store_true",
                    help="run to the end, the evaluation after training included (plan and run told --steps)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(train_worker(a)), flush=True)
        return 0

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    planned = a.steps if a.finish else max(PLANNED_STEPS, a.steps + 1)
    for case in a.cases.split(","):
        seq, mb, budget = case.split(":")
        asked = [f"data.max_seq_len={seq}", f"train.micro_batch_size={mb}", f"train.max_steps={planned}"]
        with tempfile.TemporaryDirectory() as tmp:
            plan_json = Path(tmp) / "plan.json"
            proc = subprocess.run([sys.executable, "-m", "qlorakit", "plan", *asked, "--budget-gb", budget,
                                   "--no-calibrate", "--json", str(plan_json)], env=env, capture_output=True, text=True)
            if proc.returncode not in (0, 1) or not plan_json.is_file():
                raise RuntimeError(f"qlorakit plan failed for {case}:\n{proc.stderr[-2000:]}")
            plan = json.loads(plan_json.read_text())
            command = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("to run it"))
        overrides = shlex.split(command.split("to run it", 1)[1])[2:]  # after "qlorakit train"
        print(f"{case}: {' '.join(overrides)}", file=sys.stderr, flush=True)
        res = run_worker(Path(__file__), ["--worker", "--steps", str(a.steps), "--overrides", json.dumps(overrides),
                                          *(["--finish"] if a.finish else [])], timeout=3600)
        budget_mb = float(budget) * 1024
        pred = plan["peak_bytes"] / 2**20
        rows.append({"case": case, "plan": plan, "overrides": overrides, "result": res, "budget_mb": budget_mb,
                     "predicted_mb": pred})
        print(f"  predicted {pred:.0f} MB, measured {res['peak_rss_mb']:.0f} MB, budget {budget_mb:.0f} MB",
              file=sys.stderr, flush=True)

    cmd = "python bench/bench_budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Memory budgets: `qlorakit plan`'s settings in `qlorakit train`",
        "",
        f"Command: `{cmd.strip()}` ({started})  ",
        (f"CPU: {cpu_name()}; default model and its sample data; each run {a.steps} optimizer steps to its end: the "
         "final adapter, then the held-out loss of base and tuned, the sample generations and the short release gate "
         "in the same process." if a.finish else
         f"CPU: {cpu_name()}; default model and its sample data; each run stopped after {a.steps} optimizer steps "
         f"(planned as {planned}, so the fast path's kernels are compiled as in a real run)."),
        "",
        "| asked (seq x micro-batch) | budget (MB) | plan's settings | run took | `qlorakit train` settings | "
        "predicted peak (MB) | measured peak (MB) | error | within budget |"
        + (" training steps' peak (MB) | predicted training peak (MB) |" if a.finish else ""),
        "|---|---:|---|---|---|---:|---:|---:|---|" + ("---:|---:|" if a.finish else ""),
    ]
    for r in rows:
        s = r["plan"]["settings"]
        seq, mb, _ = r["case"].split(":")
        chosen = (f"{s['micro_batch']} x {s['seq_len']}, accum {s['grad_accum']}, ckpt {'on' if s['checkpointing'] else 'off'}, "
                  f"{'bf16 copy' if s['weights'] == 'cache' else 'per-use'}")
        meas = r["result"]["peak_rss_mb"]
        err = (r["predicted_mb"] - meas) / meas * 100
        ok = "yes" if meas <= r["budget_mb"] else "NO"
        lines.append(f"| {seq} x {mb} | {r['budget_mb']:.0f} | {chosen} | {r['result']['taken']} | "
                     f"`{' '.join(o for o in r['overrides'] if not o.startswith('train.max_steps'))}` | "
                     f"{r['predicted_mb']:.0f} | {meas:.0f} | {err:+.1f}% | {ok} |"
                     + (f" {r['result']['train_peak_rss_mb']:.0f} | {sum(r['plan']['memory'].values()) / 2**20:.0f} |"
                        if a.finish else ""))
    lines += ["", "Errors are (predicted - measured) / measured. Peak RSS is the whole training process, loading "
              "included (MB = 2^20 bytes; a budget of B GB is B x 1024 MB)."]
    write_atomic(Path(a.out), "\n".join(lines) + "\n")
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    write_atomic(REPO / "bench" / "out" / ("budget_finish.json" if a.finish else "budget.json"),
                 json.dumps(rows, indent=2, default=str) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
