"""Retention suite: general knowledge and common sense that fine-tuning should not erode.

- ``mmlu``: zero-shot MMLU validation prompts (ending ``Answer:``); the four letters are scored as
  continuations `` A``..`` D``; accuracy. Items are interleaved across subjects so that a limit
  keeps every subject represented.
- ``hellaswag``: context and four endings, preprocessed as lm-eval's ``hellaswag`` task does;
  ``acc`` and ``acc_norm``. The shared file keeps only the joined ``ctx`` (activity label, ``ctx_a``
  and ``ctx_b``), so lm-eval's capitalisation of ``ctx_b`` cannot be applied; scores are therefore
  close to, not identical with, published HellaSwag numbers.
"""

from __future__ import annotations

import re

from qlorakit.eval.data_files import data_file, read_jsonl
from qlorakit.eval.suites.common import round_robin
from qlorakit.eval.tasks import LoadContext, MCItem, MCOutput, TaskSpec, mean_metric
from qlorakit.eval.metrics import mc_acc

__all__ = ["MMLU_FILE", "HELLASWAG_FILE", "hellaswag_preprocess", "load_mmlu", "load_hellaswag", "mmlu_task", "hellaswag_task", "retention_tasks"]

MMLU_FILE = "benchmarks/mmlu_val_zero_shot.jsonl"
HELLASWAG_FILE = "benchmarks/hellaswag_val_first1000.jsonl"
_LETTERS = ("A", "B", "C", "D")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up: strip, ``" [title]"`` to ``". "``, drop bracketed
    markup, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def load_mmlu(ctx: LoadContext, *, interleave: bool = True) -> list[MCItem]:
    path = data_file(MMLU_FILE, ctx.data_root)
    items = []
    for i, row in enumerate(read_jsonl(path)):
        where = f"{path} record {i + 1}"
        for key in ("input", "output", "subject"):
            if key not in row:
                raise KeyError(f"{where}: missing key {key!r}")
        answer = str(row["output"]).strip()
        if answer not in _LETTERS:
            raise ValueError(f"{where}: output must be one of {_LETTERS}, got {row['output']!r}")
        items.append(MCItem(f"mmlu-{i}", row["input"], _LETTERS, _LETTERS.index(answer), {"subject": row["subject"]}))
    return round_robin(items, key=lambda it: it.meta["subject"]) if interleave else items


def load_hellaswag(ctx: LoadContext) -> list[MCItem]:
    path = data_file(HELLASWAG_FILE, ctx.data_root)
    items = []
    for i, row in enumerate(read_jsonl(path)):
        where = f"{path} record {i + 1}"
        for key in ("ctx", "endings", "label"):
            if key not in row:
                raise KeyError(f"{where}: missing key {key!r}")
        endings = tuple(hellaswag_preprocess(e) for e in row["endings"])
        label = int(row["label"])
        items.append(MCItem(f"hellaswag-{row.get('idx', i)}", hellaswag_preprocess(row["ctx"]), endings, label))
    return items


def _process_mc(item: MCItem, out: MCOutput) -> dict[str, float]:
    acc, acc_norm = mc_acc(out.logprobs, item.choices, item.gold)
    return {"acc": acc, "acc_norm": acc_norm}


def mmlu_task(default_limit: int | None = 200) -> TaskSpec:
    return TaskSpec(
        name="mmlu",
        kind="multiple_choice",
        loader=load_mmlu,
        process=_process_mc,
        metrics=(mean_metric("acc", description="accuracy over the letters A-D"),),
        default_limit=default_limit,
        description="MMLU validation, zero-shot, letter scoring",
    )


def hellaswag_task(default_limit: int | None = 200) -> TaskSpec:
    return TaskSpec(
        name="hellaswag",
        kind="multiple_choice",
        loader=load_hellaswag,
        process=_process_mc,
        metrics=(
            mean_metric("acc", description="argmax of summed log-likelihood"),
            mean_metric("acc_norm", description="argmax of log-likelihood per character"),
        ),
        default_limit=default_limit,
        description="HellaSwag validation (first 1000), lm-eval preprocessing",
    )


def retention_tasks() -> list[TaskSpec]:
    return [mmlu_task(), hellaswag_task()]
