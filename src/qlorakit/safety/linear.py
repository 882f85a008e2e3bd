"""A linear text classifier stored as plain files: a ``.json`` of settings and a ``.npz`` of arrays.

File layout (``<name>.json`` next to ``<name>.npz``; neither needs pickle to read):

- json: ``format`` ("qlorakit.safety.linear"), ``version`` (1), ``guard``, ``heads`` (names),
  ``thresholds`` (head -> score threshold in (0, 1)), ``window_max_chars``, ``blocks`` (one
  vectorizer config each, see :class:`~qlorakit.safety.features.TfidfBlock`), ``training`` (free
  metadata).
- npz: ``idf_<i>`` per block that uses idf, ``coef`` (n_features, n_heads), ``intercept``
  (n_heads,).

The margin of a window is ``x @ coef[:, h] + intercept[h]`` (scikit-learn's ``decision_function``);
the score of a text is the logistic function of the largest window margin.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .features import FeatureUnionSpec, TfidfBlock
from .windows import window_spans

__all__ = ["FORMAT", "VERSION", "LinearTextModel", "sigmoid"]

FORMAT = "qlorakit.safety.linear"
VERSION = 1


def sigmoid(margin: float) -> float:
    """Numerically safe logistic function."""
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    e = math.exp(margin)
    return e / (1.0 + e)


@dataclass(frozen=True)
class LinearTextModel:
    """Feature blocks plus one weight column per head; see the module docstring for the files."""

    guard: str
    features: FeatureUnionSpec
    heads: tuple[str, ...]
    coef: np.ndarray  # (n_features, n_heads) float64
    intercept: np.ndarray  # (n_heads,) float64
    thresholds: Mapping[str, float]
    window_max_chars: int = 320
    training: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.features.n_features
        if self.coef.shape != (n, len(self.heads)):
            raise ValueError(f"coef has shape {self.coef.shape}, expected ({n}, {len(self.heads)})")
        if self.intercept.shape != (len(self.heads),):
            raise ValueError(
                f"intercept has shape {self.intercept.shape}, expected ({len(self.heads)},)"
            )
        missing = [h for h in self.heads if h not in self.thresholds]
        if missing:
            raise ValueError(f"no threshold for head(s) {missing}")
        for h, t in self.thresholds.items():
            if not 0.0 < float(t) < 1.0:
                raise ValueError(f"threshold of head {h!r} must lie in (0, 1), got {t}")

    def head_index(self, head: str) -> int:
        try:
            return self.heads.index(head)
        except ValueError as e:
            raise ValueError(f"unknown head {head!r}; this model has {list(self.heads)}") from e

    # -- inference ----------------------------------------------------------------------------
    def batch_margins(self, texts: Sequence[str]) -> np.ndarray:
        """Decision values of each text as one window: shape (n_texts, n_heads)."""
        row, col, val = self.features.transform_batch(texts)
        contrib = val[:, None] * self.coef[col]  # (nnz, n_heads)
        out = np.empty((len(texts), len(self.heads)), dtype=np.float64)
        for j in range(len(self.heads)):
            out[:, j] = np.bincount(row, weights=contrib[:, j], minlength=len(texts))
        return out + self.intercept

    def margins(self, text: str) -> np.ndarray:
        """Decision values of ``text`` as one window: shape (n_heads,)."""
        return self.batch_margins([text])[0]

    def window_margins(self, text: str) -> np.ndarray:
        """Decision values per window: shape (n_windows, n_heads)."""
        spans = window_spans(text, self.window_max_chars)
        return self.batch_margins([text[a:b] for a, b in spans])

    def max_margin(self, text: str, head: str) -> float:
        """Largest window margin of ``text`` for ``head``."""
        return float(self.window_margins(text)[:, self.head_index(head)].max())

    def score(self, text: str, head: str) -> float:
        """Logistic of the largest window margin, in (0, 1)."""
        return sigmoid(self.max_margin(text, head))

    # -- files ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, json_path: str | os.PathLike[str], npz_path: str | os.PathLike[str]) -> "LinearTextModel":
        """Read a model; errors name the file and the key that is wrong."""
        jp, npp = Path(json_path), Path(npz_path)
        try:
            cfg = json.loads(jp.read_text(encoding="utf-8"))
        except OSError as e:
            raise FileNotFoundError(f"cannot read guard settings {jp}: {e}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{jp}: not valid JSON (line {e.lineno}): {e.msg}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{jp}: expected a JSON object at the top level")
        if cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
            raise ValueError(
                f"{jp}: expected format {FORMAT!r} version {VERSION}, "
                f"got {cfg.get('format')!r} version {cfg.get('version')!r}"
            )
        try:
            with np.load(npp, allow_pickle=False) as arrays:
                arr = {k: arrays[k] for k in arrays.files}
        except OSError as e:
            raise FileNotFoundError(f"cannot read guard weights {npp}: {e}") from e
        except ValueError as e:
            raise ValueError(f"{npp}: not a plain-array .npz file: {e}") from e
        try:
            blocks = []
            for i, bcfg in enumerate(cfg["blocks"]):
                idf = arr.get(f"idf_{i}")
                blocks.append(TfidfBlock.from_config(bcfg, idf, where=f"{jp} blocks[{i}]"))
            heads = tuple(str(h) for h in cfg["heads"])
            coef = np.asarray(arr["coef"], dtype=np.float64)
            intercept = np.asarray(arr["intercept"], dtype=np.float64).reshape(-1)
            return cls(
                guard=str(cfg["guard"]),
                features=FeatureUnionSpec(blocks),
                heads=heads,
                coef=coef,
                intercept=intercept,
                thresholds={str(k): float(v) for k, v in cfg["thresholds"].items()},
                window_max_chars=int(cfg["window_max_chars"]),
                training=cfg.get("training", {}),
            )
        except KeyError as e:
            raise ValueError(f"{jp} / {npp}: missing key {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{jp} / {npp}: {e}") from e

    def save(self, json_path: str | os.PathLike[str], npz_path: str | os.PathLike[str]) -> None:
        """Write both files atomically (temporary name, fsync, rename); weights as float32."""
        cfg = {
            "format": FORMAT,
            "version": VERSION,
            "guard": self.guard,
            "heads": list(self.heads),
            "thresholds": {h: float(self.thresholds[h]) for h in self.heads},
            "window_max_chars": self.window_max_chars,
            "blocks": [b.config() for b in self.features.blocks],
            "training": dict(self.training),
        }
        arrays: dict[str, np.ndarray] = {
            "coef": self.coef.astype(np.float32),
            "intercept": self.intercept.astype(np.float64),
        }
        for i, b in enumerate(self.features.blocks):
            if b.idf is not None:
                arrays[f"idf_{i}"] = b.idf.astype(np.float32)
        _atomic_write(Path(npz_path), lambda f: np.savez_compressed(f, **arrays))
        data = json.dumps(cfg, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        _atomic_write(Path(json_path), lambda f: f.write(data))


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; package data must be readable by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
