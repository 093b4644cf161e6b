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

import hashlib
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

    # Everything a lookup needs is computed once per plan as int64 arrays (24 bytes a shard:
    # 24 MB at 1e6 shards), so per-row work never grows with the shard count.
    @cached_property
    def _sizes(self) -> np.ndarray:
        return np.asarray(self.shard_sizes, dtype=np.int64)

    @cached_property
    def total(self) -> int:
        return int(self._sizes.sum())

    @cached_property
    def _order(self) -> np.ndarray:
        n = len(self.shard_sizes)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return _rng(self.seed, self.epoch, 0x5EED).permutation(n).astype(np.int64)

    @property
    def shard_order(self) -> list[int]:
        return self._order.tolist()

    def row_order(self, shard: int) -> np.ndarray:
        n = self.shard_sizes[shard]
        if not self.shuffle:
            return np.arange(n)
        return _rng(self.seed, self.epoch, shard, 0xF00D).permutation(n)

    @cached_property
    def _starts(self) -> np.ndarray:
        sizes = self._sizes[self._order]
        return np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)

    @cached_property
    def identity(self) -> str:
        """Names this plan in ledgers: equal identities read the same rows in the same order."""
        h = hashlib.sha256(self._sizes.tobytes())
        h.update(f"{self.seed}/{self.epoch}/{self.shuffle}".encode())
        return h.hexdigest()[:16]

    def locate(self, position: int) -> tuple[int, int]:
        """Stream position (wrapped modulo the total) -> (shard index, offset in its row order).
        A binary search over cached shard starts; `span` is what the stream calls, once per shard."""
        shard, offset, _ = self.span(position)
        return shard, offset

    def span(self, position: int) -> tuple[int, int, int]:
        """(shard, offset in its row order, rows of that shard from `offset` on) of a stream
        position: a reader takes that many rows from one shard before it needs to look again."""
        if self.total == 0:
            raise ValueError("empty dataset")
        position %= self.total
        starts = self._starts
        k = int(np.searchsorted(starts, position, side="right")) - 1
        while self._sizes[self._order[k]] == 0:  # skip empty shards
            k += 1
        shard = int(self._order[k])
        offset = position - int(starts[k])
        return shard, offset, int(self._sizes[shard]) - offset


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
    out: list[tuple[int, int]] = []
    pos = segment.start + begin
    while pos < segment.stop:
        shard, offset, run = plan.span(pos)
        run = min(run, segment.stop - pos)
        out += [(shard, int(r)) for r in plan.row_order(shard)[offset : offset + run]]
        pos += run
    return out


Ranges = tuple[tuple[int, int], ...]  # [start, stop) intervals of stream positions, read in order


def segment_ranges(segment: Segment, total: int) -> Ranges:
    """A train segment as ranges inside [0, total): wrapped positions become further ranges."""
    out, pos = [], segment.start
    while pos < segment.stop:
        lap_end = (pos // total + 1) * total
        end = min(segment.stop, lap_end)
        out.append((pos % total, pos % total + end - pos))
        pos = end
    return tuple(out)


def ranges_len(ranges: Ranges) -> int:
    return sum(stop - start for start, stop in ranges)


def offsets_to_ranges(ranges: Ranges, offsets: list[int] | tuple[int, ...]) -> Ranges:
    """Stream positions of the given offsets into a position list `ranges`, as one-position
    ranges (the rows of a partly consumed length group; see data/batching.py)."""
    starts = np.cumsum([0] + [stop - start for start, stop in ranges])
    out = []
    for offset in sorted(offsets):
        k = int(np.searchsorted(starts, offset, side="right")) - 1
        if not 0 <= k < len(ranges):
            raise ValueError(f"offset {offset} is outside the position list")
        pos = ranges[k][0] + offset - int(starts[k])
        out.append((pos, pos + 1))
    return tuple(out)


def _take(ranges: Ranges, count: int) -> list[tuple[int, int]]:
    """The first `count` positions of `ranges`, as ranges."""
    out = []
    for start, stop in ranges:
        if count <= 0:
            break
        n = min(count, stop - start)
        out.append((start, start + n))
        count -= n
    return out


def _complement(taken: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    out, cursor = [], 0
    for start, stop in sorted(taken):
        if start > cursor:
            out.append((cursor, start))
        cursor = max(cursor, stop)
    if cursor < total:
        out.append((cursor, total))
    return out


def _subtract(have: list[tuple[int, int]], drop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges `have` minus sorted, disjoint ranges `drop`."""
    out, k = [], 0
    for start, stop in have:
        cursor = start
        while k < len(drop) and drop[k][1] <= cursor:
            k += 1
        j = k
        while j < len(drop) and drop[j][0] < stop:
            if drop[j][0] > cursor:
                out.append((cursor, drop[j][0]))
            cursor = max(cursor, drop[j][1])
            j += 1
        if cursor < stop:
            out.append((cursor, stop))
    return out


def slice_ranges(ranges, lo: int, hi: int) -> list[tuple[int, int]]:
    """Positions lo..hi-1 of the concatenation of `ranges`, as ranges (hi may pass its end)."""
    out, base = [], 0
    for start, stop in ranges:
        n = stop - start
        a, b = max(lo, base), min(hi, base + n)
        if a < b:
            out.append((start + a - base, start + b - base))
        base += n
        if base >= hi:
            break
    return out


@dataclass(frozen=True)
class Share:
    """One rank's part of the rest of an epoch after a restart with a different world size."""

    ranges: Ranges
    padding: int  # positions that repeat a not-yet-consumed example (wrap-around), counted

    def __len__(self) -> int:
        return ranges_len(self.ranges)


def reshard_rest_of_epoch(
    total: int, consumed: list[tuple[Ranges, int]], world_size: int
) -> list[Share]:
    """Split what the old ranks had not consumed yet among `world_size` new ranks.

    `consumed` holds, per old rank, (the ranges it was reading this epoch, how many of their
    positions it had consumed). The positions the old ranks were to read (all of [0, total) in
    a normal epoch; only what an earlier resplit handed out when this epoch was already resplit
    once) that none of them consumed, in stream order, are cut into `world_size` contiguous
    pieces of equal length ceil(rest / world_size); the last pieces wrap around to the start of
    that rest, like `train_segment` does. So every example of the epoch is seen exactly once,
    plus the counted padding of the old and new plans, however often the epoch is resplit.
    """
    if total <= 0:
        raise ValueError("cannot plan an empty dataset")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    taken = [r for ranges, position in consumed for r in _take(ranges, position)]
    assigned = _complement(_complement([r for ranges, _ in consumed for r in ranges], total), total)
    rest = _subtract(assigned, _complement(_complement(taken, total), total))
    n = ranges_len(tuple(rest))
    if n == 0:
        return [Share((), 0) for _ in range(world_size)]
    per_rank = -(-n // world_size)
    shares = []
    for rank in range(world_size):
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        ranges: list[tuple[int, int]] = []
        while lo < hi:  # each pass covers at most one lap of the rest
            lap_lo = lo % n
            step = min(hi - lo, n - lap_lo)
            ranges += slice_ranges(rest, lap_lo, lap_lo + step)
            lo += step
        shares.append(Share(tuple(ranges), max(0, hi - max(rank * per_rank, n))))
    return shares
