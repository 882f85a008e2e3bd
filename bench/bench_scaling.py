"""Scaling of the fast path, and the planner's predictions against measurement.

For SmolLM2-135M (the packaged model) and random-initialised models of the SmolLM2-360M and -1.7B
shapes, at sequence lengths 256, 512 and 1024 (2048 tokens per step: 8 x 256, 4 x 512, 2 x 1024),
each configuration runs in rounds (``--rounds``, default 3; 2 for 1.7B, whose rounds take 6-10
minutes) of two fresh processes, as a user would:

1. ``plan``: the planner (:func:`qlorakit.train.plan.plan_run`) with a memory budget, on the
   text the run trains on: it chooses the settings and predicts peak RSS and step time;
2. ``train``: the same packed real text, trained with exactly those settings through the fast
   path; peak RSS of the process and its step times are measured.

Rounds take planner and training in turn, so that the shared machine's slow and fast spells fall
on both; before each process the benchmark waits for the load average to come down (``--settle``),
so that a process does not start while the previous one's memory is still being handed back. The
table gives trained tokens/s, peak RSS, model FLOPs utilisation against the bf16 matmul rate
measured in the same run, and each prediction's error against the median over all rounds, with
every round's own pair beside it.

    python bench/bench_scaling.py                                  # writes bench/results/plan.md
    python bench/bench_scaling.py --shapes 135M --seq-lens 512 --budget-gb 3
    python bench/bench_scaling.py --shapes 1.7B --merge                # rerun some rows, keep the others
    python bench/bench_scaling.py --precision fp32 --out bench/results/plan_avx2.md  # CPUs without bf16

``--precision`` (default auto: bf16 where the CPU has bf16 instructions, else fp32, as
``model.compute_dtype=auto`` trains) sets the planner's precision, the training's compute dtype and
the matmul rate MFU is measured against.

``--merge`` replaces the rerun rows in ``bench/out/plan.json`` (``bench/out/<name>.json`` for
``--out .../<name>.md``) and keeps the rest; the table then
says which run (command, commit, time, matmul rate) each row comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import (  # noqa: E402
    REPO,
    add_precision_arg,
    git_commit,
    cpu_name,
    matmul_tflops,
    model_flops_per_token,
    packed_text_batches,
    peak_rss_mb,
    precision_dtype,
    random_model_folder,
    resolve_precision,
    run_worker,
    settle,
    write_atomic,
)

TOKENS_PER_STEP = 2048


def _base(shape: str) -> str:
    return "default" if shape == "135M" else str(random_model_folder(shape))


def _tokenizer():
    from qlorakit.models import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base("default")[0])


def plan_worker(a: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig

    from qlorakit.models import resolve_base
    from qlorakit.train.memory import ModelShape
    from qlorakit.train.plan import _file_bytes, plan_run

    folder = resolve_base(a.base)[0]
    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(folder)))
    # the text the timed run trains on (the planner takes a micro-batch of typical attention work from it)
    batches = packed_text_batches(_tokenizer(), a.seq_len, a.batch, a.warmup + a.steps)
    batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    dt = precision_dtype(a.precision)
    rate = matmul_tflops(seconds=2.0, dtype=dt)  # the machine's speed as the planner calibrates (shared machines vary)
    t = time.perf_counter()
    p = plan_run(shape, model_name=a.base, micro_batch=a.batch, seq_len=a.seq_len, grad_accum=1, r=16, alpha=32,
                 dropout=0.0, budget_bytes=a.budget_gb * 2**30, sample=batch, total_steps=a.steps,
                 compile_=True, file_bytes=_file_bytes(folder), precision=a.precision)
    out = p.to_json()
    out["plan_s"] = time.perf_counter() - t
    out["matmul_tflops"] = (rate + matmul_tflops(seconds=2.0, dtype=dt)) / 2
    return out


def train_worker(a: argparse.Namespace) -> dict[str, Any]:
    from qlorakit.config import load_recipe
    from qlorakit.lora import attach_lora, lora_parameters
    from qlorakit.models import load_base_model
    from qlorakit.train.fast import FastModel, FastOptions
    from qlorakit.train.loop import autocast_ctx

    s = json.loads(a.settings)
    recipe = load_recipe(None, [f"model.base={a.base}", f"model.compute_dtype={a.precision}", "lora.r=16", "lora.alpha=32"])
    dt = precision_dtype(a.precision)
    t0 = time.perf_counter()
    loaded = load_base_model(recipe.model)
    load_s = time.perf_counter() - t0
    model = loaded.model
    torch.manual_seed(0)
    attach_lora(model, recipe.lora)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    # as `qlorakit train` runs them (choose_fast_options): freed heap memory goes back to the OS near the budget
    fm = FastModel(model, FastOptions(weights=s["weights"], checkpointing=s["checkpointing"], compile=s["compile"],
                                      trim_above=0.9 * a.budget_gb * 2**30, dtype=dt),
                   pad_token_id=loaded.tokenizer.pad_token_id)
    model.train()
    mb, accum = s["micro_batch"], s["grad_accum"]
    batches = packed_text_batches(loaded.tokenizer, s["seq_len"], mb * accum, a.warmup + a.steps)
    opt = torch.optim.AdamW(params, lr=2e-4)

    def step(batch: dict[str, torch.Tensor]) -> float:
        t = time.perf_counter()
        n_loss = int((batch["labels"][:, 1:] != -100).sum())
        for k in range(accum):
            micro = {key: v[k * mb:(k + 1) * mb] for key, v in batch.items()}
            with autocast_ctx(loaded):
                loss, _ = fm(model, micro)
            (loss / n_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    warm = [step(b) for b in batches[:a.warmup]]
    rate = matmul_tflops(seconds=2.0, dtype=dt)  # the machine's speed around the timed steps
    times = [step(b) for b in batches[a.warmup:]]
    rate = (rate + matmul_tflops(seconds=2.0, dtype=dt)) / 2
    tokens = mb * accum * s["seq_len"]
    return {"step_s_median": statistics.median(times), "step_s": [round(x, 3) for x in times],
            "warmup_s": [round(x, 2) for x in warm], "tokens_per_s": tokens * len(times) / sum(times),
            "peak_rss_mb": peak_rss_mb(), "load_s": round(load_s, 1), "threads": torch.get_num_threads(),
            "matmul_tflops": rate}


# what a run recorded before these fields existed: the defaults of that version, no settle wait
LEGACY_RUN = {"commit": "not recorded", "rounds": 3, "rounds_large": 2, "warmup": 2, "steps": 5, "settle_s": 0.0}


def _load_previous(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, rows) of an earlier plan.json; every row names its run."""
    try:
        old = json.loads(path.read_text())
        rows = old["rows"]
        # a file from before runs were recorded: one run, with that version's fixed settings
        runs = old.get("runs") or [{"command": "python bench/bench_scaling.py", "peak_tflops": old["peak_tflops"]}]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--merge: cannot read the earlier results {path}: {e}") from e
    for ru in runs:
        for key, value in LEGACY_RUN.items():
            ru.setdefault(key, value)
    for r in rows:
        r.setdefault("run", 0)
    return runs, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="135M,360M,1.7B")
    ap.add_argument("--seq-lens", default="256,512,1024")
    ap.add_argument("--budget-gb", type=float, default=6.0, help="memory budget given to the planner")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="plan-then-train rounds per configuration, in turn (the machine's speed drifts over minutes)")
    ap.add_argument("--rounds-1.7B", dest="rounds_large", type=int, default=2,
                    help="rounds for the 1.7B shape (6-10 minutes each; a round spans more of the drift)")
    ap.add_argument("--settle", type=float, default=90.0,
                    help="before each process, wait up to this many seconds for the load average to come down")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of bench/out/<name of --out>.json that this run does not redo")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.md"))
    add_precision_arg(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.precision = resolve_precision(a.precision)
    prec = a.precision
    if a.worker:
        torch.set_num_threads(os.cpu_count() or 1)
        res = plan_worker(a) if a.worker == "plan" else train_worker(a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    torch.set_num_threads(os.cpu_count() or 1)
    json_path = REPO / "bench" / "out" / (Path(a.out).stem + ".json")  # plan.md: bench/out/plan.json
    runs, kept = _load_previous(json_path) if a.merge else ([], [])
    cmd = "python bench/bench_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run = {"command": cmd.strip(), "commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rounds": a.rounds, "rounds_large": a.rounds_large, "warmup": a.warmup, "steps": a.steps, "settle_s": a.settle,
           "precision": prec}
    load_before = os.getloadavg()
    peak0 = matmul_tflops(dtype=precision_dtype(prec))
    rows = []
    from transformers import AutoConfig

    from qlorakit.models import resolve_base

    for shape in a.shapes.split(","):
        base = _base(shape)
        cfg = AutoConfig.from_pretrained(str(resolve_base(base)[0]))
        for seq in (int(x) for x in a.seq_lens.split(",")):
            batch = TOKENS_PER_STEP // seq
            common = ["--base", base, "--seq-len", str(seq), "--batch", str(batch), "--warmup", str(a.warmup),
                      "--steps", str(a.steps), "--budget-gb", str(a.budget_gb), "--precision", prec]
            plans, meass = [], []
            n_rounds = a.rounds_large if shape == "1.7B" else a.rounds
            for k in range(n_rounds):
                print(f"{shape} seq {seq} round {k + 1}/{n_rounds}: planning ...", file=sys.stderr, flush=True)
                waited, load = settle(a.settle)
                plan = run_worker(Path(__file__), ["--worker", "plan", *common], timeout=3600)
                plan.update(settle_s=round(waited), load_at_start=round(load, 2))
                print(f"  settings {plan['settings']}, predicted step {plan['step_s']:.2f} s; training ...",
                      file=sys.stderr, flush=True)
                waited, load = settle(a.settle)
                meas = run_worker(Path(__file__), ["--worker", "train", *common, "--settings",
                                                   json.dumps(plan["settings"])], timeout=7200)
                meas.update(settle_s=round(waited), load_at_start=round(load, 2))
                print(f"  {meas['tokens_per_s']:.0f} tokens/s, step {meas['step_s_median']:.2f} s, peak "
                      f"{meas['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
                plans.append(plan)
                meass.append(meas)
            rows.append({"shape": shape, "seq": seq, "batch": batch, "plans": plans, "measured": meass,
                         "flops_per_token": model_flops_per_token(cfg), "run": len(runs)})
    peak1 = matmul_tflops(dtype=precision_dtype(prec))
    load_after = os.getloadavg()
    run.update(finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), peak_tflops=max(peak0, peak1),
               load_before=round(load_before[0], 2), load_after=round(load_after[0], 2))
    runs.append(run)
    redone = {(r["shape"], r["seq"]) for r in rows}
    order = {s: i for i, s in enumerate(["135M", "360M", "1.7B"])}
    rows = sorted([r for r in kept if (r["shape"], r["seq"]) not in redone] + rows,
                  key=lambda r: (order.get(r["shape"], len(order)), r["shape"], r["seq"]))
    used = sorted({r["run"] for r in rows})
    write_atomic(json_path, json.dumps({"rows": rows, "runs": runs}, indent=2, default=str))

    table = ["| model | seq | batch | settings chosen | tokens/s | MFU | peak RSS (MB) | predicted peak (MB) | error | "
             "step (s) | predicted step (s) | error | per round: predicted / measured step (s) | within budget |"
             + (" run |" if len(used) > 1 else ""),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|" + ("---:|" if len(used) > 1 else "")]
    for r in rows:
        plans, meass = r["plans"], r["measured"]
        s = plans[0]["settings"]
        desc = (f"mb {s['micro_batch']}x{s['grad_accum']}, ckpt {'on' if s['checkpointing'] else 'off'}, "
                f"{runs[r['run']].get('precision', 'bf16') + ' copy' if s['weights'] == 'cache' else 'per-use'}")
        if s["seq_len"] != r["seq"]:
            desc += f", seq shortened to {s['seq_len']}"
        if any(p["settings"] != s for p in plans):  # memory decides them, so this would be a bug
            desc += " (DIFFERENT settings in other rounds, see plan.json)"
        pk = statistics.median(p["peak_bytes"] for p in plans) / 2**20
        st = statistics.median(p["step_s"] for p in plans)
        steps = [x for m in meass for x in m["step_s"]]
        step = statistics.median(steps)  # every timed step of every round
        tps = r["batch"] * r["seq"] * len(steps) / sum(steps)
        rss = max(m["peak_rss_mb"] for m in meass)
        mfu = tps * r["flops_per_token"] / (runs[r["run"]]["peak_tflops"] * 1e12)
        e_mem = (pk - rss) / rss
        e_t = (st - step) / step
        rounds = ", ".join(f"{p['step_s']:.2f} / {m['step_s_median']:.2f}" for p, m in zip(plans, meass))
        ok = "yes" if rss <= a.budget_gb * 1024 else "NO"
        table.append(f"| {r['shape']} | {r['seq']} | {r['batch']} | {desc} | {tps:.0f} | {100 * mfu:.1f}% | "
                     f"{rss:.0f} | {pk:.0f} | {100 * e_mem:+.1f}% | {step:.2f} | {st:.2f} | "
                     f"{100 * e_t:+.1f}% | {rounds} | {ok} |" + (f" {used.index(r['run']) + 1} |" if len(used) > 1 else ""))

    def describe(k: int) -> str:
        ru = runs[k]
        when = f"{ru['started']} to {ru['finished']}" if "started" in ru else "time not recorded"
        load = (f"load average before/after {ru['load_before']:.2f}/{ru['load_after']:.2f}; "
                if "load_before" in ru else "")
        wait = (f"waiting up to {ru['settle_s']:.0f} s before each process for the load average to fall to half "
                f"the cores" if ru["settle_s"] else "no wait between processes")
        return (f"`{ru['command']}` (commit {ru['commit']}, {when}; {load}{ru.get('precision', 'bf16')} matmul rate "
                f"{ru['peak_tflops']:.2f} TFLOP/s; {ru['rounds']} rounds per configuration "
                f"({ru['rounds_large']} for 1.7B) of {ru['warmup']} warmup + {ru['steps']} timed steps; {wait})")

    if len(used) == 1:
        head = [f"Command: `{runs[used[0]]['command']}`  ",
                f"Run: {describe(used[0])}  "]
    else:
        head = ["Rows come from more than one run (the last column): "
                + "; ".join(f"run {i + 1}: {describe(k)}" for i, k in enumerate(used)) + ".  "]
    md = ["# Scaling and the planner's predictions\n",
          *head,
          f"CPU: {cpu_name()}; torch {torch.__version__}, {rows[0]['measured'][0]['threads'] if rows else '?'} threads  ",
          f"Precision: {prec} (the planner's, the training's and the matmul rate's). "
          f"MFU of each row is against the {prec} matmul rate measured in its own run. Memory budget given to the planner: "
          f"{a.budget_gb} GB. {TOKENS_PER_STEP} tokens per step of packed real text, LoRA r=16 on all linear "
          f"layers; each round of a configuration is a fresh planner process and then a fresh training "
          f"process; 360M and 1.7B are random-initialised SmolLM2 shapes.\n",
          "\n".join(table), "",
          "Errors are (predicted - measured) / measured. Peak RSS is the whole training process, loading included; "
          f"MFU counts 4 x matmul parameters per token against the measured {prec} matmul rate. "
          "Predicted values are the median of the rounds' predictions, measured step time the median of every timed "
          "step of every round, peak RSS the highest of the rounds. The machine is shared with other jobs and its "
          "speed drifts over minutes (the same 360M full-depth calibration took 5.0 s and then 6.9 s a call two "
          "minutes apart, while the 2048^3 bf16 matmul rate read 2.06 and 2.03 TFLOP/s, so that rate does not "
          "track it): the rounds take the planner and the training in turn so that a slow or fast spell falls on "
          "both, and the per-round column shows each round's own pair."]
    text = "\n".join(md) + "\n"
    write_atomic(Path(a.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
