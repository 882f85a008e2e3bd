"""The causal-LM loss: summed token cross-entropy, so that gradient accumulation can normalise by the
number of answer tokens in the whole optimizer step.

Two implementations with the same maths:

- :func:`plain_loss` runs the whole model and takes the cross-entropy over every position's logits.
- :func:`chunked_loss` runs the decoder, keeps only positions that carry a label, and computes the
  output head and cross-entropy in chunks under activation checkpointing, so the (tokens, vocab)
  logits never exist at once. With a 49k vocabulary and loss on the answers only, this skips most
  of the output head's work and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.templating import IGNORE_INDEX

__all__ = ["plain_loss", "chunked_loss", "shift_labels", "LOSS_CHUNK"]

LOSS_CHUNK = 2048


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t] is what position t must predict: the token at t + 1 (or IGNORE_INDEX)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def plain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of loss tokens) with the full logits tensor."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits.float()  # (B, T, V)
    target = shift_labels(batch["labels"])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def _head_ce(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight.to(h.dtype)).float()  # (n, V)
    return F.cross_entropy(logits, target, reduction="sum")


def chunked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, int]:
    """Same value as :func:`plain_loss`; the output head only sees positions with a label."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=False).last_hidden_state  # (B, T, H)
    target = shift_labels(batch["labels"]).reshape(-1)
    keep = (target != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(keep.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)  # (n, H)
    t = target.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk):
        hs, ts = h[s:s + chunk], t[s:s + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_ce, hs, head.weight, ts, use_reentrant=False)
        else:
            total = total + _head_ce(hs, head.weight, ts)
    return total, n
