"""The evaluation after training keeps within the memory training took: the fast path's buffers are
released first, and the generation's weight copy and the log-likelihood batches are sized to what
is left under the cap (the whole-process peaks are measured in bench/results/budget_finish.md)."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from transformers import LlamaConfig

from qlorakit.eval.loglikelihood import DEFAULT_BATCH_TOKENS
from qlorakit.train.memory import ModelShape
from qlorakit.train.report import (EVAL_LOGIT_BYTES, EVAL_MIN_BATCH_TOKENS, EVAL_RESERVE,
                                   EvalMemory, eval_memory)

MB = 2**20


class _Model:
    def __init__(self) -> None:
        self.config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                  num_key_value_heads=3, vocab_size=49152)


def test_eval_memory_fits_what_is_left_under_the_cap():
    model = _Model()
    copy = 2 * ModelShape.from_config(model.config).linear_params
    per_token = EVAL_LOGIT_BYTES * model.config.vocab_size
    # no cap: the weight copy (as roomy as generation allows) and the scorer's own batches
    assert eval_memory(model, None) == EvalMemory(float("inf"), DEFAULT_BATCH_TOKENS)
    # roomy: the copy, and full batches
    roomy = eval_memory(model, 8000 * MB, rss=1000 * MB)
    assert roomy.cache_bytes == copy and roomy.batch_tokens == DEFAULT_BATCH_TOKENS
    # the copy only where it takes at most half of what is left; the rest bounds the batches
    room = 1500 * MB
    mid = eval_memory(model, 1000 * MB + EVAL_RESERVE + room, rss=1000 * MB)
    assert mid.cache_bytes == copy and copy <= 0.5 * room
    assert mid.batch_tokens == min(DEFAULT_BATCH_TOKENS, int((room - copy) // per_token))
    tight = eval_memory(model, 1000 * MB + EVAL_RESERVE + 1.5 * copy, rss=1000 * MB)
    assert tight.cache_bytes == 0
    assert tight.batch_tokens == min(DEFAULT_BATCH_TOKENS, int(1.5 * copy // per_token))
    # nothing left: no copy, the smallest batches
    assert eval_memory(model, 900 * MB, rss=1000 * MB) == EvalMemory(0.0, EVAL_MIN_BATCH_TOKENS)


def test_released_fast_path_frees_its_copies_and_refuses_to_run():
    from tests.train.test_fast_path import _batch, _tiny

    from qlorakit.lora import lora_parameters
    from qlorakit.train.fast import FastModel, FastOptions

    model = _tiny()
    fm = FastModel(model, FastOptions(weights="cache", compile=False), pad_token_id=2)
    before = [p.detach().clone() for p in lora_parameters(model)]
    with torch.no_grad():
        loss, n = fm.loss(_batch())
    assert n > 0 and torch.isfinite(loss)
    assert fm.cached_weight_bytes() > 0
    fm.release()
    assert fm.cached_weight_bytes() == 0 and fm.layers == [] and fm._workspace is None
    with pytest.raises(RuntimeError, match="released"):
        fm.loss(_batch())
    assert all(torch.equal(a, p) for a, p in zip(before, lora_parameters(model)))  # the model is untouched


def test_the_run_hands_the_sizes_to_generation_and_the_gate(tmp_path, tiny_model_dir, monkeypatch):
    """`train` passes a cap (its budget, or its training peak when lower) to the evaluation, which
    hands the sizes it chose to the weight copy and to the gate's log-likelihood scorer, and runs the
    held-out loss on the training's own fast path, released afterwards."""
    from qlorakit.config import load_recipe
    from qlorakit.eval import loglikelihood
    from qlorakit.models import generation
    from qlorakit.train import report
    from qlorakit.train.fast import FastModel
    from qlorakit.train.loop import train

    seen: dict[str, list] = {"cap": [], "copy": [], "batch_tokens": [], "released": []}
    real_eval_memory, real_prepare = report.eval_memory, generation.prepare_inference
    real_init, real_release = loglikelihood.LoglikelihoodScorer.__init__, FastModel.release

    def spy_eval_memory(model, cap, rss=None):
        seen["cap"].append(cap)
        return EvalMemory(cache_bytes=0.0, batch_tokens=300)

    def spy_prepare(model, max_bytes=None):
        seen["copy"].append(max_bytes)
        return real_prepare(model, max_bytes)

    def spy_init(self, *a, **kw):
        seen["batch_tokens"].append(kw.get("batch_tokens"))
        real_init(self, *a, **kw)

    def spy_release(self):
        seen["released"].append(True)
        real_release(self)

    monkeypatch.setattr(report, "eval_memory", spy_eval_memory)
    monkeypatch.setattr(generation, "prepare_inference", spy_prepare)
    monkeypatch.setattr(loglikelihood.LoglikelihoodScorer, "__init__", spy_init)
    monkeypatch.setattr(FastModel, "release", spy_release)
    rows = [{"instruction": f"How do I reset my password, case {i}?", "input": "", "output": "Click the reset link."}
            for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl.licence").write_text("Apache-2.0\n")
    recipe = load_recipe(None, [f"model.base={tiny_model_dir}", f"output_dir={tmp_path / 'runs'}", f"data.train={data}",
                                "data.max_seq_len=64", "train.max_steps=2", "train.micro_batch_size=2",
                                "train.progress=false", "train.memory_budget_gb=64", "eval.samples=1",
                                "eval.max_new_tokens=2"])
    run = train(recipe)
    assert (run / "eval" / "results.json").is_file()
    (cap,) = seen["cap"]
    # not the 64 GB budget: what training took (its predicted peak, or the measured one when higher)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 * 0.5 < cap < 8 * 2**30
    assert seen["copy"] and seen["copy"][0] == 0.0
    assert seen["batch_tokens"] and set(seen["batch_tokens"]) == {300}
    assert seen["released"] == [True]
