"""Exact and near-duplicate records.

Exact duplicates are records whose text is equal after normalisation (Unicode NFKC, case folded,
punctuation dropped, whitespace squeezed). Near duplicates are found with MinHash and locality-
sensitive hashing from ``datasketch`` over word 3-gram shingles, and every candidate pair the index
proposes is confirmed with the exact Jaccard similarity of the two shingle sets, so a reported pair
really is at least ``threshold`` similar. Groups are the connected components of confirmed pairs.

Words are those of :func:`words`: in scripts written without spaces between words (Chinese,
Japanese, Thai, Lao, Khmer, Myanmar) each character counts as a word, so shingles there are
character 3-grams; a run of Chinese text would otherwise be one "word", and two passages differing
in one character would share no shingle. A word keeps its combining marks (the vowel signs and
viramas of Hindi, Bengali, Tamil and the other Indic scripts, the tone marks of Thai): split at
them, "हिन्दी" read as the three "words" ह न द, and का, की, के, को (of, of, of, to) were all क.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import defaultdict
from dataclasses import dataclass

import regex

__all__ = ["DuplicateGroup", "normalise", "shingles", "exact_duplicates", "near_duplicates", "jaccard", "lsh_params",
           "words"]

# scripts written without spaces between words: each of their characters is a word of its own
_UNSPACED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3031-\u3035\u3038-\u303c"  # CJK radicals, ideographic marks
    "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\U00020000-\U0003134f"  # CJK ideographs, supplementary planes
)
# (the ``regex`` package: its \w is Unicode's word character, marks and joiners included, which
# ``re``'s is not; \p{N} keeps the other numerals, such as superscripts, that ``re``'s \w had)
_WORD = regex.compile(f"(?V1)[[\\w\\p{{N}}]--[{_UNSPACED}]]+|[[{_UNSPACED}]--\\p{{M}}]\\p{{M}}*")
_ASCII_WORD = re.compile(r"[A-Za-z0-9_]+")  # the same words in ASCII text, about 3x faster


@dataclass
class DuplicateGroup:
    kind: str  # 'exact' or 'near'
    members: list[int]  # indices into the texts, ascending; the first is the one kept
    similarity: float  # 1.0 for exact; for near: the lowest confirmed Jaccard similarity in the group


def words(text: str) -> list[str]:
    """The words of ``text`` as written (no normalisation): runs of letters, digits and their
    combining marks, and each single character (with its marks) of a script written without spaces
    (Chinese, Japanese, Thai, ...); punctuation and whitespace dropped."""
    if text.isascii():  # (a flag of the string: no scan)
        return _ASCII_WORD.findall(text)
    return _WORD.findall(text)


def _words(text: str) -> list[str]:
    return words(unicodedata.normalize("NFKC", text).casefold())


def normalise(text: str) -> str:
    """NFKC, case folded, punctuation dropped, whitespace squeezed: what 'exact' compares."""
    return " ".join(_words(text))


def shingles(text: str, k: int = 3) -> set[int]:
    """Word ``k``-grams of the normalised text, hashed to 32 bits (CRC-32: fast and stable across runs)."""
    words = _words(text)
    if len(words) <= k:
        return {zlib.crc32(" ".join(words).encode("utf-8"))} if words else set()
    return {zlib.crc32(" ".join(words[i:i + k]).encode("utf-8")) for i in range(len(words) - k + 1)}


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def exact_duplicates(texts: list[str]) -> list[DuplicateGroup]:
    """Groups of records whose normalised texts are equal (empty texts are ignored)."""
    seen: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        n = normalise(t)
        if n:
            seen[n].append(i)
    return [DuplicateGroup("exact", g, 1.0) for g in seen.values() if len(g) > 1]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _identity(x: int) -> int:
    return x


def lsh_params(threshold: float, num_perm: int, recall: float = 0.999) -> tuple[int, int]:
    """``(bands, rows)`` whose chance to propose a pair exactly ``threshold`` similar is >= ``recall``.

    datasketch's own choice balances false positives against false negatives, which at the
    threshold itself proposes a pair less than half the time; since every candidate is confirmed
    with the exact Jaccard similarity, false positives cost only time, so recall comes first.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            best = (bands, rows)
    return best


def near_duplicates(texts: list[str], threshold: float = 0.8, *, num_perm: int = 128, k: int = 3,
                    exclude: set[int] | None = None) -> list[DuplicateGroup]:
    """Groups of records at least ``threshold`` similar (Jaccard of word ``k``-gram shingles).

    ``exclude`` holds indices to leave out (e.g. all but the first of each exact-duplicate group,
    which are reported as exact duplicates already).
    """
    from datasketch import MinHash, MinHashLSH

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    exclude = exclude or set()
    sets: dict[int, set[int]] = {}
    for i, t in enumerate(texts):
        if i not in exclude:
            s = shingles(t, k)
            if s:
                sets[i] = s
    lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
    proto = MinHash(num_perm=num_perm, hashfunc=_identity)
    uf = _UnionFind()
    pair_sim: dict[tuple[int, int], float] = {}
    with lsh.insertion_session() as session:
        minhashes = {}
        for i, s in sets.items():
            m = proto.copy()
            m.update_batch(list(s))
            minhashes[i] = m
            session.insert(i, m, check_duplication=False)
    for i, m in minhashes.items():
        for j in lsh.query(m):
            if j <= i:
                continue
            sim = jaccard(sets[i], sets[j])
            if sim >= threshold:
                pair_sim[(i, j)] = sim
                uf.union(i, j)
    groups: dict[int, set[int]] = defaultdict(set)
    lowest: dict[int, float] = {}
    for (i, j), sim in pair_sim.items():
        root = uf.find(i)
        groups[root].update((i, j))
        lowest[root] = min(lowest.get(root, 1.0), sim)
    out = [DuplicateGroup("near", sorted(m), round(lowest[r], 4)) for r, m in groups.items()]
    return sorted(out, key=lambda g: g.members[0])
