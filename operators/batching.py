"""Padding a list of examples into batch tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from operators.tasks.base import IGNORE_INDEX


@dataclass
class Batch:
    """Right-padded tensors of one batch, all of shape (batch, length)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device), self.targets.to(device), self.attention_mask.to(device)
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(
    input_ids: list[list[int]], targets: list[list[int]], pad_id: int, length: int | None = None
) -> Batch:
    """Right-pad sequences to `length` (default: the longest) with `pad_id` and IGNORE_INDEX.

    With causal attention and right padding, and with the attention mask for bidirectional
    models, an example's outputs do not depend on how much padding follows it.
    """
    if len(input_ids) != len(targets):
        raise ValueError(f"{len(input_ids)} input sequences but {len(targets)} target sequences")
    longest = max((len(ids) for ids in input_ids), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a sequence of length {longest} does not fit a batch length of {length}")
    batch = len(input_ids)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, (sequence, target) in enumerate(zip(input_ids, targets, strict=True)):
        if len(sequence) != len(target):
            raise ValueError(
                f"example in row {row} has {len(sequence)} tokens but {len(target)} targets"
            )
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        labels[row, : len(target)] = torch.as_tensor(target, dtype=torch.long)
        mask[row, : len(sequence)] = True
    return Batch(ids, labels, mask)


def iter_batches(
    input_ids: list[list[int]], targets: list[list[int]], pad_id: int, batch_size: int
) -> Iterator[Batch]:
    """Yield consecutive padded batches of at most `batch_size` examples, in order."""
    for start in range(0, len(input_ids), batch_size):
        end = start + batch_size
        yield collate(input_ids[start:end], targets[start:end], pad_id)
