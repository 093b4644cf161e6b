"""The shard plan: which examples each rank reads in an epoch, and in which order (pure).

An epoch is one global stream: shards in an order permuted by (seed, epoch), rows inside each
shard permuted by (seed, epoch, shard). The stream is cut into `world_size` contiguous
segments of equal length, so every rank runs the same number of steps and reads only the few
shards its segment overlaps, one after another. When the example count does not divide
evenly, the last segments wrap around to the start of the stream: `padding` examples are seen
twice that epoch (counted and reported), none is dropped. A stream position is a plain int, so
resuming is exact.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in keys])


@dataclass(frozen=True)
class EpochPlan:
    shard_sizes: tuple[int, ...]
    seed: int
    epoch: int
    shuffle: bool = True

    @property
    def total(self) -> int:
        return sum(self.shard_sizes)

    @cached_property
    def shard_order(self) -> list[int]:
        order = list(range(len(self.shard_sizes)))
        if self.shuffle:
            order = [int(i) for i in _rng(self.seed, self.epoch, 0x5EED).permutation(order)]
        return order

    def row_order(self, shard: int) -> np.ndarray:
        n = self.shard_sizes[shard]
        if not self.shuffle:
            return np.arange(n)
        return _rng(self.seed, self.epoch, shard, 0xF00D).permutation(n)

    @cached_property
    def _starts(self) -> list[int]:
        starts, acc = [], 0
        for shard in self.shard_order:
            starts.append(acc)
            acc += self.shard_sizes[shard]
        return starts

    def locate(self, position: int) -> tuple[int, int]:
        """Stream position (wrapped modulo the total) -> (shard index, offset in its row order)."""
        if self.total == 0:
            raise ValueError("empty dataset")
        position %= self.total
        starts = self._starts
        k = bisect.bisect_right(starts, position) - 1
        while self.shard_sizes[self.shard_order[k]] == 0:  # skip empty shards
            k += 1
        return self.shard_order[k], position - starts[k]


@dataclass(frozen=True)
class Segment:
    """Rank `rank`'s contiguous slice [start, stop) of the epoch stream (stop may exceed
    the total: those positions wrap to the stream's start)."""

    start: int
    stop: int
    padding: int  # positions of this segment that repeat an example (wrap-around)

    def __len__(self) -> int:
        return self.stop - self.start


def train_segment(total: int, world_size: int, rank: int) -> Segment:
    """Equal-length segments for training: ceil(total / world) examples on every rank."""
    if total <= 0:
        raise ValueError("cannot plan an empty dataset")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    per_rank = -(-total // world_size)
    start = rank * per_rank
    stop = start + per_rank
    padding = max(0, stop - max(start, total))
    return Segment(start, stop, padding)


def eval_segment(total: int, world_size: int, rank: int) -> Segment:
    """Disjoint, possibly unequal segments for evaluation: every example exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return Segment(start, start + base + (1 if rank < extra else 0), 0)


def segment_rows(plan: EpochPlan, segment: Segment, begin: int = 0) -> list[tuple[int, int]]:
    """(shard, row) pairs of a segment from offset `begin`, in stream order. For tests and
    ledgers; the stream itself walks the same positions lazily."""
    out = []
    for pos in range(segment.start + begin, segment.stop):
        shard, offset = plan.locate(pos)
        out.append((shard, int(plan.row_order(shard)[offset])))
    return out
