"""GGUF writing: names, shapes, types and metadata read back with gguf.GGUFReader; the Q/K permutation
pinned against transformers' GGUF reader; the LoRA adapter file as llama.cpp's converter writes it."""

from __future__ import annotations

import numpy as np
import pytest

from qlorakit._gguf import shared_gguf_readers
from qlorakit.export import read_gguf
from qlorakit.export.artifacts import _lora_pairs, write_gguf
from qlorakit.export.gguf_file import permute_qk, unpermute_qk
from qlorakit.export.source import full_precision_state

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    for n_head, n_kv, rows in ((4, 4, 64), (4, 2, 32), (9, 3, 192)):
        w = rng.standard_normal((rows, 24)).astype(np.float32)
        p = permute_qk(w, n_kv)
        back = LlamaTensorProcessor()._reverse_permute_weights(p, n_head, n_kv)
        np.testing.assert_array_equal(back, w)
        np.testing.assert_array_equal(unpermute_qk(p, n_kv), w)
        assert not np.array_equal(p, w)


@pytest.fixture(scope="module")
def gguf_files(export_source, tmp_path_factory):
    out = {}
    for q in ("f16", "q8_0", "q4_1"):
        d = tmp_path_factory.mktemp(f"gguf-{q}")
        out[q] = (d, write_gguf(export_source, d, q))
    return out


def _expected_names(n_layers):
    names = {"token_embd.weight", "output_norm.weight"}
    for i in range(n_layers):
        names |= {f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"}
        names |= {f"blk.{i}.{t}.weight" for t in LINEARS}
    return names


@pytest.mark.parametrize("quant,linear_type", [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_1", "Q4_1")])
def test_model_gguf_tensors_and_metadata(gguf_files, export_source, quant, linear_type):
    folder, info = gguf_files[quant]
    cfg = export_source.loaded.model.config
    tok = export_source.loaded.tokenizer
    r = read_gguf(folder / info["files"]["model"])
    t, m = r["tensors"], r["meta"]
    assert set(t) == _expected_names(cfg.num_hidden_layers)  # tied embeddings: no output.weight
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert t["token_embd.weight"]["shape"] == (cfg.vocab_size, h)
    assert t["blk.0.attn_q.weight"]["shape"] == (h, h)
    assert t["blk.1.attn_k.weight"]["shape"] == (kv, h)
    assert t["blk.0.ffn_down.weight"]["shape"] == (h, cfg.intermediate_size)
    assert t["blk.0.attn_norm.weight"]["type"] == "F32"
    assert t["blk.0.ffn_up.weight"]["type"] == linear_type
    # 4-bit: the embedding, which is also the output head, stays at 8 bits
    assert t["token_embd.weight"]["type"] == ("Q8_0" if quant == "q4_1" else linear_type)
    assert m["general.architecture"] == "llama" and m["general.type"] == "model"
    assert m["llama.block_count"] == cfg.num_hidden_layers
    assert m["llama.attention.head_count"] == cfg.num_attention_heads
    assert m["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert m["llama.rope.dimension_count"] == h // cfg.num_attention_heads
    assert m["llama.context_length"] == cfg.max_position_embeddings
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    assert len(m["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert m["tokenizer.ggml.tokens"][2] == "<|im_end|>" and m["tokenizer.ggml.token_type"][2] == 3
    assert m["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert not m["tokenizer.ggml.add_bos_token"]
    assert m["tokenizer.chat_template"] == tok.chat_template
    assert len(m["tokenizer.ggml.merges"]) > 40000
    # the data terms travel with the model: its licence, commercial use, the sources' credit
    terms = export_source.adapter_config["qlorakit"]
    assert m["general.license"] == terms["adapter_licence"]
    assert m["qlorakit.data_commercial_use"] == terms["data_commercial_use"]
    assert m["qlorakit.data_terms"] == terms["data_terms"]
    lora = read_gguf(folder / info["files"]["adapter"])["meta"]
    assert lora["general.license"] == terms["adapter_licence"]


def test_model_gguf_weights_round_trip(gguf_files, export_source):
    """Dequantized GGUF weights (Q/K permuted back) are the merged weights, within the type's precision."""
    import gguf

    merged = full_precision_state(export_source.loaded.model, merge=True)
    cfg = export_source.loaded.model.config
    for quant, tol in (("f16", 1e-3), ("q8_0", 1e-2)):
        folder, info = gguf_files[quant]
        with shared_gguf_readers():  # the faster parse (its own test compares it with gguf's)
            reader = gguf.GGUFReader(str(folder / info["files"]["model"]))
        tensors = {t.name: t for t in reader.tensors}
        for gname, hf, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight",
                                  cfg.num_attention_heads),
                                 ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight",
                                  cfg.num_key_value_heads),
                                 ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", None)):
            t = tensors[gname]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(merged[hf].shape)
            if heads:
                w = unpermute_qk(w, heads)
            want = merged[hf].numpy()
            err = np.abs(w - want).max() / np.abs(want).max()
            assert err < tol, (quant, gname, err)


def test_lora_gguf_matches_the_peft_adapter(gguf_files, export_source):
    import gguf

    folder, info = gguf_files["f16"]
    path = folder / info["files"]["adapter"]
    r = read_gguf(path)
    m = r["meta"]
    assert m["general.type"] == "adapter" and m["adapter.type"] == "lora"
    conf = export_source.adapter_config
    assert m["adapter.lora.alpha"] == pytest.approx(float(conf["lora_alpha"]))
    cfg = export_source.loaded.model.config
    names = {f"blk.{i}.{t}.weight.lora_{ab}" for i in range(cfg.num_hidden_layers) for t in LINEARS for ab in "ab"}
    assert set(r["tensors"]) == names
    pairs = _lora_pairs(export_source)
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for module, gname, heads in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", cfg.num_attention_heads),
                                 ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", cfg.num_key_value_heads),
                                 ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", None)):
        a, b = pairs[module]
        ga = np.asarray(reader[gname + ".lora_a"].data).reshape(a.shape)
        gb = np.asarray(reader[gname + ".lora_b"].data).reshape(b.shape)
        np.testing.assert_array_equal(ga, a.numpy())
        np.testing.assert_array_equal(unpermute_qk(gb, heads) if heads else gb, b.numpy())
        assert r["tensors"][gname + ".lora_a"]["shape"] == tuple(a.shape)  # (r, in) as llama.cpp expects


def test_unsupported_architecture_is_refused(export_source, tmp_path):
    import copy

    from qlorakit.export import ExportError, write_model_gguf

    cfg = copy.deepcopy(export_source.loaded.model.config)
    cfg.model_type = "qwen2"
    with pytest.raises(ExportError, match="model_type is 'qwen2'"):
        write_model_gguf(tmp_path / "x.gguf", {}, cfg, export_source.loaded.tokenizer, "f16", name="x")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_export_read_back_passes_parity(run_copy, tmp_path):
    """End to end without llama.cpp: the GGUF files read back by transformers (tokenizer and chat template
    from the file) answer the golden prompts as the tuned model does."""
    from qlorakit.export import export_run

    res = export_run(run_copy, "gguf", tmp_path / "out", quant="f16", runtime="transformers", measure=False)
    assert res.passed, res.reasons
    assert [r.artifact for r in res.reports] == ["GGUF f16 (merged)", "GGUF f16 base + GGUF LoRA adapter"]
    for r in res.reports:
        assert r.template_ok and r.tokenizer_ok
        assert r.token_agreement >= 0.95
        assert abs(r.loss_increase) < 1e-2
    assert any("read back by transformers" in n for n in res.notes)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model-f16.gguf", "base-f16.gguf", "adapter-lora.gguf"}
