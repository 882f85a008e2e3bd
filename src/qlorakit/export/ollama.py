"""An Ollama Modelfile whose template, system prompt and stop tokens are the ones the model was trained with.

Ollama renders prompts with Go templates, not the Jinja chat template of the tokenizer. The writer
recognises the training template's family by rendering probe conversations with it (ChatML is the
one handled: ``<|im_start|>role\\n...<|im_end|>\\n``, which SmolLM2 uses), extracts the default system
prompt the template inserts when a conversation has none (Ollama's ``SYSTEM``, which Ollama inserts
the same way), and then checks that the Go template, rendered by :func:`render_go_template`, gives
byte for byte what the training template gives on a set of conversations.

Parameters are those of qlorakit's own generation: greedy (temperature 0), no top-p cut and no
repetition penalty (Ollama's defaults are 0.8, 0.9 and 1.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .common import ExportError

__all__ = [
    "OllamaChat",
    "ollama_chat_for",
    "render_go_template",
    "render_ollama",
    "modelfile_text",
    "parse_modelfile",
    "probe_conversations",
    "template_mismatches",
]

CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")


@dataclass
class OllamaChat:
    family: str
    template: str  # Go template for Ollama's TEMPLATE
    system: str | None  # default system prompt (Ollama's SYSTEM), None when the template adds none
    stop: list[str] = field(default_factory=list)


def probe_conversations() -> list[list[dict[str, str]]]:
    """Conversations that exercise a chat template: with and without a system turn, several turns."""
    return [
        [{"role": "user", "content": "Where is my order #4411?"}],
        [{"role": "system", "content": "You answer for Fernhill Cycles."},
         {"role": "user", "content": "Do you repair e-bikes?\nAnd folding bikes?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Opening hours on Sunday?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  spaces  "},
         {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Thanks"}],
    ]


def _hf_render(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    kw = {"chat_template": template} if template is not None else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def _chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_chat_for(tokenizer: Any) -> OllamaChat:
    """The Ollama template, system prompt and stops equivalent to ``tokenizer``'s chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError("ollama export: the tokenizer has no chat template to translate")
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        bare = _hf_render(tokenizer, [{"role": "user", "content": "\x01"}])
        m = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n\x01<\|im_end\|>\n"
                         r"<\|im_start\|>assistant\n", bare, flags=re.S)
        system = m.group(1) if m else None
        chat = OllamaChat("chatml", CHATML_TEMPLATE, system, ["<|im_end|>"])
        bad = template_mismatches(tokenizer, chat)
        if not bad:
            return chat
        raise ExportError("ollama export: the chat template uses ChatML tokens but renders differently from "
                          f"ChatML ({bad[0]}); translate it by hand")
    raise ExportError("ollama export: the chat template is not ChatML (<|im_start|>/<|im_end|>), the family "
                      "this writer translates to a Go template")


def template_mismatches(tokenizer: Any, chat: OllamaChat, template: str | None = None,
                        conversations: list[list[dict[str, str]]] | None = None) -> list[str]:
    """Where the Go template's rendering differs from the training template's (empty when equal)."""
    out = []
    for conv in conversations or probe_conversations():
        want = _hf_render(tokenizer, conv)
        got = render_ollama(template if template is not None else chat.template, chat.system, conv)
        if got != want:
            out.append(f"conversation {conv[-1]['content'][:30]!r}: {_first_difference(want, got)}")
    return out


def _first_difference(want: str, got: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"first difference at character {i}: training {want[i:i + 40]!r}, export {got[i:i + 40]!r}"


# ------------------------------------------------------------------------------ a tiny Go template engine

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)


def _parse(template: str) -> list[Any]:
    """Text and actions, with ``{{-`` / ``-}}`` whitespace trimming applied (Go's rules)."""
    parts: list[Any] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            parts.append(text)
        parts.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    if trim_next:
        tail = tail.lstrip(" \t\r\n")
    if tail:
        parts.append(tail)
    return parts


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render the subset of Go templates the writer emits: text, ``.Field``, ``range .Messages``/``end``,
    ``if .Field``/``else``/``end``. Anything else is an error rather than a guess."""
    parts = _parse(template)
    out, i = _run(parts, 0, data, stop=False)
    if i != len(parts):
        raise ExportError("Go template: unexpected {{ end }}")
    return out


def _lookup(expr: str, scope: dict[str, Any]) -> Any:
    if not re.fullmatch(r"\.[A-Za-z_]\w*", expr):
        raise ExportError(f"Go template: unsupported expression {{{{ {expr} }}}}")
    return scope.get(expr[1:], "")


def _run(parts: list[Any], i: int, scope: dict[str, Any], stop: bool) -> tuple[str, int]:
    out: list[str] = []
    while i < len(parts):
        p = parts[i]
        if isinstance(p, str):
            out.append(p)
            i += 1
            continue
        act = p[1]
        if act in ("end", "else"):
            if not stop:
                raise ExportError(f"Go template: unexpected {{{{ {act} }}}}")
            return "".join(out), i
        if act.startswith("range "):
            items = _lookup(act[6:].strip(), scope) or []
            body_end = _skip(parts, i + 1)
            for item in items:
                text, _ = _run(parts, i + 1, {**scope, **{k.capitalize(): v for k, v in item.items()}}, stop=True)
                out.append(text)
            i = body_end + 1
            continue
        if act.startswith("if "):
            cond = bool(_lookup(act[3:].strip(), scope))
            then_text, j = _run(parts, i + 1, scope, stop=True)
            else_text = ""
            if parts[j][1] == "else":
                else_text, j = _run(parts, j + 1, scope, stop=True)
            out.append(then_text if cond else else_text)
            i = j + 1
            continue
        out.append(str(_lookup(act, scope)))
        i += 1
    if stop:
        raise ExportError("Go template: missing {{ end }}")
    return "".join(out), i


def _skip(parts: list[Any], i: int) -> int:
    """Index of the ``end`` that closes the block starting at ``i``."""
    depth = 0
    while i < len(parts):
        p = parts[i]
        if not isinstance(p, str):
            if p[1].startswith(("range ", "if ")):
                depth += 1
            elif p[1] == "end":
                if depth == 0:
                    return i
                depth -= 1
        i += 1
    raise ExportError("Go template: missing {{ end }}")


def render_ollama(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """The prompt Ollama builds for a chat request: its SYSTEM goes first when the request has none."""
    msgs = list(messages)
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return render_go_template(template, {"Messages": msgs})


# ------------------------------------------------------------------------------------------ Modelfile


def _quote(text: str) -> str:
    if '"""' in text:
        raise ExportError('Modelfile: text contains """ and cannot be quoted')
    return f'"""{text}"""'


def modelfile_text(chat: OllamaChat, gguf_name: str, *, num_ctx: int, source: str, licence: str | None = None) -> str:
    lines = [
        f"# Ollama Modelfile for {source}, written by qlorakit export.",
        "# TEMPLATE, SYSTEM and stop tokens reproduce the chat template the model was trained with;",
        "# the parameters are qlorakit's greedy generation. Create with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quote(chat.template)}",
    ]
    if chat.system:
        lines.append(f"SYSTEM {_quote(chat.system)}")
    lines += [f'PARAMETER stop "{s}"' for s in chat.stop]
    lines += ["PARAMETER temperature 0", "PARAMETER top_p 1", "PARAMETER top_k 0", "PARAMETER repeat_penalty 1",
              f"PARAMETER num_ctx {num_ctx}"]
    if licence:
        lines.append(f"LICENSE {_quote(licence)}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, TEMPLATE, SYSTEM, LICENSE and PARAMETERs of a Modelfile (the subset the writer emits)."""
    out: dict[str, Any] = {"from": None, "template": None, "system": None, "license": None, "parameters": {}}
    pos = 0
    line_no = 1
    tok = re.compile(r'[ \t]*(#[^\n]*\n|\n|(\w+)[ \t]+("""(.*?)"""|"([^"\n]*)"|[^\n]*)[ \t]*(\n|$))', re.S)
    while pos < len(text):
        m = tok.match(text, pos)
        if not m:
            raise ExportError(f"Modelfile line {line_no}: cannot parse {text[pos:pos + 40]!r}")
        if m.group(2):
            cmd = m.group(2).upper()
            val = m.group(4) if m.group(4) is not None else (m.group(5) if m.group(5) is not None else m.group(3).strip())
            if cmd == "PARAMETER":
                key, _, v = val.partition(" ")
                v = v.strip()
                v = v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v
                out["parameters"].setdefault(key, []).append(v)
            elif cmd in ("FROM", "TEMPLATE", "SYSTEM", "LICENSE"):
                out[cmd.lower()] = val
            else:
                raise ExportError(f"Modelfile line {line_no}: unexpected instruction {cmd}")
        line_no += m.group(0).count("\n")
        pos = m.end()
    return out
