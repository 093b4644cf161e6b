"""The ledger: an opt-in, compact record of the stream positions every rank consumed, per
micro-batch, and the reconstruction of what a run committed across restarts (with the example
ids resolved from the deterministic plan and the manifest, one shard at a time).

Layout under a run directory `R` ({run.output}/{run.name}):
  R/ledger/attempt-00002.json                    rank 0, at start: world size, step it resumed
                                                 from, the dataset URI the ids resolve against
  R/ledger/attempt-00002/rank-00001.00003.jsonl  rank 1's third flush of that attempt
A part holds two kinds of lines:
  {"list": k, "epoch", "plan", "seed", "shuffle", "grad_accum", "ranges"}  a position list: the
      stream ranges a rank reads this epoch (its segment, or its share after a resplit) under
      the plan named by `plan` (EpochPlan.identity)
  {"list": k, "step", "micro_step", "batches", "size", "offsets"}  `batches` consecutive
      micro-batches (from `micro_step`, counting towards optimizer step `step` on), each taking
      the next `size` offsets (into list k) of the runs `offsets` ([start, stop) pairs)
  {"list": k, "step", "micro_step", "batches", "size", "grouping", "start", "k0", "assign"}
      consecutive length groups (data/batching.py) from offset `start`, the first from its
      micro-batch `k0`: `assign` (zlib + base64) holds a window of batch * grouping bytes per
      group, one per offset: the index in its group of the micro-batch that took it (255: one
      outside this record, before a flush or a resume)
Micro-batches that read consecutive offsets (length_grouping 1) share one line, so the ledger
costs O(flushes); length groups cost about a byte per example before compression (the batches
of a group depend on token lengths, which the ledger does not recompute). The ids follow from
plan + manifest. The order of rows inside a micro-batch is not kept (one gradient sum; ids come
back in stream order). Object stores cannot append, so each flush (at every report, before the
checkpoint is handed to Ray) writes a new small object with only the new lines.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
from shardtune.data import storage
from shardtune.data.run_layout import RunLayout
from shardtune.data.shard_plan import EpochPlan, Ranges, slice_ranges

_ATTEMPT = re.compile(r"^attempt-(\d{5})\.json$")
_PART = re.compile(r"^rank-(\d{5})\.(\d{5})\.jsonl$")


def next_attempt(run_uri: str, options: storage.StorageOptions | None = None) -> int:
    """1 + the highest attempt recorded so far (rank 0 asks; the others get it by collective)."""
    found = [
        int(m[1])
        for n in storage.list_names(RunLayout(run_uri).ledger, options)
        if (m := _ATTEMPT.match(n))
    ]
    return max(found, default=0) + 1


def _runs(offsets: Sequence[int]) -> list[list[int]]:
    """Offsets as sorted [start, stop) runs."""
    out: list[list[int]] = []
    for o in sorted(offsets):
        if out and out[-1][1] == o:
            out[-1][1] += 1
        else:
            out.append([o, o + 1])
    return out


class LedgerWriter:
    """One rank's ledger for one attempt; buffers records in memory between flushes."""

    def __init__(
        self,
        run_uri: str,
        *,
        rank: int,
        attempt: int,
        world_size: int,
        resumed_step: int | None,
        data_uri: str | None = None,
        data_version: int | None = None,
        grad_accum: int = 1,
        batch_size: int = 1,
        length_grouping: int = 1,
        options: storage.StorageOptions | None = None,
    ):
        self.dir = RunLayout(run_uri).ledger
        self.rank, self.attempt, self.options = rank, attempt, options
        self.grad_accum = grad_accum
        self.batch_size, self.grouping = batch_size, length_grouping
        self._group: dict | None = None  # the length group being recorded
        self._records: list[dict] = []
        self._parts = 0
        self._list = 0  # the current position list's number (0: none yet)
        self._list_key: tuple | None = None
        self._list_record: dict | None = None
        self._list_written = False  # in the part being buffered
        if rank == 0:
            header = {
                "attempt": attempt,
                "world_size": world_size,
                "resumed_step": resumed_step,
                "data": data_uri,
                "data_version": data_version,
            }
            storage.write_text(
                storage.join(self.dir, f"attempt-{attempt:05d}.json"), json.dumps(header), options
            )

    def positions(self, *, epoch: int, plan: EpochPlan, ranges: Ranges) -> None:
        """The position list the following micro-batches' offsets point into."""
        key = (epoch, plan.identity, tuple(ranges))
        if key == self._list_key:
            return
        self._close_group()
        self._list += 1
        self._list_key = key
        self._list_record = {
            "list": self._list, "epoch": epoch, "plan": plan.identity, "seed": plan.seed,
            "shuffle": plan.shuffle, "grad_accum": self.grad_accum,
            "ranges": [list(r) for r in ranges],
        }  # fmt: skip
        self._list_written = False

    def record(
        self,
        *,
        epoch: int,
        step: int,
        micro_step: int,
        offsets: Sequence[int],
        group_step: int | None = None,
    ) -> None:
        """One micro-batch: its offsets in the current position list (of epoch `epoch`) and,
        with length grouping, its index in its group (TrainState.group_step before it ran)."""
        if self._list_key is None or self._list_key[0] != epoch:
            raise ValueError(f"ledger: micro-batch of epoch {epoch} before its position list")
        if self.grouping > 1 and group_step is not None:
            size = self.batch_size * self.grouping
            start = min(offsets) // size * size  # groups start at multiples of their size
            group = self._group
            if group is not None and (
                group["start"] != start or group["k0"] + len(group["batches"]) != group_step
            ):
                self._close_group()
            if self._group is None:
                self._group = {"start": start, "k0": group_step, "batches": []}
            self._group["batches"].append((step, micro_step, list(offsets)))
            return
        self._add_batch(step, micro_step, offsets)

    def _ensure_list(self) -> None:
        if not self._list_written:  # each part restates its list: a part reads on its own
            self._records.append(self._list_record)  # type: ignore[arg-type]
            self._list_written = True

    def _close_group(self) -> None:
        """Record the pending batches of one length group as a window of its offsets, a byte
        each: the batch's index in the group, or 255 where a batch outside this record (before a
        flush or a resume) took it. Appended to the previous record when that one ended with a
        whole group right before this one."""
        group, self._group = self._group, None
        if group is None:
            return
        batches, start, k0 = group["batches"], group["start"], group["k0"]
        size = self.batch_size * self.grouping
        steps_ok = all(
            m == batches[0][1] + i
            and s == _step_of(batches[0][0], batches[0][1], i, self.grad_accum)
            for i, (s, m, _) in enumerate(batches)
        )
        inside = all(start <= o < start + size for _, _, b in batches for o in b)
        if not (steps_ok and inside and self.grouping < 255):
            for step, micro_step, batch in batches:  # not expected: kept exact, uncompressed
                self._add_batch(step, micro_step, batch)
            return
        assign = bytearray(b"\xff" * size)
        for i, (_, _, batch) in enumerate(batches):
            for o in batch:
                assign[o - start] = k0 + i
        self._ensure_list()
        prev = self._records[-1]
        step, micro_step = batches[0][0], batches[0][1]
        if (
            "assign" in prev
            and prev["list"] == self._list
            and k0 == 0
            and (prev["k0"] + prev["batches"]) % self.grouping == 0
            and prev["start"] + len(prev["assign"]) == start
            and micro_step == prev["micro_step"] + prev["batches"]
            and step == _step_of(prev["step"], prev["micro_step"], prev["batches"], self.grad_accum)
        ):
            prev["assign"] += assign
            prev["batches"] += len(batches)
            return
        self._records.append({"list": self._list, "step": step, "micro_step": micro_step,
                              "batches": len(batches), "size": self.batch_size,
                              "grouping": self.grouping, "start": start, "k0": k0,
                              "assign": assign})  # fmt: skip

    def _add_batch(self, step: int, micro_step: int, offsets: Sequence[int]) -> None:
        self._ensure_list()
        prev = self._records[-1] if self._records else None
        if (
            prev is not None
            and "offsets" in prev
            and self._extends(prev, step, micro_step, offsets)
        ):
            prev["batches"] += 1
            prev["offsets"][-1][1] += len(offsets)
            return
        self._records.append({"list": self._list, "step": step, "micro_step": micro_step,
                              "batches": 1, "size": len(offsets), "offsets": _runs(offsets)})  # fmt: skip

    def _extends(self, prev: dict, step: int, micro_step: int, offsets: Sequence[int]) -> bool:
        """Whether this micro-batch continues `prev`: the next micro-step and its step, full
        batches so far, and the offsets right after prev's."""
        n, ga = prev["batches"], self.grad_accum
        end = prev["offsets"][-1][1]
        taken = sum(b - a for a, b in prev["offsets"])
        return (
            prev["list"] == self._list
            and micro_step == prev["micro_step"] + n
            and step == _step_of(prev["step"], prev["micro_step"], n, ga)
            and taken == n * prev["size"]
            and 0 < len(offsets) <= prev["size"]
            and min(offsets) == end
            and max(offsets) == end + len(offsets) - 1
            and len(set(offsets)) == len(offsets)
        )

    def flush(self) -> None:
        self._close_group()  # a group cut here continues in the next part (from its index)
        if not self._records:
            return
        self._parts += 1
        name = f"rank-{self.rank:05d}.{self._parts:05d}.jsonl"
        uri = storage.join(self.dir, f"attempt-{self.attempt:05d}", name)
        lines = [json.dumps(_encoded(r), separators=(",", ":")) for r in self._records]
        storage.write_text(uri, "\n".join(lines) + "\n", self.options)
        self._records = []
        self._list_written = False


def _encoded(record: dict) -> dict:
    if "assign" not in record:
        return record
    packed = base64.b64encode(zlib.compress(bytes(record["assign"]), 9)).decode()
    return {**record, "assign": packed}


def _step_of(step0: int, micro0: int, i: int, grad_accum: int) -> int:
    """The optimizer step micro-batch micro0 + i counts towards, micro0 counting towards step0."""
    return step0 + (micro0 - 1 + i) // grad_accum - (micro0 - 1) // grad_accum


class IdResolver:
    """Example ids of ledger positions: rebuilds the epoch's plan from the manifest (checked
    against the plan identity recorded) and reads only the `id` column of the shards the
    positions fall in, keeping the last `shards_in_memory` of them."""

    def __init__(
        self,
        data_uri: str,
        options: storage.StorageOptions | None = None,
        shards_in_memory: int = 4,
        version: int | None = None,
    ):
        from shardtune.data.manifest import read_manifest_version

        self.data_uri, self.options = data_uri, options
        # The manifest version the attempt read (None: the latest; ledgers from before runs
        # were pinned): `prepare --append` since then must not change what positions name.
        self.manifest = read_manifest_version(data_uri, version, options)
        self._sizes = self.manifest.shard_sizes()
        self._plans: OrderedDict[tuple, EpochPlan] = OrderedDict()
        self._ids: OrderedDict[int, np.ndarray] = OrderedDict()
        self.capacity = max(1, shards_in_memory)

    def _plan(self, lst: dict) -> EpochPlan:
        key = (lst["seed"], lst["epoch"], lst["shuffle"])
        if key not in self._plans:
            plan = EpochPlan(self._sizes, seed=key[0], epoch=key[1], shuffle=key[2])
            if plan.identity != lst["plan"]:
                raise ValueError(
                    f"ledger: plan {lst['plan']} of epoch {lst['epoch']} does not match the "
                    f"dataset at {self.data_uri} (plan {plan.identity}): it changed since"
                )
            self._plans[key] = plan
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[key]

    def _shard_ids(self, shard: int, plan: EpochPlan) -> np.ndarray:
        """The shard's ids in the plan's row order (cached per shard and plan's row order)."""
        if shard not in self._ids:
            import io

            import pyarrow.parquet as pq

            info = self.manifest.shards[shard]
            data = storage.read_bytes(storage.join(self.data_uri, info.name), self.options)
            self._ids[shard] = pq.read_table(io.BytesIO(data), columns=["id"])["id"].to_numpy()
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
        self._ids.move_to_end(shard)
        return self._ids[shard][plan.row_order(shard)]

    def ids(self, lst: dict, offsets: Sequence[Sequence[int]]) -> list[int]:
        """Ids at the offset runs `offsets` of position list `lst`, in stream order."""
        plan = self._plan(lst)
        positions = _positions(lst["ranges"], offsets)
        out: list[int] = []
        for start, stop in positions:
            pos = start
            while pos < stop:
                shard, offset, run = plan.span(pos)
                run = min(run, stop - pos)
                out += self._shard_ids(shard, plan)[offset : offset + run].tolist()
                pos += run
        return out


def _positions(ranges: Sequence[Sequence[int]], offsets: Sequence[Sequence[int]]) -> list:
    """Offset runs into the concatenation of `ranges` -> stream position runs."""
    starts = np.cumsum([0] + [b - a for a, b in ranges])
    out = []
    for lo, hi in offsets:
        while lo < hi:
            k = int(np.searchsorted(starts, lo, side="right")) - 1
            if not 0 <= k < len(ranges):
                raise ValueError(f"ledger: offset {lo} is outside its position list")
            n = min(hi, int(starts[k + 1])) - lo
            pos = ranges[k][0] + lo - int(starts[k])
            out.append((pos, pos + n))
            lo += n
    return out


def iter_committed(
    run_uri: str, options: storage.StorageOptions | None = None, *, resolve: bool = True
) -> Iterator[dict]:
    """What the run committed, one micro-batch at a time, in (attempt, rank, micro_step) order
    and bounded memory (one part and a few shards' id columns): attempts in order, where an
    attempt that resumed from step s discards every earlier entry past s (work of a failed
    attempt after the checkpoint it was restarted from). Entries: "epoch", "step",
    "micro_step", "rank", "attempt", "world_size", "list" (the position list), "offsets" (runs)
    and, with `resolve`, "ids"."""
    root = RunLayout(run_uri).ledger
    headers = [
        json.loads(storage.read_text(storage.join(root, name), options))
        for name in sorted(storage.list_names(root, options))
        if _ATTEMPT.match(name)
    ]
    headers.sort(key=lambda h: h["attempt"])
    resolvers: dict[tuple, IdResolver] = {}
    for i, header in enumerate(headers):
        # An entry survives if no later attempt resumed from before its step.
        later = [h["resumed_step"] or 0 for h in headers[i + 1 :]]
        cutoff = min(later) if later else None
        part_dir = storage.join(root, f"attempt-{header['attempt']:05d}")
        parts = sorted(
            (int(m[1]), int(m[2]), name)
            for name in storage.list_names(part_dir, options)
            if (m := _PART.match(name))
        )
        lists: dict[tuple[int, int], dict] = {}
        resolver = None
        if resolve:
            if not header.get("data"):
                raise ValueError(f"ledger: {run_uri} attempt {header['attempt']} names no dataset")
            key = (header["data"], header.get("data_version"))
            resolver = resolvers.get(key)
            if resolver is None:
                resolver = resolvers[key] = IdResolver(key[0], options, version=key[1])
        for rank, _, name in parts:
            text = storage.read_text(storage.join(part_dir, name), options)
            for line in text.splitlines():
                rec = json.loads(line)
                if "ranges" in rec:
                    lists[rank, rec["list"]] = rec
                    continue
                lst = lists[rank, rec["list"]]
                yield from _expand(rec, lst, rank, header, cutoff, resolver)


def _expand(rec: dict, lst: dict, rank: int, header: dict, cutoff: int | None,
            resolver: IdResolver | None) -> Iterator[dict]:  # fmt: skip
    """The micro-batches of one batch record, as entries."""
    size, ga = rec["size"], lst["grad_accum"]
    runs = [tuple(r) for r in rec.get("offsets", ())]
    assign = zlib.decompress(base64.b64decode(rec["assign"])) if "assign" in rec else b""
    for i in range(rec["batches"]):
        step = _step_of(rec["step"], rec["micro_step"], i, ga)
        if cutoff is not None and step > cutoff:
            return  # steps only grow within a record
        if assign:  # batch i is index k of the record's g-th group window
            g, k = divmod(rec["k0"] + i, rec["grouping"])
            lo = g * size * rec["grouping"]
            window = assign[lo : lo + size * rec["grouping"]]
            offsets = _runs([rec["start"] + lo + t for t, b in enumerate(window) if b == k])
        else:
            offsets = [list(r) for r in slice_ranges(runs, i * size, (i + 1) * size)]
        entry = {
            "epoch": lst["epoch"], "step": step, "micro_step": rec["micro_step"] + i,
            "rank": rank, "attempt": header["attempt"], "world_size": header["world_size"],
            "list": lst, "offsets": offsets,
        }  # fmt: skip
        if resolver is not None:
            entry["ids"] = resolver.ids(lst, offsets)
        yield entry


class Committed:
    """The committed ledger as a re-iterable view: each pass streams from storage again
    (iter_committed), so no pass holds the whole ledger."""

    def __init__(self, run_uri: str, options: storage.StorageOptions | None = None):
        self.run_uri, self.options = run_uri, options

    def __iter__(self) -> Iterator[dict]:
        return iter_committed(self.run_uri, self.options)


def read_committed(run_uri: str, options: storage.StorageOptions | None = None) -> Committed:
    """The ledger of what the run committed, entries with "ids", "rank", "step", "micro_step",
    "epoch", "attempt" and "world_size" (see iter_committed); iterate it as often as needed."""
    return Committed(run_uri, options)
