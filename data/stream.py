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

from data import storage
from data.manifest import Manifest, read_shard_rows
from data.shard_plan import EpochPlan, Segment


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
        order = self.plan.shard_order
        for pos in range(segment.start + begin, segment.stop):
            shard, offset = self.plan.locate(pos)
            rows = self._rows(shard)
            if offset == 0 or pos == segment.start + begin:
                # Prefetch the shard that follows in the stream while this one is consumed.
                nxt = order[(order.index(shard) + 1) % len(order)]
                if nxt != shard and self.capacity > 1 and pos + len(rows) - offset < segment.stop:
                    self._request(nxt)
                    self._cache.move_to_end(shard)
            self.stats.examples += 1
            yield pos - segment.start, rows[offset]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._cache.clear()
