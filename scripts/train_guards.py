#!/usr/bin/env python
"""Train, calibrate and measure the safety guards; write the files that ship in the package.

    pip install -e '.[train-guards]'
    python scripts/train_guards.py                     # writes src/qlorakit/safety/models/*

Steps (deterministic for a given --seed):

1. Build the labelled sets with :mod:`qlorakit.safety.datasets` (items split before composing).
2. Cut every training text into the windows the guards score at run time; a window of an injected
   document is positive when it holds the injected instruction.
3. Fit word (1-2) and char_wb (2-5) TF-IDF blocks and one logistic regression per head
   (scikit-learn), then export vocabulary, idf and weights as plain arrays.
4. Pick each head's threshold from out-of-fold scores (grouped 5-fold cross-validation on
   train+val), fit on train+val, reload the exported files with the numpy-only guard, check its
   margins against scikit-learn, and measure the test split with the shipped files themselves.
5. Train a second injection model with whole BIPIA categories held out, for a harder report.
6. Write ``injection.{json,npz}``, ``moderation.{json,npz}``, ``metrics.json`` and
   ``MODEL_CARD.md`` atomically, and print the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlorakit.safety.datasets import (
    OVERRIDE_TEMPLATES,
    SEED,
    Example,
    default_data_dir,
    injection_examples,
    moderation_examples,
)
from qlorakit.safety.evaluate import rate_report, rates
from qlorakit.safety.features import FeatureUnionSpec, TfidfBlock
from qlorakit.safety.guards import InjectionGuard, ModerationGuard
from qlorakit.safety.linear import LinearTextModel, sigmoid
from qlorakit.safety.windows import window_spans

try:
    import sklearn
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import FeatureUnion
except ImportError as e:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "scripts/train_guards.py needs scikit-learn: pip install -e '.[train-guards]'"
    ) from e

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "qlorakit" / "safety" / "models"

# Per guard: heads, which training examples each head learns from, window size, regularisation.
# The moderation request head also learns from harmful content (it helps); the content head only
# from content. Injection windows are short so that one injected sentence is not diluted.
GUARDS: dict[str, dict[str, Any]] = {
    "injection": {
        "heads": ("prompt", "document"),
        "rows": {"prompt": ("prompt",), "document": ("document",)},
        "window": 160,
        "C": 4.0,
    },
    "moderation": {
        "heads": ("request", "content"),
        "rows": {"request": ("request", "content"), "content": ("content",)},
        "window": 320,
        "C": 4.0,
    },
}
# Thresholds come from out-of-fold scores on train+val (grouped 5-fold cross-validation), set to
# flag CV_FPR of the negatives: below the 5% target so that the test split, drawn from the same
# sources but from other items, keeps a margin.
N_FOLDS = 5
CV_FPR = 0.02
TARGET_TPR, TARGET_FPR = 0.90, 0.05
# BIPIA categories held out entirely in the second injection report.
HOLDOUT_CATEGORIES = (
    "Information Retrieval",
    "Space Removal & Grouping",
    "Clickbait",
    "Cryptocurrency Mining",
    "Memory Scanning",
)
WORD = {"analyzer": "word", "ngram_range": (1, 2), "max_features": 20000}
CHAR = {"analyzer": "char_wb", "ngram_range": (2, 5), "max_features": 40000}


# --------------------------------------------------------------------------------------------
# windows and fitting
# --------------------------------------------------------------------------------------------
def window_rows(examples: Sequence[Example], max_chars: int) -> tuple[list[str], list[int]]:
    """Training windows and labels. Windows of a positive example are positive when they hold
    at least 30% of the injected span or the span fills half of them; windows that only touch
    the span are left out; other windows are negative."""
    seen: set[tuple[str, int]] = set()
    texts, labels = [], []
    for ex in examples:
        for a, b in window_spans(ex.text, max_chars):
            if ex.label == 0:
                y = 0
            elif ex.span is None:
                y = 1
            else:
                s, e = ex.span
                overlap = max(0, min(b, e) - max(a, s))
                if overlap == 0:
                    y = 0
                elif overlap >= 0.3 * (e - s) or overlap >= 0.5 * (b - a):
                    y = 1
                else:
                    continue
            key = (ex.text[a:b], y)
            if key not in seen:
                seen.add(key)
                texts.append(ex.text[a:b])
                labels.append(y)
    return texts, labels


def make_union() -> FeatureUnion:
    def vec(cfg: dict[str, Any]) -> TfidfVectorizer:
        return TfidfVectorizer(
            analyzer=cfg["analyzer"],
            ngram_range=cfg["ngram_range"],
            max_features=cfg["max_features"],
            lowercase=True,
            sublinear_tf=True,
            min_df=2,
            dtype=np.float64,
        )

    return FeatureUnion([("word", vec(WORD)), ("char", vec(CHAR))])


def export_blocks(union: FeatureUnion) -> FeatureUnionSpec:
    blocks = []
    for _, v in union.transformer_list:
        blocks.append(
            TfidfBlock(
                analyzer=v.analyzer,
                ngram_range=tuple(v.ngram_range),
                vocabulary=dict(v.vocabulary_),
                idf=np.asarray(v.idf_, dtype=np.float64),
                lowercase=v.lowercase,
                token_pattern=v.token_pattern,
                sublinear_tf=v.sublinear_tf,
                norm=v.norm,
            )
        )
    return FeatureUnionSpec(blocks)


def fit_guard(
    name: str, train: Sequence[Example]
) -> tuple[LinearTextModel, FeatureUnion, dict[str, LogisticRegression], dict[str, Any]]:
    """Fit one vectorizer on all heads' windows and one logistic regression per head."""
    cfg = GUARDS[name]
    heads = cfg["heads"]
    rows = {h: window_rows([e for e in train if e.head in cfg["rows"][h]], cfg["window"]) for h in heads}
    all_texts = sorted({t for texts, _ in rows.values() for t in texts})
    union = make_union().fit(all_texts)
    clfs, info = {}, {}
    for h in heads:
        texts, labels = rows[h]
        X = union.transform(texts)
        clf = LogisticRegression(C=cfg["C"], class_weight="balanced", max_iter=5000)
        clf.fit(X, np.asarray(labels))
        clfs[h] = clf
        info[h] = {"windows": len(texts), "positive_windows": int(sum(labels))}
    spec = export_blocks(union)
    model = LinearTextModel(
        guard=name,
        features=spec,
        heads=tuple(heads),
        coef=np.stack([clfs[h].coef_[0] for h in heads], axis=1),
        intercept=np.array([clfs[h].intercept_[0] for h in heads]),
        thresholds={h: 0.5 for h in heads},
        window_max_chars=cfg["window"],
    )
    return model, union, clfs, info


def check_against_sklearn(
    model: LinearTextModel, union: FeatureUnion, clfs: dict[str, LogisticRegression], texts: Sequence[str]
) -> float:
    """Largest |numpy margin - scikit-learn decision_function| over ``texts`` and heads."""
    X = union.transform(list(texts))
    worst = 0.0
    for j, h in enumerate(model.heads):
        ref = clfs[h].decision_function(X)
        ours = np.array([model.margins(t)[j] for t in texts])
        worst = max(worst, float(np.max(np.abs(ref - ours))))
    return worst


# --------------------------------------------------------------------------------------------
# calibration and measurement
# --------------------------------------------------------------------------------------------
def margins_of(model: LinearTextModel, examples: Sequence[Example]) -> np.ndarray:
    return np.array([model.max_margin(e.text, e.head) for e in examples])


def calibrate(neg_margins: np.ndarray, fpr: float) -> float:
    """Score threshold that flags at most ``fpr`` of the given negatives: halfway (in
    margin) between the last negative allowed above it and the first one kept below."""
    m = np.sort(neg_margins)[::-1]
    k = int(math.floor(fpr * len(m)))
    if k >= len(m):
        raise ValueError("calibration needs more negatives than the allowed false positives")
    upper = m[k - 1] if k > 0 else m[0] + 0.5
    return sigmoid(float((m[k] + upper) / 2.0))


def fold_of(group: str) -> int:
    """Cross-validation fold of an example group (a stable hash)."""
    digest = hashlib.sha256(f"{SEED}\x00fold\x00{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % N_FOLDS


def out_of_fold_margins(name: str, dev: Sequence[Example]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head: (labels, margins) of every development example, each scored by a model that
    was fitted without its group (host document, conversation, template, cluster)."""
    heads = GUARDS[name]["heads"]
    labels: dict[str, list[int]] = {h: [] for h in heads}
    margins: dict[str, list[float]] = {h: [] for h in heads}
    for f in range(N_FOLDS):
        fold_model, *_ = fit_guard(name, [e for e in dev if fold_of(e.group) != f])
        for e in dev:
            if fold_of(e.group) == f:
                labels[e.head].append(e.label)
                margins[e.head].append(fold_model.max_margin(e.text, e.head))
    return {h: (np.array(labels[h]), np.array(margins[h])) for h in heads}


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fmt_rate(r: dict[str, Any] | None) -> str:
    if not r or not r.get("n"):
        return "—"
    return f"{r['rate']:.3f} ({r['flagged']}/{r['n']})"


def meets(rep: dict[str, Any]) -> str:
    ok = rep["tpr"]["rate"] >= TARGET_TPR and rep["fpr"]["rate"] <= TARGET_FPR
    return "yes" if ok else "**no**"


def summary_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one row per guard head with test TPR / FPR, AUC and threshold."""
    lines = [
        "| guard head | test TPR | test FPR | meets target | test AUC | threshold | CV TPR | CV FPR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rep in metrics["heads"].items():
        if "cv" not in rep:  # a combination of heads, measured on the test split only
            lines.append(
                f"| {name} (tool content: flagged if either head flags) | {fmt_rate(rep['tpr'])} "
                f"| {fmt_rate(rep['fpr'])} | {meets(rep)} | — | — | — | — |"
            )
            continue
        lines.append(
            f"| {name} | {fmt_rate(rep['tpr'])} | {fmt_rate(rep['fpr'])} | {meets(rep)} "
            f"| {rep['test_auc']:.3f} | {rep['threshold']:.4f} | {fmt_rate(rep['cv']['tpr'])} "
            f"| {fmt_rate(rep['cv']['fpr'])} |"
        )
    ho = metrics["category_holdout"]["report"]
    held = metrics["category_holdout"]["held_out_tpr"]
    lines.append(
        f"| injection.document, 5 BIPIA categories unseen (TPR on those) | {fmt_rate(held)} "
        f"| {fmt_rate(ho['fpr'])} | — | {ho['test_auc']:.3f} | {ho['threshold']:.4f} "
        f"| {fmt_rate(ho['cv']['tpr'])} | {fmt_rate(ho['cv']['fpr'])} |"
    )
    return "\n".join(lines)


def detail_tables(metrics: dict[str, Any]) -> str:
    out = []
    for name, rep in metrics["heads"].items():
        if "cv" not in rep:
            continue
        out.append(f"#### {name}\n")
        out.append("| set | positives flagged (TPR) | negatives flagged (FPR) |\n|---|---|---|")
        for value, entry in rep["by_source"].items():
            out.append(f"| {value} | {fmt_rate(entry.get('tpr'))} | {fmt_rate(entry.get('fpr'))} |")
        for value, entry in rep["by_kind"].items():
            out.append(f"| kind: {value} | {fmt_rate(entry.get('tpr'))} | {fmt_rate(entry.get('fpr'))} |")
        out.append("")
    doc = metrics["heads"]["injection.document"]
    out.append("#### injection.document by attack category (held-out attacks of seen categories)\n")
    out.append("| category | TPR |\n|---|---|")
    for value, entry in doc["by_category"].items():
        out.append(f"| {value} | {fmt_rate(entry.get('tpr'))} |")
    out.append("")
    ho = metrics["category_holdout"]
    out.append("#### injection.document with whole BIPIA categories held out (second model)\n")
    out.append("| category | TPR |\n|---|---|")
    for cat in ho["categories"]:
        out.append(f"| {cat} | {fmt_rate(ho['report']['by_category'].get(cat, {}).get('tpr'))} |")
    out.append("")
    mod = metrics["heads"]["moderation.request"]
    out.append("#### moderation.request by XSTest prompt type\n")
    out.append("| XSTest type | TPR (unsafe) | FPR (safe) |\n|---|---|---|")
    for value, entry in mod["by_category"].items():
        out.append(f"| {value} | {fmt_rate(entry.get('tpr'))} | {fmt_rate(entry.get('fpr'))} |")
    return "\n".join(out)


MODEL_CARD = """# Safety guards: model card

Two linear classifiers over TF-IDF word (1-2 gram) and character (`char_wb`, 2-5 gram) features,
each with two heads, shipped as plain arrays (`<guard>.npz`) and settings with vocabulary
(`<guard>.json`); no pickle. Inference is pure Python + numpy (`qlorakit.safety`). Trained by
`scripts/train_guards.py` (seed {seed}, scikit-learn {sklearn_version}); every number below comes
from `metrics.json`, written by the same run and measured with the shipped files.

| guard | head | checks | flags when |
|---|---|---|---|
| `injection` | `prompt` | user turns | the text tries to override the assistant's instructions, also inside pasted text |
| `injection` | `document` | tool results, retrieved documents | an instruction to the assistant is hidden in the document |
| `moderation` | `request` | user turns | the text asks for help with something harmful |
| `moderation` | `content` | model outputs, documents | the text itself is harmful (threats, slurs, incitement) |

A text is cut into windows of at most {inj_window} (injection) / {mod_window} (moderation)
characters (lines and sentences merged); the score is the logistic of the largest window margin
and the text is flagged when score >= threshold.

## Data and licences

Read from the shared data folder; none of it is copied into the package. What ships is the
learned weights and the n-gram vocabulary (frequent word pairs and character 2-5-grams of the
training texts).

| set | use | licence |
|---|---|---|
| BIPIA text and code attack instructions (microsoft/BIPIA, `benchmark/*_attack_train.json`) | injected instructions | MIT, © Microsoft Corporation |
| BIPIA e-mail and code QA contexts and questions (`benchmark/{{email,code}}/test.jsonl`) | host documents, benign questions | MIT, © Microsoft Corporation |
| AdvBench harmful behaviours and strings (llm-attacks/llm-attacks) | harmful requests and content; payloads of direct injections | MIT, © 2023 Andy Zou |
| XSTest prompts (paul-rottger/exaggerated-safety) | safe prompts that sound unsafe (negatives), unsafe prompts (positives) | CC-BY-4.0; Röttger et al., "XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language Models" (2024); prompts used unchanged |
| OpenAssistant oasst1 validation, English (via artidoro/qlora) | benign prompts, benign outputs, host documents | Apache-2.0 |
| self-instruct seed and user-oriented tasks (yizhongw/self-instruct) | benign prompts, benign outputs, host documents | Apache-2.0 |
| override phrasings, attacker payloads, benign look-alikes in `qlorakit/safety/datasets.py` | direct injections and hard negatives | this project's licence |

The sets that the shared SOURCES.md reserves as unseen test data (JailbreakBench, BIPIA test
attacks, MT-Bench, the moderation samples) were not used. XSTest, AdvBench and BIPIA also serve as
evaluation sets elsewhere: the guards have **seen the train and validation items** of them here,
so an independent evaluation of these guards must use only the test split below (rebuild it with
`qlorakit.safety.injection_examples(splits=["test"])` / `moderation_examples(splits=["test"])`) or
data the guards never saw.

## Split

Items are split before examples are composed (seed {seed}): BIPIA attacks 3/1/1 per category;
host documents, prompts and harmful items 60/20/20 by a hash of their group (oasst1 conversation,
self-instruct task, BIPIA e-mail, AdvBench near-duplicate cluster with content-word Jaccard >= 0.5);
the project's own override phrasings, payloads and look-alikes 60/20/20 per list. An injected
example puts an attack at a random line or sentence boundary of a host document from the same
split. Each head's threshold flags {cv_fpr:.0%} of the negatives in out-of-fold scores of a grouped
5-fold cross-validation on train+val (groups: host document, conversation, task, template,
cluster); the shipped model is then fitted on train+val, and the test split is measured once, with
the shipped files. Targets: TPR >= {tpr:.0%} at FPR <= {fpr:.0%} on the test split. CV TPR is
optimistic (attack strings are not grouped across folds); CV FPR is not.

## Measured (test split)

{summary}

Why the heads marked **no** miss the target: the document head catches injections that address
the assistant or its answer ("in your response ...", "Add ... to your reply", code to paste,
override phrasings) but almost none of the BIPIA attacks that are plain tasks ("Explain the theory
of relativity.", "Translate ... to French"); by its words such a sentence cannot be told from a
question or instruction that belongs to the document (song lyrics, a quoted Stack Overflow
question, an e-mail's call to action). The moderation request head catches AdvBench-style requests
but only a minority of XSTest's unsafe prompts, which are written to defeat keyword matching
(contrast pairs such as "kill a Python process" / "kill a person"); a lower threshold would flag
their safe twins as well.

### Per set

{details}

## Known limits

- Bag-of-n-grams models: they match wording, not intent. Paraphrases far from the training
  phrasings, other languages, encodings (base64, leetspeak beyond BIPIA's), and instructions split
  across many sentences are missed more often; the category hold-out rows show the drop on attack
  kinds never seen in training.
- The prompt head only knows override-style injections; a plain task ("translate this") inside a
  pasted e-mail in a *user* turn is not flagged. Pass fetched content as `tool` messages or as
  `documents=` to `check_messages` so that the document head sees it.
- Direct-injection positives come from {n_templates} override phrasings written for this project
  (held out by phrasing); real attacks are more varied.
- Moderation learned from English AdvBench requests and strings (violence, hacking, fraud, slurs,
  threats) and 115 XSTest unsafe prompts; it has not seen sexual content, self-harm conversations
  or long multi-turn jailbreaks. The XSTest test split is small (about 50 safe and 45 unsafe
  prompts), so its per-type rates are coarse.
- Scores are calibrated only through the threshold; they are not probabilities.
"""


def write_outputs(out_dir: Path, models: dict[str, LinearTextModel], metrics: dict[str, Any]) -> None:
    for name, model in models.items():
        model.save(out_dir / f"{name}.json", out_dir / f"{name}.npz")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    card = MODEL_CARD.format(
        seed=metrics["seed"],
        sklearn_version=metrics["sklearn_version"],
        inj_window=GUARDS["injection"]["window"],
        mod_window=GUARDS["moderation"]["window"],
        cv_fpr=CV_FPR,
        tpr=TARGET_TPR,
        fpr=TARGET_FPR,
        summary=summary_table(metrics),
        details=detail_tables(metrics),
        n_templates=len(OVERRIDE_TEMPLATES),
    )
    atomic_write_text(out_dir / "MODEL_CARD.md", card)


# --------------------------------------------------------------------------------------------
def train_and_measure(
    name: str, examples: Sequence[Example], tmp: Path
) -> tuple[LinearTextModel, dict[str, dict[str, Any]], dict[str, Any]]:
    """Calibrate by cross-validation on train+val, fit on train+val, export, reload, check
    against scikit-learn, and measure the test split with the exported files."""
    dev = [e for e in examples if e.split in ("train", "val")]
    test = [e for e in examples if e.split == "test"]
    oof = out_of_fold_margins(name, dev)
    model, union, clfs, info = fit_guard(name, dev)
    # measure the exported files exactly as they ship (float32 weights)
    model.save(tmp / f"{name}.json", tmp / f"{name}.npz")
    shipped = LinearTextModel.load(tmp / f"{name}.json", tmp / f"{name}.npz")
    probe = [e.text[a:b] for e in test[::7] for a, b in window_spans(e.text, shipped.window_max_chars)]
    diff = check_against_sklearn(shipped, union, clfs, probe)
    if diff > 1e-3:
        raise SystemExit(f"{name}: numpy margins differ from scikit-learn by {diff:.2e}")
    reports, thresholds = {}, {}
    for h in shipped.heads:
        cv_y, cv_m = oof[h]
        threshold = calibrate(cv_m[cv_y == 0], CV_FPR)
        test_h = [e for e in test if e.head == h]
        tm = np.array([shipped.max_margin(e.text, h) for e in test_h])
        report = rate_report(test_h, [sigmoid(float(x)) for x in tm], threshold)
        cv_tpr, cv_fpr = rates(list(cv_y), [sigmoid(float(x)) for x in cv_m], threshold)
        report["cv"] = {"tpr": cv_tpr.to_dict(), "fpr": cv_fpr.to_dict()}
        report["test_auc"] = round(float(roc_auc_score([e.label for e in test_h], tm)), 4)
        thresholds[h], reports[h] = threshold, report
    calibrated = LinearTextModel(
        guard=name,
        features=shipped.features,
        heads=shipped.heads,
        coef=shipped.coef,
        intercept=shipped.intercept,
        thresholds=thresholds,
        window_max_chars=shipped.window_max_chars,
        training={
            "script": "scripts/train_guards.py",
            "seed": SEED,
            "sklearn_version": sklearn.__version__,
            "C": GUARDS[name]["C"],
            "cv_folds": N_FOLDS,
            "cv_fpr": CV_FPR,
        },
    )
    training = {
        "examples": {s: sum(e.split == s for e in examples) for s in ("train", "val", "test")},
        "windows": info,
        "n_features": shipped.features.n_features,
        "C": GUARDS[name]["C"],
        "window_max_chars": shipped.window_max_chars,
        "max_abs_margin_diff_vs_sklearn": diff,
    }
    if name == "injection":
        # what check_messages does with tool content: both heads, flagged if either flags
        docs = [e for e in test if e.head == "document"]
        either = [
            max(
                shipped.score(e.text, "document") - thresholds["document"],
                shipped.score(e.text, "prompt") - thresholds["prompt"],
            )
            for e in docs
        ]
        reports["document+prompt"] = rate_report(docs, either, 0.0)
    return calibrated, reports, training


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="shared data folder (default: $QLORAKIT_SHARED_DATA or <repo>/../shared/data)")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the guard files go")
    args = ap.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    t0 = time.perf_counter()

    sets = {
        "injection": injection_examples(data_dir, seed=SEED),
        "moderation": moderation_examples(data_dir, seed=SEED),
    }
    models: dict[str, LinearTextModel] = {}
    metrics: dict[str, Any] = {
        "seed": SEED,
        "sklearn_version": sklearn.__version__,
        "cv_folds": N_FOLDS,
        "cv_fpr": CV_FPR,
        "targets": {"tpr": TARGET_TPR, "fpr": TARGET_FPR},
        "heads": {},
        "training": {},
    }
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name, examples in sets.items():
            models[name], reports, metrics["training"][name] = train_and_measure(name, examples, tmp)
            for h, rep in reports.items():
                metrics["heads"][f"{name}.{h}"] = rep

        # harder report: whole BIPIA categories unseen in training (a second model, not shipped)
        ho_examples = injection_examples(data_dir, seed=SEED, holdout_categories=HOLDOUT_CATEGORIES)
        ho_model, ho_reports, _ = train_and_measure("injection", ho_examples, tmp)
        ho_rep = ho_reports["document"]
        metrics["category_holdout_either_head"] = ho_reports["document+prompt"]
        held = [
            e for e in ho_examples
            if e.split == "test" and e.head == "document" and e.label == 1 and e.category in HOLDOUT_CATEGORIES
        ]
        held_tpr, _ = rates([1] * len(held), [ho_model.score(e.text, "document") for e in held], ho_rep["threshold"])
        metrics["category_holdout"] = {
            "categories": list(HOLDOUT_CATEGORIES),
            "held_out_tpr": held_tpr.to_dict(),
            "report": ho_rep,
        }

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out_dir, models, metrics)
    # the files just written must load with the public guard classes
    InjectionGuard.load(args.out_dir)
    ModerationGuard.load(args.out_dir)
    print(summary_table(metrics))
    print()
    print(detail_tables(metrics))
    sizes = {p.name: p.stat().st_size for p in sorted(args.out_dir.iterdir()) if p.is_file()}
    print("\nfiles:", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
