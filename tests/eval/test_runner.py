"""End to end on a tiny Llama: tasks, base-vs-tuned pairing, run_eval and the report."""

import contextlib
import json

import numpy as np
import pytest
import torch

from qlorakit.eval import run_eval
from qlorakit.eval.runner import EvalOptions, run_task
from qlorakit.eval.suites.quality import heldout_generation_task, heldout_loss_task, record_to_chat
from qlorakit.eval.tasks import LoadContext, MCItem, TaskSpec, mean_metric

HELDOUT = [
    {"instruction": "What is the capital of France?", "output": "Paris is the capital."},
    {"messages": [{"role": "user", "content": "Say sorry."}, {"role": "assistant", "content": "I'm sorry."}]},
    {"prompt": "Add two numbers in Python.", "response": "def add(a, b):\n    return a + b"},
]


@contextlib.contextmanager
def scaled_head(model, factor):
    """A stand-in for disabling adapters: temporarily scale the output head."""
    w = model.lm_head.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_record_formats_and_errors():
    assert record_to_chat(HELDOUT[0], 0) == ([{"role": "user", "content": "What is the capital of France?"}], "Paris is the capital.")
    assert record_to_chat(HELDOUT[1], 1)[1] == "I'm sorry."
    with pytest.raises(ValueError, match="held-out record 4: expected 'messages'"):
        record_to_chat({"text": "x"}, 4)


def test_heldout_loss_counts_answer_tokens_only(tiny_llama, tiny_tokenizer):
    task = heldout_loss_task()
    items = task.loader(LoadContext(None, HELDOUT))
    run = run_task(task, tiny_llama, tiny_tokenizer, items, EvalOptions(precision="fp32"))
    # answer tokens of item 0: the answer and <|im_end|>, not the prompt
    answer_ids = tiny_tokenizer.encode("Paris is the capital.<|im_end|>", add_special_tokens=False)
    assert run.columns["tokens"][0] == len(answer_ids)
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tiny_tokenizer.encode(prompt, add_special_tokens=False) + answer_ids])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].float(), -1)
    n_prompt = ids.shape[1] - len(answer_ids)
    nll = -sum(float(lp[n_prompt - 1 + k, t]) for k, t in enumerate(answer_ids))
    assert run.columns["nll"][0] == pytest.approx(nll, abs=1e-3)


def test_same_items_for_base_and_tuned_and_report(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):

    toy = TaskSpec(
        name="toy_mc",
        kind="multiple_choice",
        loader=lambda ctx: [MCItem(f"t{i}", "The quick brown", (" fox", "dog jumps", " lazy dog."), i % 3) for i in range(6)],
        process=lambda item, out: {"acc": float(int(np.argmax(out.logprobs)) == item.gold)},
        metrics=(mean_metric("acc"),),
    )
    from qlorakit.eval import suites

    monkeypatch.setitem(suites.SUITES, "toy", lambda: [toy])
    monkeypatch.setitem(suites.SUITES, "quality", lambda: [heldout_loss_task(), heldout_generation_task(max_new_tokens=4)])
    metrics_jsonl = tmp_path / "metrics.jsonl"
    metrics_jsonl.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 / (s + 1)}) for s in range(10)) + "\n")
    res = run_eval(tiny_llama, tiny_tokenizer, suites=["quality", "toy"], heldout_records=HELDOUT,
                   base_context=lambda: scaled_head(tiny_llama, 0.5), limits={"toy": 5}, out_dir=tmp_path / "eval",
                   thresholds=[{"metric": "quality/heldout_loss/loss", "rule": "max_value", "value": 100.0}],
                   loss_curve=metrics_jsonl, precision="fp32", n_resamples=50)
    loss = res["suites"]["quality"]["heldout_loss"]["metrics"]["loss"]
    assert res["suites"]["toy"]["toy_mc"]["n_items"] == 5
    assert loss["base"] != loss["tuned"]  # the base context really changed the model
    assert loss["delta"] == pytest.approx(loss["tuned"] - loss["base"])
    assert loss["ci_low"] <= loss["delta"] <= loss["ci_high"]
    assert res["gate"]["passed"] is True
    gen = res["suites"]["quality"]["heldout_generation"]
    assert set(gen["metrics"]) == {"rouge_l", "f1", "exact_match"}
    assert len(gen["samples"]) == 3 and "base" in gen["samples"][0]
    out = tmp_path / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert saved["suites"]["quality"]["heldout_loss"]["metrics"]["loss"]["tuned"] == pytest.approx(loss["tuned"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # loss curve + two suites
    assert "Gate: PASSED" in (out / "report.md").read_text()
    # the model is restored after the base pass
    res2 = run_eval(tiny_llama, tiny_tokenizer, suites=["toy"], limits={"toy": 5}, precision="fp32", n_resamples=20)
    assert res2["suites"]["toy"]["toy_mc"]["metrics"]["acc"]["tuned"] == res["suites"]["toy"]["toy_mc"]["metrics"]["acc"]["tuned"]


def test_unknown_suite_and_limit_keys_are_rejected(tiny_llama, tiny_tokenizer):
    with pytest.raises(KeyError, match="did you mean 'retention'"):
        run_eval(tiny_llama, tiny_tokenizer, suites=["retension"])
    with pytest.raises(KeyError, match="unknown limit key"):
        run_eval(tiny_llama, tiny_tokenizer, suites=["retention"], limits={"hellaswagg": 3})


def test_an_evaluation_keeps_what_training_wrote_into_results_json(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    toy = TaskSpec(
        name="toy_mc", kind="multiple_choice",
        loader=lambda ctx: [MCItem(f"t{i}", "The quick brown", (" fox", " dog"), i % 2) for i in range(4)],
        process=lambda item, out: {"acc": float(int(np.argmax(out.logprobs)) == item.gold)},
        metrics=(mean_metric("acc"),),
    )
    from qlorakit.eval import suites
    from qlorakit.eval.cli import EvalError, eval_main

    monkeypatch.setitem(suites.SUITES, "toy", lambda: [toy])
    out = tmp_path / "eval"
    out.mkdir()
    training = {"heldout": {"examples": 9, "base_loss": 4.2, "tuned_loss": 2.5}, "samples": [], "suites": {"old": {}}}
    (out / "results.json").write_text(json.dumps(training))
    run_eval(tiny_llama, tiny_tokenizer, suites=["toy"], limits={"toy": 4}, out_dir=out, precision="fp32",
             n_resamples=20)
    saved = json.loads((out / "results.json").read_text())
    assert saved["heldout"] == training["heldout"] and "samples" in saved  # training's numbers stay
    assert set(saved["suites"]) == {"toy"}  # the evaluation's own keys are replaced
    (out / "results.json").write_text("{broken")
    with pytest.raises(EvalError, match=r"results\.json: cannot be read as JSON"):
        run_eval(tiny_llama, tiny_tokenizer, suites=["toy"], limits={"toy": 4}, out_dir=out, precision="fp32",
                 n_resamples=20)
    assert (out / "results.json").read_text() == "{broken"
    for empty in ("", ","):
        with pytest.raises(EvalError, match="--suites: no suite named"):
            eval_main([str(tmp_path), "--suites", empty])
