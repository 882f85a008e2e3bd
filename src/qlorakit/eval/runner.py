"""Running tasks on a model, and base-vs-tuned comparison on the same items.

``evaluate_pair`` loads each task's items once, scores them with the model as it is (tuned) and
again inside ``base_context()`` (e.g. PEFT's ``model.disable_adapter``), and reports per metric
the base value, the tuned value, the difference and its paired bootstrap interval.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np

from qlorakit.eval.bootstrap import bootstrap_interval, paired_bootstrap
from qlorakit.eval.generation import chat_prompt, greedy_generate
from qlorakit.eval.loglikelihood import DEFAULT_BATCH_TOKENS, LoglikelihoodScorer, encode_pair
from qlorakit.eval.suites import SUITE_NAMES, SUITES, suite_tasks
from qlorakit.eval.tasks import GenItem, Item, LLItem, LoadContext, MCItem, MCOutput, TaskSpec, apply_limit

__all__ = ["TaskRun", "EvalOptions", "load_items", "run_task", "evaluate", "evaluate_pair", "resolve_limit", "DEFAULT_SUITES"]

log = logging.getLogger("qlorakit.eval")

DEFAULT_SUITES: tuple[str, ...] = SUITE_NAMES
SCHEMA = "qlorakit.eval/1"
_N_SAMPLES = 5  # generated answers kept per task for the report


@dataclass
class TaskRun:
    """One model's pass over one task's items."""

    columns: dict[str, np.ndarray]
    outputs: list[Any]
    seconds: float
    tokens: int


@dataclass(frozen=True)
class EvalOptions:
    """Settings shared by every task in one evaluation."""

    precision: str = "auto"
    batch_size: int = 8
    n_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    strategy: str = "auto"
    limits: Mapping[str, int | None] = field(default_factory=dict)
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # padded tokens per log-likelihood forward


def resolve_limit(suite: str, task: TaskSpec, limits: Mapping[str, int | None]) -> int | None:
    """Item limit for ``task``: key ``suite/task``, then ``task``, then ``suite``, then ``*``,
    then the task's default. A value of None means every item."""
    for key in (f"{suite}/{task.name}", task.name, suite, "*"):
        if key in limits:
            return limits[key]
    return task.default_limit


def _check_limit_keys(limits: Mapping[str, int | None], running: Sequence[str] = ()) -> None:
    """Every key must name a known suite, task or ``suite/task`` (also ones not run now, so that
    one limits mapping serves several suite selections); typos fail with the valid keys."""
    valid = {"*"}
    for s in dict.fromkeys([*SUITES, *running]):  # the live registry and the suites run now
        valid.add(s)
        for t in suite_tasks(s):
            valid.update({t.name, f"{s}/{t.name}"})
    bad = sorted(k for k in limits if k not in valid)
    if bad:
        raise KeyError(f"unknown limit key(s) {bad}; valid keys: {sorted(valid)}")
    for k, v in limits.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"limit {k!r} must be a positive integer or None, got {v!r}")


def load_items(task: TaskSpec, ctx: LoadContext, limit: int | None) -> list[Item]:
    """The task's items in loader order, first ``limit`` of them."""
    items = apply_limit(task.loader(ctx), limit)
    if not items:
        raise ValueError(f"task {task.name}: no items to evaluate")
    return items


def _ll_tokens(tokenizer: Any, item: LLItem) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids of a held-out item: the chat template renders the prompt (with
    the assistant header) and the full conversation; the answer ids are the full encoding past
    the prompt's, up to and including the end-of-turn token (trailing whitespace dropped)."""
    if not item.chat:
        if len(item.messages) != 1:
            raise ValueError(f"item {item.id}: a non-chat loglikelihood item needs exactly one prompt message")
        return encode_pair(tokenizer, item.messages[0]["content"], item.target)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; the held-out loss needs one")
    msgs = [dict(m) for m in item.messages]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": item.target}], tokenize=False)
    ctx_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    whole = list(tokenizer.encode(full, add_special_tokens=False))
    if full.startswith(prompt) and whole[: len(ctx_ids)] == ctx_ids:
        cont = whole[len(ctx_ids):]
    else:  # template renders the answer turn differently: score the answer text on its own
        cont = list(tokenizer.encode(item.target, add_special_tokens=False))
    while cont and not tokenizer.decode(cont[-1:]).strip():
        cont = cont[:-1]
    if not cont:
        raise ValueError(f"item {item.id}: the answer has no tokens")
    return ctx_ids, cont


def run_task(task: TaskSpec, model: Any, tokenizer: Any, items: Sequence[Item], options: EvalOptions) -> TaskRun:
    """Score ``items`` with ``model`` and turn each output into the task's per-item columns."""
    start = time.perf_counter()
    outputs: list[Any] = []
    tokens = 0
    if task.kind in ("multiple_choice", "loglikelihood"):
        scorer = LoglikelihoodScorer(model, tokenizer, precision=options.precision, strategy=options.strategy,  # type: ignore[arg-type]
                                     batch_tokens=options.batch_tokens)
        if task.kind == "multiple_choice":
            for item in items:
                if not isinstance(item, MCItem):
                    raise TypeError(f"task {task.name}: expected MCItem, got {type(item).__name__}")
            groups = [scorer.encode_group(it.context, [task.target_delimiter + c for c in it.choices]) for it in items]  # type: ignore[union-attr]
            for scores in scorer.score_token_groups(groups):
                outputs.append(MCOutput(tuple(s.logprob for s in scores), tuple(s.n_tokens for s in scores), tuple(s.is_greedy for s in scores)))
        else:
            groups = []
            for item in items:
                if not isinstance(item, LLItem):
                    raise TypeError(f"task {task.name}: expected LLItem, got {type(item).__name__}")
                ctx_ids, cont = _ll_tokens(tokenizer, item)
                groups.append((ctx_ids, [cont]))
            for (score,) in scorer.score_token_groups(groups):
                outputs.append((-score.logprob, score.n_tokens))
        tokens = scorer.tokens_processed
    elif task.kind == "generation":
        prompts = []
        for item in items:
            if not isinstance(item, GenItem):
                raise TypeError(f"task {task.name}: expected GenItem, got {type(item).__name__}")
            prompts.append(chat_prompt(tokenizer, item.prompt, system=item.system) if item.chat else item.prompt)
        outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                                  batch_size=options.batch_size, precision=options.precision)
        tokens = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    else:  # pragma: no cover - TaskSpec validates kinds
        raise ValueError(f"unknown task kind {task.kind!r}")
    rows = [dict(task.process(item, out)) for item, out in zip(items, outputs)]
    keys = list(rows[0])
    for i, r in enumerate(rows):
        if list(r) != keys:
            raise ValueError(f"task {task.name}: item {i} produced columns {list(r)}, expected {keys}")
    columns = {}
    for k in keys:
        values = [r[k] for r in rows]
        columns[k] = np.asarray(values, dtype=object if isinstance(values[0], str) else np.float64)
    return TaskRun(columns, outputs, time.perf_counter() - start, tokens)


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _metric_meta(m: Any) -> dict[str, Any]:
    return {"higher_is_better": m.higher_is_better, "fraction": m.fraction, "description": m.description}


def _samples(items: Sequence[Item], tuned: TaskRun, base: TaskRun | None) -> list[dict[str, Any]]:
    out = []
    for item, t_out, b_out in zip(items[:_N_SAMPLES], tuned.outputs, (base.outputs if base else [None] * _N_SAMPLES)):
        if not isinstance(item, GenItem):
            return []
        row = {"id": item.id, "prompt": item.prompt[:500], "tuned": t_out}
        if base is not None:
            row["base"] = b_out
        if item.references:
            row["reference"] = item.references[0][:500]
        out.append(row)
    return out


def _run_suites(
    model: Any,
    tokenizer: Any,
    suites: Sequence[str],
    base_context: Callable[[], ContextManager[Any]] | None,
    heldout_records: Sequence[Mapping[str, Any]] | None,
    options: EvalOptions,
    data_root: Path | None,
) -> dict[str, Any]:
    if isinstance(suites, str):
        suites = [suites]
    suites = list(dict.fromkeys(suites))
    for s in suites:
        suite_tasks(s)  # validates names before any work
    _check_limit_keys(options.limits, suites)
    ctx = LoadContext(data_root, heldout_records)
    paired = base_context is not None
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "paired": paired,
        "settings": {
            "precision": options.precision,
            "n_resamples": options.n_resamples,
            "seed": options.seed,
            "confidence": options.confidence,
            "limits": dict(options.limits),
        },
        "suites": {},
    }
    for suite in suites:
        suite_out: dict[str, Any] = {}
        for task in suite_tasks(suite):
            limit = resolve_limit(suite, task, options.limits)
            items = load_items(task, ctx, limit)
            log.info("%s/%s: %d items", suite, task.name, len(items))
            tuned = run_task(task, model, tokenizer, items, options)
            base = None
            if base_context is not None:
                with base_context():
                    base = run_task(task, model, tokenizer, items, options)
            metrics: dict[str, Any] = {}
            for m in task.metrics:
                entry = _metric_meta(m)
                if base is not None:
                    d = paired_bootstrap(m.fn, base.columns, tuned.columns, n_resamples=options.n_resamples,
                                         seed=options.seed, confidence=options.confidence)
                    entry.update(base=_num(d.base), tuned=_num(d.tuned), delta=_num(d.delta), ci_low=_num(d.ci_low), ci_high=_num(d.ci_high))
                else:
                    value, lo, hi = bootstrap_interval(m.fn, tuned.columns, n_resamples=options.n_resamples, seed=options.seed,
                                                       confidence=options.confidence)
                    entry.update(base=None, tuned=_num(value), delta=None, ci_low=_num(lo), ci_high=_num(hi))
                metrics[m.name] = entry
            suite_out[task.name] = {
                "kind": task.kind,
                "description": task.description,
                "n_items": len(items),
                "limit": limit,
                "seconds": {"tuned": round(tuned.seconds, 3), **({"base": round(base.seconds, 3)} if base else {})},
                "tokens": {"tuned": tuned.tokens, **({"base": base.tokens} if base else {})},
                "metrics": metrics,
                "samples": _samples(items, tuned, base),
            }
        results["suites"][suite] = suite_out
    return results


def evaluate(
    model: Any,
    tokenizer: Any,
    suites: Sequence[str] = DEFAULT_SUITES,
    *,
    heldout_records: Sequence[Mapping[str, Any]] | None = None,
    options: EvalOptions | None = None,
    data_root: Path | None = None,
) -> dict[str, Any]:
    """One model on ``suites``; each metric with a bootstrap interval of its value."""
    return _run_suites(model, tokenizer, suites, None, heldout_records, options or EvalOptions(), data_root)


def evaluate_pair(
    model: Any,
    tokenizer: Any,
    suites: Sequence[str],
    base_context: Callable[[], ContextManager[Any]],
    *,
    heldout_records: Sequence[Mapping[str, Any]] | None = None,
    options: EvalOptions | None = None,
    data_root: Path | None = None,
) -> dict[str, Any]:
    """Tuned (``model`` as it is) against base (``model`` inside ``base_context()``) on the same
    items; each metric gets ``base``, ``tuned``, ``delta = tuned - base`` and the paired bootstrap
    interval ``ci_low``/``ci_high`` of ``delta``."""
    if not callable(base_context):
        raise TypeError("base_context must be a callable returning a context manager (e.g. model.disable_adapter)")
    return _run_suites(model, tokenizer, suites, base_context, heldout_records, options or EvalOptions(), data_root)
