"""Text generation with a KV cache: greedy or sampled, with stop strings, streaming or not.

Llama-style models (Llama, Mistral, Qwen2 shapes) run in :mod:`qlorakit.models.decode`: a lean
decoding loop over the model's own modules that computes what transformers' ``generate`` computes,
bitsandbytes' inference kernel included, at a fraction of the per-token overhead (measured in
``bench/bench_generate.py``). Other models run transformers' ``generate``. Either way the adapter
stays unmerged, so several adapters can share one base and small LoRA updates are not rounded away
(merging them into bf16 weights loses every update below the weight's bf16 resolution).

Before the first generation each 4-bit base weight gets a bf16 copy
(:func:`qlorakit.quant.fast_linear.cache_bf16_weights`, when it fits in a quarter of the available
memory), read by long prompts and by models the decoder does not run; for the latter, with room,
also an fp32 copy of the same values for one-token products (a one-row bf16 product runs 2-3x
slower than fp32 on CPUs).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .decode import decoder_for

__all__ = ["GenerationResult", "generate", "generate_stream", "chat_prompt", "autocast_for", "prepare_inference"]


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" (``cancel`` was set before either)


def _stop_when_set(event: threading.Event) -> Any:
    """A transformers ``StoppingCriteriaList`` that ends ``generate`` once ``event`` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Flag(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Flag()])


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Sampling from ``seed`` inside, and the random state of the process as it was afterwards: a
    seeded request must not make the next unseeded one predictable (a server answers many)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _stop_strings(tokenizer: Any, stop: list[str] | None) -> dict[str, Any]:
    """transformers' ``generate`` arguments that end the generation at a stop string."""
    return {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    from ..data.templating import render_prompt

    return render_prompt(tokenizer, messages)


def autocast_for(model: torch.nn.Module) -> Any:
    """bf16 autocast on CPUs/GPUs that have it (matching training), a no-op otherwise."""
    from ..quant import cpu_supports_bf16

    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_supports_bf16())


def prepare_inference(model: torch.nn.Module, max_bytes: float | None = None) -> int:
    """Cache bf16 copies of the 4-bit base weights for generation; the bytes added (0: none).

    The copies are made only when they fit in ``max_bytes`` (default: a quarter of the available
    memory); the first call decides, later ones return 0. When the fast decoder runs the model with
    bitsandbytes' packed kernel, one-token products never read these copies, so no fp32 copies are
    made; the bf16 ones serve long prompts."""
    if getattr(model, "_qlk_inference_ready", False):
        return 0
    from ..quant.fast_linear import cache_bf16_weights
    from ..train.memory import available_memory_bytes

    dec = decoder_for(model)
    limit = 0.25 * available_memory_bytes()
    added = cache_bf16_weights(model, max_bytes=limit if max_bytes is None else min(limit, max_bytes),
                               decode_fp32=dec is None or not dec.packs)
    model._qlk_inference_ready = True
    return added


def _precision(model: torch.nn.Module) -> Any:
    """No autocast: the 4-bit linears compute in their bf16 compute dtype, the rest (LoRA, norms,
    attention, head) in the model's fp32, as a plain transformers + peft generate does. Measured on
    a 2-core CPU with the bf16 weight cache this is also faster than bf16 autocast, which casts the
    LoRA and head weights again at every token."""
    return contextlib.nullcontext()


def _gen_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float,
                stop_ids: list[int], min_new_tokens: int = 0) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True,
                          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids}
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if min_new_tokens:
        kw["min_new_tokens"] = min_new_tokens
    return kw


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        i = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
        if i is not None and i not in ids:
            ids.append(i)
    return ids


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             seed: int | None = None, min_new_tokens: int = 0,
             cancel: threading.Event | None = None) -> GenerationResult:
    """Complete ``prompt`` (already chat-templated when chatting); ``min_new_tokens`` delays EOS.

    ``cancel``, when set from another thread, ends the generation after the token in progress (a
    server whose client has gone); the result then holds the tokens made so far, finish "cancelled".
    """
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    n_prompt = enc["input_ids"].shape[1]
    stop_ids = _stop_ids(tokenizer)
    prepare_inference(model)
    with _eval_mode(model), _seeded(seed):
        dec = decoder_for(model)
        if dec is not None:
            new = []
            for t in dec.tokens(enc["input_ids"][0].tolist(), max_new_tokens, stop_ids=stop_ids,
                                temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens):
                new.append(t)
                if cancel is not None and cancel.is_set():
                    break
                # a stop string ends the generation at the token that completes it
                if stop and t not in stop_ids and _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)[1]:
                    break
        else:
            kw = _gen_kwargs(tokenizer, max_new_tokens, temperature, top_p, stop_ids, min_new_tokens)
            kw.update(_stop_strings(tokenizer, stop))
            if cancel is not None:
                kw["stopping_criteria"] = _stop_when_set(cancel)
            with _precision(model):
                out = model.generate(**enc, **kw)
            new = out[0, n_prompt:].tolist()
    hit_eos = bool(new) and new[-1] in stop_ids
    if hit_eos:
        new = new[:-1]
    text, hit_stop = _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    cancelled = cancel is not None and cancel.is_set() and len(new) < max_new_tokens
    finish = "stop" if hit_eos or hit_stop else "cancelled" if cancelled else "length"
    if finish != "stop":
        text = _whole_characters(tokenizer, new, text)
    return GenerationResult(text, n_prompt, len(new) + (1 if hit_eos else 0), finish)


def _whole_characters(tokenizer: Any, toks: list[int], text: str) -> str:
    """``text`` without the replacement characters that stand for a character whose bytes the cut
    (max_tokens, a cancel) left incomplete: those the last tokens alone decode to."""
    n = 0
    while text.endswith("\ufffd" * (n + 1)):
        n += 1
    if not n:
        return text
    tail = tokenizer.decode(toks[-n:], skip_special_tokens=True) if toks else ""
    return text[:-n] if tail.endswith("\ufffd" * n) else text


def _held_back(text: str, stop: list[str] | None) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    n = 0
    for s in stop or []:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def _stream_decoder(dec: Any, model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int,
                    temperature: float, top_p: float, stop: list[str] | None, seed: int | None,
                    stats: dict[str, Any]) -> Iterator[str]:
    """Text pieces from the fast decoder, in the consumer's thread: a stop string is never emitted
    (text that could begin one is held back until it cannot), nor a half-decoded character."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stop_ids = _stop_ids(tokenizer)
    toks: list[int] = []
    emitted = ""
    stats["completion_tokens"] = 0
    try:
        with _eval_mode(model), _seeded(seed):
            for t in dec.tokens(ids, max_new_tokens, stop_ids=stop_ids, temperature=temperature, top_p=top_p):
                stats["completion_tokens"] += 1  # an end token too, as :func:`generate` counts
                if t in stop_ids:
                    stats["finish_reason"] = "stop"
                    break
                toks.append(t)
                text = tokenizer.decode(toks, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                    continue
                text, hit = _cut_at_stop(text, stop)
                ready = text if hit else text[:len(text) - _held_back(text, stop)]
                if len(ready) > len(emitted):
                    yield ready[len(emitted):]
                    emitted = ready
                if hit:
                    stats["finish_reason"] = "stop"
                    return
            text, _ = _cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), stop)
            text = _whole_characters(tokenizer, toks, text)
            if len(text) > len(emitted):
                yield text[len(emitted):]
            stats.setdefault("finish_reason", "length")
    finally:  # closed by the consumer before the end
        stats.setdefault("finish_reason", "cancelled")


def generate_stream(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                    seed: int | None = None, stats: dict[str, Any] | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated (stops at a stop string, not including it).

    ``stats``, when given, receives ``completion_tokens`` (the tokens generated, an end token
    included, as :func:`generate` counts them) and ``finish_reason`` ("stop", "length", or
    "cancelled" when the consumer closed the stream first) once the stream ends.

    Closing the generator early (``close()``, or leaving a ``for`` loop over it and dropping it) ends
    the generation before ``close()`` returns, in every case: the model is idle afterwards.
    """
    stats = {} if stats is None else stats
    prepare_inference(model)
    dec = decoder_for(model)
    if dec is not None:
        yield from _stream_decoder(dec, model, tokenizer, prompt, max_new_tokens, temperature, top_p, stop, seed,
                                   stats)
        return
    from transformers import TextIteratorStreamer

    class _Counting(TextIteratorStreamer):
        """Also counts the generated tokens and keeps the last one."""

        count, last = 0, None

        def put(self, value: torch.Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                v = value.reshape(-1)
                self.count += v.numel()
                if v.numel():
                    self.last = int(v[-1])
            super().put(value)

    halt = threading.Event()  # set by the consumer: at a stop string, or when it closes this generator
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = _Counting(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop_ids = _stop_ids(tokenizer)
    kw = _gen_kwargs(tokenizer, max_new_tokens, temperature, top_p, stop_ids)
    kw.update(_stop_strings(tokenizer, stop))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad(), _precision(model), _seeded(seed):
                model.generate(**enc, **kw, streamer=streamer, stopping_criteria=_stop_when_set(halt))
        except BaseException as e:  # re-raised in the consuming thread below
            errors.append(e)
            streamer.end()

    model.eval()
    t = threading.Thread(target=work, daemon=True)
    t.start()
    emitted, hit, ended = "", False, False
    try:
        for piece in streamer:
            candidate = emitted + piece
            text, hit = _cut_at_stop(candidate, stop)
            if text[len(emitted):]:
                yield text[len(emitted):]
            emitted = text
            if hit:
                break
        ended = True
    finally:  # also when the consumer closes this generator: the generating thread stops and is joined
        halt.set()
        t.join()
        stats["completion_tokens"] = streamer.count
        stats["finish_reason"] = ("stop" if hit or streamer.last in stop_ids else
                                  "length" if streamer.count >= max_new_tokens else
                                  "stop" if ended else "cancelled")
    if errors:
        raise errors[0]
