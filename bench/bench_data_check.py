"""Throughput of ``qlorakit data check`` on 100,000 records, and whether it still finds what was planted.

    python bench/bench_data_check.py                 # 100,000 records; writes bench/results/data_check.md
    python bench/bench_data_check.py --records 5000  # a quick look (does not overwrite the results file)

The training file is synthetic but made of real text: sentences of the oasst1, self-instruct and
SGD sets in the shared data folder, drawn with a fixed seed into instruction/output records. Into
it go exact duplicates (re-cased, re-spaced copies), near duplicates (two words changed), TruthfulQA
and MMLU rows, and records holding an e-mail address, a phone number, a card number, an IBAN or an
API key. The check runs once, through the command line, exactly as a user would run it:

    python -m qlorakit.data.cli check FILE --json     (the same as: qlorakit data check FILE --json)

and its JSON gives the time of each pass: (1) personal data and exact duplicates, (2) near
duplicates (MinHash LSH) and 13-gram overlap with every evaluation set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qlorakit.data import read_records  # noqa: E402
from qlorakit.data.contamination import words as eval_words  # noqa: E402
from qlorakit.data.licences import shared_data_root  # noqa: E402

_SENT = re.compile(r"(?<=[.!?])\s+")


def sentence_pool(root: Path) -> list[str]:
    texts: list[str] = []
    for r in read_records(root / "instruction" / "oasst1_val_en.jsonl"):
        texts.append(r["output"])
    for name in ("self_instruct_user_oriented.jsonl", "self_instruct_seed_tasks.jsonl"):
        for r in read_records(root / "instruction" / name):
            texts += [r["instruction"]] + [i["output"] for i in r["instances"]]
    for d in read_records(root / "dialogue" / "sgd_train_first2_per_file.json"):
        texts += [t["utterance"] for t in d["turns"]]
    pool = {s.strip() for t in texts for s in _SENT.split(t) if 4 <= len(s.split()) <= 40 and "```" not in s}
    return sorted(pool)


def luhn_digit(payload: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def iban(rng: random.Random) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(18))
    digits = "".join(str(int(c, 36)) for c in bban + "DE00")
    return f"DE{98 - int(digits) % 97:02d}{bban}"


def build(root: Path, n: int, seed: int) -> tuple[list[dict], dict[str, set[int]]]:
    rng = random.Random(seed)
    pool = sentence_pool(root)
    base = n - n // 50  # 2% planted
    recs = [{"instruction": rng.choice(pool), "input": "",
             "output": " ".join(rng.sample(pool, rng.randint(3, 6)))} for _ in range(base)]
    planted: dict[str, list[dict]] = {k: [] for k in ("exact", "near", "truthfulqa", "mmlu", "pii")}
    k = n // 250
    for r in rng.sample(recs, k):
        planted["exact"].append({**r, "output": r["output"].upper().replace(" ", "  ")})
    for r in rng.sample([r for r in recs if len(r["output"].split()) >= 60], k):
        words = r["output"].split()
        for i in rng.sample(range(len(words)), 2):
            words[i] = rng.choice(["alpha", "bravo", "charlie", "delta"])
        planted["near"].append({**r, "output": " ".join(words)})
    for r in rng.sample(read_records(root / "truthfulqa" / "TruthfulQA.csv"), min(k, 817)):
        planted["truthfulqa"].append({"instruction": r["Question"], "input": "", "output": r["Best Answer"]})
    for r in rng.sample(read_records(root / "benchmarks" / "mmlu_val_zero_shot.jsonl"), k):
        planted["mmlu"].append({"instruction": "Answer the question.", "input": r["input"].split("\n\n", 1)[1],
                                "output": r["output"]})
    for i in range(n - base - 4 * k):
        payload = "4" + "".join(rng.choice(string.digits) for _ in range(14))
        secret = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(36))
        value = [f"user{i}@mailbox.org", f"+44 20 7946 {rng.randint(1000, 9999)}", payload + luhn_digit(payload),
                 iban(rng), "ghp_" + secret][i % 5]
        planted["pii"].append({"instruction": rng.choice(pool), "input": "",
                               "output": rng.choice(pool) + f" Details: {value}."})
    tagged = [(r, "") for r in recs] + [(r, kind) for kind, rs in planted.items() for r in rs]
    rng.shuffle(tagged)
    rows: dict[str, set[int]] = {k: set() for k in planted}
    for row, (_, kind) in enumerate(tagged, start=1):
        if kind:
            rows[kind].add(row)
    return [r for r, _ in tagged], rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "data_check"))
    ap.add_argument("--results", default=None, help="Markdown results file (default: bench/results/data_check.md "
                                                    "for runs of at least 100,000 records)")
    a = ap.parse_args()
    root = shared_data_root()
    if root is None:
        sys.exit("the shared data folder (../shared/data or $QLORAKIT_SHARED_DATA) is absent")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recs, planted = build(root, a.records, a.seed)
    data = out / f"train_{a.records}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    print(f"built {len(recs)} records ({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")

    cmd = [sys.executable, "-m", "qlorakit.data.cli", "check", str(data), "--licence", "Apache-2.0", "--json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    t1, r0 = time.perf_counter(), os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, r1 = time.perf_counter() - t1, os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    if proc.returncode not in (0, 1):
        sys.exit(f"data check failed ({proc.returncode}): {proc.stderr}")
    rep = json.loads(proc.stdout)
    n = rep["counts"]["records"]
    t = rep["timings"]
    found: dict[str, set[int]] = {k: set() for k in planted}
    groups: dict[str, list[set[int]]] = {"exact": [], "near": []}
    for f in rep["findings"]:
        if f["check"] == "duplicates":
            rows = {m["row"] for m in f["members"]}
            found[f["kind"]] |= rows
            groups[f["kind"]].append(rows)
        elif f["check"] == "contamination" and f["kind"] in found:
            found[f["kind"]].update(h["row"] for h in f["hits"])
        elif f["check"] == "pii" and f["severity"] != "info":
            found["pii"].update(f["rows"])
    recall = {}
    for k in planted:
        extra = (sum(1 for g in groups[k] if not g & planted[k]) if k in groups
                 else len(found[k] - planted[k]))
        recall[k] = (len(planted[k] & found[k]), len(planted[k]), extra)
    words = sum(len((r["instruction"] + " " + r["output"]).split()) for r in recs) / len(recs)
    p1, p2 = t["pii_exact_s"], t["near_contamination_s"]
    c1, c2 = t["pii_exact_cpu_s"], t["near_contamination_cpu_s"]
    lines = [
        "# `qlorakit data check` throughput",
        "",
        f"Command: `python bench/bench_data_check.py --records {a.records}` (seed {a.seed}), which builds the file "
        "and runs, once:",
        "",
        "```",
        f"python -m qlorakit.data.cli check {data.relative_to(REPO) if data.is_relative_to(REPO) else data} "
        "--licence Apache-2.0 --json",
        "```",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}, shared with other work), Python "
        f"{platform.python_version()}; single process.",
        "",
        f"Data: {n:,} records, {words:.0f} words each on average ({data.stat().st_size / 1e6:.1f} MB of JSONL), "
        "real sentences of oasst1, self-instruct and SGD drawn at random, 2% of them planted findings. "
        f"Contamination against all evaluation sets ({', '.join(rep['options']['eval_sets'])}) with "
        f"{rep['options']['ngram']}-grams; near duplicates at Jaccard >= {rep['options']['near_threshold']}.",
        "",
        "Wall-clock seconds depend on what else the shared cores run; CPU seconds (of this process) do not.",
        "",
        "| pass | wall s | records/s (wall) | CPU s | records/s (CPU) |",
        "|---|---|---|---|---|",
        f"| 1: personal data + exact duplicates | {p1:.1f} | {n / p1:,.0f} | {c1:.1f} | {n / c1:,.0f} |",
        f"| 2: near duplicates (MinHash LSH) + contamination | {p2:.1f} | {n / p2:,.0f} | {c2:.1f} | {n / c2:,.0f} |",
        f"| whole command (start, read, parse, both passes, JSON out) | {wall:.1f} | {n / wall:,.0f} | "
        f"{cpu:.1f} | {n / cpu:,.0f} |",
        "",
        "Planted findings found (found of planted; `extra`: duplicate groups without a planted record, or "
        "records reported that were not planted):",
        "",
        "| planted | found | extra |",
        "|---|---|---|",
    ]
    for k, (hit, total, extra) in recall.items():
        lines.append(f"| {k} | {hit} of {total} | {extra} |")
    floor = rep["options"]["min_words"]
    for k in ("truthfulqa", "mmlu"):
        missed = sorted(planted[k] - found[k])
        short = [r for r in missed if len(eval_words(recs[r - 1]["instruction"] + " " + recs[r - 1]["output"])) < floor]
        if short:
            example = recs[short[0] - 1]
            lines += ["", f"Missed {k} records with fewer than {floor} words: {len(short)} of {len(missed)} missed "
                      f"(e.g. \"{example['instruction']} {example['output']}\"). Items under the GPT-3 paper's "
                      "floor are not checked, by design, to avoid spurious matches."]
    lines += ["", "Extras are real findings of the drawn text, not false alarms: the SGD utterances hold business "
              "phone numbers and some self-instruct tasks e-mail addresses; random records can draw the same "
              "sentences and so be real duplicates."]
    text = "\n".join(lines) + "\n"
    print(text)
    results = a.results or (str(REPO / "bench" / "results" / "data_check.md") if a.records >= 100_000 else None)
    if results:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        Path(results).write_text(text, encoding="utf-8")
        print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
