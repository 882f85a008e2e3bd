"""From the recipe's data settings to packed training rows and a held-out split."""

from __future__ import annotations

import json
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
    rows_held_out: int = 0  # records of this source held out as the validation split


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


def _example_key(ex: Example) -> str:
    """The content of an example, for telling copies apart from distinct examples."""
    return json.dumps([ex.text, ex.messages], sort_keys=True, ensure_ascii=False, default=str)


def _hold_out(pools: list[list[Example]], fraction: float, seed: int, first_path: str) -> tuple[list[list[Example]], list[Example]]:
    """A validation split drawn from the sources' own records, before any weighting repeats them.

    Copies of one example (the same content twice in the data) fall on the same side, so that no
    held-out example is also trained on. Returns each source's remaining examples, in file order,
    and the held-out ones.
    """
    flat = [(i, j) for i, pool in enumerate(pools) for j in range(len(pool))]
    n_val = max(1, round(len(flat) * fraction))
    if len(flat) - n_val < 1:
        raise DataError(f"{first_path}: {len(flat)} record(s) are too few to hold out a validation split")
    keys = [_example_key(pools[i][j]) for i, j in flat]
    groups: dict[str, list[int]] = {}
    for n, key in enumerate(keys):
        groups.setdefault(key, []).append(n)
    order = list(range(len(flat)))
    random.Random(seed + 1).shuffle(order)
    val_idx: set[int] = set()
    for n in order:
        if len(val_idx) >= n_val:
            break
        val_idx.update(groups[keys[n]])  # a no-op for a copy already held out
    if len(val_idx) >= len(flat):
        raise DataError(f"{first_path}: every record is a copy of the others; no distinct record is left to train on "
                        f"after holding out a validation split")
    val = [pools[i][j] for n, (i, j) in enumerate(flat) if n in val_idx]
    kept: list[list[Example]] = [[] for _ in pools]
    for n, (i, j) in enumerate(flat):
        if n not in val_idx:
            kept[i].append(pools[i][j])
    return kept, val


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    rng = random.Random(seed)
    sources: list[SourceInfo] = []
    pools: list[list[Example]] = []
    weights: list[float] = []
    specs = cfg.sources or []
    if specs:
        for s in specs:
            path = resolve_data_path(s.path)
            ex = load_examples(path, s.format if s.format != "auto" else cfg.format, s.fields or None)
            pools.append(ex)
            weights.append(s.weight)
            sources.append(SourceInfo(str(path), sha256_file(path), len(ex), len(ex), s.licence, s.origin,
                                      s.commercial_use))
    else:
        path = resolve_data_path(cfg.train)
        ex = load_examples(path, cfg.format)
        pools.append(ex)
        weights.append(1.0)
        licence = "Apache-2.0" if cfg.train == SAMPLE else ""
        origin = "qlorakit sample data (fictional customer support)" if cfg.train == SAMPLE else ""
        sources.append(SourceInfo(str(path), sha256_file(path), len(ex), len(ex), licence, origin,
                                  True if cfg.train == SAMPLE else None))
    n_sources = len(sources)

    if cfg.eval == "auto" and cfg.train == SAMPLE and not specs:
        vpath = resolve_data_path(SAMPLE, role="eval")
        val = load_examples(vpath, cfg.format)
        sources.append(SourceInfo(str(vpath), sha256_file(vpath), len(val), len(val), "Apache-2.0",
                                  "qlorakit sample data (held-out part)", True, role="eval"))
    elif cfg.eval in ("auto", None, ""):
        # held out from the distinct records first, weighted after: a weight > 1 repeats only
        # training records, never a held-out one
        held = pools
        pools, val = _hold_out(pools, cfg.val_fraction, seed, sources[0].path)
        for info, before, after in zip(sources, held, pools):
            info.rows_held_out = len(before) - len(after)
    else:
        vpath = resolve_data_path(cfg.eval, role="eval")
        val = load_examples(vpath, cfg.format)
        sources.append(SourceInfo(str(vpath), sha256_file(vpath), len(val), len(val), role="eval"))

    train: list[Example] = []
    for info, pool, weight in zip(sources[:n_sources], pools, weights):
        used = _weighted(pool, weight, rng) if weight != 1.0 else pool
        info.rows_used = len(used)
        train += used

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
    held_from = sources[n_sources].path if len(sources) > n_sources else f"the split held out of {sources[0].path}"
    if val and not val_toks:
        raise DataError(f"{held_from}: no held-out example has answer tokens within data.max_seq_len="
                        f"{cfg.max_seq_len}, so the tuned model could not be measured; raise data.max_seq_len or "
                        "give held-out examples with shorter prompts")
    if len(val_toks) < len(val):
        log.warning("%d of %d held-out examples (%s) have no answer tokens within data.max_seq_len=%d; the "
                    "held-out loss is measured on the other %d", len(val) - len(val_toks), len(val), held_from,
                    cfg.max_seq_len, len(val_toks))
    return PreparedData(rows, train, val, val_toks, sources, n_trunc)
