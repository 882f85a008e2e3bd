"""Evaluation: tasks as data, suites, base-vs-tuned comparison, the gate and the report.

Typical use (what ``qlorakit eval`` does)::

    from qlorakit.eval import run_eval
    results = run_eval(model, tokenizer, suites=["retention", "safety"],
                       base_context=model.disable_adapter, out_dir="runs/x/eval")
    print(results["gate"]["passed"])

The model is any causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
``.logits``; the tokenizer needs ``encode``/``decode`` and, for chat prompts, a chat template.
"""

from qlorakit.eval.api import run_eval
from qlorakit.eval.bbq import bbq_bias_score, bbq_biased_indices, bbq_summary, bbq_unknown_index
from qlorakit.eval.bootstrap import PairedDiff, bootstrap_interval, paired_bootstrap
from qlorakit.eval.gate import DEFAULT_THRESHOLDS, GateCheck, GateOutcome, GateResult, apply_gate, parse_checks
from qlorakit.eval.generation import chat_prompt, greedy_generate, truncate_at_stop
from qlorakit.eval.loglikelihood import ContinuationScore, LoglikelihoodScorer, encode_pair
from qlorakit.eval.metrics import exact_match, mc1, mc2, mc_acc, mc_predictions, normalize_answer, rouge_l, rouge_l_lcs, token_f1
from qlorakit.eval.precision import autocast_context, cpu_has_native_bf16, resolve_precision
from qlorakit.eval.refusal import REFUSAL_PHRASES, is_refusal
from qlorakit.eval.report import write_report
from qlorakit.eval.runner import DEFAULT_SUITES, EvalOptions, evaluate, evaluate_pair, run_task
from qlorakit.eval.suites import SUITE_NAMES, SUITES, suite_tasks
from qlorakit.eval.tasks import GenItem, LLItem, MCItem, MCOutput, Metric, TaskSpec, mean_metric, ratio_metric

__all__ = [
    "run_eval", "evaluate", "evaluate_pair", "run_task", "EvalOptions", "DEFAULT_SUITES",
    "SUITES", "SUITE_NAMES", "suite_tasks",
    "TaskSpec", "MCItem", "GenItem", "LLItem", "MCOutput", "Metric", "mean_metric", "ratio_metric",
    "LoglikelihoodScorer", "ContinuationScore", "encode_pair", "greedy_generate", "chat_prompt", "truncate_at_stop",
    "mc_predictions", "mc_acc", "mc1", "mc2", "exact_match", "token_f1", "normalize_answer", "rouge_l", "rouge_l_lcs",
    "bbq_biased_indices", "bbq_unknown_index", "bbq_bias_score", "bbq_summary",
    "is_refusal", "REFUSAL_PHRASES",
    "paired_bootstrap", "bootstrap_interval", "PairedDiff",
    "apply_gate", "parse_checks", "GateCheck", "GateOutcome", "GateResult", "DEFAULT_THRESHOLDS",
    "write_report",
    "resolve_precision", "autocast_context", "cpu_has_native_bf16",
]
