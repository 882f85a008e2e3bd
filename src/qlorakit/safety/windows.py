"""Cut a text into short windows so that one injected sentence is not diluted by a long document.

A guard scores every window and keeps the maximum. Two ways to cut, both into substrings of the
text that start and end at non-space characters (so word and character n-grams inside a window
are the same as in the full text):

- :func:`window_spans` ("merged"): pieces (lines and sentences) merged greedily up to
  ``max_chars``; a text no longer than ``max_chars`` is a single window, the text itself.
- :func:`piece_spans` ("pieces"): every line or sentence on its own (split at spaces when longer
  than ``max_chars``), so that a sentence embedding sees one sentence and not its neighbours.
"""

from __future__ import annotations

import re

__all__ = ["WINDOW_KINDS", "window_spans", "piece_spans", "spans_of", "text_windows"]

WINDOW_KINDS = ("merged", "pieces")

# A piece ends at a run of newlines, or at whitespace after sentence-final punctuation.
_PIECE_BREAK = re.compile(r"\s*\n\s*|(?<=[.!?])\s+")


def _pieces(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _PIECE_BREAK.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    # strip leading/trailing spaces of the first/last piece (the regex eats the inner ones)
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def _chunk(text: str, a: int, b: int, max_chars: int) -> list[tuple[int, int]]:
    """Split the piece ``text[a:b]`` into chunks of at most ``max_chars``, at spaces where possible."""
    chunks = []
    while b - a > max_chars:
        cut = -1
        for i in range(a + max_chars, a, -1):
            if text[i].isspace():
                cut = i
                break
        if cut <= a:
            cut = a + max_chars
        chunks.append((a, cut))
        a = cut
        while a < b and text[a].isspace():
            a += 1
    if b > a:
        chunks.append((a, b))
    return chunks


def _check(text: str, max_chars: int) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if max_chars < 16:
        raise ValueError(f"max_chars must be at least 16, got {max_chars}")


def window_spans(text: str, max_chars: int = 320) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the windows of ``text``; at least one span.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: ``max_chars`` is below 16.
    """
    _check(text, max_chars)
    if len(text) <= max_chars:
        return [(0, len(text))]
    windows: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for a, b in _pieces(text):
        for ca, cb in _chunk(text, a, b, max_chars):
            if cur is not None and cb - cur[0] <= max_chars:
                cur = (cur[0], cb)
            else:
                if cur is not None:
                    windows.append(cur)
                cur = (ca, cb)
    if cur is not None:
        windows.append(cur)
    return windows or [(0, len(text))]


def text_windows(text: str, max_chars: int = 320) -> list[str]:
    """The windows of ``text`` as strings (see :func:`window_spans`)."""
    return [text[a:b] for a, b in window_spans(text, max_chars)]


def piece_spans(text: str, max_chars: int = 320) -> list[tuple[int, int]]:
    """Character spans of the lines and sentences of ``text``, each cut at spaces to at most
    ``max_chars``; at least one span (``[(0, len(text))]`` for a text without a piece).

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: ``max_chars`` is below 16.
    """
    _check(text, max_chars)
    spans = [c for a, b in _pieces(text) for c in _chunk(text, a, b, max_chars)]
    return spans or [(0, len(text))]


def spans_of(text: str, kind: str, max_chars: int) -> list[tuple[int, int]]:
    """The windows of ``text`` cut the ``kind`` way ("merged" or "pieces")."""
    if kind == "merged":
        return window_spans(text, max_chars)
    if kind == "pieces":
        return piece_spans(text, max_chars)
    raise ValueError(f"window kind must be one of {WINDOW_KINDS}, got {kind!r}")
