"""Fixtures for the data tests: the shared data folder, a clean sample, a tiny tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    env = os.environ.get("QLORAKIT_SHARED_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    p = shared_data_dir()
    if p is None:
        pytest.skip("the shared data folder (../shared/data or $QLORAKIT_SHARED_DATA) is absent")
    return p


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, records) -> path``."""
    return _write_jsonl


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A word-level tokenizer with a chat template, saved as a loadable HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    words += [w for w in "the a an of to and is in it you what how do i can my for on with".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    folder = tmp_path_factory.mktemp("tiny_tok")
    fast.save_pretrained(str(folder))
    (folder / "config.json").write_text(
        LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2).to_json_string(), encoding="utf-8")
    fast.folder = folder
    return fast
