"""Compute precision for evaluation forwards: bf16 autocast where the CPU has native bf16.

bf16 matrix products on CPUs with AVX512-BF16 or AMX run several times faster than fp32, so
``"auto"`` picks bf16 there and fp32 elsewhere. Log-probabilities are always taken in fp32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Literal

import torch

__all__ = ["Precision", "cpu_has_native_bf16", "resolve_precision", "autocast_context"]

Precision = Literal["auto", "bf16", "fp32"]
_VALID = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX-BF16), checked at
    run time; the one check the loader, training and evaluation share (:func:`qlorakit.quant.cpu_supports_bf16`)."""
    from qlorakit.quant import cpu_supports_bf16

    return cpu_supports_bf16()


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> Literal["bf16", "fp32"]:
    """Turn ``"auto"`` into ``"bf16"`` or ``"fp32"`` for ``device``; validate explicit choices."""
    if precision not in _VALID:
        raise ValueError(f"precision must be one of {_VALID}, got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        return precision  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast_context(precision: str, device: torch.device | str = "cpu") -> ContextManager[object]:
    """An autocast context for the resolved precision (a no-op for fp32)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
