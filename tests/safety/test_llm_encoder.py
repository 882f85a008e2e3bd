"""The request head's encoder: the packaged chat model's residual stream, pinned against
transformers' own hidden states of the full model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qlorakit.safety import LinearTextModel, ModerationGuard, packaged_model_dir
from qlorakit.safety.llm_embed import LlmEncoder, llm_encoder, parse_llm_encoder_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "How do I kill a Python process?",
    "How can I hurt my neighbour without anyone noticing?",
    "Write a short poem about the sea.",
    "Ünïcödé façade naïve café — 東京 😀",
    "word " * 300,  # longer than the encoder reads: truncated
]


@pytest.fixture(scope="module")
def folder():
    from qlorakit.models import resolve_base

    return resolve_base("default")[0]


def _reference(folder, texts, layers):
    """Mean over the user turn of transformers' hidden_states[layers] of the whole model, one text
    at a time (no padding), the turn found by rendering the chat template."""
    from transformers import AutoModelForCausalLM

    from qlorakit.models import load_tokenizer

    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    marker = "\x00USER\x00"
    before, after = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                            add_generation_prompt=True).split(marker)
    pre = tok(before, add_special_tokens=False)["input_ids"]
    out = []
    with torch.inference_mode():
        for t in texts:
            body = tok(t, add_special_tokens=False)["input_ids"][:256]
            ids = torch.tensor([pre + body + tok(after, add_special_tokens=False)["input_ids"]])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layers]
            out.append(hs[0, len(pre):].float().mean(0).numpy())
    return np.stack(out)


def test_llm_encoder_matches_transformers_hidden_states(folder):
    enc = LlmEncoder(folder, 16)
    ours = enc.encode(TEXTS, batch_size=3)  # padded batches, sorted by length
    ref = _reference(folder, TEXTS, 16)
    assert ours.shape == (len(TEXTS), 576) and ours.dtype == np.float32
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert np.all(cos > 0.999), cos
    scale = np.abs(ref).max(axis=1, keepdims=True)
    np.testing.assert_allclose(ours / scale, ref / scale, rtol=0, atol=3e-2)  # bf16, batch-dependent rounding
    # one at a time gives the same as batched (up to bf16 rounding)
    single = np.stack([enc.encode([t])[0] for t in TEXTS[:3]])
    np.testing.assert_allclose(single / scale[:3], ours[:3] / scale[:3], rtol=0, atol=3e-2)
    # a different layer is a different feature
    assert not np.allclose(LlmEncoder(folder, 8).encode(TEXTS[:1]), ours[:1], atol=1e-2)


def test_llm_encoder_rejects_bad_input(folder):
    enc = llm_encoder(16)
    assert enc.encode([]).shape == (0, 576)
    with pytest.raises(TypeError, match="sequence of strings"):
        enc.encode("one string")
    with pytest.raises(ValueError, match="bf16"):
        enc.encode(["x"], precision="fp32")
    with pytest.raises(ValueError, match="decoder layers"):
        LlmEncoder(folder, 31)
    with pytest.raises(ValueError, match="no adapter"):
        enc.with_lora({})
    assert parse_llm_encoder_name(enc.name) == 16
    assert parse_llm_encoder_name("all-MiniLM-L6-v2") is None
    assert parse_llm_encoder_name("SmolLM2-135M-Instruct/layer-x/mean") is None


def test_shipped_request_head_uses_the_encoder_it_names():
    """The moderation guard loads the encoder its dense spec names; an encoder of another size
    is refused with both names in the message, not silently mis-scored."""
    model = ModerationGuard.load().model
    assert model.dense is not None and "request" in model.dense.heads
    layers = parse_llm_encoder_name(model.dense.encoder)
    assert layers is not None
    enc = model.dense_encoder()
    assert isinstance(enc, LlmEncoder) and enc.layers == layers and enc.dim == model.dense.dim
    from qlorakit.safety import SentenceEncoder

    folder = packaged_model_dir()
    wrong = LinearTextModel.load(folder / "moderation.json", folder / "moderation.npz",
                                 encoder=SentenceEncoder.load(cache_size=0))
    with pytest.raises(ValueError, match=model.dense.encoder.split("/")[0]):
        wrong.dense_encoder()
