"""The end of a run: held-out loss of base and tuned, sample generations side by side, the model card."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Recipe
from ..data import PreparedData, no_pack
from ..eval.loglikelihood import DEFAULT_BATCH_TOKENS
from ..lora import adapters_disabled
from ..models import LoadedModel, chat_prompt, generate
from .checkpoint import write_atomic

__all__ = ["finish_run", "write_model_card", "sample_generations"]

log = logging.getLogger(__name__)
EVAL_MIN_BATCH_TOKENS = 256
# bytes per token and vocabulary entry of a log-likelihood forward: the bf16 logits (of the contexts
# and of the continuations on their cache, both alive at once), the fp32 result the output head's
# matmul writes before rounding, and the fp32 log-softmax of the scored rows
EVAL_LOGIT_BYTES = 14
# what the evaluation's forwards add besides their logits: oneDNN's kernels for the new matmul
# shapes (bounded at 256 shapes, about 160 MB; see qlorakit/__init__.py) and heap growth (measured
# on the packaged model: the evaluation came within 16 MB of its cap with 200 MB kept back here)
EVAL_RESERVE = 256 * 2**20


def sample_generations(model: torch.nn.Module, loaded: LoadedModel, data: PreparedData, n: int,
                       max_new_tokens: int) -> list[dict[str, str]]:
    out = []
    for ex in data.val_examples[:n]:
        msgs = ex.messages or []
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        prompt = chat_prompt(loaded.tokenizer, msgs[:last])
        with adapters_disabled(model):
            base = generate(model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens).text
        tuned = generate(model, loaded.tokenizer, prompt, max_new_tokens=max_new_tokens).text
        out.append({"prompt": msgs[last - 1]["content"], "reference": msgs[last]["content"],
                    "base": base.strip(), "tuned": tuned.strip()})
    return out


@dataclass
class EvalMemory:
    """How the evaluation after training sizes its buffers to the memory it may use."""

    cache_bytes: float  # the bf16 copy of the base weights for generation, when it fits (else 0)
    batch_tokens: int  # padded tokens per log-likelihood forward


def eval_memory(model: torch.nn.Module, cap: float | None, rss: float | None = None) -> EvalMemory:
    """Buffer sizes that keep the evaluation's process under ``cap`` bytes (None: no limit).

    Of what is left under the cap (``rss``: the process now, read when None), less
    :data:`EVAL_RESERVE` for the kernels and heap the evaluation's new shapes add, the bf16 weight
    copy generation reads takes its share when it needs at most half, and the rest bounds the
    log-likelihood forwards, at ``vocabulary x`` :data:`EVAL_LOGIT_BYTES` bytes per token.
    """
    from .memory import ModelShape, current_rss_bytes

    if cap is None:
        return EvalMemory(cache_bytes=float("inf"), batch_tokens=DEFAULT_BATCH_TOKENS)
    room = max(0.0, cap - (current_rss_bytes() if rss is None else rss) - EVAL_RESERVE)
    copy = 2.0 * ModelShape.from_config(model.config).linear_params
    cache = copy if copy <= 0.5 * room else 0.0
    tokens = int((room - cache) // (EVAL_LOGIT_BYTES * model.config.vocab_size))
    return EvalMemory(cache_bytes=cache, batch_tokens=max(EVAL_MIN_BATCH_TOKENS, min(DEFAULT_BATCH_TOKENS, tokens)))


def _free_training_memory(loss_fn: Any) -> None:
    """Drop the fast path's weight copies and buffers and give malloc's free memory back."""
    import gc

    from .memory import release_free_memory

    release = getattr(loss_fn, "release", None)
    if release is not None:
        release()
    gc.collect()
    release_free_memory()


def finish_run(run_dir: Path, recipe: Recipe, loaded: LoadedModel, model: torch.nn.Module, data: PreparedData,
               ledger: dict[str, Any], state: Any, targets: list[str], *, loss_fn: Any = None,
               memory_cap: float | None = None, processes: int = 1) -> dict[str, Any]:
    """Held-out loss of base and tuned, sample generations, the short gate and the model card.
    ``processes``: how many processes trained the run, data parallel.

    ``loss_fn``: the training's loss function (the fast path's, which computes the held-out loss
    in the memory training took; released afterwards); the recipe's plain choice when None.
    ``memory_cap``: bytes the process may take meanwhile (the run's budget, or its training peak
    when lower); the generation's weight copy and the log-likelihood batches are sized to fit.
    """
    from ..models.decode import decoder_for
    from ..models.generation import prepare_inference
    from .loop import heldout_loss, loss_fn_for
    from .memory import MMAP_THRESHOLD_EVAL, mmap_threshold, release_free_memory

    t0 = time.perf_counter()
    pad = loaded.tokenizer.pad_token_id
    val_rows = no_pack(data.val_tokens, recipe.data.max_seq_len, pad)
    bs = recipe.train.micro_batch_size
    loss_fn = loss_fn if loss_fn is not None else loss_fn_for(recipe)
    with adapters_disabled(model):
        base_loss = heldout_loss(model, loaded, val_rows, bs, loss_fn)
    tuned_loss = heldout_loss(model, loaded, val_rows, bs, loss_fn)
    _free_training_memory(loss_fn)
    loss_fn = None
    # capped, blocks of 4 MB and more (logits, activations) come from their own mappings, returned
    # when freed; the generation decoder's own copies are made first, so that what is left is measured
    with mmap_threshold(MMAP_THRESHOLD_EVAL) if memory_cap is not None else contextlib.nullcontext():
        decoder_for(model)
        release_free_memory()
        room = eval_memory(model, memory_cap)
        log.info("evaluation within %s: weight copy %s, %d tokens per log-likelihood batch",
                 "no limit" if memory_cap is None else f"{memory_cap / 2**30:.2f} GB",
                 "on" if room.cache_bytes else "off", room.batch_tokens)
        prepare_inference(model, max_bytes=room.cache_bytes)
        samples = sample_generations(model, loaded, data, recipe.eval.samples, recipe.eval.max_new_tokens)
        results = {
            "heldout": {"examples": len(val_rows), "base_loss": base_loss, "tuned_loss": tuned_loss,
                        "base_ppl": float(torch.tensor(base_loss).exp()), "tuned_ppl": float(torch.tensor(tuned_loss).exp())},
            "samples": samples,
            "train": {"steps": state.step, "tokens": state.tokens, "seconds": round(state.elapsed, 1),
                      "tokens_per_s": round(state.tokens / max(1e-9, state.elapsed), 1), "processes": processes},
            "eval_seconds": round(time.perf_counter() - t0, 1),
        }
        (run_dir / "eval").mkdir(exist_ok=True)
        if recipe.eval.suites and recipe.eval.gate.enabled:
            results["gate_run"] = _short_gate(run_dir, recipe, loaded, model, data, room.batch_tokens)
        path = run_dir / "eval" / "results.json"
        suite_results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        write_atomic(path, json.dumps(suite_results | results, indent=2, default=str) + "\n")
    write_model_card(run_dir, recipe, loaded, data, ledger, results, targets)
    _print_summary(run_dir, results)
    return results


def _short_gate(run_dir: Path, recipe: Recipe, loaded: LoadedModel, model: torch.nn.Module,
                data: PreparedData, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[str, Any]:
    """The recipe's evaluation suites (by default the quality suite alone) with the release gate."""
    from ..eval.api import run_eval
    from ..eval.cli import thresholds_from_recipe

    records = [{"messages": ex.messages} for ex in data.val_examples if ex.messages]
    limits = {"*": recipe.eval.limit} if recipe.eval.limit else {"quality/heldout_generation": 8}
    out = run_eval(model, loaded.tokenizer, suites=list(recipe.eval.suites), heldout_records=records,
                   base_context=lambda: adapters_disabled(model), limits=limits, out_dir=run_dir / "eval",
                   thresholds=thresholds_from_recipe(recipe.eval.gate), loss_curve=run_dir / "metrics.jsonl",
                   batch_tokens=batch_tokens)
    gate = out.get("gate", {})
    return {"suites": list(recipe.eval.suites), "passed": gate.get("passed"), "checks": gate.get("checks", []),
            "report": "eval/report.md"}


def _print_summary(run_dir: Path, results: dict[str, Any]) -> None:
    h = results["heldout"]
    print(f"\nheld-out loss: base {h['base_loss']:.4f} -> tuned {h['tuned_loss']:.4f} "
          f"(perplexity {h['base_ppl']:.2f} -> {h['tuned_ppl']:.2f}) on {h['examples']} examples")
    for s in results["samples"]:
        print(f"\n> {s['prompt']}\n  base : {s['base'][:300]}\n  tuned: {s['tuned'][:300]}")
    g = results.get("gate_run")
    if g:
        print(f"\ngate ({', '.join(g['suites'])}): {'passed' if g['passed'] else 'FAILED'}")
        for c in g["checks"]:
            if c.get("status") != "skipped":
                print(f"  [{c.get('status')}] {c.get('message')}")
        print("full evaluation against the base model: qlorakit eval " + str(run_dir))
    print(f"\nrun folder: {run_dir}")


def _terms(ledger: dict[str, Any]) -> str:
    from ..data.ledger import terms_markdown

    return terms_markdown(ledger)


def write_model_card(run_dir: Path, recipe: Recipe, loaded: LoadedModel, data: PreparedData,
                     ledger: dict[str, Any], results: dict[str, Any], targets: list[str]) -> Path:
    h = results["heldout"]
    tr = results["train"]
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    lines = [
        f"# Model card: {run_dir.name}",
        "",
        f"A LoRA adapter for **{loaded.name}**, trained with qlorakit on a 4-bit "
        f"{recipe.model.quant_type.upper()} base (double quantization: {recipe.model.double_quant}).",
        "",
        "## Use",
        "",
        "```",
        f"qlorakit generate {run_dir} \"your question\"",
        f"qlorakit chat {run_dir}",
        "```",
        "",
        "The adapter in `adapter/` is in the PEFT format: `peft.PeftModel.from_pretrained(base, "
        f"'{run_dir}/adapter')` loads it over the same base model.",
        "",
        "## Training",
        "",
        f"- LoRA rank {recipe.lora.r}, alpha {recipe.lora.alpha:g}, dropout {recipe.lora.dropout:g}, "
        f"on {len(targets)} layers ({', '.join(leaves)})",
        f"- {tr['steps']} steps, {tr['tokens']} tokens, {tr['seconds']} s ({tr['tokens_per_s']} tokens/s"
        f"{', data parallel in %d processes' % tr['processes'] if tr.get('processes', 1) > 1 else ''}), "
        f"learning rate {recipe.train.lr:g} ({recipe.train.schedule}), sequence length {recipe.data.max_seq_len}, "
        f"compute {str(loaded.compute_dtype).replace('torch.', '')}",
        f"- {len(data.train_examples)} training examples packed into {len(data.train_rows)} sequences; "
        f"{len(data.val_examples)} held-out examples",
        "",
        "## Data and licence terms",
        "",
        _terms(ledger),
        "",
        "The full ledger (hashes, findings) is in `data_manifest.json`.",
        "",
        "## Results on the held-out data",
        "",
        "| model | loss | perplexity |",
        "|---|---|---|",
        f"| base | {h['base_loss']:.4f} | {h['base_ppl']:.2f} |",
        f"| tuned | {h['tuned_loss']:.4f} | {h['tuned_ppl']:.2f} |",
        "",
    ]
    if results.get("samples"):
        lines += ["### Samples (greedy)", ""]
        for s in results["samples"]:
            lines += [f"**Prompt:** {s['prompt']}", "", f"- base: {s['base']}", f"- tuned: {s['tuned']}",
                      f"- reference: {s['reference']}", ""]
    if (run_dir / "eval" / "report.md").is_file():
        lines += ["Full evaluation: [eval/report.md](eval/report.md) ([HTML](eval/report.html)).", ""]
    lines += [
        "## Known limits",
        "",
        f"- A {loaded.name} base is small: it answers from what the adapter taught it and can still invent facts.",
        "- The held-out loss measures the training distribution only; run `qlorakit eval` for retention, "
        "truthfulness, bias and safety against the base model.",
        "",
    ]
    path = run_dir / "MODEL_CARD.md"
    write_atomic(path, "\n".join(lines))
    return path
