"""True and false positive rates of a guard on labelled examples, pooled and per group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .datasets import Example
from .guards import InjectionGuard, ModerationGuard
from .linear import sigmoid

__all__ = ["Rate", "score_examples", "rates", "rate_report"]


@dataclass(frozen=True)
class Rate:
    """``flagged`` of ``n`` texts; for positives this is the TPR, for negatives the FPR."""

    n: int
    flagged: int

    @property
    def rate(self) -> float:
        return self.flagged / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "flagged": self.flagged, "rate": round(self.rate, 4) if self.n else None}


def score_examples(
    examples: Sequence[Example],
    *,
    injection: InjectionGuard | None = None,
    moderation: ModerationGuard | None = None,
) -> list[float]:
    """Score each example with the guard head named by ``example.head`` (the same numbers as
    ``guard.score``; the windows of all examples of a head are encoded in one batch)."""
    by_head: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.head in ("prompt", "document"):
            if injection is None:
                raise ValueError(f"examples[{i}] needs the injection guard (head {ex.head!r})")
        elif ex.head in ("request", "content"):
            if moderation is None:
                raise ValueError(f"examples[{i}] needs the moderation guard (head {ex.head!r})")
        else:
            raise ValueError(f"examples[{i}]: unknown head {ex.head!r}")
        by_head.setdefault(ex.head, []).append(i)
    scores = [0.0] * len(examples)
    for head, idx in by_head.items():
        guard = injection if head in ("prompt", "document") else moderation
        assert guard is not None  # checked above
        margins = guard.model.batch_max_margins([examples[i].text for i in idx], head)
        for i, m in zip(idx, margins):
            scores[i] = sigmoid(float(m))
    return scores


def rates(labels: Sequence[int], scores: Sequence[float], threshold: float) -> tuple[Rate, Rate]:
    """(TPR as a :class:`Rate` over positives, FPR as a :class:`Rate` over negatives)."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    return (
        Rate(len(pos), sum(s >= threshold for s in pos)),
        Rate(len(neg), sum(s >= threshold for s in neg)),
    )


def rate_report(
    examples: Sequence[Example],
    scores: Sequence[float],
    threshold: float,
    *,
    by: Sequence[str] = ("source", "kind", "category"),
) -> dict[str, Any]:
    """Pooled TPR / FPR and the same per value of each attribute in ``by``.

    Returns ``{"threshold", "tpr", "fpr", "by_<attr>": {value: {"tpr"|"fpr": Rate dict}}}``; a
    group holds "tpr" when it has positives and "fpr" when it has negatives.
    """
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} examples but {len(scores)} scores")
    tpr, fpr = rates([e.label for e in examples], scores, threshold)
    report: dict[str, Any] = {"threshold": threshold, "tpr": tpr.to_dict(), "fpr": fpr.to_dict()}
    for attr in by:
        groups: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            value = getattr(ex, attr)
            if value:
                groups.setdefault(str(value), []).append(i)
        table = {}
        for value in sorted(groups):
            idx = groups[value]
            t, f = rates([examples[i].label for i in idx], [scores[i] for i in idx], threshold)
            entry = {}
            if t.n:
                entry["tpr"] = t.to_dict()
            if f.n:
                entry["fpr"] = f.to_dict()
            table[value] = entry
        report[f"by_{attr}"] = table
    return report
