"""Evaluation suites: named lists of tasks.

| suite | tasks |
|---|---|
| quality | heldout_loss, heldout_generation (the run's held-out split) |
| retention | mmlu, hellaswag |
| truthfulness | truthfulqa (MC1, MC2) |
| bias | bbq |
| safety | advbench_refusal, xstest_over_refusal, bipia_injection |
"""

from __future__ import annotations

from typing import Callable

from qlorakit.eval.suites.bias import bias_tasks
from qlorakit.eval.suites.quality import quality_tasks, record_to_chat
from qlorakit.eval.suites.retention import hellaswag_preprocess, retention_tasks
from qlorakit.eval.suites.safety import extract_marker, insert_attack, safety_tasks
from qlorakit.eval.suites.truthfulness import truthfulness_tasks
from qlorakit.eval.tasks import TaskSpec

__all__ = ["SUITES", "SUITE_NAMES", "suite_tasks", "record_to_chat", "hellaswag_preprocess", "extract_marker", "insert_attack"]

SUITES: dict[str, Callable[[], list[TaskSpec]]] = {
    "quality": quality_tasks,
    "retention": retention_tasks,
    "truthfulness": truthfulness_tasks,
    "bias": bias_tasks,
    "safety": safety_tasks,
}
SUITE_NAMES: tuple[str, ...] = tuple(SUITES)


def suite_tasks(name: str) -> list[TaskSpec]:
    """The tasks of suite ``name``; unknown names fail with the list of valid ones."""
    if name not in SUITES:
        import difflib

        close = difflib.get_close_matches(name, SUITE_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown suite {name!r}{hint}; valid suites: {', '.join(SUITE_NAMES)}")
    return SUITES[name]()
