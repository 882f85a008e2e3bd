"""Overlap between training records and the evaluation sets qlorakit measures with.

The method follows the contamination analysis of the GPT-3 paper (Brown et al. 2020, appendix C):
texts are lower-cased and split into words with punctuation dropped; a training record is
*contaminated* by an evaluation item when they share an ``n``-gram (13 words by default). An item
shorter than ``n`` words counts as one gram of its own length, provided it has at least
``min_words`` words (8, the paper's floor against spurious matches); shorter items are not checked.

Evaluation items are split into the segments a model is shown (an MMLU question and its choices, a
HellaSwag context and its right ending, a TruthfulQA question and its best answer, ...), and grams
never cross from one segment into another. The sets are read from the shared data folder
(``$QLORAKIT_SHARED_DATA`` or ``<repo>/../shared/data``); a set whose files are absent is reported
as skipped. Any other file can be named too: each of its records is one item, its string fields
the segments.

Grams are hashed to 64 bits and matched with numpy over all records at once, so the pass runs at
memory speed; a hit names the evaluation item and quotes the shared words.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .dedup import words as split_words
from .licences import shared_data_root
from .readers import DataError, read_records

__all__ = ["EvalSet", "EVAL_SETS", "ContaminationIndex", "Contamination", "build_index", "find_contamination",
           "words", "DEFAULT_N", "DEFAULT_MIN_WORDS"]

DEFAULT_N = 13
DEFAULT_MIN_WORDS = 8
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial gram hash


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation and whitespace dropped; in scripts written without spaces
    (Chinese, Japanese, Thai, ...) each character is a word, so n-grams there are character n-grams
    (see :func:`qlorakit.data.dedup.words`)."""
    return split_words(text.casefold())


# --------------------------------------------------------------------------------------------
# the evaluation sets: name -> files under the shared data folder and how to cut items into segments

Item = tuple[str, list[str]]  # (item id, segments)


def _mmlu(rec: dict[str, Any]) -> list[str]:
    text = str(rec.get("input", ""))
    body = text.split("\n\n", 1)[1] if "\n\n" in text else text  # drop the per-subject header line
    body = re.sub(r"\s*Answer:\s*$", "", body)
    question = re.split(r"\n[A-D]\. ", body, maxsplit=1)[0]
    return [body, question]


def _hellaswag(rec: dict[str, Any]) -> list[str]:
    ctx, endings, label = str(rec.get("ctx", "")), rec.get("endings") or [], rec.get("label")
    gold = endings[label] if isinstance(label, int) and 0 <= label < len(endings) else ""
    return [f"{ctx} {gold}".strip(), ctx]


def _truthfulqa(rec: dict[str, Any]) -> list[str]:
    q, best = str(rec.get("Question", "")), str(rec.get("Best Answer", ""))
    return [q, f"{q} {best}".strip()]


def _bbq(rec: dict[str, Any]) -> list[str]:
    ctx, q = str(rec.get("context", "")), str(rec.get("question", ""))
    return [f"{ctx} {q}".strip(), ctx]


def _fields(*names: str) -> Callable[[dict[str, Any]], list[str]]:
    def get(rec: dict[str, Any]) -> list[str]:
        return [str(rec[n]) for n in names if isinstance(rec.get(n), str)]
    return get


def _all_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "_line" for s in _all_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _all_strings(v)]
    return []


def _string_lists(path: Path) -> list[Item]:
    """BIPIA attack files: ``{category: [attack text, ...]}``."""
    obj = json.loads(path.read_text(encoding="utf-8"))
    return [(f"{path.name}:{cat}[{i}]", [s]) for cat, items in obj.items() for i, s in enumerate(items)
            if isinstance(s, str)]


@dataclass(frozen=True)
class EvalSet:
    name: str
    files: tuple[str, ...]  # globs relative to the shared data folder
    segments: Callable[[dict[str, Any]], list[str]] | None  # None: the file is a {category: [str]} map

    def paths(self, root: Path) -> list[Path]:
        return sorted(p for pattern in self.files for p in root.glob(pattern))

    def items(self, root: Path) -> list[Item]:
        out: list[Item] = []
        for p in self.paths(root):
            if self.segments is None:
                out += _string_lists(p)
                continue
            for rec in read_records(p):
                out.append((f"{p.name}:{rec['_line']}", self.segments(rec)))
        return out


EVAL_SETS: dict[str, EvalSet] = {s.name: s for s in [
    EvalSet("mmlu", ("benchmarks/mmlu_val_zero_shot.jsonl",), _mmlu),
    EvalSet("hellaswag", ("benchmarks/hellaswag_val_first1000.jsonl",), _hellaswag),
    EvalSet("truthfulqa", ("truthfulqa/TruthfulQA.csv",), _truthfulqa),
    EvalSet("bbq", ("bbq/*.jsonl",), _bbq),
    EvalSet("advbench", ("safety/advbench_harmful_behaviors.csv", "safety/advbench_harmful_strings.csv"),
            _fields("goal", "target")),
    EvalSet("xstest", ("safety/xstest_prompts.csv",), _fields("prompt")),
    EvalSet("bipia", ("safety/bipia_email_test.jsonl", "safety/bipia_code_test.jsonl"),
            _fields("context", "question", "error", "code")),
    EvalSet("bipia_attacks", ("safety/bipia_text_attack_train.json", "safety/bipia_code_attack_train.json"), None),
]}


# --------------------------------------------------------------------------------------------
# hashing


def _word_hashes(ws: list[str]) -> np.ndarray:
    # Python's str hash: fast, and stable within one process, which is all the index needs
    return np.fromiter((hash(w) for w in ws), dtype=np.int64, count=len(ws)).view(np.uint64)


def _gram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """Hash of every ``n``-gram of the word hashes ``h`` (length ``len(h) - n + 1``)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    g = h[:m].copy()
    for k in range(1, n):
        g *= _MULT
        g += h[k:k + m]
    return g


@dataclass
class ContaminationIndex:
    n: int
    min_words: int
    sets: list[str]  # eval sets indexed
    skipped: dict[str, str]  # eval set -> why it was not indexed
    items: dict[str, int]  # eval set -> number of items
    lengths: list[int]  # gram lengths present (n, and shorter whole segments)
    # gram length -> (gram hashes, sorted; the owning item of each, as an index into ``owners``)
    table: dict[int, tuple[np.ndarray, np.ndarray]]
    owners: list[tuple[str, str]]  # (eval set, item id)

    def items_of(self, length: int, gram: int) -> list[tuple[str, str]]:
        hashes, owner = self.table[length]
        key = np.uint64(gram)
        lo, hi = int(np.searchsorted(hashes, key, side="left")), int(np.searchsorted(hashes, key, side="right"))
        return list(dict.fromkeys(self.owners[k] for k in owner[lo:hi].tolist()))


def _index_items(index_items: dict[str, list[Item]], n: int, min_words: int
                 ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[tuple[str, str]]]:
    """All grams of all segments, computed at once over the concatenated words."""
    owners: list[tuple[str, str]] = []
    flat: list[str] = []
    seg_len: list[int] = []
    seg_owner: list[int] = []
    for set_name, items in index_items.items():
        for item_id, segments in items:
            owners.append((set_name, item_id))
            for seg in segments:
                ws = words(seg)
                if len(ws) >= min_words:
                    flat += ws
                    seg_len.append(len(ws))
                    seg_owner.append(len(owners) - 1)
    if not flat:
        return {}, owners
    lens = np.asarray(seg_len, dtype=np.int64)
    seg = np.repeat(np.arange(len(lens)), lens)  # segment of every word position
    starts = np.zeros(len(flat), dtype=bool)
    starts[np.concatenate(([0], np.cumsum(lens)[:-1]))] = True
    owner_of_seg = np.asarray(seg_owner, dtype=np.int64)
    h = _word_hashes(flat)
    g = h.copy()
    table: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for length in range(1, n + 1):
        if length > 1:
            g = g[:-1] * _MULT + h[length - 1:]
        if length < min_words:
            continue
        s = seg[: len(g)]
        if length == n:  # every n-gram inside a segment of at least n words
            keep = (s == seg[length - 1:]) & (lens[s] >= n)
        else:  # the whole of a segment exactly this long
            keep = starts[: len(g)] & (lens[s] == length)
        if keep.any():
            grams, own = g[keep], owner_of_seg[s[keep]]
            order = np.argsort(grams, kind="stable")
            table[length] = (grams[order], own[order])
    return table, owners


def _load(name: str, root: Path | None) -> list[Item]:
    if name in EVAL_SETS:
        if root is None:
            raise FileNotFoundError("the shared data folder was not found (set QLORAKIT_SHARED_DATA)")
        s = EVAL_SETS[name]
        if not s.paths(root):
            raise FileNotFoundError(f"no files for {name} under {root} ({', '.join(s.files)})")
        return s.items(root)
    p = Path(name)
    if p.is_file():
        return [(f"{p.name}:{rec['_line']}", _all_strings(rec)) for rec in read_records(p)]
    raise DataError(f"--eval-sets: {name!r} is neither an evaluation set ({', '.join(EVAL_SETS)}) nor a file")


@lru_cache(maxsize=4)
def _cached_index(names: tuple[str, ...], root: str | None, n: int, min_words: int) -> ContaminationIndex:
    rootp = Path(root) if root else None
    loaded: dict[str, list[Item]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            loaded[name] = _load(name, rootp)
        except FileNotFoundError as e:
            skipped[name] = str(e)
    table, owners = _index_items(loaded, n, min_words)
    return ContaminationIndex(n, min_words, list(loaded), skipped, {k: len(v) for k, v in loaded.items()},
                              sorted(table), table, owners)


def build_index(names: Iterable[str] | None = None, *, n: int = DEFAULT_N, min_words: int = DEFAULT_MIN_WORDS,
                root: str | Path | None = None) -> ContaminationIndex:
    """The gram index of the named evaluation sets (default: all of :data:`EVAL_SETS`); cached."""
    if n < 1 or min_words < 1:
        raise ValueError(f"n-gram size and min_words must be positive, got n={n}, min_words={min_words}")
    names = tuple(names) if names else tuple(EVAL_SETS)
    r = Path(root) if root is not None else shared_data_root()
    return _cached_index(names, str(r) if r is not None else None, n, min(min_words, n))


# --------------------------------------------------------------------------------------------
# matching


@dataclass
class Contamination:
    record: int  # index into the texts
    eval_set: str
    items: list[str] = field(default_factory=list)  # evaluation item ids it overlaps
    ngram: str = ""  # the first shared words, as evidence


def find_contamination(texts: list[str], index: ContaminationIndex, *, chunk: int = 20000) -> list[Contamination]:
    """Every (training record, evaluation set) pair that shares a gram, in record order."""
    out: list[Contamination] = []
    if not index.table:
        return out
    for start in range(0, len(texts), chunk):
        out += _match_chunk(texts[start:start + chunk], start, index)
    return out


def _match_chunk(texts: list[str], offset: int, index: ContaminationIndex) -> list[Contamination]:
    toks = [words(t) for t in texts]
    lens = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
    if lens.sum() == 0:
        return []
    h = _word_hashes([w for t in toks for w in t])
    rec = np.repeat(np.arange(len(toks)), lens)  # record of every word position
    hits: dict[tuple[int, str], Contamination] = {}
    g = h.copy()
    longest = max(index.lengths)
    for length in range(1, longest + 1):
        if length > 1:  # extend every gram by one word: g[i] covers words i .. i+length-1
            g = g[:-1] * _MULT + h[length - 1:]
        if length not in index.table or len(g) == 0:
            continue
        valid = rec[: len(g)] == rec[length - 1:]  # the gram stays inside one record
        table = index.table[length][0]
        pos = np.searchsorted(table, g)
        found = valid & (table[np.minimum(pos, len(table) - 1)] == g)
        for i in np.flatnonzero(found).tolist():
            r = int(rec[i])
            first = i - int(np.searchsorted(rec, r))  # word offset inside the record
            for set_name, item in index.items_of(length, int(g[i])):
                key = (r, set_name)
                c = hits.get(key)
                if c is None:
                    c = hits[key] = Contamination(offset + r, set_name, [], " ".join(toks[r][first:first + length]))
                if item not in c.items:
                    c.items.append(item)
    return sorted(hits.values(), key=lambda c: (c.record, c.eval_set))
