"""Examples to token ids with the base model's chat template; loss on the answer tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import Example
from .readers import DataError

__all__ = ["Tokenized", "IGNORE_INDEX", "tokenize_example", "tokenize_examples", "render_prompt"]

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # no template (a base model): a plain, documented fallback
    parts = [f"{m['role']}: {m['content']}\n" for m in messages]
    if add_generation_prompt:
        parts.append("assistant: ")
    return "".join(parts)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text that asks the model for the next assistant turn."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def _lead_in(tokenizer: Any, first: dict[str, str], where: str) -> str:
    """What the template writes before the content of an assistant turn that opens the conversation
    (a dialogue where the agent speaks first): a chat template cannot render the empty conversation
    before it, so the turn is rendered with a marker in place of its content and cut there."""
    marker = "\ue000qlorakit-answer\ue000"
    text = _render(tokenizer, [{**first, "content": marker}], add_generation_prompt=False)
    pos = text.find(marker)
    if pos < 0:
        raise DataError(f"{where}: the chat template does not write the first turn's text; cannot find the answer tokens")
    return text[:pos]


def tokenize_example(tokenizer: Any, ex: Example, max_len: int) -> Tokenized:
    """Token ids and labels for one example; labels are IGNORE_INDEX outside assistant turns.

    Each assistant turn's tokens are found by rendering the conversation up to that turn with and
    without the answer: the answer is what the longer rendering adds. The rendering of a prefix must
    be a prefix of the full rendering, which holds for chat templates that only append.
    """
    if ex.text is not None:
        ids = _ids(tokenizer, ex.text)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        labels = list(ids)
    else:
        msgs = ex.messages or []
        ids, labels = [], []
        prev_text = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt_text = (_render(tokenizer, msgs[:i], add_generation_prompt=True) if i
                           else _lead_in(tokenizer, m, f"{ex.source}:{ex.line}"))
            full_text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
            if not prompt_text.startswith(prev_text) or not full_text.startswith(prompt_text):
                raise DataError(
                    f"{ex.source}:{ex.line}: the chat template does not render conversations by appending "
                    "turns; cannot find the answer tokens"
                )
            ctx = _ids(tokenizer, prompt_text[len(prev_text):])
            ans = _ids(tokenizer, full_text[len(prompt_text):])
            ids += ctx + ans
            labels += [IGNORE_INDEX] * len(ctx) + ans
            prev_text = full_text
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    return Tokenized(ids, labels, truncated)


def tokenize_examples(tokenizer: Any, examples: list[Example], max_len: int) -> list[Tokenized]:
    out = [tokenize_example(tokenizer, ex, max_len) for ex in examples]
    # an example whose answer was cut off entirely teaches nothing
    return [t for t in out if any(lab != IGNORE_INDEX for lab in t.labels)]
