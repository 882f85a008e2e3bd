"""Text generation with a KV cache: greedy or sampled, with stop strings, streaming or not.

Fast on CPU: before the first generation each 4-bit base weight gets a bf16 copy
(:func:`qlorakit.quant.fast_linear.cache_bf16_weights`, when it fits in a quarter of the available
memory; with room, also an fp32 copy of the same values, since a one-row bf16 product runs 2-3x
slower than fp32 on CPUs), so a new token reads every weight once instead of dequantizing it; the adapter stays
unmerged, so several adapters can share one base and small LoRA updates are not rounded away
(merging them into bf16 weights loses every update below the weight's bf16 resolution).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GenerationResult", "generate", "generate_stream", "chat_prompt", "autocast_for", "prepare_inference"]


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


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


def prepare_inference(model: torch.nn.Module) -> int:
    """Cache bf16 copies of the 4-bit base weights for generation; the bytes added (0: none)."""
    if getattr(model, "_qlk_inference_ready", False):
        return 0
    from ..quant.fast_linear import cache_bf16_weights
    from ..train.memory import available_memory_bytes

    added = cache_bf16_weights(model, max_bytes=0.25 * available_memory_bytes())
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


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             seed: int | None = None, min_new_tokens: int = 0) -> GenerationResult:
    """Complete ``prompt`` (already chat-templated when chatting); ``min_new_tokens`` delays EOS."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    n_prompt = enc["input_ids"].shape[1]
    stop_ids = _stop_ids(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    prepare_inference(model)
    was_training = model.training
    model.eval()
    try:
        with _precision(model):
            out = model.generate(**enc, **_gen_kwargs(tokenizer, max_new_tokens, temperature, top_p, stop_ids,
                                                      min_new_tokens))
    finally:
        model.train(was_training)
    new = out[0, n_prompt:].tolist()
    hit_eos = bool(new) and new[-1] in stop_ids
    if hit_eos:
        new = new[:-1]
    text, hit_stop = _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    finish = "stop" if hit_eos or hit_stop else "length"
    return GenerationResult(text, n_prompt, len(new) + (1 if hit_eos else 0), finish)


def generate_stream(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                    seed: int | None = None) -> Iterator[str]:
    """Yield text pieces as they are generated (stops at a stop string, not including it)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    halt = threading.Event()

    class _Halt(StoppingCriteria):  # lets the consumer stop generation at a stop string
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kw = _gen_kwargs(tokenizer, max_new_tokens, temperature, top_p, _stop_ids(tokenizer))
    prepare_inference(model)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad(), _precision(model):
                model.generate(**enc, **kw, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Halt()]))
        except BaseException as e:  # re-raised in the consuming thread below
            errors.append(e)
            streamer.end()

    model.eval()
    t = threading.Thread(target=work, daemon=True)
    t.start()
    emitted = ""
    for piece in streamer:
        candidate = emitted + piece
        text, hit = _cut_at_stop(candidate, stop)
        if text[len(emitted):]:
            yield text[len(emitted):]
        emitted = text
        if hit:
            halt.set()
            break
    halt.set()
    t.join()
    if errors:
        raise errors[0]
