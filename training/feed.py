"""This rank's training data: its shards streamed in the epoch's order, read in length groups,
encoded once and cut into micro-batches (data/batching.py), from the position a `TrainState`
holds; plus the opt-in ledger of what each micro-batch contained (data/ledger.py).

The position (epoch, position, group_step, group_done, ranges) lives in the `TrainState` that
checkpoints save: `batches(state)` starts from it, and `advance` moves it past a micro-batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from shardtune.data.alignment import AlignmentStats
from shardtune.data.batching import group_batches, group_starts, micro_batches_per_epoch
from shardtune.data.ledger import LedgerWriter, next_attempt
from shardtune.data.manifest import Manifest
from shardtune.data.shard_plan import EpochPlan, ranges_len, segment_ranges, train_segment
from shardtune.data.storage import StorageOptions
from shardtune.data.stream import ShardStream
from shardtune.data.tasks import TaskSpec, get_task
from shardtune.training.checkpoint import TrainState
from shardtune.training.collective import all_reduce
from shardtune.training.config import DataSection, TrainSection, WorkerConfig
from shardtune.training.meter import Meter
from shardtune.training.session import Placement

if TYPE_CHECKING:  # a name for readers; transformers stays unimported until a worker runs
    from transformers import PreTrainedTokenizerBase as Tokenizer


@dataclass
class MicroBatch:
    rows: list[dict]
    items: list  # the rows' model inputs (NER windows or encoded texts)
    offsets: tuple[int, ...]  # the rows' offsets in this epoch's position list


def advance(state: TrainState, batch: MicroBatch) -> None:
    """Record a micro-batch as consumed, so a checkpoint taken now resumes right after it."""
    state.micro_step += 1
    state.group_step += 1
    state.group_done = (*state.group_done, *batch.offsets)


class DataFeed:
    """Micro-batches of one rank; every rank gets the same number per epoch."""

    def __init__(
        self,
        data: DataSection,
        train: TrainSection,
        options: StorageOptions,
        *,
        manifest: Manifest,
        spec: TaskSpec,
        tokenizer: Tokenizer,
        rank: int,
        world: int,
        meter: Meter | None = None,
    ) -> None:
        self.data, self.train, self.options = data, train, options
        self.manifest, self.spec, self.tokenizer = manifest, spec, tokenizer
        self.rank, self.world = rank, world
        self.meter = meter or Meter()  # where the reading and encoding time goes
        self.label2id = {label: i for i, label in enumerate(manifest.labels)}
        self.stats = AlignmentStats()  # words without sub-words, sentences split into windows
        self.segment_len = len(train_segment(manifest.num_examples, world, rank))  # equal on all
        self.micro_per_epoch = micro_batches_per_epoch(self.segment_len, train.batch_size)
        self.ledger: LedgerWriter | None = None
        self.stream: ShardStream | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def batches(self, st: TrainState) -> Iterator[MicroBatch]:
        """The current epoch's micro-batches from the state's position: length groups read from
        the stream, encoded once, cut by data/batching.py; a resume mid-group recomputes that
        group and skips the micro-batches it already ran. The caller advances the state."""
        tc, total = self.train, self.manifest.num_examples
        ranges = st.ranges or segment_ranges(train_segment(total, self.world, self.rank), total)
        plan = EpochPlan(self.manifest.shard_sizes(), seed=tc.seed, epoch=st.epoch)
        self.stream = ShardStream(
            self.data.train, self.manifest, plan, self.options, self.data.shards_in_memory
        )
        rows_from = self.stream.iter_ranges(ranges, st.position)
        if self.ledger:  # micro-batches are recorded as offsets into this list (data/ledger.py)
            self.ledger.positions(epoch=st.epoch, plan=plan, ranges=ranges)
        size = tc.batch_size * tc.length_grouping
        for start in group_starts(
            ranges_len(ranges), tc.batch_size, tc.length_grouping, st.position
        ):
            t0 = time.perf_counter()
            rows = [row for _, (_offset, row) in zip(range(size), rows_from, strict=False)]
            encoded = [
                self.spec.encode(
                    row, self.tokenizer, self.label2id, self.data.max_length, self.stats
                )
                for row in rows
            ]
            lengths = [sum(len(item.input_ids) for item in items) for items in encoded]
            batches = group_batches(
                lengths,
                tc.batch_size,
                key=(tc.seed, st.epoch, self.rank, start),
                shuffle=tc.length_grouping > 1,
            )
            self.meter.add_data_time(time.perf_counter() - t0)
            for idx in batches[st.group_step :]:
                yield MicroBatch(
                    [rows[i] for i in idx],
                    [x for i in idx for x in encoded[i]],
                    tuple(start + i for i in idx),
                )
            st.position, st.group_step, st.group_done = start + len(rows), 0, ()

    def record(self, st: TrainState, batch: MicroBatch) -> None:
        """Ledger: the micro-batch about to run, by positions (the ids follow from the plan)."""
        if self.ledger:
            self.ledger.record(
                epoch=st.epoch,
                step=st.step + 1,
                micro_step=st.micro_step + 1,
                offsets=batch.offsets,
                group_step=st.group_step,
            )

    def flush(self) -> None:
        """Before a checkpoint exists: a resume from it never misses ledger lines."""
        if self.ledger:
            self.ledger.flush()

    def end_epoch(self, st: TrainState) -> None:
        """Stop this epoch's stream; the next epoch starts at its beginning, on the normal
        plan (a resplit for another world size lasts only for the epoch it was made in)."""
        self.close()
        st.epoch += 1
        st.position, st.group_step, st.group_done = 0, 0, ()
        st.ranges = None

    def close(self) -> None:
        """Stop the stream's prefetch thread."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def open_feed(
    cfg: WorkerConfig, place: Placement, manifest: Manifest, tokenizer: Tokenizer, meter: Meter
) -> DataFeed:
    spec = get_task(cfg.task)
    return DataFeed(
        cfg.data,
        cfg.train,
        cfg.storage,
        manifest=manifest,
        spec=spec,
        tokenizer=tokenizer,
        rank=place.rank,
        world=place.world,
        meter=meter,
    )


def open_ledger(
    cfg: WorkerConfig, place: Placement, device: torch.device, resumed_step: int | None
) -> LedgerWriter:
    """This rank's ledger for a new attempt (every rank calls it: the attempt number is rank 0's,
    carried by a collective)."""
    tc = cfg.train
    mine = next_attempt(cfg.run_uri, cfg.storage) if place.rank == 0 else 0
    attempt = int(all_reduce([mine], device, "max")[0])
    return LedgerWriter(
        cfg.run_uri,
        rank=place.rank,
        attempt=attempt,
        world_size=place.world,
        options=cfg.storage,
        resumed_step=resumed_step,
        data_uri=cfg.data.train,
        data_version=cfg.train_version,
        grad_accum=tc.grad_accum,
        batch_size=tc.batch_size,
        length_grouping=tc.length_grouping,
    )
