"""Dynamic padding: a list of encoded windows or texts into one batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
from shardtune.data.alignment import IGNORE_INDEX, EncodedText, Window


class Batch(TypedDict):
    input_ids: torch.Tensor
    """[batch, length] int64, padded with pad_id."""
    attention_mask: torch.Tensor
    """[batch, length] int64, 1 on real tokens."""
    labels: torch.Tensor
    """NER: [batch, length] int64 padded with IGNORE_INDEX; classification: [batch] int64."""
    num_tokens: int
    """Real (non-pad) tokens in the batch, for throughput."""


def collate(
    items: Sequence[Window] | Sequence[EncodedText],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> Batch:
    """Pad to the longest item (rounded up to pad_to_multiple_of, e.g. 8 for tensor cores).

    ``num_tokens`` is a plain int; pop it before calling the model with ``**batch``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    kinds = {type(item) for item in items}
    if len(kinds) > 1 or not kinds <= {Window, EncodedText}:
        raise ValueError(f"a batch holds only Window or only EncodedText, got {kinds}")
    lengths = [len(item.input_ids) for item in items]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : lengths[row]] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, : lengths[row]] = 1

    if isinstance(items[0], Window):
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, : lengths[row]] = torch.tensor(item.labels, dtype=torch.long)
    else:
        labels = torch.tensor([item.label for item in items], dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        num_tokens=sum(lengths),
    )
