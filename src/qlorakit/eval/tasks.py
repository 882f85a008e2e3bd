"""Tasks as data: items, metrics and a small spec that says how to score them.

A task is a :class:`TaskSpec`: a name, a kind, a loader that returns items in a fixed order, a
function that turns one item's model output into per-item numbers (columns), and metrics that
aggregate those columns. Three kinds exist:

- ``multiple_choice`` (:class:`MCItem`): each choice is scored as ``target_delimiter + choice``
  by summed log-likelihood given the context.
- ``generation`` (:class:`GenItem`): greedy decoding of a prompt, compared with references.
- ``loglikelihood`` (:class:`LLItem`): negative log-likelihood of a target text given a prompt
  (held-out loss / perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "Kind",
    "MCItem",
    "GenItem",
    "LLItem",
    "Item",
    "MCOutput",
    "Metric",
    "TaskSpec",
    "LoadContext",
    "mean_metric",
    "ratio_metric",
    "apply_limit",
]

Kind = Literal["multiple_choice", "generation", "loglikelihood"]
Columns = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class MCItem:
    """A context and its choices; ``gold`` is the index of the correct choice (-1 if the task
    scores without one, e.g. TruthfulQA, whose ``meta`` says which answers are true)."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"item {self.id}: no choices")
        if self.gold >= len(self.choices) or self.gold < -1:
            raise ValueError(f"item {self.id}: gold index {self.gold} outside the {len(self.choices)} choices")


@dataclass(frozen=True)
class GenItem:
    """A prompt to complete greedily. With ``chat=True`` the prompt is the user turn (and
    ``system`` the system turn) rendered by the tokenizer's chat template; otherwise it is raw
    text. ``references`` are the acceptable answers (may be empty for checks such as refusal)."""

    id: str
    prompt: str
    references: tuple[str, ...] = ()
    system: str | None = None
    chat: bool = True
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LLItem:
    """A prompt and the target whose token NLL is measured. With ``chat=True`` both are turns
    of a chat (``messages`` before the answer, then the assistant's ``target``)."""

    id: str
    messages: tuple[Mapping[str, str], ...]
    target: str
    chat: bool = True
    meta: Mapping[str, Any] = field(default_factory=dict)


Item = Union[MCItem, GenItem, LLItem]


@dataclass(frozen=True)
class MCOutput:
    """Model output for one multiple-choice item: summed log-likelihood and token count per choice."""

    logprobs: tuple[float, ...]
    n_tokens: tuple[int, ...]
    is_greedy: tuple[bool, ...]


@dataclass(frozen=True)
class Metric:
    """An aggregate over per-item columns. ``fraction`` metrics lie in [0, 1] (bias scores in
    [-1, 1]) and are shown (and gated) in points, i.e. times 100. ``higher_is_better=None``
    means closer to zero is better (bias scores)."""

    name: str
    fn: Callable[[Columns], float]
    higher_is_better: bool | None = True
    fraction: bool = True
    description: str = ""


def mean_metric(name: str, column: str | None = None, *, higher_is_better: bool = True, fraction: bool = True, description: str = "") -> Metric:
    """Mean of one per-item column."""
    col = column or name

    def fn(columns: Columns) -> float:
        values = np.asarray(columns[col], dtype=np.float64)
        return float(values.mean()) if values.size else float("nan")

    return Metric(name, fn, higher_is_better, fraction, description)


def ratio_metric(name: str, numerator: str, denominator: str, *, higher_is_better: bool = True, fraction: bool = False,
                 transform: Callable[[float], float] | None = None, description: str = "") -> Metric:
    """``sum(numerator) / sum(denominator)``, optionally transformed (e.g. ``math.exp`` for
    perplexity from summed NLL and token counts)."""

    def fn(columns: Columns) -> float:
        den = float(np.sum(columns[denominator]))
        if den == 0:
            return float("nan")
        value = float(np.sum(columns[numerator])) / den
        if transform is not None:
            try:
                return transform(value)
            except OverflowError:
                return math.inf
        return value

    return Metric(name, fn, higher_is_better, fraction, description)


@dataclass(frozen=True)
class LoadContext:
    """What loaders may use: the shared data folder and the run's held-out records."""

    data_root: Any  # pathlib.Path | None, resolved lazily by loaders that need it
    heldout_records: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    ``process(item, output)`` returns the item's columns: for ``multiple_choice`` the output is
    an :class:`MCOutput`, for ``generation`` the generated text, for ``loglikelihood`` a pair
    ``(summed_nll, n_tokens)``.
    """

    name: str
    kind: Kind
    loader: Callable[[LoadContext], Sequence[Item]]
    process: Callable[[Any, Any], Mapping[str, float]]
    metrics: tuple[Metric, ...]
    default_limit: int | None = None
    target_delimiter: str = " "
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("multiple_choice", "generation", "loglikelihood"):
            raise ValueError(f"task {self.name}: unknown kind {self.kind!r}")
        if not self.metrics:
            raise ValueError(f"task {self.name}: no metrics")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name}: duplicate metric names {names}")


def apply_limit(items: Sequence[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` items (all when ``limit`` is None), in the loader's order."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    return list(items[:limit])
