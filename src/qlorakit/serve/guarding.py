"""The server's guard policy: which :mod:`qlorakit.safety` checks run, and what a flag does.

Three checks, each ``block``, ``flag`` or ``off`` in the config:

- ``input_injection``: the injection guard on user turns (prompt head) and on tool/function turns,
  which is where documents supplied with a request go (document and prompt heads, so instructions
  hidden in a fetched e-mail or web page are caught); on the ``prompt`` of ``/v1/completions``.
- ``input_harmful``: the moderation guard's request head on user turns and completion prompts.
- ``output_harmful``: the moderation guard's content head on the answer.

``block`` on input answers 400 ``content_policy_violation`` (nothing is generated); ``block`` on
output replaces the answer with :data:`OUTPUT_REFUSAL` and sets ``finish_reason`` to
``"content_filter"`` (a stream stops there: text is released only after the check has passed).
``flag`` answers normally and records the verdict in the audit log and in the
``X-Qlorakit-Guard`` response header. Every verdict, flagged or not, goes to the audit log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Guards

__all__ = ["GuardPolicy", "GuardOutcome", "OUTPUT_REFUSAL"]

OUTPUT_REFUSAL = "[The answer was withheld by the content filter.]"

# safety guard names -> the config setting that governs them
_CHECK_OF = {"injection.prompt": "input_injection", "injection.document": "input_injection",
             "moderation.request": "input_harmful", "moderation.content": "output_harmful"}


@dataclass
class GuardOutcome:
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # Verdict.to_dict() + check + action
    blocked: list[str] = field(default_factory=list)  # checks that block this request
    flagged: list[str] = field(default_factory=list)  # checks that only flag it

    def merge(self, other: GuardOutcome) -> GuardOutcome:
        return GuardOutcome(self.verdicts + other.verdicts, sorted(set(self.blocked + other.blocked)),
                            sorted(set(self.flagged + other.flagged)))

    @property
    def action(self) -> str:
        return "blocked" if self.blocked else "flagged" if self.flagged else ""


class GuardPolicy:
    """Loads the shipped guards that some check needs; applies the configured actions."""

    def __init__(self, guards: Guards) -> None:
        self.actions = {"input_injection": guards.input_injection, "input_harmful": guards.input_harmful,
                        "output_harmful": guards.output_harmful}
        self.injection = self.moderation = None
        if any(a != "off" for a in self.actions.values()):
            from ..safety import InjectionGuard, ModerationGuard

            self.injection = InjectionGuard.load()
            self.moderation = ModerationGuard.load()
            # the heads' encoders load now, at startup, not inside the first request that needs them
            # (the request head's is the packaged chat model's first layers: seconds to load)
            for guard, on in ((self.injection, guards.input_injection != "off"),
                              (self.moderation, guards.input_harmful != "off")):  # the content head has none
                if on and guard.model.dense is not None:
                    guard.model.dense_encoder()

    def _outcome(self, verdicts: list[Any]) -> GuardOutcome:
        out = GuardOutcome()
        for v in verdicts:
            check = _CHECK_OF[v.guard]
            action = self.actions[check]
            if action == "off":
                continue
            d = v.to_dict() | {"check": check, "action": action if v.flagged else "pass"}
            out.verdicts.append(d)
            if v.flagged:
                (out.blocked if action == "block" else out.flagged).append(check)
        out.blocked, out.flagged = sorted(set(out.blocked)), sorted(set(out.flagged))
        return out

    def _input_on(self) -> bool:
        return self.actions["input_injection"] != "off" or self.actions["input_harmful"] != "off"

    def check_messages(self, messages: Sequence[Mapping[str, Any]]) -> GuardOutcome:
        """Input checks on chat messages (plain ``role``/``content`` string dicts)."""
        if not self._input_on():
            return GuardOutcome()
        from ..safety import check_messages

        return self._outcome(check_messages(messages, injection=self.injection, moderation=self.moderation))

    def check_prompt(self, prompt: str) -> GuardOutcome:
        """Input checks on a ``/v1/completions`` prompt (read as a user turn)."""
        if not self._input_on() or not prompt.strip():
            return GuardOutcome()
        assert self.injection is not None and self.moderation is not None  # loaded when any check is on
        return self._outcome([self.injection.check(prompt, source="prompt", where="prompt"),
                              self.moderation.check(prompt, kind="request", where="prompt")])

    def check_output(self, text: str) -> GuardOutcome:
        if self.actions["output_harmful"] == "off" or not text.strip():
            return GuardOutcome()
        assert self.moderation is not None
        return self._outcome([self.moderation.check(text, kind="content", where="answer")])
