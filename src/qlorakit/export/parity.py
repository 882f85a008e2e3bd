"""The parity check: golden prompts through the source model and through the exported artifact.

Golden prompts come from the run's held-out data. Both models answer them greedily; the check
reports the share of the leading answer tokens that agree (position by position), whether answers
stop at the same end-of-turn token, and the held-out loss of both on the same examples. It also
checks what makes exports go wrong silently in other tools: the artifact's own chat template must
render the golden conversations exactly as training did, its own tokenizer must give the same token
ids, it must stop at the training's end-of-turn token, and every weight must be finite.

A runner is anything with the :class:`Runner` methods; there is one for Hugging Face models
(the source, a merged folder, a PEFT adapter, a GGUF read back by transformers) and one for llama.cpp
through ``llama-cpp-python``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..config import ExportConfig
from ..data import IGNORE_INDEX, Row, no_pack
from .common import ExportError
from .source import Source, end_of_turn_ids

__all__ = [
    "Golden",
    "Runner",
    "HFRunner",
    "LlamaCppRunner",
    "SourceAnswers",
    "ParityReport",
    "golden_set",
    "source_answers",
    "check_parity",
    "token_agreement",
    "llama_cpp_available",
]


@dataclass
class Golden:
    conversations: list[list[dict[str, str]]]  # each up to (not including) the answer
    prompts: list[str]  # rendered with the training chat template, asking for the answer
    prompt_ids: list[list[int]]  # tokenized as in training
    rows: list[Row]  # held-out examples for the loss, one per row
    end_of_turn: int  # the token training ends answers with
    end_of_turn_text: str


def golden_set(source: Source, cfg: ExportConfig) -> Golden:
    """Golden prompts and loss rows from the run's held-out data (the same split training used)."""
    from ..data import prepare_data
    from ..models import chat_prompt

    tok = source.loaded.tokenizer
    data = prepare_data(source.recipe.data, tok, source.recipe.seed)
    convs: list[list[dict[str, str]]] = []
    for ex in data.val_examples:
        msgs = ex.messages or []
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last:
            convs.append([dict(m) for m in msgs[:last]])
        if len(convs) >= cfg.golden_prompts:
            break
    if not convs:
        raise ExportError(f"{source.run_dir}: the held-out data has no conversation with an answer to use as a "
                          "golden prompt")
    prompts = [chat_prompt(tok, c) for c in convs]
    ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    toks = data.val_tokens if cfg.loss_examples <= 0 else data.val_tokens[:cfg.loss_examples]
    rows = no_pack(toks, source.recipe.data.max_seq_len, tok.pad_token_id)
    eot = _training_end_of_turn(tok)
    return Golden(convs, prompts, ids, rows, eot, tok.convert_ids_to_tokens(eot))


def _training_end_of_turn(tok: Any) -> int:
    """The token the chat template closes an assistant turn with (eos when none of the known ones)."""
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    text = tok.apply_chat_template(conv, tokenize=False) if getattr(tok, "chat_template", None) else ""
    ids = list(tok(text, add_special_tokens=False)["input_ids"]) if text else []
    stops = end_of_turn_ids(tok)
    for i in reversed(ids):
        if i in stops:
            return i
    if not stops:
        raise ExportError("the tokenizer has no eos or end-of-turn token; answers could never stop")
    return stops[0]


class Runner(Protocol):
    name: str

    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        """Greedy continuation of ``ids``; the last token is the stop token when it stopped."""

    def forced(self, ids: list[int], answer: list[int]) -> list[int]:
        """The runtime's greedy choice at each position of ``answer``, given ``ids`` and the answer's
        tokens before that position (teacher forcing): one entry per answer token."""

    def loss(self, rows: list[Row]) -> float:
        """Mean cross-entropy per answer token over ``rows``."""

    def stop_ids(self) -> set[int]:
        """Tokens that end generation in this runtime."""

    def tokenize(self, text: str) -> list[int] | None:
        """The artifact's own tokenization of a templated prompt (None: it carries no tokenizer)."""

    def chat_template(self) -> str | None:
        """The chat template the artifact carries (None: it carries none)."""


def _row_loss(logits: torch.Tensor, labels: list[int]) -> tuple[float, int]:
    """Summed next-token cross-entropy of one row: logits (T, V) against labels shifted by one."""
    target = torch.tensor(labels[1:] + [IGNORE_INDEX], dtype=torch.long)
    keep = target != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return 0.0, 0
    return float(F.cross_entropy(logits.float()[keep], target[keep], reduction="sum")), n


class HFRunner:
    """A transformers causal LM (4-bit or not, with or without adapters)."""

    def __init__(self, name: str, model: torch.nn.Module, *, stop: list[int], autocast: torch.dtype | None = None,
                 tokenizer: Any = None, template: str | None = None, pad_id: int = 0):
        self.name = name
        self.model = model.eval()
        self._stop = list(stop)
        self._autocast = autocast
        self._tok = tokenizer
        self._template = template
        self._pad = pad_id

    def _ctx(self) -> Any:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self._autocast)

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        dev = next(self.model.parameters()).device
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        with self._ctx():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                      do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                                      eos_token_id=self._stop, pad_token_id=self._pad)
        new = out[0, len(ids):].tolist()
        for k, t in enumerate(new):  # generate pads after a stop in batches; keep up to the first stop
            if t in self._stop:
                return new[:k + 1]
        return new

    @torch.no_grad()
    def forced(self, ids: list[int], answer: list[int]) -> list[int]:
        if not answer:
            return []
        dev = next(self.model.parameters()).device
        x = torch.tensor([list(ids) + list(answer[:-1])], dtype=torch.long, device=dev)
        with self._ctx():
            logits = self.model(input_ids=x, use_cache=False).logits[0, len(ids) - 1:]
        return logits.float().argmax(-1).tolist()

    @torch.no_grad()
    def loss(self, rows: list[Row]) -> float:
        dev = next(self.model.parameters()).device
        total, count = 0.0, 0
        for r in rows:
            x = torch.tensor([r.input_ids], dtype=torch.long, device=dev)
            with self._ctx():
                logits = self.model(input_ids=x, use_cache=False).logits[0]
            s, n = _row_loss(logits.cpu(), r.labels)
            total += s
            count += n
        return total / max(1, count)

    def stop_ids(self) -> set[int]:
        return set(self._stop)

    def tokenize(self, text: str) -> list[int] | None:
        if self._tok is None:
            return None
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def chat_template(self) -> str | None:
        return self._template


def llama_cpp_available() -> bool:
    """True when llama-cpp-python imports (its shared library loads) in this environment."""
    import importlib

    try:
        importlib.import_module("llama_cpp")
    except (ImportError, OSError):
        return False
    return True


class LlamaCppRunner:
    """A GGUF file (and optionally a GGUF LoRA adapter over it) in llama.cpp."""

    def __init__(self, name: str, model_path: str, *, lora_path: str | None = None, n_ctx: int = 1024,
                 threads: int | None = None):
        try:
            import llama_cpp
        except ImportError as e:
            raise ExportError("the llama.cpp parity check needs llama-cpp-python: "
                              "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'qlorakit[gguf-check]'") from e
        self.name = name
        self._lc = llama_cpp
        try:
            self.llm = llama_cpp.Llama(model_path=model_path, lora_path=lora_path, n_ctx=n_ctx, n_batch=n_ctx,
                                       logits_all=True, n_threads=threads or os.cpu_count() or 1, verbose=False,
                                       seed=0)
        except (ValueError, RuntimeError) as e:
            what = f"{model_path}" + (f" with adapter {lora_path}" if lora_path else "")
            raise ExportError(f"llama.cpp could not load {what}: {e}") from e
        self.n_ctx = n_ctx

    def _is_eog(self, t: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.llm._model.vocab, t))

    def _last_logits(self) -> Any:
        return self.llm.scores[self.llm.n_tokens - 1]

    def greedy(self, ids: list[int], max_new: int) -> list[int]:
        if len(ids) + max_new > self.n_ctx:
            raise ExportError(f"golden prompt of {len(ids)} tokens + {max_new} does not fit n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(max_new):
            t = int(self._last_logits().argmax())
            out.append(t)
            if self._is_eog(t):
                break
            self.llm.eval([t])
        return out

    def forced(self, ids: list[int], answer: list[int]) -> list[int]:
        if not answer:
            return []
        seq = list(ids) + list(answer[:-1])
        if len(seq) > self.n_ctx:
            raise ExportError(f"golden prompt + answer of {len(seq)} tokens does not fit n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(seq)
        return [int(t) for t in self.llm.scores[len(ids) - 1:len(seq)].argmax(-1)]

    def loss(self, rows: list[Row]) -> float:
        total, count = 0.0, 0
        for r in rows:
            if len(r.input_ids) > self.n_ctx:
                raise ExportError(f"held-out row of {len(r.input_ids)} tokens does not fit n_ctx={self.n_ctx}")
            self.llm.reset()
            self.llm.eval(r.input_ids)
            logits = torch.from_numpy(self.llm.scores[:len(r.input_ids)].copy())
            s, n = _row_loss(logits, r.labels)
            total += s
            count += n
        return total / max(1, count)

    def stop_ids(self) -> set[int]:
        return {i for i in range(self.llm.n_vocab()) if self._is_eog(i)}

    def tokenize(self, text: str) -> list[int] | None:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def close(self) -> None:
        self.llm.close()


@dataclass
class SourceAnswers:
    name: str
    answers: list[list[int]]
    loss: float
    stop_ids: set[int]


def source_answers(runner: Runner, golden: Golden, cfg: ExportConfig) -> SourceAnswers:
    answers = [runner.greedy(ids, cfg.max_new_tokens) for ids in golden.prompt_ids]
    return SourceAnswers(runner.name, answers, runner.loss(golden.rows), runner.stop_ids())


def token_agreement(src: list[int], exp: list[int], n: int) -> tuple[int, int, int]:
    """(agreeing positions, compared positions, common prefix) over the first ``n`` tokens.

    Positions run to the longer of the two answers (both cut at ``n``): an answer that stops early
    or runs on counts as disagreeing there.
    """
    a, b = src[:n], exp[:n]
    width = max(len(a), len(b))
    agree = sum(1 for i in range(min(len(a), len(b))) if a[i] == b[i])
    prefix = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return agree, width, prefix


@dataclass
class ParityReport:
    artifact: str
    runtime: str
    source: str
    prompts: int
    agreement_tokens: int
    token_agreement: float
    prefix_agreement: float
    stops: dict[str, int]  # source_stopped, same (identical answer and stop), diverged_before_stop,
    # export_ended_with_eot (answers of the export that end with the training's end-of-turn token)
    source_loss: float
    export_loss: float
    loss_increase: float
    max_token_disagreement: float
    max_loss_increase: float
    template_ok: bool | None = None
    tokenizer_ok: bool | None = None
    failures: list[str] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    # teacher-forced: the export fed the source's greedy answer picks the same next token (the
    # "same top token" statistic of llama.cpp's KL-divergence tool); ``token_agreement`` above is
    # free-running, where the first near-tie that flips sends the rest of an answer elsewhere
    forced_agreement: float = 0.0
    forced_stops: dict[str, int] = field(default_factory=dict)  # source_stopped, export_stops_there

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}

    def summary(self) -> str:
        state = "passed" if self.passed else "FAILED"
        return (f"{self.artifact} [{self.runtime}]: {state}: next-token agreement {self.forced_agreement:.1%} "
                f"(teacher-forced; free-running {self.token_agreement:.1%}) over the first {self.agreement_tokens} "
                f"tokens of {self.prompts} prompts; ends where the source ends "
                f"{self.forced_stops.get('export_stops_there', 0)}/{self.forced_stops.get('source_stopped', 0)}; held-out loss "
                f"{self.source_loss:.4f} (source) vs {self.export_loss:.4f} (export), "
                f"{self.loss_increase:+.4f}; same stop {self.stops['same']}/{self.stops['source_stopped']}")


def _diff(want: str, got: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"first difference at character {i}: training {want[i:i + 40]!r}, export {got[i:i + 40]!r}"


def check_parity(artifact: str, runner: Runner, src: SourceAnswers, golden: Golden, cfg: ExportConfig, *,
                 max_token_disagreement: float, max_loss_increase: float, tokenizer: Any,
                 extra_failures: list[str] = ()) -> ParityReport:
    """Replay the golden prompts through ``runner`` and compare with the source's answers."""
    failures = list(extra_failures)

    template_ok: bool | None = None
    tmpl = runner.chat_template()
    if tmpl is not None:
        template_ok = True
        for conv, want in zip(golden.conversations, golden.prompts):
            got = tokenizer.apply_chat_template(conv, chat_template=tmpl, tokenize=False, add_generation_prompt=True)
            if got != want:
                template_ok = False
                failures.append(f"chat template: the export renders golden prompts differently from training "
                                f"({_diff(want, got)})")
                break

    tokenizer_ok: bool | None = None
    for text, want in zip(golden.prompts, golden.prompt_ids):
        got = runner.tokenize(text)
        if got is None:
            break
        tokenizer_ok = got == want
        if not tokenizer_ok:
            k = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
            failures.append(f"tokenizer: the export tokenizes a golden prompt differently from training (first "
                            f"difference at token {k}: {want[k:k + 4]} vs {got[k:k + 4]})")
            break

    stops = runner.stop_ids()
    if golden.end_of_turn not in stops:
        failures.append(f"stop tokens: the export does not stop at {golden.end_of_turn_text!r} (id "
                        f"{golden.end_of_turn}), the token training ends answers with; it would run on")

    n = cfg.agreement_tokens
    agree = width = prefix = 0
    f_agree = f_width = f_stopped = f_stops_there = 0
    stopped = same_stop = diverged = eot_ends = 0
    answers = []
    for k, (ids, s) in enumerate(zip(golden.prompt_ids, src.answers)):
        f = runner.forced(ids, s)
        if len(f) != len(s):
            raise ExportError(f"{runner.name}: teacher-forced replay gave {len(f)} tokens for an answer of {len(s)}")
        f_agree += sum(1 for i in range(min(n, len(s))) if f[i] == s[i])
        f_width += min(n, len(s))
        if s and s[-1] in src.stop_ids:
            f_stopped += 1
            f_stops_there += f[-1] == golden.end_of_turn or (f[-1] == s[-1] and f[-1] in stops)
        e = runner.greedy(ids, cfg.max_new_tokens)
        a, w, p = token_agreement(s, e, n)
        agree, width, prefix = agree + a, width + w, prefix + min(p, w)
        src_stop = bool(s) and s[-1] in src.stop_ids
        exp_stop = bool(e) and e[-1] in stops
        eot_ends += bool(e) and e[-1] == golden.end_of_turn
        if src_stop:
            stopped += 1
            if e[:len(s)] == s and exp_stop:
                same_stop += 1
            elif e[:len(s) - 1] == s[:-1]:  # same answer, different end: the classic run-on export
                failures.append(f"stop: golden prompt {k}: the export gives the same answer but does not end it "
                                f"with {golden.end_of_turn_text!r} (source ends with token {s[-1]}, export with "
                                f"{e[len(s) - 1] if len(e) >= len(s) else 'nothing'})")
            else:  # the answers parted before the end; where each stops says nothing about the stop token
                diverged += 1
        answers.append({"prompt": k, "agree": a, "compared": w, "common_prefix": p, "source_len": len(s),
                        "export_len": len(e), "source_stopped": src_stop, "export_stopped": exp_stop,
                        "forced_agree": sum(1 for i in range(min(n, len(s))) if f[i] == s[i])})
    agreement = agree / max(1, width)
    prefix_share = prefix / max(1, width)
    forced = f_agree / max(1, f_width)
    if 1.0 - forced > max_token_disagreement + 1e-12:
        failures.append(f"next-token agreement {forced:.1%} (teacher-forced on the source's answers) is below "
                        f"{1 - max_token_disagreement:.1%} (export.max_token_disagreement={max_token_disagreement:g})")
    if f_stopped and 1.0 - f_stops_there / f_stopped > max_token_disagreement + 1e-12:
        failures.append(f"stop: where the source ends its answer with {golden.end_of_turn_text!r}, the export ends it "
                        f"in only {f_stops_there} of {f_stopped} golden prompts (it would run on)")

    exp_loss = runner.loss(golden.rows)
    inc = exp_loss - src.loss
    if not math.isfinite(exp_loss):
        failures.append(f"held-out loss of the export is {exp_loss}")
    elif inc > max_loss_increase:
        failures.append(f"held-out loss rose by {inc:.4f} nats ({src.loss:.4f} -> {exp_loss:.4f}), more than "
                        f"export.max_loss_increase={max_loss_increase:g}")
    return ParityReport(artifact, runner.name, src.name, len(golden.prompt_ids), n, agreement, prefix_share,
                        {"source_stopped": stopped, "same": same_stop, "diverged_before_stop": diverged,
                         "export_ended_with_eot": eot_ends}, src.loss, exp_loss, inc,
                        max_token_disagreement, max_loss_increase, template_ok, tokenizer_ok, failures, answers,
                        forced, {"source_stopped": f_stopped, "export_stops_there": f_stops_there})
