"""Record forms: instruction, chat messages, plain completion; all become one ``Example``.

An ``Example`` is either a conversation (``messages``, loss on the assistant turns only) or a plain
text (``text``, loss on every token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re
from pathlib import Path
from typing import Any, Literal

from .readers import DataError

__all__ = ["Example", "detect_format", "to_examples", "example_text", "FORMS"]

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


# other names for our fields, tried (case-insensitively) when the canonical field is absent
INSTRUCTION_ALIASES = ("instruction", "prompt", "question", "query", "input")
OUTPUT_ALIASES = ("output", "response", "answer", "completion", "target")
CONTEXT_ALIASES = ("input", "context")
MIN_HELD_INPUT = 16  # characters: a shorter input is appended even when the instruction ends with it
# dialogue files: the list field, the speaker and text keys of a turn, and speaker -> role
_DIALOGUE_ROLES = {
    "user": "user", "customer": "user", "human": "user", "client": "user",
    "system": "assistant", "assistant": "assistant", "agent": "assistant", "bot": "assistant",
    "gpt": "assistant", "model": "assistant",
}
_SKIPPED_SPEAKERS = {"action"}  # ABCD's logged agent actions are not turns of the conversation


def _find_key(rec: dict[str, Any], names: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str | None:
    lower = {k.lower(): k for k in rec if isinstance(k, str)}
    for n in names:
        k = lower.get(n)
        if k is not None and k not in exclude and rec[k] is not None:
            return k
    return None


def _dialogue_key(rec: dict[str, Any]) -> str | None:
    """The field holding the turns of an SGD-, Taskmaster- or ABCD-style dialogue, if any."""
    for key in ("turns", "utterances", "original", "dialogue", "dialog"):
        turns = rec.get(key)
        if isinstance(turns, list) and turns:
            t = turns[0]
            if isinstance(t, dict) and "speaker" in t and ("utterance" in t or "text" in t):
                return key
            if isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t):
                return key
    return None


def detect_format(record: dict[str, Any]) -> Form | None:
    """The form of one record, or None when no form fits.

    Besides our own field names it knows common others: ``prompt``/``response``,
    ``question``/``answer``, ``prompt``/``completion``, ``input``/``output``; self-instruct's
    ``instances`` list; and dialogue turns (SGD ``turns[{speaker, utterance}]``, Taskmaster
    ``utterances[{speaker, text}]``, ABCD ``original[[speaker, text]]``), read as chat.
    """
    if "messages" in record or "conversations" in record or _dialogue_key(record):
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if _find_key(record, INSTRUCTION_ALIASES) and (
            _find_key(record, OUTPUT_ALIASES) or isinstance(record.get("instances"), list)):
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


_TURN_MARK = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)


def _split_marked_turns(text: str) -> list[dict[str, str]] | None:
    """``[preamble] ### Human: a ### Assistant: b ### Human: c`` as messages (the OASST/QLoRA layout)."""
    marks = list(_TURN_MARK.finditer(text))
    if not marks or marks[0].group(1).lower() != "human":
        return None
    msgs = []
    preamble = text[: marks[0].start()].strip()
    if preamble:
        msgs.append({"role": "system", "content": preamble})
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        content = text[m.end():end].strip()
        role = "user" if m.group(1).lower() == "human" else "assistant"
        if content:
            msgs.append({"role": role, "content": content})
    return msgs if msgs and msgs[-1]["role"] == "user" else None


def _holds_input(instruction: str, inp: str) -> bool:
    """Whether the instruction already ends with the whole input, as OASST's ``prompt`` (a preamble
    and then the ``input``) does; the input is then not repeated. A short input found inside the
    instruction ("What is 12 times 3?" with input "3") is data of its own and is kept."""
    s = inp.strip()
    return s == instruction.strip() or (len(s) >= MIN_HELD_INPUT and instruction.rstrip().endswith(s))


def _instruction(rec: dict, where: str) -> list[list[dict[str, str]]]:
    """One conversation per (instruction, output) pair; self-instruct ``instances`` give several."""
    ikey = _find_key(rec, INSTRUCTION_ALIASES) or "instruction"
    instruction = _need_str(rec, ikey, where)
    if isinstance(rec.get("instances"), list) and _find_key(rec, OUTPUT_ALIASES) is None:
        pairs = []
        for j, inst in enumerate(rec["instances"]):
            if not isinstance(inst, dict):
                raise DataError(f"{where}: instances[{j}] must be an object with 'input' and 'output'")
            pairs.append((inst.get("input", ""), _need_str(inst, "output", f"{where}: instances[{j}]")))
        if not pairs:
            raise DataError(f"{where}: field 'instances' is empty; expected at least one {{input, output}}")
    else:
        okey = _find_key(rec, OUTPUT_ALIASES, exclude=(ikey,)) or "output"
        ckey = _find_key(rec, CONTEXT_ALIASES, exclude=(ikey, okey))
        pairs = [(rec.get(ckey, "") if ckey else "", _need_str(rec, okey, where))]
    system = rec.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    out = []
    for inp, output in pairs:
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
        user = instruction if not inp.strip() or _holds_input(instruction, inp) else f"{instruction}\n\n{inp}"
        turns = _split_marked_turns(user)
        msgs = turns if turns is not None else [{"role": "user", "content": user}]
        if head and msgs[0]["role"] == "system":
            msgs = msgs[1:]
        out.append(head + msgs + [{"role": "assistant", "content": output}])
    return out


def _dialogue(rec: dict, key: str, where: str) -> list[dict[str, str]]:
    """Dialogue turns as chat messages; consecutive turns of one speaker are joined."""
    out: list[dict[str, str]] = []
    for j, t in enumerate(rec[key]):
        if isinstance(t, dict):
            speaker, text = t.get("speaker"), t.get("utterance", t.get("text"))
        elif isinstance(t, list) and len(t) == 2:
            speaker, text = t
        else:
            raise DataError(f"{where}: {key}[{j}] must be a {{speaker, utterance}} object or a [speaker, text] pair")
        if not isinstance(speaker, str) or not isinstance(text, str):
            raise DataError(f"{where}: {key}[{j}]: speaker and text must be strings, got "
                            f"{type(speaker).__name__} and {type(text).__name__}")
        if speaker.lower() in _SKIPPED_SPEAKERS or not text.strip():
            continue
        role = _DIALOGUE_ROLES.get(speaker.lower())
        if role is None:
            raise DataError(f"{where}: {key}[{j}].speaker {speaker!r} is not known; expected one of "
                            f"{', '.join(sorted(_DIALOGUE_ROLES))}")
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n" + text
        else:
            out.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn with text in '{key}'; nothing to learn from")
    return out


def _chat(rec: dict, where: str) -> list[dict[str, str]]:
    if "messages" not in rec and "conversations" not in rec:
        key = _dialogue_key(rec)
        if key is not None:
            return _dialogue(rec, key, where)
    msgs = rec.get("messages", rec.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if isinstance(role, str):
            role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
        if not isinstance(role, str) or role not in ROLES:
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
    A record yields one example, except a self-instruct record with several ``instances``.
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
            out += [Example(messages=m, source=str(path), line=line) for m in _instruction(rec, where)]
        elif f == "chat":
            out.append(Example(messages=_chat(rec, where), source=str(path), line=line))
        elif f == "completion":
            out.append(Example(text=_need_str(rec, "text", where), source=str(path), line=line))
        else:
            raise DataError(f"{where}: unknown form {f!r}; expected one of {', '.join(FORMS)}")
    return out


def example_text(ex: Example) -> str:
    """All the text of an example (every message's content, one per line): what the checks read."""
    if ex.text is not None:
        return ex.text
    return "\n".join(m["content"] for m in ex.messages or [])
