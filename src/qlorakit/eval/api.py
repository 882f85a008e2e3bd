"""``run_eval``: the one call behind ``qlorakit eval`` — evaluate, gate, write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from qlorakit.eval.gate import GateCheck, apply_gate
from qlorakit.eval.loglikelihood import DEFAULT_BATCH_TOKENS
from qlorakit.eval.report import write_report
from qlorakit.eval.runner import DEFAULT_SUITES, EvalOptions, evaluate, evaluate_pair

__all__ = ["run_eval"]


def run_eval(
    model: Any,
    tokenizer: Any,
    *,
    suites: Sequence[str] = DEFAULT_SUITES,
    heldout_records: Sequence[Mapping[str, Any]] | None = None,
    base_context: Callable[[], ContextManager[Any]] | None = None,
    limits: Mapping[str, int | None] | None = None,
    out_dir: str | Path | None = None,
    thresholds: Sequence[GateCheck | Mapping[str, Any]] | None = None,
    loss_curve: str | Path | None = None,
    precision: str = "auto",
    batch_size: int = 8,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``suites``, apply the gate, and (with ``out_dir``) write
    ``results.json``, ``report.md`` and ``report.html`` there.

    With ``base_context`` (e.g. ``model.disable_adapter`` of a PEFT model) every metric compares
    tuned with base on the same items; without it only the model's own values are reported and
    comparison checks are skipped. ``limits`` maps ``suite``, ``task`` or ``suite/task`` (or ``*``)
    to an item count (None: all items). ``thresholds`` defaults to
    :data:`qlorakit.eval.DEFAULT_THRESHOLDS`. ``batch_tokens`` bounds the padded tokens of one
    log-likelihood forward (whose logits take tokens x vocabulary values). ``loss_curve`` is a training ``metrics.jsonl``
    plotted in the report. The returned dict is what ``results.json`` holds, with ``gate``
    (``passed`` and every check's status, observed value, margin and message) and, when written,
    ``report_files``.
    """
    options = EvalOptions(precision=precision, batch_size=batch_size, batch_tokens=batch_tokens, n_resamples=n_resamples, seed=seed,
                          confidence=confidence, limits=dict(limits or {}))
    root = Path(data_root) if data_root is not None else None
    if base_context is not None:
        results = evaluate_pair(model, tokenizer, suites, base_context, heldout_records=heldout_records, options=options, data_root=root)
    else:
        results = evaluate(model, tokenizer, suites, heldout_records=heldout_records, options=options, data_root=root)
    gate = apply_gate(results, thresholds)
    results["gate"] = gate.to_dict()
    if out_dir is not None:
        paths = write_report(results, out_dir, loss_curve=loss_curve)
        results["report_files"] = {k: str(v) for k, v in paths.items()}
    return results
