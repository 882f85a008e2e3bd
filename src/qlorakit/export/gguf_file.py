"""GGUF files for llama.cpp: the whole model, and a LoRA adapter alone, written with the ``gguf`` package.

Llama-architecture models only (SmolLM2 is one). What llama.cpp expects, as its own
``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py`` write it:

- hyperparameters under ``llama.*``; the tokenizer as a GPT-2 style byte-level BPE (tokens, token
  types, merges, special token ids) with the chat template in ``tokenizer.chat_template``;
- tensors renamed (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``) and the
  rows of the Q and K projections permuted: Hugging Face pairs rotary dimensions (i, i + d/2) within a
  head, llama.cpp pairs (2i, 2i + 1);
- 1-D tensors (norms) in F32; with a 4- or 5-bit type, the token embedding (which is also the output
  head when the two are tied) in Q8_0, as llama.cpp's own quantizer keeps the head at higher precision;
- a LoRA adapter as ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha`` and the
  tensors ``<name>.lora_a`` (r, in) and ``<name>.lora_b`` (out, r), with Q/K rows of ``lora_b`` permuted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._gguf import shared_gguf_readers
from .common import GGUF_QUANTS, LOSSY_GGUF_QUANTS, ExportError, fsync_file

__all__ = [
    "llama_tensor_name",
    "permute_qk",
    "unpermute_qk",
    "check_llama_config",
    "tokenizer_fields",
    "write_model_gguf",
    "write_lora_gguf",
    "read_gguf",
    "gguf_tensors_finite",
]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def llama_tensor_name(hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face Llama parameter (None if it has none)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"blk.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.weight"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection (or of a LoRA B for one) from HF's rotary layout to llama.cpp's."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def check_llama_config(config: Any) -> None:
    """Refuse what the writer does not handle, naming it."""
    problems = []
    if _cfg(config, "model_type") != "llama":
        problems.append(f"model_type is {_cfg(config, 'model_type')!r}, the GGUF writer handles 'llama' "
                        "(export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py)")
    if _cfg(config, "attention_bias") or _cfg(config, "mlp_bias"):
        problems.append("the model has bias terms in its linear layers")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type')!r} is not handled")
    if problems:
        raise ExportError("GGUF export: " + "; ".join(problems))


def _rope(config: Any) -> dict[str, Any]:
    rope = _cfg(config, "rope_parameters") or _cfg(config, "rope_scaling") or {}
    return dict(rope) if isinstance(rope, dict) else {}


def _rope_theta(config: Any) -> float:
    rope = _rope(config)
    return float(rope.get("rope_theta", _cfg(config, "rope_theta", 10000.0)))


def _head_dim(config: Any) -> int:
    return int(_cfg(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# ----------------------------------------------------------------------------------------- tokenizer


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer; this one is "
                          f"{type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json (the regex that splits words)."""
    def bytelevel(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre and bytelevel(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and bytelevel(parts[1])):
            return "smollm"  # digits one by one, then the GPT-2 regex (also starcoder's)
    raise ExportError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one this "
                      "writer maps to llama.cpp (GPT-2 byte-level, or digits + GPT-2 byte-level)")


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges, pre-tokenizer and special ids of a byte-level BPE tokenizer."""
    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"GGUF export handles GPT-2 style byte-level BPE tokenizers; this one is "
                          f"{model.get('type')} (byte_fallback={model.get('byte_fallback')})")
    pre = _pre_name(tj.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until filled
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = 3 if added[i].get("special") else 4  # CONTROL or USER_DEFINED
        else:
            types[i] = 1  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = len(plain) > len(bare) and plain[0] == tokenizer.bos_token_id
    add_eos = len(plain) > len(bare) and plain[-1] == tokenizer.eos_token_id
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "add_bos": add_bos,
            "add_eos": add_eos}


# ------------------------------------------------------------------------------------------- writing


def _quant_type(name: str) -> Any:
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q5_1": gguf.GGMLQuantizationType.Q5_1, "q5_0": gguf.GGMLQuantizationType.Q5_0,
            "q4_1": gguf.GGMLQuantizationType.Q4_1, "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def _file_type(name: str) -> int:
    import gguf

    t = gguf.LlamaFileType
    return int({"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0,
                "q5_1": t.MOSTLY_Q5_1, "q5_0": t.MOSTLY_Q5_0, "q4_1": t.MOSTLY_Q4_1, "q4_0": t.MOSTLY_Q4_0}[name])


def _encode(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """The bytes of one tensor in ``qtype`` (falls back to F16 when rows do not fill whole blocks)."""
    import gguf

    if qtype == "f32":
        return arr.astype(np.float32), None
    if qtype == "f16":
        return arr.astype(np.float16), None
    t = _quant_type(qtype)
    block = gguf.GGML_QUANT_SIZES[t][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr.astype(np.float32), t), t


def _tensor_type(gname: str, ndim: int, qtype: str) -> str:
    if ndim == 1:
        return "f32"
    if qtype in LOSSY_GGUF_QUANTS and gname in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return qtype


def _finish(writer: Any, tmp: Path, path: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    fsync_file(tmp)
    os.replace(tmp, path)


def _add_terms(w: Any, terms: dict[str, str] | None) -> None:
    """The data terms the model carries: its licence as GGUF's ``general.license``, and the rest."""
    if not terms:
        return
    import gguf

    if terms.get("adapter_licence"):
        w.add_string(gguf.Keys.General.LICENSE, str(terms["adapter_licence"]))
    for k, v in sorted(terms.items()):
        w.add_string(f"qlorakit.{k}", str(v))


def write_model_gguf(path: str | Path, state: dict[str, torch.Tensor], config: Any, tokenizer: Any,
                     qtype: str, *, name: str, chat_template: str | None = None,
                     eot_id: int | None = None, terms: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a whole Llama model (weights in fp32 under HF names) as GGUF; return what was written.

    ``terms`` (the run's data terms, :func:`qlorakit.data.ledger.adapter_metadata`) go into the
    metadata: ``general.license`` and one ``qlorakit.<key>`` string per term."""
    import gguf

    if qtype not in GGUF_QUANTS:
        raise ExportError(f"--quant {qtype!r}: expected one of {', '.join(GGUF_QUANTS)}")
    check_llama_config(config)
    path = Path(path)
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    tied = bool(_cfg(config, "tie_word_embeddings", False))
    tok = tokenizer_fields(tokenizer, int(config.vocab_size))

    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    _add_terms(w, terms)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(len(tok["tokens"]))
    w.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // n_head:
        w.add_key_length(_head_dim(config))
        w.add_value_length(_head_dim(config))
    w.add_file_type(_file_type(qtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id), ("eot", eot_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)

    written: dict[str, str] = {}
    for hf_name in sorted(state, key=_order):
        gname = llama_tensor_name(hf_name)
        if gname is None:
            raise ExportError(f"GGUF export: no llama.cpp name for parameter {hf_name!r}")
        if gname == "output.weight" and tied:
            continue  # llama.cpp uses token_embd as the output head when there is no output tensor
        arr = state[hf_name].detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            arr = permute_qk(arr, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            arr = permute_qk(arr, n_kv)
        ttype = _tensor_type(gname, arr.ndim, qtype)
        data, raw = _encode(np.ascontiguousarray(arr), ttype)
        w.add_tensor(gname, data, raw_dtype=raw)
        written[gname] = (raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32"))
    try:
        _finish(w, tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file": path.name, "quant": qtype, "tensors": len(written), "tokenizer_pre": tok["pre"],
            "tensor_types": sorted(set(written.values()))}


def _order(hf_name: str) -> tuple[int, int, str]:
    m = _LAYER.match(hf_name)
    if m:
        return (1, int(m.group(1)), hf_name)
    return (0 if "embed" in hf_name else 2, 0, hf_name)


def write_lora_gguf(path: str | Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], config: Any,
                    alpha: float, *, name: str, terms: dict[str, str] | None = None) -> dict[str, Any]:
    """Write LoRA pairs ``{hf_module_name: (A (r, in), B (out, r))}`` as a llama.cpp GGUF adapter (F32)."""
    import gguf

    check_llama_config(config)
    path = Path(path)
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name)
    _add_terms(w, terms)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    ranks = set()
    for module in sorted(lora, key=lambda m: _order(m + ".weight")):
        a_t, b_t = lora[module]
        gname = llama_tensor_name(module + ".weight")
        if gname is None or gname in ("token_embd.weight", "output.weight"):
            raise ExportError(f"GGUF LoRA export: llama.cpp cannot apply a LoRA to {module!r}")
        a = a_t.detach().to("cpu", torch.float32).numpy()
        b = b_t.detach().to("cpu", torch.float32).numpy()
        if module.endswith("self_attn.q_proj"):
            b = permute_qk(b, n_head)
        elif module.endswith("self_attn.k_proj"):
            b = permute_qk(b, n_kv)
        ranks.add(a.shape[0])
        w.add_tensor(gname + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(gname + ".lora_b", np.ascontiguousarray(b))
    try:
        _finish(w, tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file": path.name, "pairs": len(lora), "alpha": float(alpha), "ranks": sorted(ranks)}


# ------------------------------------------------------------------------------------------- reading


def read_gguf(path: str | Path) -> dict[str, Any]:
    """Metadata and tensor list of a GGUF file (names, shapes in numpy order, types)."""
    import gguf

    try:
        with shared_gguf_readers():
            r = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ExportError(f"{path}: not a readable GGUF file ({e})") from e
    meta: dict[str, Any] = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            meta[k] = f.contents()
        except Exception as e:  # a field type gguf cannot decode: keep its name, say why
            meta[k] = f"<unreadable: {type(e).__name__}>"
    tensors = {t.name: {"shape": tuple(int(x) for x in reversed(t.shape.tolist())), "type": t.tensor_type.name}
               for t in r.tensors}
    return {"meta": meta, "tensors": tensors}


def gguf_tensors_finite(path: str | Path) -> list[str]:
    """Names of tensors in a GGUF file that hold NaN or infinite values (dequantized)."""
    import gguf

    with shared_gguf_readers():
        r = gguf.GGUFReader(str(path))
    bad = []
    for t in r.tensors:
        vals = gguf.quants.dequantize(t.data, t.tensor_type)
        if not np.isfinite(vals).all():
            bad.append(t.name)
    return bad
