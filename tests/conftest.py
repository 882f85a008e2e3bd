"""Shared fixtures: a tiny Llama model with the real SmolLM2 tokenizer, saved as a local HF folder.

The tiny model keeps tests fast on 2 cores; the tokenizer and chat template are the default
model's, so templating and generation behave as in real runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

try:  # loading bars of every test model would bury the test output
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:
    pass


def arch_model(arch: str, **common):
    """A random, unsaved decoder of ``arch`` from the config fields ``common``; the seed is the caller's.

    ``arch``: ``llama`` (tied head); ``qwen2`` (q/k/v biases, made non-zero, untied head);
    ``mistral`` (no sliding window, untied head); ``llama3-rope`` (Llama 3's scaled rotary
    embedding, heads of 32 wide, not hidden / heads).
    """
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        for layer in model.model.layers:  # biases start at zero: give them an effect
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.2)
        return model
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    if arch == "llama3-rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
        return LlamaForCausalLM(LlamaConfig(**common, head_dim=32, rope_scaling=rope, tie_word_embeddings=True))
    raise ValueError(f"unknown arch {arch!r}")


def make_tiny_model(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, arch: str = "llama") -> Path:
    """A random decoder of ``arch`` (see :func:`arch_model`; vocab of SmolLM2) plus the SmolLM2
    tokenizer, in ``out``."""
    import torch

    from qlorakit.models import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base("default")[0])
    torch.manual_seed(seed)
    model = arch_model(arch, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def arch_model_factory():
    """:func:`arch_model` itself (test modules cannot import it: ``conftest`` names several
    modules in one run)."""
    return arch_model


@pytest.fixture(scope="session")
def tiny_model_factory():
    """:func:`make_tiny_model` itself, for tests that build other sizes or architectures (test
    modules cannot import it: ``conftest`` names several modules in one run)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    env = os.environ.get("QLORAKIT_SHARED_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    if not p.is_dir():
        pytest.skip("the shared data folder (../shared/data or $QLORAKIT_SHARED_DATA) is absent")
    return p
