"""Memory estimates used by 'auto' choices (gradient checkpointing) and by ``qlorakit plan``."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["activation_bytes", "memory_budget_bytes", "available_memory_bytes"]


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_budget_bytes(recipe: Any) -> float:
    gb = recipe.train.memory_budget_gb
    return gb * 2**30 if gb else 0.8 * available_memory_bytes()


def activation_bytes(config: Any, micro_batch: int, seq_len: int, bytes_per: int = 2) -> float:
    """Activations kept for the backward pass of one micro-batch without recomputation.

    Per layer and token, a Llama-style block keeps about 16 hidden-sized and 3 intermediate-sized
    tensors (norm inputs, q/k/v/o, attention output, gate/up/act products); attention with an
    explicit mask adds heads x seq_len scores.
    """
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    tokens = micro_batch * seq_len
    per_layer = tokens * (16 * h + 3 * inter) * bytes_per + micro_batch * heads * seq_len * seq_len * bytes_per
    return float(layers * per_layer)
