"""Quality suite: how well the model answers the run's own held-out split.

- ``heldout_loss``: mean token NLL of the reference answers given the chat-templated prompt
  (token-weighted over all items; answer tokens are the answer text and the end-of-turn
  token), and its perplexity.
- ``heldout_generation``: greedy answers compared with the references by ROUGE-L, SQuAD token F1
  and exact match.

Held-out records may be chat (``messages`` ending with an assistant turn) or pairs:
``instruction`` [+ ``input``] / ``output``, ``prompt`` / ``response`` | ``completion`` | ``output``,
``question`` / ``answer``, ``input`` / ``output``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from qlorakit.eval.metrics import exact_match, max_over_references, rouge_l, token_f1
from qlorakit.eval.tasks import GenItem, LLItem, LoadContext, TaskSpec, mean_metric, ratio_metric

__all__ = ["record_to_chat", "load_heldout_loss", "load_heldout_generation", "heldout_loss_task", "heldout_generation_task", "quality_tasks"]

_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("prompt", "output"), ("question", "answer"), ("input", "output"))


def record_to_chat(record: Mapping[str, Any], index: int) -> tuple[list[dict[str, str]], str]:
    """``(messages before the answer, answer)`` of one held-out record."""
    where = f"held-out record {index}"
    if not isinstance(record, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, Sequence) or len(msgs) < 2:
            raise ValueError(f"{where}: 'messages' must list at least a user and an assistant turn")
        for j, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: messages[{j}] must have 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer, got role {msgs[-1]['role']!r}")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs[:-1]], str(msgs[-1]["content"])
    if "instruction" in record and "output" in record:
        user = str(record["instruction"])
        extra = record.get("input")
        if extra:
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user}], str(record["output"])
    for p, a in _PAIRS:
        if p in record and a in record:
            return [{"role": "user", "content": str(record[p])}], str(record[a])
    raise ValueError(
        f"{where}: expected 'messages' (ending with an assistant turn) or one of the pairs "
        f"('instruction', 'output'), {', '.join(repr(x) for x in _PAIRS)}; got keys {sorted(record)}"
    )


def _records(ctx: LoadContext) -> Sequence[Mapping[str, Any]]:
    if not ctx.heldout_records:
        raise ValueError("the quality suite needs the run's held-out records (heldout_records is empty)")
    return ctx.heldout_records


def load_heldout_loss(ctx: LoadContext) -> list[LLItem]:
    items = []
    for i, rec in enumerate(_records(ctx)):
        msgs, answer = record_to_chat(rec, i)
        if answer.strip():
            items.append(LLItem(f"heldout-{i}", tuple(msgs), answer))
    return items


def load_heldout_generation(ctx: LoadContext) -> list[GenItem]:
    items = []
    for i, rec in enumerate(_records(ctx)):
        msgs, answer = record_to_chat(rec, i)
        if not answer.strip():
            continue
        users = [m for m in msgs if m["role"] == "user"]
        systems = [m for m in msgs if m["role"] == "system"]
        if len(users) != 1 or len(msgs) != len(users) + len(systems):
            # multi-turn prompts: keep the whole history in the user turn's place
            prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs if m["role"] != "system")
        else:
            prompt = users[0]["content"]
        system = systems[0]["content"] if systems else None
        items.append(GenItem(f"heldout-{i}", prompt, (answer,), system=system))
    return items


def _process_loss(item: LLItem, out: tuple[float, int]) -> dict[str, float]:
    nll, n = out
    return {"nll": nll, "tokens": float(n)}


def _process_gen(item: GenItem, text: str) -> dict[str, float]:
    refs = item.references
    return {
        "rouge_l": max_over_references(rouge_l, text, refs),
        "f1": max_over_references(token_f1, text, refs),
        "exact_match": max_over_references(exact_match, text, refs),
    }


def heldout_loss_task(default_limit: int | None = 64) -> TaskSpec:
    return TaskSpec(
        name="heldout_loss",
        kind="loglikelihood",
        loader=load_heldout_loss,
        process=_process_loss,
        metrics=(
            ratio_metric("loss", "nll", "tokens", higher_is_better=False, description="mean token NLL of the reference answers"),
            ratio_metric("perplexity", "nll", "tokens", higher_is_better=False, transform=math.exp, description="exp(loss)"),
        ),
        default_limit=default_limit,
        description="held-out split: answer-token loss",
    )


def heldout_generation_task(default_limit: int | None = 16, max_new_tokens: int = 64) -> TaskSpec:
    return TaskSpec(
        name="heldout_generation",
        kind="generation",
        loader=load_heldout_generation,
        process=_process_gen,
        metrics=(
            mean_metric("rouge_l", description="ROUGE-L F against the reference"),
            mean_metric("f1", description="SQuAD token F1 against the reference"),
            mean_metric("exact_match", description="normalised exact match"),
        ),
        default_limit=default_limit,
        max_new_tokens=max_new_tokens,
        description="held-out split: greedy answers vs references",
    )


def quality_tasks() -> list[TaskSpec]:
    return [heldout_loss_task(), heldout_generation_task()]
