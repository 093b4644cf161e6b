"""Length-grouped micro-batches over one rank's stream (pure).

A rank's epoch is a list of stream positions (its segment, or its share after a resplit). It is
read in *groups* of `batch_size * length_grouping` positions; inside a group the rows are sorted
by token length (longest first) and cut into micro-batches of `batch_size` rows, so each batch
pads to nearly its own longest row. The micro-batches of a group are then shuffled by a generator
seeded from (seed, epoch, rank, group start), except that the longest stays first: a memory peak
shows on a group's first step, not at random. Everything is a function of those keys and the
rows, so the same seed and epoch give the same batches on every run, and a resume recomputes
the group it stopped in and skips the micro-batches already done.

Every rank gets the same number of micro-batches: its position list has the same length on
every rank (shard_plan), groups are cut at the same offsets, and only the last group can hold a
partial micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def group_size(batch_size: int, length_grouping: int) -> int:
    """Positions per group: a whole number of micro-batches."""
    if batch_size < 1 or length_grouping < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and length_grouping ({length_grouping}) must be >= 1"
        )
    return batch_size * length_grouping


def group_starts(length: int, batch_size: int, length_grouping: int, begin: int = 0) -> range:
    """Offsets (into a rank's position list of `length`) where groups start, from the group
    holding offset `begin` (a resume point is always a group start, or the end)."""
    size = group_size(batch_size, length_grouping)
    if begin % size and begin != length:
        raise ValueError(f"offset {begin} is not a group start (groups of {size})")
    return range(begin, length, size)


def micro_batches_per_epoch(length: int, batch_size: int) -> int:
    """Micro-batches a rank runs over `length` positions: groups hold whole micro-batches, so
    this is the same as plain batching."""
    return -(-length // batch_size)


def group_batches(
    lengths: Sequence[int], batch_size: int, key: Sequence[int], *, shuffle: bool = True
) -> list[list[int]]:
    """Micro-batches of one group as lists of indices into `lengths` (the group's rows in
    stream order): sorted by length, longest first (ties keep stream order), cut into
    `batch_size` rows, then shuffled by `key` with the longest batch kept first. With
    `shuffle=False` (evaluation) the batches stay in length order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and len(batches) > 2:
        rest = np.random.default_rng([k & 0xFFFFFFFF for k in key]).permutation(len(batches) - 1)
        batches = [batches[0]] + [batches[1 + int(i)] for i in rest]
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions when each batch pads to its longest row (for reports)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return 1.0 - real / padded if padded else 0.0
