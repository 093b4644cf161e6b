"""Per-rank streaming of a prepared dataset along its shard plan, with background prefetch.

A worker holds at most `shards_in_memory` shards (the one being read plus those prefetched);
nothing else of the dataset is ever on its disk or in its memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from shardtune.data import storage
from shardtune.data.manifest import (
    Manifest,
    read_shard_rows,
    read_shard_rows_sized,
    read_shard_slice,
)
from shardtune.data.shard_plan import EpochPlan, Ranges, Segment, segment_ranges


@dataclass
class StreamStats:
    examples: int = 0
    shard_reads: int = 0
    wait_s: float = 0.0  # time the consumer blocked on storage (prefetch miss)


class ShardStream:
    """Reads rows of one rank's segment in plan order: `iter_from(segment, begin)` yields
    (stream position, row) from `segment.start + begin`."""

    def __init__(
        self,
        dataset_uri: str,
        manifest: Manifest,
        plan: EpochPlan,
        options: storage.StorageOptions | None = None,
        shards_in_memory: int = 2,
    ):
        self.dataset_uri = dataset_uri
        self.manifest = manifest
        self.plan = plan
        self.options = options
        self.capacity = max(1, shards_in_memory)
        self.stats = StreamStats()
        self._cache: OrderedDict[int, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")

    def _load(self, shard: int) -> list[dict]:
        rows = read_shard_rows(self.dataset_uri, self.manifest.shards[shard], self.options)
        order = self.plan.row_order(shard)
        return [rows[i] for i in order]

    def _request(self, shard: int) -> Future:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        while len(self._cache) >= self.capacity:
            self._cache.popitem(last=False)
        self.stats.shard_reads += 1
        fut = self._pool.submit(self._load, shard)
        self._cache[shard] = fut
        return fut

    def _rows(self, shard: int) -> list[dict]:
        fut = self._request(shard)
        if not fut.done():
            t0 = time.perf_counter()
            rows = fut.result()
            self.stats.wait_s += time.perf_counter() - t0
            return rows
        return fut.result()

    def iter_from(self, segment: Segment, begin: int = 0) -> Iterator[tuple[int, dict]]:
        """Rows of a train/eval segment from offset `begin`: (offset in the segment, row)."""
        return self.iter_ranges(segment_ranges(segment, self.plan.total), begin)

    def iter_ranges(self, ranges: Ranges, begin: int = 0) -> Iterator[tuple[int, dict]]:
        """Rows at an explicit list of stream ranges (the rest of an epoch after a restart with
        another world size), from offset `begin`: yields (offset in the list, row)."""
        offset_in_list = 0
        for k, (start, stop) in enumerate(ranges):
            if offset_in_list + stop - start <= begin:
                offset_in_list += stop - start
                continue
            pos = start + max(0, begin - offset_in_list)
            while pos < stop:  # one plan lookup per shard run, then a slice of its rows
                shard, offset, run = self.plan.span(pos)
                run = min(run, stop - pos)
                rows = self._rows(shard)
                self._prefetch_after(shard, pos + len(rows) - offset, ranges, k)
                self._cache.move_to_end(shard)
                base = offset_in_list + pos - start
                for i, row in enumerate(rows[offset : offset + run]):
                    self.stats.examples += 1
                    yield base + i, row
                pos += run
            offset_in_list += stop - start

    def _prefetch_after(self, shard: int, shard_end: int, ranges: Ranges, k: int) -> None:
        """Start loading the shard holding the next position this rank will read after
        `shard` (which ends at stream position `shard_end`), while `shard` is consumed."""
        if self.capacity < 2:
            return
        start, stop = ranges[k]
        if shard_end < stop:
            nxt = shard_end
        elif k + 1 < len(ranges):
            nxt = ranges[k + 1][0]
        else:
            return
        nxt_shard, _ = self.plan.locate(nxt)
        if nxt_shard != shard:
            self._request(nxt_shard)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cache.clear()


def read_span(
    dataset_uri: str,
    manifest: Manifest,
    start: int,
    stop: int,
    options: storage.StorageOptions | None = None,
) -> tuple[list[dict], int]:
    """Rows at positions [start, stop) of the unshuffled stream (shards in manifest order, rows
    as stored: an eval segment) and the bytes fetched. A shard wholly inside is read whole
    (sha256-checked); one the span cuts is read by its row groups only, so a rank's share of
    the eval set costs about its own bytes instead of every shard it touches."""
    import numpy as np

    sizes = np.asarray(manifest.shard_sizes(), dtype=np.int64)
    ends = np.cumsum(sizes)
    rows: list[dict] = []
    fetched = 0
    k = int(np.searchsorted(ends, start, side="right"))  # the first shard ending after start
    while k < len(sizes) and start < stop:
        base = int(ends[k] - sizes[k])
        lo, hi = start - base, min(stop, int(ends[k])) - base
        info = manifest.shards[k]
        if lo == 0 and hi == sizes[k]:
            part, n = read_shard_rows_sized(dataset_uri, info, options)
        elif hi > lo:
            part, n = read_shard_slice(dataset_uri, info, lo, hi, options)
        else:
            part, n = [], 0
        rows += part
        fetched += n
        start = base + hi
        k += 1
    return rows, fetched
