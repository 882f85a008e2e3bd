"""NF4 (double-quantized) weights through bitsandbytes.

bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a ``Linear4bit`` weight in place during an
eval/no-grad forward; LoRA gradients computed after that are silently wrong. :func:`guard_linear4bit`
switches that repack off on every such layer, and a test proves the gradients right after an
evaluation pass.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

__all__ = ["cpu_supports_bf16", "guard_linear4bit", "is_linear4bit", "dequantize", "quantize_linear", "quantize_decoder_linears"]


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    cap = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX2", "DEFAULT"
    return cap == "AVX512" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def is_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def guard_linear4bit(model: nn.Module) -> int:
    """Turn off the in-place CPU repack on every ``Linear4bit``; return how many were guarded."""
    n = 0
    for m in model.modules():
        if is_linear4bit(m):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of a 4-bit (or plain) linear, shape (out_features, in_features): in the dtype the
    4-bit weight was quantized from (full precision), or in ``dtype``.

    A 4-bit weight is dequantized straight to ``dtype``: bitsandbytes computes each value in fp32
    and rounds it once, so the result is exactly the fp32 dequantization cast to ``dtype`` (a test
    pins this for bf16 and fp16), without the fp32 copy; to bf16 about three times faster.
    """
    if not is_linear4bit(module):
        w = module.weight.detach()
        return w if dtype is None else w.to(dtype)
    import bitsandbytes.functional as F

    w = module.weight
    state = w.quant_state
    if dtype is not None and state.dtype != dtype:
        state = copy.copy(state)  # shallow: the packed data and statistics are shared, only the output dtype differs
        state.dtype = dtype
    return F.dequantize_4bit(w.data, state).reshape(module.out_features, module.in_features)


def quantize_linear(linear: nn.Linear, *, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A guarded bitsandbytes ``Linear4bit`` holding ``linear``'s weight in 4 bits."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                          )
    q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu", torch.float32), requires_grad=False,
                                 compress_statistics=double_quant, quant_type=quant_type)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to(linear.weight.device)
    q.support_avx512bf16_for_cpu = False
    return q


def quantize_decoder_linears(model: nn.Module, *, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every ``nn.Linear`` of the attention and MLP blocks of a Llama-style decoder
    (``model.model.layers``) by its guarded NF4 ``Linear4bit``, in place; the head and
    embeddings stay as they are. Returns ``model``."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, compute_dtype=compute_dtype))
    return model
