"""A linear text classifier stored as plain files: a ``.json`` of settings and a ``.npz`` of arrays.

Each head scores the windows of a text (see :mod:`qlorakit.safety.windows`) and keeps the largest
margin. The margin of a window is a sum of two linear parts:

- sparse: TF-IDF word and character n-grams (:class:`~qlorakit.safety.features.TfidfBlock`),
  ``x @ coef[:, h]``, equal to scikit-learn's ``decision_function`` on the same features;
- dense (optional, per head): the window's sentence embedding (all-MiniLM-L6-v2, see
  :mod:`qlorakit.safety.embed`) followed by context features that compare the window with the
  rest of the text (:func:`context_features`), ``z @ dense_coef[:, h]``.

plus ``intercept[h]``. The score of a text is the logistic function of its largest window margin.

A dense head may have a lexical first stage (:class:`Gate`): a sparse-only head of the same model
scores every window, and only windows whose gate margin reaches ``min_margin`` (at most
``max_windows`` per text, the highest first) are embedded; every other window gets the constant
``fill`` in place of its dense part. Clean text, whose windows look nothing like an attack,
then costs no encoder call at all, and a long document costs at most ``max_windows`` embeddings.

File layout (``<name>.json`` next to ``<name>.npz``; neither needs pickle to read):

- json: ``format`` ("qlorakit.safety.linear"), ``version`` (2), ``guard``, ``heads`` (names),
  ``thresholds`` (head -> score threshold in (0, 1); optional extras named ``<head>@<use>``, such
  as ``prompt@document``, a head's threshold in another use), ``windows`` (head -> ``{"kind": "merged" |
  "pieces", "max_chars": int}``), ``blocks`` (one vectorizer config each), ``dense`` (null, or
  ``{"encoder", "dim", "context": [feature names], "heads": [heads that use it], "precision"}``),
  ``gates`` (optional; dense head -> ``{"head", "min_margin", "fill", "max_windows"}``),
  ``training`` (free metadata).
- npz: ``idf_<i>`` per block that uses idf, ``coef`` (n_sparse, n_heads), ``intercept``
  (n_heads,), ``dense_coef`` (dim + n_context, n_heads) when ``dense`` is set, and
  ``lora.<linear>.A`` / ``lora.<linear>.B`` when the dense heads' encoder carries a LoRA adapter
  (:mod:`qlorakit.safety.tune`; merged into the encoder's weights on first use).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .features import FeatureUnionSpec, TfidfBlock
from .windows import WINDOW_KINDS, spans_of

if TYPE_CHECKING:  # the encoder pulls in torch; only heads with dense features need it
    from .embed import SentenceEncoder

__all__ = [
    "FORMAT",
    "VERSION",
    "CONTEXT_FEATURES",
    "HeadWindows",
    "DenseSpec",
    "Gate",
    "LinearTextModel",
    "context_features",
    "sigmoid",
]

FORMAT = "qlorakit.safety.linear"
VERSION = 2


def sigmoid(margin: float) -> float:
    """Numerically safe logistic function."""
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    e = math.exp(margin)
    return e / (1.0 + e)


# --------------------------------------------------------------------------------------------
# context features: how a window relates to the rest of its text
# --------------------------------------------------------------------------------------------
def _cos_context(emb: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Cosine of each window with the length-weighted mean of the *other* windows (0 if none)."""
    n = len(emb)
    if n < 2:
        return np.zeros(n)
    weighted = emb * lens[:, None]
    total = weighted.sum(0)
    ctx = total[None, :] - weighted  # (n, d): sum over the other windows
    norms = np.linalg.norm(ctx, axis=1)
    return np.where(norms > 0, np.einsum("nd,nd->n", emb, ctx) / np.maximum(norms, 1e-12), 0.0)


def _max_cos_other(emb: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Largest cosine of each window with any other window (0 if none)."""
    n = len(emb)
    if n < 2:
        return np.zeros(n)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.max(1)


def _has_context(emb: np.ndarray, lens: np.ndarray) -> np.ndarray:
    return np.full(len(emb), 1.0 if len(emb) > 1 else 0.0)


def _log_windows(emb: np.ndarray, lens: np.ndarray) -> np.ndarray:
    return np.full(len(emb), math.log(len(emb)))


# name -> f(embeddings (n, d) unit rows, window lengths (n,)) -> (n,)
CONTEXT_FEATURES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cos_context": _cos_context,
    "max_cos_other": _max_cos_other,
    "has_context": _has_context,
    "log_windows": _log_windows,
}


def context_features(emb: np.ndarray, lens: Sequence[int] | np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Context features of the windows of one text: (n_windows, len(names)) float64.

    ``emb`` holds the windows' unit-length embeddings in text order, ``lens`` their lengths in
    characters. An unknown name raises ``ValueError``.
    """
    emb = np.asarray(emb, dtype=np.float64)
    lens_arr = np.asarray(lens, dtype=np.float64)
    if emb.ndim != 2 or len(emb) != len(lens_arr):
        raise ValueError(f"expected (n, d) embeddings and n lengths, got {emb.shape} and {lens_arr.shape}")
    cols = []
    for name in names:
        fn = CONTEXT_FEATURES.get(name)
        if fn is None:
            raise ValueError(f"unknown context feature {name!r}; known: {sorted(CONTEXT_FEATURES)}")
        cols.append(fn(emb, lens_arr))
    return np.stack(cols, axis=1) if cols else np.zeros((len(emb), 0))


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadWindows:
    """How a head cuts a text: "merged" lines and sentences up to ``max_chars``, or "pieces"."""

    kind: str = "merged"
    max_chars: int = 320

    def __post_init__(self) -> None:
        if self.kind not in WINDOW_KINDS:
            raise ValueError(f"window kind must be one of {WINDOW_KINDS}, got {self.kind!r}")
        if self.max_chars < 16:
            raise ValueError(f"window max_chars must be at least 16, got {self.max_chars}")


@dataclass(frozen=True)
class DenseSpec:
    """Dense features: the encoder's embedding (``dim`` values) then the named context features;
    only ``heads`` use them (the other heads' columns of ``dense_coef`` are zero). ``precision``
    is the encoder precision the weights were trained with ("fp32" or "bf16", see
    :mod:`qlorakit.safety.embed`); inference uses the same."""

    encoder: str
    dim: int
    context: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    precision: str = "fp32"
    context_from: str = "encoder"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"dense precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.context_from not in ("encoder", "static"):
            raise ValueError(f"dense context_from must be 'encoder' or 'static', got {self.context_from!r}")
        unknown = [c for c in self.context if c not in CONTEXT_FEATURES]
        if unknown:
            raise ValueError(f"unknown context feature(s) {unknown}; known: {sorted(CONTEXT_FEATURES)}")
        if self.dim < 1:
            raise ValueError(f"dense dim must be positive, got {self.dim}")

    @property
    def n_features(self) -> int:
        return self.dim + len(self.context)


@dataclass(frozen=True)
class Gate:
    """Lexical first stage of a dense head (see the module docstring): the sparse-only ``head``
    of the same model decides which windows are embedded."""

    head: str
    min_margin: float
    fill: float
    max_windows: int = 8

    def __post_init__(self) -> None:
        if self.max_windows < 1:
            raise ValueError(f"gate max_windows must be at least 1, got {self.max_windows}")
        if not (math.isfinite(self.min_margin) and math.isfinite(self.fill)):
            raise ValueError(f"gate min_margin and fill must be finite, got {self.min_margin}, {self.fill}")

    def config(self) -> dict[str, Any]:
        return {"head": self.head, "min_margin": self.min_margin, "fill": self.fill, "max_windows": self.max_windows}


@dataclass(frozen=True)
class LinearTextModel:
    """Feature blocks plus one weight column per head; see the module docstring for the files."""

    guard: str
    features: FeatureUnionSpec
    heads: tuple[str, ...]
    coef: np.ndarray  # (n_sparse, n_heads) float64
    intercept: np.ndarray  # (n_heads,) float64
    thresholds: Mapping[str, float]
    windows: Mapping[str, HeadWindows]
    dense: DenseSpec | None = None
    dense_coef: np.ndarray | None = None  # (dim + n_context, n_heads) float64
    training: Mapping[str, Any] = field(default_factory=dict)
    encoder: "SentenceEncoder | None" = field(default=None, compare=False, repr=False)
    gates: Mapping[str, Gate] = field(default_factory=dict)
    # LoRA adapter of the encoder for the dense heads ("<linear>.A" / "<linear>.B" arrays, see
    # qlorakit.safety.tune); empty: the encoder as it ships
    adapter: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n, k = self.features.n_features, len(self.heads)
        if self.coef.shape != (n, k):
            raise ValueError(f"coef has shape {self.coef.shape}, expected ({n}, {k})")
        if self.intercept.shape != (k,):
            raise ValueError(f"intercept has shape {self.intercept.shape}, expected ({k},)")
        missing = [h for h in self.heads if h not in self.thresholds]
        if missing:
            raise ValueError(f"no threshold for head(s) {missing}")
        for h, t in self.thresholds.items():
            if not 0.0 < float(t) < 1.0:
                raise ValueError(f"threshold of head {h!r} must lie in (0, 1), got {t}")
        missing = [h for h in self.heads if h not in self.windows]
        if missing:
            raise ValueError(f"no window settings for head(s) {missing}")
        if (self.dense is None) != (self.dense_coef is None):
            raise ValueError("dense settings and dense_coef must be given together")
        if self.dense is not None and self.dense_coef is not None:
            if self.dense_coef.shape != (self.dense.n_features, k):
                raise ValueError(
                    f"dense_coef has shape {self.dense_coef.shape}, expected ({self.dense.n_features}, {k})"
                )
            unknown = [h for h in self.dense.heads if h not in self.heads]
            if unknown:
                raise ValueError(f"dense heads {unknown} are not heads of this model {list(self.heads)}")
        if self.adapter and self.dense is None:
            raise ValueError("an encoder adapter needs dense features")
        for h, g in self.gates.items():
            if not self.uses_dense(h):
                raise ValueError(f"gate for head {h!r}, which has no dense features")
            if g.head not in self.heads or self.uses_dense(g.head):
                raise ValueError(f"gate of head {h!r} names {g.head!r}, which is not a sparse-only head of this model")
            if self.dense is not None and self.dense.context and self.dense.context_from != "static":
                raise ValueError(
                    f"gate of head {h!r}: context features must come from static embeddings "
                    "(context_from='static'), since a gated head embeds only some windows"
                )

    def head_index(self, head: str) -> int:
        try:
            return self.heads.index(head)
        except ValueError as e:
            raise ValueError(f"unknown head {head!r}; this model has {list(self.heads)}") from e

    def uses_dense(self, head: str) -> bool:
        """Whether ``head`` needs sentence embeddings."""
        return self.dense is not None and head in self.dense.heads

    def dense_encoder(self) -> "SentenceEncoder":
        """The encoder of the dense heads: ``encoder`` (default: the packaged one the dense spec names) with the
        model's adapter merged in, built once per base encoder."""
        if self.dense is None:
            raise ValueError(f"the {self.guard} model has no dense features")
        if self.encoder is None:
            from .embed import default_encoder
            from .llm_embed import llm_encoder, parse_llm_encoder_name

            layers = parse_llm_encoder_name(self.dense.encoder)
            # the encoder the dense weights were trained on: the packaged chat model's first
            # layers (qlorakit.safety.llm_embed) or the packaged sentence encoder
            object.__setattr__(self, "encoder", llm_encoder(layers) if layers else default_encoder())
        assert self.encoder is not None
        if int(self.encoder.dim) != self.dense.dim:
            raise ValueError(f"the {self.guard} model's dense heads were trained on {self.dense.encoder} "
                             f"({self.dense.dim} values), the encoder given gives {self.encoder.dim}")
        if not self.adapter:
            return self.encoder
        built = self.__dict__.get("_adapted")
        if built is None or built[0] is not self.encoder:
            built = (self.encoder, self.encoder.with_lora(self.adapter))
            object.__setattr__(self, "_adapted", built)
        return built[1]

    # -- inference ----------------------------------------------------------------------------
    def sparse_margins(self, texts: Sequence[str]) -> np.ndarray:
        """Sparse part plus intercept of each text taken as one window: (n_texts, n_heads).

        For a head without dense features this is its whole margin; it equals scikit-learn's
        ``decision_function`` on the n-gram features.
        """
        row, col, val = self.features.transform_batch(texts)
        contrib = val[:, None] * self.coef[col]  # (nnz, n_heads)
        out = np.empty((len(texts), len(self.heads)), dtype=np.float64)
        for j in range(len(self.heads)):
            out[:, j] = np.bincount(row, weights=contrib[:, j], minlength=len(texts))
        return out + self.intercept

    def spans(self, text: str, head: str) -> list[tuple[int, int]]:
        """The windows ``head`` scores in ``text``."""
        w = self.windows[head]
        return spans_of(text, w.kind, w.max_chars)

    def dense_features(
        self, windows: Sequence[str], emb: np.ndarray, context: np.ndarray | None = None
    ) -> np.ndarray:
        """Dense features of the windows of one text from their embeddings: (n, dim + n_context).
        ``context``: the context features of these windows when computed elsewhere (from static
        embeddings of all the text's windows); by default they come from ``emb``."""
        if self.dense is None:
            raise ValueError(f"the {self.guard} model has no dense features")
        ctx = context if context is not None else context_features(emb, [len(w) for w in windows], self.dense.context)
        return np.concatenate([np.asarray(emb, dtype=np.float64), ctx], axis=1)

    def static_context(self, windows: Sequence[str]) -> np.ndarray:
        """Context features of all windows of one text from their static embeddings: (n, n_context)."""
        if self.dense is None:
            raise ValueError(f"the {self.guard} model has no dense features")
        if not self.dense.context:
            return np.zeros((len(windows), 0))
        static = self.dense_encoder().encode_static(windows)
        return context_features(static, [len(w) for w in windows], self.dense.context)

    def batch_window_margins(self, texts: Sequence[str], head: str) -> list[np.ndarray]:
        """Margins of ``head`` per window, one array per text (windows of all texts are scored
        in one batch, embeddings included)."""
        j = self.head_index(head)
        spans = [self.spans(t, head) for t in texts]
        windows = [t[a:b] for t, sp in zip(texts, spans) for a, b in sp]
        sparse = self.sparse_margins(windows)
        margins = sparse[:, j].copy()
        if self.uses_dense(head):
            assert self.dense is not None and self.dense_coef is not None
            chosen = self.embedded_windows(spans, sparse, head)  # per text: window indices
            flat = [pos + k for pos, ks in chosen for k in ks]
            emb = (
                self.dense_encoder().encode([windows[i] for i in flat], precision=self.dense.precision)
                if flat
                else np.zeros((0, self.dense.dim), dtype=np.float32)
            )
            gate = self.gates.get(head)
            if gate is not None:
                margins += gate.fill  # replaced below for the embedded windows
            e = 0
            for (pos, ks), sp in zip(chosen, spans):
                if not ks:
                    continue
                idx = [pos + k for k in ks]
                ctx = None
                if self.dense.context_from == "static":  # context of each window among all of them
                    ctx = self.static_context(windows[pos : pos + len(sp)])[ks]
                z = self.dense_features([windows[i] for i in idx], emb[e : e + len(ks)], ctx)
                margins[idx] = sparse[idx, j] + z @ self.dense_coef[:, j]
                e += len(ks)
        out, pos = [], 0
        for sp in spans:
            out.append(margins[pos : pos + len(sp)])
            pos += len(sp)
        return out

    def embedded_windows(
        self, spans: Sequence[Sequence[tuple[int, int]]], sparse: np.ndarray, head: str
    ) -> list[tuple[int, list[int]]]:
        """Which windows of each text ``head`` embeds: ``(offset of the text's first window,
        window indices in text order)`` per text. All of them without a gate; with one, those
        whose gate margin (column of ``sparse``, the texts' windows in order) reaches
        ``min_margin``, at most ``max_windows``, the highest first."""
        gate = self.gates.get(head)
        out, pos = [], 0
        for sp in spans:
            n = len(sp)
            if gate is None:
                ks = list(range(n))
            else:
                g = sparse[pos : pos + n, self.head_index(gate.head)]
                ks = [k for k in np.argsort(-g, kind="stable")[: gate.max_windows] if g[k] >= gate.min_margin]
                ks = sorted(int(k) for k in ks)
            out.append((pos, ks))
            pos += n
        return out

    def window_margins(self, text: str, head: str) -> np.ndarray:
        """Margins of ``head`` per window of ``text``: shape (n_windows,)."""
        return self.batch_window_margins([text], head)[0]

    def max_margin(self, text: str, head: str) -> float:
        """Largest window margin of ``text`` for ``head``."""
        return float(self.window_margins(text, head).max())

    def batch_max_margins(self, texts: Sequence[str], head: str) -> np.ndarray:
        """Largest window margin of each text: shape (n_texts,)."""
        return np.array([float(m.max()) for m in self.batch_window_margins(texts, head)])

    def score(self, text: str, head: str) -> float:
        """Logistic of the largest window margin, in (0, 1)."""
        return sigmoid(self.max_margin(text, head))

    def replace(self, **changes: Any) -> "LinearTextModel":
        """``dataclasses.replace``, keeping the encoder with the adapter merged in (and the
        embeddings it has cached) unless the encoder or the adapter changes."""
        out = dataclasses.replace(self, **changes)
        built = self.__dict__.get("_adapted")
        if built is not None and "encoder" not in changes and "adapter" not in changes:
            object.__setattr__(out, "_adapted", built)
        return out

    def with_thresholds(self, thresholds: Mapping[str, float], training: Mapping[str, Any]) -> "LinearTextModel":
        """The same model with other thresholds and training metadata."""
        return self.replace(thresholds=dict(thresholds), training=dict(training))

    # -- files ----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        json_path: str | os.PathLike[str],
        npz_path: str | os.PathLike[str],
        *,
        encoder: "SentenceEncoder | None" = None,
    ) -> "LinearTextModel":
        """Read a model; errors name the file and the key that is wrong. ``encoder`` defaults to
        the packaged all-MiniLM-L6-v2, loaded on first use by a head with dense features."""
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
            windows = {
                str(h): HeadWindows(kind=str(w["kind"]), max_chars=int(w["max_chars"]))
                for h, w in cfg["windows"].items()
            }
            dense = dense_coef = None
            if cfg.get("dense") is not None:
                d = cfg["dense"]
                dense = DenseSpec(
                    encoder=str(d["encoder"]),
                    dim=int(d["dim"]),
                    context=tuple(str(c) for c in d["context"]),
                    heads=tuple(str(h) for h in d["heads"]),
                    precision=str(d.get("precision", "fp32")),
                    context_from=str(d.get("context_from", "encoder")),
                )
                dense_coef = np.asarray(arr["dense_coef"], dtype=np.float64)
            gates = {
                str(h): Gate(
                    head=str(g["head"]), min_margin=float(g["min_margin"]), fill=float(g["fill"]),
                    max_windows=int(g["max_windows"]),
                )
                for h, g in (cfg.get("gates") or {}).items()
            }
            return cls(
                guard=str(cfg["guard"]),
                features=FeatureUnionSpec(blocks),
                heads=heads,
                coef=np.asarray(arr["coef"], dtype=np.float64),
                intercept=np.asarray(arr["intercept"], dtype=np.float64).reshape(-1),
                thresholds={str(k): float(v) for k, v in cfg["thresholds"].items()},
                windows=windows,
                dense=dense,
                dense_coef=dense_coef,
                training=cfg.get("training", {}),
                encoder=encoder,
                gates=gates,
                adapter={k.removeprefix("lora."): np.asarray(v, dtype=np.float32) for k, v in arr.items() if k.startswith("lora.")},
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
            # one per head, plus any named extra (a head's threshold in another use, such as
            # "prompt@document" of the injection guard)
            "thresholds": {
                **{h: float(self.thresholds[h]) for h in self.heads},
                **{str(k): float(v) for k, v in self.thresholds.items() if k not in self.heads},
            },
            "windows": {h: {"kind": self.windows[h].kind, "max_chars": self.windows[h].max_chars} for h in self.heads},
            "dense": None
            if self.dense is None
            else {
                "encoder": self.dense.encoder,
                "dim": self.dense.dim,
                "context": list(self.dense.context),
                "heads": list(self.dense.heads),
                "precision": self.dense.precision,
                "context_from": self.dense.context_from,
            },
            "gates": {h: g.config() for h, g in self.gates.items()},
            "blocks": [b.config() for b in self.features.blocks],
            "training": dict(self.training),
        }
        arrays: dict[str, np.ndarray] = {
            "coef": self.coef.astype(np.float32),
            "intercept": self.intercept.astype(np.float64),
        }
        if self.dense_coef is not None:
            arrays["dense_coef"] = self.dense_coef.astype(np.float32)
        for k, v in self.adapter.items():
            arrays["lora." + k] = np.asarray(v, dtype=np.float32)
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
