"""Helpers shared by the suites."""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

__all__ = ["round_robin"]

T = TypeVar("T")


def round_robin(rows: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
    """Interleave ``rows`` by ``key``: first row of each group (groups in order of first
    appearance), then the second of each, and so on. Deterministic; the first N rows of the
    result cover the groups evenly, so a ``--limit`` keeps a balanced sample."""
    groups: dict[Hashable, list[T]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out: list[T] = []
    depth = max((len(g) for g in groups.values()), default=0)
    for i in range(depth):
        for g in groups.values():
            if i < len(g):
                out.append(g[i])
    return out
