"""Packing short examples into full sequences, and batches for the training loop.

Every row carries ``position_ids`` that restart at 0 for each example. With no attention mask,
transformers builds a block-diagonal causal mask from them, so attention never crosses from one
packed example into another (the padding tail is a segment of its own, with no loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .templating import IGNORE_INDEX, Tokenized

__all__ = ["Row", "pack", "no_pack", "collate", "BatchSchedule"]


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    n_real: int = 0  # tokens of real examples; the rest is padding

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _row(parts: list[Tokenized], seq_len: int, pad_id: int, pad_to: bool) -> Row:
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for t in parts:
        ids += t.input_ids
        # the first token of an example has no previous token of its own to be predicted from
        labels += [IGNORE_INDEX] + t.labels[1:]
        pos += list(range(len(t)))
    if pad_to and len(ids) < seq_len:
        n = seq_len - len(ids)
        ids += [pad_id] * n
        labels += [IGNORE_INDEX] * n
        pos += list(range(n))
    return Row(ids, labels, pos, sum(len(t) for t in parts))


def pack(examples: list[Tokenized], seq_len: int, pad_id: int) -> list[Row]:
    """First-fit-decreasing bin packing: few rows, little padding, deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i])
        for b, free in enumerate(space):
            if n <= free:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(seq_len - n)
    return [_row([examples[i] for i in sorted(b)], seq_len, pad_id, pad_to=True) for b in bins]


def no_pack(examples: list[Tokenized], seq_len: int, pad_id: int) -> list[Row]:
    """One example per row (padded in :func:`collate`)."""
    return [_row([t], seq_len, pad_id, pad_to=False) for t in examples]


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows into a batch, padding to the longest. Labels are not shifted: the loss shifts them."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        pos[i, :n] = torch.tensor(r.position_ids)
        if n < width:  # the padding tail is its own segment
            pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


class BatchSchedule:
    """The order of micro-batches for every epoch, derived only from (seed, epoch).

    Because the order does not depend on any global random state, a resumed run finds the same
    batches by their index alone.
    """

    def __init__(self, n_rows: int, micro_batch_size: int, seed: int):
        self.n_rows = n_rows
        self.mbs = micro_batch_size
        self.seed = seed

    @property
    def batches_per_epoch(self) -> int:
        return (self.n_rows + self.mbs - 1) // self.mbs

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=g).tolist()

    def batch(self, index: int) -> list[int]:
        """Row indices of global micro-batch ``index`` (counting across epochs)."""
        epoch, k = divmod(index, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        return order[k * self.mbs:(k + 1) * self.mbs]
