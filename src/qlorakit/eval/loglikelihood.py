"""Log-likelihood of continuations given a context, computed the way lm-evaluation-harness does.

Tokenisation follows lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the
front of the continuation, the context and the joined text are encoded separately, and the
continuation's tokens are the joined encoding past the length of the context's encoding. The
model input is ``context_ids + continuation_ids[:-1]`` and the score of a continuation is the sum
of the log-probabilities of its tokens.

All continuations of one item share the same context tokens. With ``strategy="shared_prefix"``
(Hugging Face-style models that take ``position_ids`` and return a key/value cache) a batch of
contexts runs once, right-padded, and then every continuation runs on top of its own context's
cache rows, with explicit positions. Single-token continuations (MMLU letters) need only the
context forward. ``strategy="concat"`` works with any model that takes
``input_ids``/``attention_mask`` and returns ``.logits``: one right-padded row of
``context + continuation[:-1]`` per continuation. Items are batched across, longest first, under
a token budget. ``"auto"`` checks once, on the first item, that the shared-prefix path gives
the concat path's numbers (fp32) and falls back to concat when it does not or cannot run.

Padded widths are rounded up to a few values per doubling (within the model's length): a multiple
of an eighth of the width's power of two, at most ``width_multiple``, so padding adds under an
eighth. On CPUs oneDNN compiles and keeps kernels for every bf16 matmul shape it meets, and a width
per item made an evaluation's memory grow with every new length (measured on the packaged model,
40 items of 80-500 tokens, shared prefix, 256-token batches: the process's peak rose by 700 MB, most
of it heap fragmented around the kept kernels; rounded as here, by 350 MB. A fixed multiple of 32
did a little better there, 270 MB, but made short items a third longer: HellaSwag's 1,000 items took
208 s, against 149 s unrounded and 153 s rounded as here, on an AMD EPYC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import inspect
import logging

import torch
import torch.nn.functional as F

from qlorakit.eval.precision import autocast_context, resolve_precision

__all__ = ["ContinuationScore", "LoglikelihoodScorer", "encode_pair", "model_device", "model_max_length"]

log = logging.getLogger("qlorakit.eval")

Strategy = Literal["auto", "shared_prefix", "concat"]
_DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_TOKENS = 4096  # padded tokens per forward (its logits: tokens x vocabulary values)
WIDTH_MULTIPLE = 32  # the largest step padded widths are rounded up to (see the module text)


def width_step(n: int, largest: int = WIDTH_MULTIPLE) -> int:
    """The step a width of ``n`` tokens is rounded up to: an eighth of its power of two (1 below 16),
    at most ``largest``; eight widths per doubling."""
    return max(1, min(largest, 1 << max(0, n.bit_length() - 4)))


@dataclass(frozen=True)
class ContinuationScore:
    """Score of one continuation: summed log-probability, its token count, and whether greedy
    decoding would have produced exactly these tokens."""

    logprob: float
    n_tokens: int
    is_greedy: bool


def _encode(tokenizer: Any, text: str, add_special_tokens: bool | None) -> list[int]:
    if add_special_tokens is None:
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def prefix_token_id(tokenizer: Any) -> int:
    """Token that stands in for an empty context (BOS, else EOS), as lm-eval uses."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has neither bos_token_id nor eos_token_id; cannot score an empty context")


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, add_special_tokens: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` as lm-eval's causal ``_encode_pair`` makes them.

    ``add_special_tokens=None`` uses the tokenizer's default, as lm-eval does when
    ``add_bos_token`` is unset. An empty context becomes the prefix token (BOS, else EOS).
    """
    if not continuation:
        raise ValueError("continuation must be a non-empty string")
    if context == "":
        return [prefix_token_id(tokenizer)], _encode(tokenizer, continuation, add_special_tokens)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    context_enc = _encode(tokenizer, context, add_special_tokens)
    return context_enc, whole[len(context_enc):]


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU when it has none)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_max_length(model: Any, tokenizer: Any | None = None) -> int:
    """Longest sequence the model accepts: ``config.max_position_embeddings``, else the
    tokenizer's ``model_max_length`` when it is a real number, else 2048."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    if isinstance(value, int) and value > 0:
        return value
    tok_value = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_value, int) and 0 < tok_value < 1_000_000:
        return tok_value
    return _DEFAULT_MAX_LENGTH


def _forward_params(model: Any) -> set[str]:
    """Parameter names of the forward of ``model`` or of the model it wraps (PEFT)."""
    names: set[str] = set()
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is None:
            continue
        try:
            names |= set(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError):
            continue
    return names


def _cache_of(out: Any) -> Any:
    for attr in ("cache", "past_key_values"):
        value = getattr(out, attr, None)
        if value is not None:
            return value
    return None


class LoglikelihoodScorer:
    """Scores continuations of contexts with a causal LM.

    ``model(input_ids=LongTensor[B, T], attention_mask=LongTensor[B, T])`` must return an object
    with ``.logits`` of shape ``[B, T, V]``. ``precision`` is ``"auto"`` (bf16 autocast where the
    hardware has native bf16), ``"bf16"`` or ``"fp32"``. ``batch_tokens`` bounds the padded tokens
    of one forward.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        precision: str = "auto",
        strategy: Strategy = "auto",
        max_length: int | None = None,
        add_special_tokens: bool | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        width_multiple: int = WIDTH_MULTIPLE,
    ) -> None:
        if strategy not in ("auto", "shared_prefix", "concat"):
            raise ValueError(f"strategy must be 'auto', 'shared_prefix' or 'concat', got {strategy!r}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if width_multiple < 1:
            raise ValueError(f"width_multiple must be >= 1, got {width_multiple}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model_device(model)
        self.precision = resolve_precision(precision, self.device)
        self.strategy: Strategy = strategy
        self.max_length = max_length if max_length is not None else model_max_length(model, tokenizer)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        self.add_special_tokens = add_special_tokens
        self.batch_tokens = batch_tokens
        self.width_multiple = width_multiple
        self.tokens_processed = 0  # real (unpadded) tokens fed through the model
        params = _forward_params(model)
        self._cache_kw = "cache" if "cache" in params else ("past_key_values" if "past_key_values" in params else None)
        self._has_positions = "position_ids" in params
        self._checked = strategy != "auto"

    # ----------------------------------------------------------------------------------- public
    def encode_group(self, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Context ids and continuation ids of one item, as lm-eval encodes them."""
        if not continuations:
            raise ValueError("continuations must not be empty")
        pairs = [encode_pair(self.tokenizer, context, c, add_special_tokens=self.add_special_tokens) for c in continuations]
        # lm-eval encodes the context once per pair; it is the same text, so the same ids
        return pairs[0][0], [cont for _, cont in pairs]

    def score(self, context: str, continuations: Sequence[str]) -> list[ContinuationScore]:
        """Scores of every continuation of ``context`` (one item's choices)."""
        return self.score_many([(context, continuations)])[0]

    def score_many(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        """``score`` over many ``(context, continuations)`` groups, batched; results in order."""
        return self.score_token_groups([self.encode_group(c, conts) for c, conts in groups])

    def score_tokens(self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[ContinuationScore]:
        """Scores of token continuations of ``context_ids``."""
        return self.score_token_groups([(context_ids, continuations)])[0]

    @torch.no_grad()
    def score_token_groups(self, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> list[list[ContinuationScore]]:
        """Scores of many ``(context_ids, [continuation_ids, ...])`` groups, in order."""
        prepared = [self._prepare(i, ctx, conts) for i, (ctx, conts) in enumerate(groups)]
        if not prepared:
            return []
        strategy = self.strategy
        if not self._checked:
            multi = [p for p in prepared if max(len(c) for c in p[1]) > 1]
            if multi:
                self._self_check(multi[0])
                strategy = self.strategy
            else:  # one-token continuations never touch the cache: no check needed yet
                strategy = "shared_prefix" if self._cache_kw is not None and self._has_positions else "concat"
        results: list[list[ContinuationScore] | None] = [None] * len(prepared)
        # longest first: similar lengths share a batch, and a too-large batch fails early
        order = sorted(range(len(prepared)), key=lambda i: -(len(prepared[i][0]) + max(len(c) for c in prepared[i][1])))
        with autocast_context(self.precision, self.device):
            for batch in self._batches(order, prepared):
                scored = self._run([prepared[i] for i in batch], strategy)
                for i, s in zip(batch, scored):
                    results[i] = s
        return results  # type: ignore[return-value]

    # --------------------------------------------------------------------------------- private
    def _prepare(self, index: int, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
        if not context_ids:
            raise ValueError(f"group {index}: context_ids must not be empty (use the prefix token for an empty context)")
        conts = [list(c) for c in continuations]
        if not conts:
            raise ValueError(f"group {index}: no continuations")
        for j, c in enumerate(conts):
            if not c:
                raise ValueError(f"group {index}: continuation {j} has no tokens")
        longest = max(len(c) for c in conts)
        if longest > self.max_length:
            raise ValueError(f"group {index}: a continuation has {longest} tokens, more than max_length={self.max_length}")
        # keep the end of the context so that context + continuation[:-1] fits, as lm-eval truncates
        room = self.max_length - (longest - 1)
        return list(context_ids)[-room:], conts

    def _batches(self, order: list[int], prepared: list[tuple[list[int], list[list[int]]]]) -> list[list[int]]:
        batches: list[list[int]] = []
        cur: list[int] = []
        width = rows = 0
        for i in order:
            ctx, conts = prepared[i]
            w = max(width, len(ctx) + max(len(c) for c in conts) - 1)
            r = rows + len(conts)
            if cur and r * w > self.batch_tokens:
                batches.append(cur)
                cur, w, r = [], len(ctx) + max(len(c) for c in conts) - 1, len(conts)
            cur.append(i)
            width, rows = w, r
        if cur:
            batches.append(cur)
        return batches

    def _self_check(self, group: tuple[list[int], list[list[int]]]) -> None:
        """Decide ``auto``: use shared_prefix only if it reproduces concat on one item (fp32)."""
        self._checked = True
        before = self.tokens_processed
        if self._cache_kw is None or not self._has_positions:
            self.strategy = "concat"
            return
        try:
            shared = self._run([group], "shared_prefix")[0]
        except (TypeError, ValueError, RuntimeError, AttributeError) as e:
            log.info("shared-prefix scoring unavailable for %s (%s); using concat", type(self.model).__name__, e)
            self.strategy = "concat"
            return
        plain = self._run([group], "concat")[0]
        worst = max(abs(a.logprob - b.logprob) for a, b in zip(shared, plain))
        if worst > 1e-3 * max(1.0, max(abs(b.logprob) for b in plain)):
            # expected at bf16 on 4-bit layers (other kernel shapes round differently): concat is
            # the lm-eval way of scoring, only slower, so this is a choice to report, not a problem
            log.info("shared-prefix scoring differs from concat by %.3g on %s; using concat", worst, type(self.model).__name__)
            self.strategy = "concat"
        else:
            self.strategy = "shared_prefix"
        self.tokens_processed = before

    def _run(self, groups: list[tuple[list[int], list[list[int]]]], strategy: str) -> list[list[ContinuationScore]]:
        if strategy == "shared_prefix":
            if self._cache_kw is None:
                raise TypeError(f"{type(self.model).__name__}.forward takes no cache argument; use strategy='concat'")
            return self._score_shared_prefix(groups)
        return self._score_concat(groups)

    def _gather(self, logits: torch.Tensor, cont: list[int]) -> ContinuationScore:
        """``logits`` [L, V] are the predictions for the L continuation tokens."""
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(cont, dtype=torch.long, device=logprobs.device)
        token_lp = logprobs.gather(-1, target[:, None]).squeeze(-1)  # (L,)
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return ContinuationScore(float(token_lp.sum()), len(cont), greedy)

    def _score_shared_prefix(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[ContinuationScore]]:
        pad = self._pad_id()
        n_ctx = self._width(max(len(ctx) for ctx, _ in groups), 0)
        ids = torch.full((len(groups), n_ctx), pad, dtype=torch.long, device=self.device)  # (B, Tc) right padded
        ctx_mask = torch.zeros_like(ids)
        for g, (ctx, _) in enumerate(groups):
            ids[g, : len(ctx)] = torch.tensor(ctx, dtype=torch.long)
            ctx_mask[g, : len(ctx)] = 1
        out = self.model(input_ids=ids, attention_mask=ctx_mask, use_cache=True)
        self.tokens_processed += sum(len(ctx) for ctx, _ in groups)
        last = torch.stack([out.logits[g, len(ctx) - 1] for g, (ctx, _) in enumerate(groups)])  # (B, V)
        # rows for continuations longer than one token: (group, continuation) pairs
        rows = [(g, j) for g, (_, conts) in enumerate(groups) for j, c in enumerate(conts) if len(c) > 1]
        body_logits: dict[tuple[int, int], torch.Tensor] = {}
        if rows:
            cache = _cache_of(out)
            if cache is None or not hasattr(cache, "batch_select_indices"):
                raise TypeError(f"{type(self.model).__name__} returned no selectable key/value cache")
            cache.batch_select_indices(torch.tensor([g for g, _ in rows], dtype=torch.long, device=self.device))
            width = self._width(max(len(groups[g][1][j]) - 1 for g, j in rows), max(len(groups[g][0]) for g, _ in rows))
            inputs = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)  # (R, Lmax-1)
            positions = torch.zeros_like(inputs)
            mask = torch.zeros((len(rows), n_ctx + width), dtype=torch.long, device=self.device)
            for r, (g, j) in enumerate(rows):
                ctx, conts = groups[g]
                body = conts[j][:-1]
                inputs[r, : len(body)] = torch.tensor(body, dtype=torch.long)
                # positions continue each row's own context, not the padded width; a shorter row's
                # padding (masked) stays within the model's positions
                positions[r] = torch.arange(len(ctx), len(ctx) + width).clamp_(max=self.max_length - 1)
                mask[r, : len(ctx)] = 1
                mask[r, n_ctx : n_ctx + len(body)] = 1
            kwargs = {self._cache_kw: cache}
            out2 = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
            self.tokens_processed += sum(len(groups[g][1][j]) - 1 for g, j in rows)
            for r, (g, j) in enumerate(rows):
                body_logits[(g, j)] = out2.logits[r, : len(groups[g][1][j]) - 1]
        result = []
        for g, (_, conts) in enumerate(groups):
            scores = []
            for j, c in enumerate(conts):
                pred = last[g][None, :]
                if len(c) > 1:
                    pred = torch.cat([pred, body_logits[(g, j)]], dim=0)  # (L, V)
                scores.append(self._gather(pred, c))
            result.append(scores)
        return result

    def _score_concat(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[ContinuationScore]]:
        pad = self._pad_id()
        rows = []  # (group, continuation index, token row)
        single: dict[int, int] = {}  # group -> row that serves all its one-token continuations
        for g, (ctx, conts) in enumerate(groups):
            for j, c in enumerate(conts):
                if len(c) == 1:
                    if g in single:
                        continue
                    single[g] = len(rows)
                rows.append((g, j, ctx + c[:-1]))
        width = self._width(max(len(r) for _, _, r in rows), 0)
        inputs = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)  # (N, T)
        mask = torch.zeros_like(inputs)
        for i, (_, _, r) in enumerate(rows):
            inputs[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        logits = self.model(input_ids=inputs, attention_mask=mask).logits  # (N, T, V)
        self.tokens_processed += sum(len(r) for _, _, r in rows)
        row_of = {(g, j): i for i, (g, j, _) in enumerate(rows)}
        result = []
        for g, (ctx, conts) in enumerate(groups):
            start = len(ctx) - 1  # position whose logits predict the first continuation token
            scores = []
            for j, c in enumerate(conts):
                i = single[g] if len(c) == 1 else row_of[(g, j)]
                scores.append(self._gather(logits[i, start : start + len(c)], c))
            result.append(scores)
        return result

    def _width(self, n: int, start: int) -> int:
        """``n`` rounded up to a multiple of ``width_step(n)``, unless the padded positions, counted
        from ``start``, would pass ``max_length``."""
        step = width_step(n, self.width_multiple)
        rounded = -(-n // step) * step
        return rounded if start + rounded <= self.max_length else n

    def _pad_id(self) -> int:
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0
