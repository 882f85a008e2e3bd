"""The result of one guard on one text."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Verdict"]


@dataclass(frozen=True)
class Verdict:
    """What a guard decided about a text.

    Attributes:
        label: the class name: "injection" or "benign" for the injection guard, "harmful" or
            "safe" for the moderation guard.
        score: the guard's score in (0, 1); higher means more likely ``positive``.
        threshold: the score at and above which the text is flagged.
        flagged: ``score >= threshold``.
        guard: which guard and head decided: "injection.prompt", "injection.document",
            "moderation.request" or "moderation.content".
        source: where the text came from, e.g. ``messages[2].content``; empty when not known.
    """

    label: str
    score: float
    threshold: float
    flagged: bool
    guard: str
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dictionary (for audit logs and API error bodies)."""
        return asdict(self)
