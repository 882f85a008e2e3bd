"""From the recipe's data settings to packed training rows and a held-out split."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .formats import Example, to_examples
from .packing import Row, no_pack, pack
from .readers import DataError, read_records, sha256_path
from .templating import Tokenized, tokenize_examples

__all__ = ["PreparedData", "SourceInfo", "prepare_data", "resolve_data_path", "sha256_file", "load_examples"]

log = logging.getLogger(__name__)

SAMPLE = "sample"


@dataclass
class SourceInfo:
    path: str
    sha256: str
    rows: int
    rows_used: int
    licence: str = ""
    origin: str = ""
    commercial_use: bool | None = None
    role: str = "train"  # train | eval


@dataclass
class PreparedData:
    train_rows: list[Row]
    train_examples: list[Example]
    val_examples: list[Example]
    val_tokens: list[Tokenized]
    sources: list[SourceInfo] = field(default_factory=list)
    n_truncated: int = 0

    @property
    def train_tokens(self) -> int:
        return sum(len(r.input_ids) for r in self.train_rows)

    @property
    def train_loss_tokens(self) -> int:
        return sum(r.n_loss_tokens for r in self.train_rows)


def sha256_file(path: str | Path) -> str:
    """sha256 of a data file or of a saved datasets folder."""
    return sha256_path(path)


def resolve_data_path(spec: str, role: str = "train") -> Path:
    if spec == SAMPLE:
        from .samples import sample_eval_path, sample_train_path

        return sample_train_path() if role == "train" else sample_eval_path()
    return Path(spec).expanduser()


def load_examples(path: Path, form: str = "auto", fields: dict[str, str] | None = None) -> list[Example]:
    return to_examples(read_records(path), path, form, fields)


def _weighted(examples: list[Example], weight: float, rng: random.Random) -> list[Example]:
    """Repeat a source ``floor(weight)`` times plus a seeded sample of the fraction."""
    whole, frac = int(weight), weight - int(weight)
    out = examples * whole
    if frac > 0:
        out += rng.sample(examples, round(frac * len(examples)))
    return out


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    rng = random.Random(seed)
    sources: list[SourceInfo] = []
    train: list[Example] = []
    specs = cfg.sources or []
    if specs:
        for s in specs:
            path = resolve_data_path(s.path)
            ex = load_examples(path, s.format if s.format != "auto" else cfg.format, s.fields or None)
            used = _weighted(ex, s.weight, rng)
            sources.append(SourceInfo(str(path), sha256_file(path), len(ex), len(used), s.licence, s.origin,
                                      s.commercial_use))
            train += used
    else:
        path = resolve_data_path(cfg.train)
        train = load_examples(path, cfg.format)
        licence = "Apache-2.0" if cfg.train == SAMPLE else ""
        origin = "qlorakit sample data (fictional customer support)" if cfg.train == SAMPLE else ""
        sources.append(SourceInfo(str(path), sha256_file(path), len(train), len(train), licence, origin,
                                  True if cfg.train == SAMPLE else None))

    if cfg.eval == "auto" and cfg.train == SAMPLE and not specs:
        vpath = resolve_data_path(SAMPLE, role="eval")
        val = load_examples(vpath, cfg.format)
        sources.append(SourceInfo(str(vpath), sha256_file(vpath), len(val), len(val), "Apache-2.0",
                                  "qlorakit sample data (held-out part)", True, role="eval"))
    elif cfg.eval in ("auto", None, ""):
        order = list(range(len(train)))
        random.Random(seed + 1).shuffle(order)
        n_val = max(1, round(len(train) * cfg.val_fraction))
        if len(train) - n_val < 1:
            raise DataError(f"{sources[0].path}: {len(train)} record(s) are too few to hold out a validation split")
        val_idx = set(order[:n_val])
        val = [train[i] for i in sorted(val_idx)]
        train = [train[i] for i in range(len(train)) if i not in val_idx]
    else:
        vpath = resolve_data_path(cfg.eval, role="eval")
        val = load_examples(vpath, cfg.format)
        sources.append(SourceInfo(str(vpath), sha256_file(vpath), len(val), len(val), role="eval"))

    toks = tokenize_examples(tokenizer, train, cfg.max_seq_len)
    if not toks:
        raise DataError(f"{sources[0].path}: no example has answer tokens within data.max_seq_len={cfg.max_seq_len}")
    n_trunc = sum(t.truncated for t in toks)
    if n_trunc:
        log.warning("%d of %d training examples were longer than data.max_seq_len=%d and were truncated",
                    n_trunc, len(toks), cfg.max_seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = pack(toks, cfg.max_seq_len, pad) if cfg.packing else no_pack(toks, cfg.max_seq_len, pad)
    val_toks = tokenize_examples(tokenizer, val, cfg.max_seq_len)
    return PreparedData(rows, train, val, val_toks, sources, n_trunc)
