"""Fixtures for the export tests: a tiny Llama with the real SmolLM2 tokenizer, and a tiny finished run.

The tiny model (hidden 64, 2 layers) keeps the tests fast on 2 cores; its tokenizer and chat template
are the default model's, so templating, GGUF tokenizer metadata and the Ollama template are real.
The run trains 2 steps on the packaged sample data; its recipe sets small parity settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# parity settings small enough for a tiny model on 2 cores
PARITY = ["export.golden_prompts=2", "export.agreement_tokens=8", "export.max_new_tokens=12",
          "export.loss_examples=3"]


def make_tiny_llama(out: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorakit.models import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base("default")[0])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def train_tiny_run(base: Path, output_dir: Path, name: str) -> Path:
    from qlorakit.config import load_recipe
    from qlorakit.train import train

    recipe = load_recipe(None, [f"model.base={base}", f"output_dir={output_dir}", f"name={name}",
                                "train.max_steps=2", "train.micro_batch_size=2", "train.lr=1e-2",
                                "train.progress=false", "train.checkpoint_every=0", "data.max_seq_len=128",
                                "model.compute_dtype=fp32", *PARITY])
    return train(recipe, finish=False)


@pytest.fixture(scope="session")
def export_tiny_base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("export-tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_run(export_tiny_base, tmp_path_factory) -> Path:
    """A finished tiny run (adapter written). Tests must not modify it; copy it first."""
    return train_tiny_run(export_tiny_base, tmp_path_factory.mktemp("export-runs"), "tiny-run")


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, for tests that write into the run folder (card, exports.json)."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="session")
def export_source(tiny_run):
    from qlorakit.export import open_source

    return open_source(tiny_run)
