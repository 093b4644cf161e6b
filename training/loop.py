"""The per-worker train function Ray Train runs on every rank, in phases that read top to bottom:
`setup` (builds the components), `train` (epochs of micro-batches; after each optimizer step and
each epoch the schedule says whether to `report` = evaluate + checkpoint) and `close` (always, in
`finally`). The components, each testable alone:

  feed.py          this rank's micro-batches from its stream position, and the ledger
  step.py          the DeepSpeed engine and `Trainer.train_step`
  evaluator.py     the eval set's all-reduced scores and the training counters -> EvalRecord
  checkpointer.py  resume, save + hand to Ray, and when the last checkpoint/report was
  meter.py         counters, rank 0's progress lines, eval records and tracker
  session.py       the only module that talks to ray.train

When to report is decided by training/schedule.py; every rank runs the same number of
micro-batches and joins every collective; rank-0-only work lives in `Progress` and `_log_setup`.

Test-only fault injection: `SHARDTUNE_FAULT="raise@step=5,rank=1,times=1,dir=/tmp/f"` (read by
the driver and passed in WorkerConfig.fault, since Ray workers inherit the raylet's environment,
not the driver's) makes rank 1 raise after optimizer step 5, or with `wait@...` block with its
pid in /tmp/f/waiting.pid until a test SIGKILLs it. See training/faults.py.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from shardtune.data.batching import micro_batches_per_epoch
from shardtune.data.logs import setup_logging
from shardtune.data.manifest import plan_identity, read_manifest_version
from shardtune.data.shard_plan import ranges_len, train_segment
from shardtune.training import faults, session
from shardtune.training.checkpoint import TrainState
from shardtune.training.checkpointer import Checkpointer
from shardtune.training.collective import all_reduce
from shardtune.training.config import WorkerConfig
from shardtune.training.ds_config import total_optimizer_steps
from shardtune.training.evaluator import Evaluator, open_evaluator, peak_memory_mb
from shardtune.training.feed import DataFeed, open_feed, open_ledger
from shardtune.training.meter import Meter, Progress, open_progress
from shardtune.training.parameter_efficient import lora_module_names
from shardtune.training.records import EvalRecord, EvalScores, RunFacts
from shardtune.training.schedule import Cadence, checkpoint_due, early_stop_reason, report_due
from shardtune.training.session import Placement
from shardtune.training.step import Engine, Trainer, build_engine

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The components `setup` builds; the phases below use them."""

    cfg: WorkerConfig
    place: Placement
    model: Engine
    feed: DataFeed
    trainer: Trainer
    evaluator: Evaluator
    checkpointer: Checkpointer
    progress: Progress
    total_steps: int
    fault: faults.Fault | None
    stop_reason: str | None = None  # early stopping's, the same on every rank
    # A checkpoint_every save due at the last optimizer step, taken before the next micro-batch
    # unless a report at that step comes first (the epoch's or the end's): one save per step.
    checkpoint_pending: bool = False


def train_worker(config: dict) -> None:
    """Ray Train entry point: config = {"worker": WorkerConfig}; values are read from here,
    never from module globals captured by pickling."""
    cfg: WorkerConfig = config["worker"]
    setup_logging(cfg.log_level)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown progress
    run = setup(cfg, session.placement(), session.restored_checkpoint())
    try:
        train(run)
    finally:
        close(run)


# ---------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: WorkerConfig, place: Placement, restored: str | None) -> Run:
    """Data plan, model, DeepSpeed engine, resume, ledger and this rank's eval rows."""
    tc = cfg.train
    seed_everything(tc.seed)
    manifest = read_manifest_version(cfg.data.train, cfg.train_version, cfg.storage)  # pinned
    segment_len = len(train_segment(manifest.num_examples, place.world, place.rank))  # all equal
    _, total_steps = total_optimizer_steps(
        segment_len, tc.batch_size, tc.grad_accum, tc.epochs, tc.max_steps
    )
    model = build_engine(cfg, manifest.labels, place.world, total_steps)
    meter = Meter()  # the clock of this worker group's training starts here
    feed = open_feed(cfg, place, manifest, model.tokenizer, meter)
    trainer = Trainer(model.engine, tc.grad_accum, feed.pad_id, meter=meter)
    ck = Checkpointer(cfg.run_uri, cfg.storage, place, upload=tc.checkpoint_upload)
    # A fresh state records the data it trains on; a resumed one must match it (check_pin).
    pin = TrainState(
        manifest_version=manifest.version,
        eval_version=cfg.eval_version,
        plan_identity=plan_identity(manifest, tc.seed),
    )
    trainer.state = replace(pin)
    resumed = ck.resume(model.engine, restored, num_examples=manifest.num_examples, pin=pin)
    if resumed is not None:
        trainer.state = resumed
        total_steps = _steps_after_resplit(resumed, cfg, feed.micro_per_epoch, total_steps)
    if tc.ledger:  # opt-in record of the ids each rank consumes (data/ledger.py)
        resumed_step = resumed.step if resumed is not None else None
        feed.ledger = open_ledger(cfg, place, trainer.device, resumed_step)
    evaluator = open_evaluator(cfg, place, model.tokenizer, manifest.labels)
    progress, fault = open_progress(cfg, place), faults.parse_fault(cfg.fault)
    progress.roll_back(resumed.step if resumed is not None else 0)  # a lost attempt's records
    run = Run(cfg, place, model, feed, trainer, evaluator, ck, progress, total_steps, fault)
    if place.rank == 0:
        _log_setup(run)
    return run


def _steps_after_resplit(
    state: TrainState, cfg: WorkerConfig, micro_per_epoch: int, total_steps: int
) -> int:
    """Resumed with another world size, the epoch's rest was resplit: its micro-batches count."""
    if state.ranges is None:
        return total_steps
    tc = cfg.train
    rest = micro_batches_per_epoch(ranges_len(state.ranges), tc.batch_size)
    total = state.step + (rest + micro_per_epoch * (tc.epochs - state.epoch - 1)) // tc.grad_accum
    return min(total, tc.max_steps or total)


def _log_setup(run: Run) -> None:
    cfg, model, feed = run.cfg, run.model, run.feed
    if cfg.model.peft.method == "lora":
        log.info("LoRA wraps %s", ", ".join(lora_module_names(model.engine.module)))
    log.info(
        "%s parameters trainable of %s (peft: %s)",
        f"{model.trainable_params:,}",
        f"{model.total_params:,}",
        cfg.model.peft.method,
    )
    log.info(
        "%d workers x %d threads, %d training examples, %d micro-batches/epoch/worker, "
        "%d optimizer steps, ZeRO-%d %s, length groups of %d micro-batches",
        run.place.world,
        torch.get_num_threads(),
        feed.manifest.num_examples,
        feed.micro_per_epoch,
        run.total_steps,
        model.zero_stage,
        model.precision,
        cfg.train.length_grouping,
    )


# ---------------------------------------------------------------------------------------- train


def train(run: Run) -> None:
    """Epochs of micro-batches; after each optimizer step and each epoch, ask the schedule
    whether to report."""
    tc, st, ck = run.cfg.train, run.trainer.state, run.checkpointer
    cadence = Cadence(tc.eval_every, tc.checkpoint_every_minutes, tc.checkpoint_every)
    run.trainer.engine.train()
    done = st.step >= run.total_steps
    while not done and st.epoch < tc.epochs:
        done = _epoch(run, cadence)
        if not done:
            run.feed.end_epoch(st)
            if report_due(cadence, "epoch", step=st.step, last_report_step=ck.last_report_step):
                report(run)
            elif run.checkpoint_pending and st.epoch < tc.epochs:  # else the end's report
                checkpoint_only(run)
            done = run.stop_reason is not None
    if report_due(cadence, "end", step=st.step, last_report_step=ck.last_report_step):
        report(run, final=True)
    run.progress.finish(st.step, run.trainer.meter.started)


def _epoch(run: Run, cadence: Cadence) -> bool:
    """The rest of the current epoch; True when training is done (last step, early stop)."""
    st, ck, trainer = run.trainer.state, run.checkpointer, run.trainer
    try:
        for batch in run.feed.batches(st):
            if run.checkpoint_pending:  # no report followed the step it was due at
                checkpoint_only(run)
            run.feed.record(st, batch)  # before the step: the ledger numbers it from the state
            if not trainer.train_step(batch):
                continue  # mid-accumulation
            trainer.on_optimizer_step()
            faults.maybe_fail(run.fault, step=st.step, rank=run.place.rank)
            run.progress.on_step(st, trainer.meter, trainer.engine, run.total_steps)
            due = report_due(
                cadence,
                "step",
                step=st.step,
                last_report_step=ck.last_report_step,
                minutes_since_checkpoint=ck.minutes_since_checkpoint(),
            )
            if _agreed(run, cadence, due):
                report(run)
            elif checkpoint_due(
                cadence, step=st.step, last_checkpoint_step=ck.last_checkpoint_step
            ):
                run.checkpoint_pending = True  # taken by the next micro-batch or report
            if st.step >= run.total_steps or run.stop_reason:
                return True
        return False
    finally:
        run.feed.close()


def _agreed(run: Run, cadence: Cadence, due: bool) -> bool:
    """The decision every rank acts on: its own when decisions depend only on counters (equal on
    all ranks), rank 0's when they depend on the clock (one collective per step)."""
    if not cadence.uses_clock or run.place.world == 1:
        return due
    mine = float(due) if run.place.rank == 0 else 0.0
    return all_reduce([mine], run.trainer.device, "max")[0] > 0


# --------------------------------------------------------------------------------------- report


def report(run: Run, final: bool = False) -> None:
    """Evaluate (all ranks), decide on early stopping, then checkpoint (on an optimizer-step
    boundary) and hand the record to Ray Train."""
    st, trainer = run.trainer.state, run.trainer
    record = run.evaluator.evaluate(trainer.engine, trainer.meter, st, facts=lambda: _facts(run))
    if record.scores is not None:  # every rank holds the same all-reduced F1: the same decision
        st.eval_f1_history = (*st.eval_f1_history, record.scores.eval_f1)
        es = run.cfg.train.early_stopping
        run.stop_reason = early_stop_reason(list(st.eval_f1_history), es.patience, es.min_delta)
    record = replace(
        record, stopped_early=run.stop_reason, final=final or run.stop_reason is not None
    )
    record = run.progress.record(record)  # rank 0: with its loss points, to evals/ and trackers
    at_boundary = trainer.at_boundary
    _save(run, record.to_dict(counts=False), record.to_dict(), at_boundary)
    run.checkpoint_pending = False  # this step's checkpoint is the evaluated one
    run.checkpointer.last_report_step = st.step
    run.progress.after_report(record, at_boundary=at_boundary)


def checkpoint_only(run: Run) -> None:
    """A checkpoint between evaluations (train.checkpoint_every; always at an optimizer-step
    boundary). It carries no eval metrics: eval_f1 -1 ranks it below every evaluated one for
    Ray's retention and for export, without Ray logging a missing score attribute. Not NaN: Ray's
    snapshot writes NaN as null, and a restored None score breaks its next ranking (TypeError
    in the controller, the rerun fails)."""
    st = run.trainer.state
    record = EvalRecord(step=st.step, epoch=st.epoch, checkpoint_only=True)
    to_ray = replace(record, scores=EvalScores(-1.0)) if run.evaluator.enabled else record
    _save(run, record.to_dict(), to_ray.to_dict(), True)
    run.checkpoint_pending = False


def _save(run: Run, meta: dict, to_ray: dict, at_boundary: bool) -> None:
    run.feed.flush()  # the ledger, before the checkpoint exists: a resume never misses lines
    run.checkpointer.save(
        run.trainer.engine,
        run.trainer.state,
        tokenizer=run.model.tokenizer,
        meta=meta,
        to_ray=to_ray,
        at_boundary=at_boundary,
    )


def _facts(run: Run) -> RunFacts:
    model, feed, world = run.model, run.feed, run.place.world
    return RunFacts(
        precision=model.precision,
        zero_stage=model.zero_stage,
        workers=world,
        threads_per_worker=torch.get_num_threads(),
        words_without_subwords=feed.stats.words_without_subwords,
        sentences_split=feed.stats.sentences_split,
        padding_examples_per_epoch=feed.segment_len * world - feed.manifest.num_examples,
        trainable_params=model.trainable_params,
        total_params=model.total_params,
        peak_memory_mb=peak_memory_mb(run.trainer.device),
        peft=run.cfg.model.peft.method,
    )


# ---------------------------------------------------------------------------------------- close


def close(run: Run) -> None:
    """Always runs: stop the stream's prefetch thread; a tracker still open means training
    failed: keep what was logged. (Ray Train owns the process group and destroys it.)"""
    run.feed.close()
    run.progress.close(run.trainer.state.step)
