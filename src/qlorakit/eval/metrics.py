"""Per-item metric functions, each matching a reference definition.

- ``acc``/``acc_norm``: lm-evaluation-harness multiple choice (``acc_norm`` divides each
  choice's log-likelihood by the choice's length in characters, the choice text without the
  leading target delimiter).
- ``mc1``/``mc2``: TruthfulQA (lm-eval ``truthfulqa_mc1``/``truthfulqa_mc2``): MC1 is whether the
  best answer outscores every incorrect one; MC2 is the normalised probability mass on the
  true answers.
- ``exact_match``/``token_f1``: SQuAD v1.1 evaluation script (lower-case, strip punctuation and
  articles, collapse whitespace).
- ``rouge_l``: ROUGE-L F-measure as Google's ``rouge-score`` computes it (no stemming); the
  package is used when installed and a plain LCS with the same tokeniser otherwise.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "mc_predictions",
    "mc_acc",
    "mc1",
    "mc2",
    "normalize_answer",
    "exact_match",
    "token_f1",
    "rouge_tokenize",
    "lcs_length",
    "rouge_l",
    "rouge_l_lcs",
    "max_over_references",
]


def mc_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the log-likelihoods, and argmax after dividing each by
    its choice's character length (lm-eval ``acc``/``acc_norm``). Ties go to the first index."""
    if len(logprobs) != len(choices) or not choices:
        raise ValueError(f"need one log-likelihood per choice, got {len(logprobs)} for {len(choices)} choices")
    lls = np.asarray(logprobs, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    if (lengths == 0).any():
        raise ValueError("a choice is empty; acc_norm needs non-empty choices")
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def mc_acc(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> tuple[float, float]:
    """``(acc, acc_norm)`` of one item as lm-eval computes them."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is outside the {len(choices)} choices")
    pred, pred_norm = mc_predictions(logprobs, choices)
    return float(pred == gold), float(pred_norm == gold)


def mc1(best_logprob: float, incorrect_logprobs: Sequence[float]) -> float:
    """TruthfulQA MC1: 1 when the best answer's log-likelihood is the argmax against the incorrect
    answers (listed first, so it wins ties, as ``np.argmax`` over lm-eval's choice list does)."""
    if not incorrect_logprobs:
        raise ValueError("MC1 needs at least one incorrect answer")
    return float(best_logprob >= max(incorrect_logprobs))


def mc2(true_logprobs: Sequence[float], false_logprobs: Sequence[float]) -> float:
    """TruthfulQA MC2: ``sum(p_true) / (sum(p_true) + sum(p_false))`` with ``p = exp(loglik)``.

    Computed with log-sum-exp, which equals lm-eval's direct exponentials but does not underflow
    to 0/0 when every answer is very unlikely.
    """
    if not true_logprobs or not false_logprobs:
        raise ValueError("MC2 needs at least one true and one false answer")
    t = np.asarray(true_logprobs, dtype=np.float64)
    f = np.asarray(false_logprobs, dtype=np.float64)
    both = np.concatenate([t, f])
    top = both.max()
    log_true = top + math.log(np.exp(t - top).sum())
    log_all = top + math.log(np.exp(both - top).sum())
    return float(math.exp(log_true - log_all))


# ------------------------------------------------------------------------------- SQuAD metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 over normalised whitespace tokens (1.0 when both are empty)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------ ROUGE-L
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def rouge_tokenize(text: str) -> list[str]:
    """The ``rouge-score`` default tokeniser without stemming: lower case, split on anything
    that is not ``[a-z0-9]``."""
    text = _NON_ALNUM.sub(" ", text.lower())
    return [t for t in re.split(r"\s+", text) if _VALID_TOKEN.match(t)]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)*len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_lcs(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from a plain LCS, with ``rouge-score``'s tokeniser and F formula."""
    pred = rouge_tokenize(prediction)
    ref = rouge_tokenize(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(ref, pred)
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


_SCORER: object | None = None


def _rouge_scorer() -> object | None:
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            return None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``rouge-score`` when installed, the built-in LCS otherwise (same
    numbers: the tests pin one against the other)."""
    scorer = _rouge_scorer()
    if scorer is None:
        return rouge_l_lcs(prediction, reference)
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)  # type: ignore[attr-defined]


def max_over_references(fn: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """Best score of ``prediction`` against any reference (SQuAD convention)."""
    if not references:
        raise ValueError("at least one reference answer is needed")
    return max(fn(prediction, r) for r in references)
