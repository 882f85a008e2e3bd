"""TF-IDF text features in plain Python and numpy, equal to scikit-learn's ``TfidfVectorizer``.

The guards are trained with scikit-learn, but serving must not need it: this module rebuilds the
same sparse vector from the shipped vocabulary and idf weights. Supported settings are the ones the
training script uses: ``analyzer`` in {"word", "char", "char_wb"}, any ``ngram_range``,
``lowercase``, the ``token_pattern`` of the word analyzer, ``sublinear_tf``, ``norm`` "l2" or None,
``use_idf``. Several vectorizers side by side behave like ``sklearn.pipeline.FeatureUnion``: each
block is normalised on its own and the blocks are concatenated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TfidfBlock", "FeatureUnionSpec", "SparseRow"]

# scikit-learn: ``_white_spaces = re.compile(r"\s\s+")``
_WHITE_SPACES = re.compile(r"\s\s+")

SparseRow = tuple[np.ndarray, np.ndarray]  # (indices int64, values float64)

_ANALYZERS = ("word", "char", "char_wb")
_WORD_CACHE_MAX = 200_000


@dataclass(frozen=True)
class TfidfBlock:
    """One fitted ``TfidfVectorizer``: its settings, vocabulary (term -> column) and idf."""

    analyzer: str
    ngram_range: tuple[int, int]
    vocabulary: Mapping[str, int]
    idf: np.ndarray | None  # (n_terms,) float64, or None when use_idf=False
    lowercase: bool = True
    token_pattern: str = r"(?u)\b\w\w+\b"
    sublinear_tf: bool = False
    norm: str | None = "l2"

    def __post_init__(self) -> None:
        if self.analyzer not in _ANALYZERS:
            raise ValueError(f"analyzer must be one of {_ANALYZERS}, got {self.analyzer!r}")
        lo, hi = self.ngram_range
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram_range must satisfy 1 <= min <= max, got {self.ngram_range}")
        if self.norm not in ("l2", None):
            raise ValueError(f"norm must be 'l2' or None, got {self.norm!r}")
        if self.idf is not None and self.idf.shape != (len(self.vocabulary),):
            raise ValueError(
                f"idf has shape {self.idf.shape}, expected ({len(self.vocabulary)},) "
                "to match the vocabulary"
            )
        object.__setattr__(self, "_token_re", re.compile(self.token_pattern))
        object.__setattr__(self, "_word_cache", {})

    @property
    def n_features(self) -> int:
        return len(self.vocabulary)

    # -- analyzers: line for line the scikit-learn ones, so the counts are identical ------------
    def terms(self, text: str) -> list[str]:
        """The n-grams of ``text`` that scikit-learn's analyzer would produce, in its order."""
        if self.lowercase:
            text = text.lower()
        lo, hi = self.ngram_range
        if self.analyzer == "word":
            tokens = self._token_re.findall(text)  # type: ignore[attr-defined]
            if hi == 1:
                return tokens
            out = list(tokens) if lo == 1 else []
            n_tok = len(tokens)
            for n in range(max(lo, 2), min(hi + 1, n_tok + 1)):
                out.extend(" ".join(tokens[i : i + n]) for i in range(n_tok - n + 1))
            return out
        text = _WHITE_SPACES.sub(" ", text)
        if self.analyzer == "char":
            out = []
            n_chr = len(text)
            for n in range(lo, min(hi + 1, n_chr + 1)):
                out.extend(text[i : i + n] for i in range(n_chr - n + 1))
            return out
        out = []
        append = out.append
        for w in text.split():
            w = " " + w + " "
            w_len = len(w)
            for n in range(lo, hi + 1):
                offset = 0
                append(w[offset : offset + n])
                while offset + n < w_len:
                    offset += 1
                    append(w[offset : offset + n])
                if offset == 0:  # a short word is counted once
                    break
        return out

    def term_indices(self, text: str) -> np.ndarray:
        """Vocabulary columns of the n-grams of ``text``, one entry per occurrence (int64).

        Character n-grams of the ``char_wb`` analyzer never cross a word, so the columns of each
        distinct word are cached (the cache is cleared when it reaches ``_WORD_CACHE_MAX``).
        """
        vocab_get = self.vocabulary.get
        if self.analyzer != "char_wb":
            return np.array([j for j in map(vocab_get, self.terms(text)) if j is not None], dtype=np.int64)
        if self.lowercase:
            text = text.lower()
        cache: dict[str, np.ndarray] = self._word_cache  # type: ignore[attr-defined]
        lo, hi = self.ngram_range
        parts: list[np.ndarray] = []
        for word in text.split():  # same words as sklearn: it collapses whitespace, then split()s
            ids = cache.get(word)
            if ids is None:
                w = " " + word + " "
                w_len = len(w)
                grams = []
                for n in range(lo, hi + 1):
                    offset = 0
                    grams.append(w[offset : offset + n])
                    while offset + n < w_len:
                        offset += 1
                        grams.append(w[offset : offset + n])
                    if offset == 0:
                        break
                ids = np.array([j for j in map(vocab_get, grams) if j is not None], dtype=np.int64)
                if len(cache) >= _WORD_CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            parts.append(ids)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def transform_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sparse TF-IDF rows of ``texts``: (row, column, value) arrays, rows normalised."""
        per_text = [self.term_indices(t) for t in texts]
        cols = np.concatenate(per_text) if per_text else np.empty(0, dtype=np.int64)
        if cols.size == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=np.float64)
        rows = np.repeat(np.arange(len(texts), dtype=np.int64), [len(c) for c in per_text])
        n = self.n_features
        keys, counts = np.unique(rows * n + cols, return_counts=True)
        row, col = keys // n, keys % n
        val = counts.astype(np.float64)
        if self.sublinear_tf:
            val = np.log(val) + 1.0
        if self.idf is not None:
            val = val * self.idf[col]
        if self.norm == "l2":
            norms = np.sqrt(np.bincount(row, weights=val * val, minlength=len(texts)))
            val = val / norms[row]
        return row, col, val

    def transform(self, text: str) -> SparseRow:
        """Column indices and TF-IDF values of one text in this block (normalised)."""
        _, col, val = self.transform_batch([text])
        return col, val

    # -- (de)serialisation ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Settings and vocabulary as JSON-ready data (the idf goes to the .npz)."""
        terms = [""] * len(self.vocabulary)
        for term, j in self.vocabulary.items():
            terms[j] = term
        return {
            "analyzer": self.analyzer,
            "ngram_range": list(self.ngram_range),
            "lowercase": self.lowercase,
            "token_pattern": self.token_pattern,
            "sublinear_tf": self.sublinear_tf,
            "norm": self.norm,
            "use_idf": self.idf is not None,
            "vocabulary": terms,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], idf: np.ndarray | None, where: str) -> "TfidfBlock":
        """Rebuild a block from :meth:`config` output; ``where`` names the source in errors."""
        try:
            terms = cfg["vocabulary"]
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                raise ValueError("'vocabulary' must be a list of strings")
            vocab = {t: j for j, t in enumerate(terms)}
            if len(vocab) != len(terms):
                raise ValueError("'vocabulary' holds duplicate terms")
            use_idf = bool(cfg["use_idf"])
            if use_idf and idf is None:
                raise ValueError("use_idf is true but no idf array was given")
            lo, hi = cfg["ngram_range"]
            return cls(
                analyzer=str(cfg["analyzer"]),
                ngram_range=(int(lo), int(hi)),
                vocabulary=vocab,
                idf=np.asarray(idf, dtype=np.float64) if use_idf else None,
                lowercase=bool(cfg["lowercase"]),
                token_pattern=str(cfg["token_pattern"]),
                sublinear_tf=bool(cfg["sublinear_tf"]),
                norm=cfg["norm"],
            )
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e.args[0]!r} in vectorizer settings") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid vectorizer settings: {e}") from e


@dataclass(frozen=True)
class FeatureUnionSpec:
    """Blocks side by side; column offsets follow the block order."""

    blocks: Sequence[TfidfBlock]

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("a feature union needs at least one block")

    @property
    def n_features(self) -> int:
        return sum(b.n_features for b in self.blocks)

    def transform_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concatenated sparse rows of ``texts``: (row, column, value) arrays."""
        rows, cols, vals = [], [], []
        offset = 0
        for block in self.blocks:
            r, c, v = block.transform_batch(texts)
            rows.append(r)
            cols.append(c + offset)
            vals.append(v)
            offset += block.n_features
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def transform(self, text: str) -> SparseRow:
        """The concatenated sparse row of one text: (column, value) arrays."""
        _, col, val = self.transform_batch([text])
        return col, val
