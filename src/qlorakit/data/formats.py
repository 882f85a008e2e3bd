"""Record forms: instruction, chat messages, plain completion; all become one ``Example``.

An ``Example`` is either a conversation (``messages``, loss on the assistant turns only) or a plain
text (``text``, loss on every token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .readers import DataError

__all__ = ["Example", "detect_format", "to_examples", "FORMS"]

Form = Literal["instruction", "chat", "completion"]
FORMS: tuple[str, ...] = ("instruction", "chat", "completion")
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def detect_format(record: dict[str, Any]) -> Form | None:
    """The form of one record, or None when no form fits."""
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "completion"
    return None


def _need_str(rec: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field '{key}' is empty; expected text")
    return v


def _instruction(rec: dict, where: str) -> list[dict[str, str]]:
    instruction = _need_str(rec, "instruction", where)
    inp = rec.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
    output = _need_str(rec, "output", where)
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    msgs = []
    system = rec.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system})
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _chat(rec: dict, where: str) -> list[dict[str, str]]:
    msgs = rec.get("messages", rec.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
        if role not in ROLES:
            raise DataError(f"{where}: messages[{j}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{j}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{where}: no assistant message with text; nothing to learn from")
    return out


def to_examples(records: list[dict[str, Any]], path: str | Path, form: str = "auto",
                fields: dict[str, str] | None = None) -> list[Example]:
    """Turn raw records into examples; raise :class:`DataError` naming file and line on a bad record.

    ``fields`` maps other column names onto ours (``{"prompt": "instruction", "response": "output"}``).
    """
    out = []
    for i, rec in enumerate(records, start=1):
        line = int(rec.get("_line", i))
        where = f"{path}:{line}"
        if fields:
            rec = {fields.get(k, k): v for k, v in rec.items()}
        f = form if form != "auto" else detect_format(rec)
        if f is None:
            keys = sorted(k for k in rec if k != "_line")
            raise DataError(
                f"{where}: cannot tell the record form from its fields {keys}; expected 'instruction' and "
                "'output' (instruction form), 'messages' (chat form) or 'text' (completion form)"
            )
        if f == "instruction":
            out.append(Example(messages=_instruction(rec, where), source=str(path), line=line))
        elif f == "chat":
            out.append(Example(messages=_chat(rec, where), source=str(path), line=line))
        elif f == "completion":
            out.append(Example(text=_need_str(rec, "text", where), source=str(path), line=line))
        else:
            raise DataError(f"{where}: unknown form {f!r}; expected one of {', '.join(FORMS)}")
    return out
