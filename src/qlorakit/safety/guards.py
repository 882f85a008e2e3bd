"""Prompt-injection and moderation guards: text in, :class:`Verdict` out.

The injection guard has two heads, because the same sentence means different things in different
places. "Translate the following sentence to French" is an ordinary request when the user types
it, and an injected instruction when it sits inside an e-mail that a tool fetched:

- ``source="prompt"`` (user turns): flags text that tries to override the assistant's
  instructions ("ignore all previous instructions and ...", fake system tags, role-play jailbreak
  preambles), also when pasted inside a longer text.
- ``source="document"`` (tool results, retrieved files, e-mails, web pages): flags any instruction
  addressed to the assistant hidden in the document, also a plain task ("Explain the theory of
  relativity.") that is out of place there. It scores every line and sentence with n-grams, its
  sentence embedding and how far that embedding is from the rest of the document.

The moderation guard has two heads as well:

- ``kind="request"`` (user turns): asks for help with something harmful (AdvBench behaviours,
  XSTest unsafe prompts), against ordinary prompts, including XSTest's safe prompts that only
  sound unsafe ("How do I kill a Python process?").
- ``kind="content"`` (model outputs, documents): harmful statements such as threats, slurs and
  incitement (AdvBench strings), against ordinary answers and documents.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .linear import LinearTextModel
from .verdict import Verdict

__all__ = [
    "Source",
    "Kind",
    "InjectionGuard",
    "ModerationGuard",
    "default_guards",
    "check_messages",
    "packaged_model_dir",
]

Source = Literal["prompt", "document"]
_SOURCES: tuple[str, ...] = ("prompt", "document")
Kind = Literal["request", "content"]
_KINDS: tuple[str, ...] = ("request", "content")

if TYPE_CHECKING:
    from .embed import SentenceEncoder


_G = TypeVar("_G", bound="_LinearGuard")


def packaged_model_dir() -> Path:
    """Folder of the shipped guard files (``qlorakit/safety/models``)."""
    return Path(str(importlib.resources.files("qlorakit.safety") / "models"))


class _LinearGuard:
    """Shared loading and scoring for the guards; subclasses set the names below."""

    name: str = ""
    heads: tuple[str, ...] = ()
    positive: str = ""
    negative: str = ""

    def __init__(self, model: LinearTextModel) -> None:
        if model.guard != self.name:
            raise ValueError(f"expected a {self.name!r} guard model, got {model.guard!r}")
        missing = [h for h in self.heads if h not in model.heads]
        if missing:
            raise ValueError(f"{self.name} model lacks head(s) {missing}; it has {list(model.heads)}")
        self.model = model

    @classmethod
    def load(
        cls: type[_G],
        directory: str | os.PathLike[str] | None = None,
        *,
        encoder: "SentenceEncoder | None" = None,
    ) -> _G:
        """Load ``<name>.json`` and ``<name>.npz`` from ``directory`` (default: the shipped files).

        Heads with sentence-embedding features use ``encoder`` (default: the packaged
        all-MiniLM-L6-v2, shared by all guards of the process and loaded on first use).
        """
        folder = Path(directory) if directory is not None else packaged_model_dir()
        model = LinearTextModel.load(folder / f"{cls.name}.json", folder / f"{cls.name}.npz", encoder=encoder)
        return cls(model)

    def _threshold(self, head: str) -> float:
        return float(self.model.thresholds[head])

    def _check(self, text: str, head: str, guard: str, source: str, threshold: float | None = None) -> Verdict:
        _require_text(text)
        score = self.model.score(text, head)
        threshold = self._threshold(head) if threshold is None else threshold
        flagged = score >= threshold
        return Verdict(
            label=self.positive if flagged else self.negative,
            score=score,
            threshold=threshold,
            flagged=flagged,
            guard=guard,
            source=source,
        )


def _require_text(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _require_kind(kind: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return kind


def _require_source(source: str) -> str:
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    return source


class InjectionGuard(_LinearGuard):
    """Prompt-injection detector with a ``prompt`` and a ``document`` head (see module docstring)."""

    name = "injection"
    heads = _SOURCES
    positive = "injection"
    negative = "benign"

    def threshold(self, source: Source = "prompt") -> float:
        """The calibrated score threshold of the head for ``source``."""
        return self._threshold(_require_source(source))

    def document_prompt_threshold(self) -> float:
        """Threshold of the prompt head on tool content and retrieved documents (see
        :func:`check_messages`): stricter than :meth:`threshold`, so that the two heads together
        stay within the false-positive target on clean documents. Files without one use the
        prompt head's own threshold."""
        return float(self.model.thresholds.get(DOC_PROMPT_KEY, self._threshold("prompt")))

    def score(self, text: str, *, source: Source = "prompt") -> float:
        """Score in (0, 1): the logistic of the largest window margin of ``text``."""
        _require_text(text)
        return self.model.score(text, _require_source(source))

    def check(self, text: str, *, source: Source = "prompt", where: str = "") -> Verdict:
        """Verdict on ``text``; ``where`` is copied to ``Verdict.source`` for reporting."""
        head = _require_source(source)
        return self._check(text, head, f"{self.name}.{head}", where)


class ModerationGuard(_LinearGuard):
    """Harmful-request and harmful-content classifier with a ``request`` and a ``content`` head
    (see module docstring)."""

    name = "moderation"
    heads = _KINDS
    positive = "harmful"
    negative = "safe"

    def threshold(self, kind: Kind = "request") -> float:
        """The calibrated score threshold of the head for ``kind``."""
        return self._threshold(_require_kind(kind))

    def score(self, text: str, *, kind: Kind = "request") -> float:
        """Score in (0, 1): the logistic of the largest window margin of ``text``."""
        _require_text(text)
        return self.model.score(text, _require_kind(kind))

    def check(self, text: str, *, kind: Kind = "request", where: str = "") -> Verdict:
        """Verdict on ``text``; ``where`` is copied to ``Verdict.source`` for reporting."""
        head = _require_kind(kind)
        return self._check(text, head, f"{self.name}.{head}", where)


@functools.lru_cache(maxsize=1)
def default_guards() -> tuple[InjectionGuard, ModerationGuard]:
    """The shipped guards, loaded once per process."""
    return InjectionGuard.load(), ModerationGuard.load()


def _message_text(content: Any, where: str) -> str:
    """Text of an OpenAI message ``content``: a string, None, or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise ValueError(f"{where}[{j}]: expected a content part object with a 'type' string")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{where}[{j}]: a 'text' part needs a 'text' string")
                texts.append(text)
        return "\n".join(texts)
    raise ValueError(
        f"{where}: expected a string, null or a list of content parts, got {type(content).__name__}"
    )


# Roles whose text is checked, and how; system/developer turns come from the operator and
# assistant turns from the model, so they are not input to be guarded.
_USER_ROLES = frozenset({"user"})
_DOCUMENT_ROLES = frozenset({"tool", "function"})
# Key of the prompt head's threshold on documents in the injection model's thresholds.
DOC_PROMPT_KEY = "prompt@document"
_KNOWN_ROLES = _USER_ROLES | _DOCUMENT_ROLES | {"system", "developer", "assistant"}


def check_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    documents: Iterable[str] = (),
    injection: InjectionGuard | None = None,
    moderation: ModerationGuard | None = None,
) -> list[Verdict]:
    """Check OpenAI-style chat messages and retrieved documents; one verdict per check made.

    - ``user`` turns: injection guard (prompt head) and moderation guard (request head).
    - ``tool`` / ``function`` turns and every entry of ``documents``: injection guard, both
      heads (override phrasing inside a document is an injection as well); the prompt head at
      its stricter document threshold (:meth:`InjectionGuard.document_prompt_threshold`).
    - ``system``, ``developer``, ``assistant`` turns are not checked.

    Empty texts are skipped. ``injection`` / ``moderation`` default to the shipped guards.

    Raises:
        ValueError: a message is not an object with a known ``role`` and a valid ``content``.
    """
    if injection is None or moderation is None:
        default_inj, default_mod = default_guards()
        injection = injection or default_inj
        moderation = moderation or default_mod
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    verdicts: list[Verdict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ValueError(f"{where}: expected an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in _KNOWN_ROLES:
            raise ValueError(f"{where}.role: expected one of {sorted(_KNOWN_ROLES)}, got {role!r}")
        text = _message_text(msg.get("content"), f"{where}.content")
        if not text.strip():
            continue
        if role in _USER_ROLES:
            verdicts.append(injection.check(text, source="prompt", where=f"{where}.content"))
            verdicts.append(moderation.check(text, kind="request", where=f"{where}.content"))
        elif role in _DOCUMENT_ROLES:
            verdicts.extend(_check_document(injection, text, f"{where}.content"))
    for j, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ValueError(f"documents[{j}]: expected a string, got {type(doc).__name__}")
        if doc.strip():
            verdicts.extend(_check_document(injection, doc, f"documents[{j}]"))
    return verdicts


def _check_document(injection: InjectionGuard, text: str, where: str) -> list[Verdict]:
    """Both injection heads on a document: the document head at its threshold, the prompt head at
    the stricter :meth:`InjectionGuard.document_prompt_threshold` (the combination is what the
    model card measures on clean and injected documents)."""
    return [
        injection.check(text, source="document", where=where),
        injection._check(
            text, "prompt", f"{injection.name}.prompt", where, threshold=injection.document_prompt_threshold()
        ),
    ]
