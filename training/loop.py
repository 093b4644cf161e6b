"""The per-worker train function Ray Train runs on every rank, in phases that read top to bottom:
`setup` (returns the worker's state), `train` (epochs of length-grouped micro-batches, each one
`train_step`), `evaluate` (one all-reduce), `report` (checkpoint + ray.train.report) and `close`
(always, in `finally`). When to report is decided by training/schedule.py; every rank runs the
same number of micro-batches and joins every collective; rank-0-only work says `if w.rank == 0`.

Test-only fault injection: `SHARDTUNE_FAULT="raise@step=5,rank=1,times=1,dir=/tmp/f"` (read by
the driver and passed in WorkerConfig.fault, since Ray workers inherit the raylet's environment,
not the driver's) makes rank 1 raise after optimizer step 5, or with `wait@...` block with its
pid in /tmp/f/waiting.pid until a test SIGKILLs it. See training/faults.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from shardtune.data import storage
from shardtune.data.alignment import AlignmentStats
from shardtune.data.batching import group_batches, group_starts, micro_batches_per_epoch
from shardtune.data.collate import collate
from shardtune.data.device import read_cpu_flags
from shardtune.data.ledger import LedgerWriter, next_attempt
from shardtune.data.logs import setup_logging
from shardtune.data.manifest import Manifest, read_manifest_compact
from shardtune.data.shard_plan import (
    EpochPlan,
    eval_segment,
    ranges_len,
    segment_ranges,
    train_segment,
)
from shardtune.data.stream import ShardStream, read_span
from shardtune.data.tasks import TaskSpec, get_task
from shardtune.training import checkpoint as ckpt
from shardtune.training import faults
from shardtune.training.config import WorkerConfig
from shardtune.training.ds_config import (
    build_deepspeed_config,
    effective_zero_stage,
    resolve_precision,
    total_optimizer_steps,
)
from shardtune.training.evaluation import evaluate_rows
from shardtune.training.metrics import scores_from_counts
from shardtune.training.model import build_model, build_tokenizer, resolve_model_dir
from shardtune.training.parameter_efficient import apply_peft, lora_module_names, parameter_counts
from shardtune.training.schedule import Cadence, checkpoint_due, early_stop_reason, report_due
from shardtune.training.tracking import Tracker, eval_scalars

log = logging.getLogger(__name__)
EVALS_DIR = "evals"  # {run}/evals/eval-{step}.json, one per evaluation (cluster/job.py reads them)

FINAL_METRICS = ("eval_f1", "eval_macro_f1", "eval_loss", "tokens_per_s")  # hparams' metrics
PHASES = ("data", "forward", "backward", "optimizer")  # the per-step breakdown, in step order
CUDA_TIMING_EVERY = 20  # on a GPU, time the phases of every 20th micro-batch (needs syncs)


@dataclass
class Meter:
    """Training counters of this rank since its worker group started."""

    examples: int = 0
    tokens: int = 0  # non-pad tokens
    padded_tokens: int = 0  # tokens the model computed, padding included
    micro_batches: int = 0
    seconds: float = 0.0  # wall time inside train steps
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    timed_seconds: float = 0.0  # the part of `seconds` whose phases were timed
    # Loss summed on the device since the last progress line, read only when logging: turning
    # it into a Python float every step would be a GPU-to-host sync point.
    loss_sum: Any = 0.0
    loss_n: int = 0

    def take_loss(self) -> float:
        mean = float(self.loss_sum) / self.loss_n if self.loss_n else float("nan")
        self.loss_sum, self.loss_n = 0.0, 0
        return mean


@dataclass
class MicroBatch:
    rows: list[dict]
    items: list  # the rows' model inputs (NER windows or encoded texts)
    offsets: tuple[int, ...]  # the rows' offsets in this epoch's position list


@dataclass
class Worker:
    """What setup builds and the other phases use."""

    cfg: WorkerConfig
    rank: int
    world: int
    spec: TaskSpec
    manifest: Manifest
    labels: list[str]
    label2id: dict[str, int]
    tokenizer: Any
    engine: Any
    device: torch.device
    precision: str
    zero_stage: int
    segment_len: int  # positions per rank per epoch (equal on all ranks)
    micro_per_epoch: int
    total_steps: int
    state: ckpt.TrainState
    taken: list[str]  # checkpoint names already in storage: new ones avoid them
    eval_rows: list[dict]
    eval_total: int
    fault: Any
    ledger: LedgerWriter | None = None
    stream: ShardStream | None = None
    meter: Meter = field(default_factory=Meter)
    stats: AlignmentStats = field(default_factory=AlignmentStats)
    t_start: float = field(default_factory=time.perf_counter)
    last_report_step: int = -1
    last_checkpoint_t: float = field(default_factory=time.perf_counter)
    last_checkpoint_step: int = -1
    first_step_unix: float | None = None  # wall clock of this group's first step (restart latency)
    params: tuple[int, int] = (0, 0)  # (trainable, total)
    tracker: Tracker | None = None  # rank 0 only
    loss_points: list = field(default_factory=list)  # rank 0: [step, loss] since the last eval
    stop_reason: str | None = None  # early stopping's, the same on every rank
    last_metrics: dict | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def train_worker(config: dict) -> None:
    """Ray Train entry point: config = {"worker": WorkerConfig}; values are read from here,
    never from module globals captured by pickling."""
    cfg: WorkerConfig = config["worker"]
    setup_logging(cfg.log_level)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown progress
    w = setup(cfg)
    try:
        train(w)
    finally:
        close(w)


# ---------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: WorkerConfig) -> Worker:
    """Data plan, model, DeepSpeed engine, resume, ledger and this rank's eval rows."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = cfg.train
    seed_everything(tc.seed)
    spec = get_task(cfg.task)
    manifest = read_manifest_compact(cfg.data.train, cfg.storage)  # once per node
    labels = manifest.labels
    segment_len = len(train_segment(manifest.num_examples, world, rank))
    micro_per_epoch = micro_batches_per_epoch(segment_len, tc.batch_size)
    _, total_steps = total_optimizer_steps(
        segment_len, tc.batch_size, tc.grad_accum, tc.epochs, tc.max_steps
    )
    engine, tokenizer, precision, stage, params = _build_engine(cfg, labels, world, total_steps)
    w = Worker(
        cfg=cfg, rank=rank, world=world, spec=spec, manifest=manifest, labels=labels,
        label2id={label: i for i, label in enumerate(labels)}, tokenizer=tokenizer, engine=engine,
        device=engine.device, precision=precision, zero_stage=stage, segment_len=segment_len,
        micro_per_epoch=micro_per_epoch, total_steps=total_steps, state=ckpt.TrainState(),
        taken=[], eval_rows=[], eval_total=0, fault=faults.parse_fault(cfg.fault), params=params,
    )  # fmt: skip
    resumed = _resume(w, ray.train.get_checkpoint())
    if tc.ledger:  # opt-in record of the ids each rank consumes (data/ledger.py)
        attempt = int(_all_reduce([next_attempt(cfg.run_uri, cfg.storage) if rank == 0 else 0], w.device, "max")[0])  # fmt: skip
        w.ledger = LedgerWriter(cfg.run_uri, rank=rank, attempt=attempt, world_size=world, options=cfg.storage,
                                resumed_step=w.state.step if resumed else None,
                                data_uri=cfg.data.train, grad_accum=tc.grad_accum,
                                batch_size=tc.batch_size, length_grouping=tc.length_grouping)  # fmt: skip
    _read_eval_rows(w)
    if rank == 0:
        w.tracker = Tracker(
            cfg.tracking, cfg.run_uri, cfg.storage, run_name=os.path.basename(cfg.run_uri),
            config_text=cfg.config_text,
            hparams={"model": cfg.model.model_dump(), "train": tc.model_dump(), "workers": world},
        )  # fmt: skip
        if cfg.model.peft.method == "lora":
            log.info("LoRA wraps %s", ", ".join(lora_module_names(engine.module)))
        log.info("%s parameters trainable of %s (peft: %s)", f"{params[0]:,}", f"{params[1]:,}",
                 cfg.model.peft.method)  # fmt: skip
        log.info(
            "%d workers x %d threads, %d training examples, %d micro-batches/epoch/worker, "
            "%d optimizer steps, ZeRO-%d %s, length groups of %d micro-batches",
            world, torch.get_num_threads(), manifest.num_examples, micro_per_epoch,
            w.total_steps, stage, precision, tc.length_grouping,
        )  # fmt: skip
    return w


def _build_engine(cfg: WorkerConfig, labels: list[str], world: int, total_steps: int) -> tuple:
    """(DeepSpeed engine, tokenizer, precision, ZeRO stage, (trainable, total) parameters) with
    the precision and stage this device and world size run (training/ds_config.py decides)."""
    import deepspeed

    tc = cfg.train
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.storage)
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, cfg.task, labels, cfg.model.dropout)
    model.config.shardtune_task = cfg.task  # read back by `evaluate` and `serve`
    model.config.shardtune_max_length = cfg.data.max_length
    # The class the weights belong to (a bare encoder's config still names BertModel): what
    # export rebuilds and what the exported config.json tells transformers.
    model.config.architectures = [type(model).__name__]
    model = apply_peft(model, cfg.model.peft, get_task(cfg.task).head_class, cfg.model.name_or_path)
    params = parameter_counts(model)
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    precision = resolve_precision(
        tc.precision, on_gpu=on_gpu, gpu_bf16=on_gpu and torch.cuda.is_bf16_supported(),
        cpu_flags=read_cpu_flags(),
    )  # fmt: skip
    stage = effective_zero_stage(tc.zero_stage, world, tc.offload)
    ds_config = build_deepspeed_config(
        batch_size=tc.batch_size, grad_accum=tc.grad_accum, world_size=world, lr=tc.lr,
        weight_decay=tc.weight_decay, warmup=tc.warmup, total_steps=total_steps,
        precision=precision, zero_stage=stage, offload=tc.offload, grad_clip=tc.grad_clip,
    )  # fmt: skip
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    named = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad
    ]  # frozen: no Adam state
    groups = [
        {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": tc.weight_decay},
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]  # fmt: skip
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if world == 1 and stage == 0:
        # Alone, DeepSpeed still flattens every gradient into buckets, "all-reduces" them with
        # itself and copies them back after each backward: three passes over the gradients for
        # an identity. Skipping it changes no number.
        engine.enable_backward_allreduce = False
    return engine, tokenizer, precision, stage, params


def _resume(w: Worker, resumed_from: Any) -> bool:
    """Restore engine, RNG and stream position from Ray's latest checkpoint, falling back past
    a corrupt one (training/checkpoint.py); True if there was one."""
    if resumed_from is None:
        return False
    cfg, tc = w.cfg, w.cfg.train
    with tempfile.TemporaryDirectory(prefix="shardtune-resume-") as tmp:
        name, local, w.taken = ckpt.agree_on_checkpoint(
            cfg.run_uri, os.path.basename(resumed_from.path.rstrip("/")), tmp, rank=w.rank,
            world_size=w.world, options=cfg.storage, warn=log.warning,
        )  # fmt: skip
        w.state = ckpt.load(w.engine, local, rank=w.rank, world_size=w.world, where=f"{cfg.run_uri}/{name}",
                            num_examples=w.manifest.num_examples)  # fmt: skip
    if w.state.ranges is not None:  # resumed with another world size: the epoch's rest was resplit
        rest = micro_batches_per_epoch(ranges_len(w.state.ranges), tc.batch_size)
        total = (
            w.state.step
            + (rest + w.micro_per_epoch * (tc.epochs - w.state.epoch - 1)) // tc.grad_accum
        )
        w.total_steps = min(total, tc.max_steps or total)
    if w.rank == 0:
        log.info(
            "resumed from %s/%s: epoch %d, step %d", cfg.run_uri, name, w.state.epoch, w.state.step
        )
    return True


def _read_eval_rows(w: Worker) -> None:
    """This rank's disjoint part of the eval set, read once, in length order (fewer pads)."""
    if not w.cfg.data.eval:
        return
    manifest = read_manifest_compact(w.cfg.data.eval, w.cfg.storage)
    segment = eval_segment(manifest.num_examples, w.world, w.rank)
    # Only the row groups this rank's slice lies in, not every shard it touches whole.
    rows, _ = read_span(w.cfg.data.eval, manifest, segment.start, segment.stop, w.cfg.storage)
    w.eval_rows = sorted(rows, key=w.spec.num_tokens)
    w.eval_total = manifest.num_examples


# ---------------------------------------------------------------------------------------- train


def train(w: Worker) -> None:
    """Epochs of micro-batches; after each optimizer step and each epoch, ask the schedule
    whether to report."""
    tc = w.cfg.train
    cadence = Cadence(tc.eval_every, tc.checkpoint_every_minutes, tc.checkpoint_every)
    w.engine.train()
    done = w.state.step >= w.total_steps
    while not done and w.state.epoch < tc.epochs:
        for batch in epoch_batches(w):
            if not train_step(w, batch):
                continue  # mid-accumulation
            on_optimizer_step(w)
            if _agreed(w, cadence, report_due(
                cadence, "step", step=w.state.step, last_report_step=w.last_report_step,
                minutes_since_checkpoint=(time.perf_counter() - w.last_checkpoint_t) / 60,
            )):  # fmt: skip
                report(w, evaluate(w))
            elif checkpoint_due(cadence, step=w.state.step, last_checkpoint_step=w.last_checkpoint_step):  # fmt: skip
                checkpoint_only(w)
            if w.state.step >= w.total_steps or w.stop_reason:
                done = True
                break
        if w.stream is not None:
            w.stream.close()
            w.stream = None
        if not done:
            w.state.epoch += 1
            w.state.position, w.state.group_step, w.state.group_done = 0, 0, ()
            w.state.ranges = None  # the normal plan again
            if report_due(cadence, "epoch", step=w.state.step, last_report_step=w.last_report_step):
                report(w, evaluate(w))
            done = w.stop_reason is not None
    if report_due(cadence, "end", step=w.state.step, last_report_step=w.last_report_step):
        report(w, evaluate(w), final=True)
    if w.rank == 0:
        log.info("training done in %s", _fmt_duration(time.perf_counter() - w.t_start))
        if w.tracker is not None:
            final = {k: v for k, v in (w.last_metrics or {}).items() if k in FINAL_METRICS}
            w.tracker.close(w.state.step, final)
            w.tracker = None


def _agreed(w: Worker, cadence: Cadence, due: bool) -> bool:
    """The decision every rank acts on: its own when decisions depend only on counters (equal on
    all ranks), rank 0's when they depend on the clock (one collective per step)."""
    if not cadence.uses_clock or w.world == 1:
        return due
    return _all_reduce([float(due) if w.rank == 0 else 0.0], w.device, "max")[0] > 0


def epoch_batches(w: Worker) -> Iterator[MicroBatch]:
    """This rank's micro-batches of the current epoch from its stream position: length groups
    read from the stream, encoded once, cut by data/batching.py; a resume mid-group recomputes
    that group and skips the micro-batches it already ran. `train_step` advances the state."""
    tc, st = w.cfg.train, w.state
    total = w.manifest.num_examples
    ranges = st.ranges or segment_ranges(train_segment(total, w.world, w.rank), total)
    plan = EpochPlan(w.manifest.shard_sizes(), seed=tc.seed, epoch=st.epoch)
    w.stream = ShardStream(
        w.cfg.data.train, w.manifest, plan, w.cfg.storage, w.cfg.data.shards_in_memory
    )
    rows_from = w.stream.iter_ranges(ranges, st.position)
    if w.ledger:  # micro-batches are recorded as offsets into this list (data/ledger.py)
        w.ledger.positions(epoch=st.epoch, plan=plan, ranges=ranges)
    size = tc.batch_size * tc.length_grouping
    for start in group_starts(ranges_len(ranges), tc.batch_size, tc.length_grouping, st.position):
        t0 = time.perf_counter()
        rows = [row for _, (_offset, row) in zip(range(size), rows_from, strict=False)]
        encoded = [
            w.spec.encode(row, w.tokenizer, w.label2id, w.cfg.data.max_length, w.stats)
            for row in rows
        ]
        lengths = [sum(len(item.input_ids) for item in items) for items in encoded]
        batches = group_batches(lengths, tc.batch_size, key=(tc.seed, st.epoch, w.rank, start),
                                shuffle=tc.length_grouping > 1)  # fmt: skip
        spent = time.perf_counter() - t0  # group reading + encoding: data time of a timed step
        w.meter.phase_seconds["data"] += spent
        w.meter.timed_seconds += spent
        w.meter.seconds += spent
        for k in range(st.group_step, len(batches)):
            idx = batches[k]
            yield MicroBatch([rows[i] for i in idx], [x for i in idx for x in encoded[i]],
                             tuple(start + i for i in idx))  # fmt: skip
        st.position, st.group_step, st.group_done = start + len(rows), 0, ()


def train_step(w: Worker, batch: MicroBatch) -> bool:
    """Forward, backward and DeepSpeed's step (which applies the optimizer only at the end of an
    accumulation); advances the state. True when an optimizer step happened."""
    st, m, engine = w.state, w.meter, w.engine
    cuda = w.device.type == "cuda"
    timed = not cuda or m.micro_batches % CUDA_TIMING_EVERY == 0
    marks = [time.perf_counter()]

    def mark() -> None:
        if timed:
            if cuda:
                torch.cuda.synchronize()  # attribute GPU time to the phase that queued it
            marks.append(time.perf_counter())

    if w.ledger:  # positions, not ids: the ids follow from the plan and the manifest
        w.ledger.record(epoch=st.epoch, step=st.step + 1, micro_step=st.micro_step + 1,
                        offsets=batch.offsets, group_step=st.group_step)  # fmt: skip
    tensors = collate(batch.items, w.pad_id)
    n_tokens = tensors.pop("num_tokens")
    tensors = {k: v.to(w.device, non_blocking=True) for k, v in tensors.items()}
    mark()
    loss = engine(**tensors).loss  # under torch.autocast when precision is bf16-mixed
    mark()
    engine.backward(loss)
    mark()
    engine.step()
    mark()
    end = time.perf_counter()
    if timed:
        for phase, (a, b) in zip(PHASES, zip(marks, marks[1:], strict=False), strict=True):
            m.phase_seconds[phase] += b - a
        m.timed_seconds += end - marks[0]
    m.seconds += end - marks[0]
    m.loss_sum = m.loss_sum + loss.detach().float()
    m.loss_n += 1
    m.examples += len(batch.rows)
    m.tokens += n_tokens
    m.padded_tokens += tensors["input_ids"].numel()
    m.micro_batches += 1
    advance(st, batch)
    return st.micro_step % w.cfg.train.grad_accum == 0


def advance(state: ckpt.TrainState, batch: MicroBatch) -> None:
    """Record a micro-batch as consumed, so a checkpoint taken now resumes right after it."""
    state.micro_step += 1
    state.group_step += 1
    state.group_done = (*state.group_done, *batch.offsets)


def on_optimizer_step(w: Worker) -> None:
    """Count the step, fire a test fault if one is due, print progress on rank 0."""
    tc, st, m = w.cfg.train, w.state, w.meter
    st.step += 1
    w.first_step_unix = w.first_step_unix or time.time()
    faults.maybe_fail(w.fault, step=st.step, rank=w.rank)
    if w.rank != 0 or not (st.step % tc.log_every == 0 or st.step == 1):
        return
    rate = m.tokens / m.seconds * w.world if m.seconds else 0.0  # ranks run concurrently
    eta = (w.total_steps - st.step) * m.seconds / max(1, m.micro_batches // tc.grad_accum)
    loss, lr = m.take_loss(), w.engine.get_lr()[0]
    examples_per_s = m.examples / m.seconds * w.world if m.seconds else 0.0
    w.loss_points.append([st.step, loss])
    if w.tracker is not None:
        norm = w.engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
        w.tracker.log(st.step, {
            "train/loss": loss, "train/learning_rate": lr, "train/tokens_per_s": rate,
            "train/examples_per_s": examples_per_s,
            "train/grad_norm": None if norm is None else float(norm),
        })  # fmt: skip
    log.info(
        "step %d/%d epoch %d/%d loss %.4f lr %.2e %.1f ex/s %.0f tok/s (%d workers) pad %.0f%% eta %s",
        st.step, w.total_steps, st.epoch + 1, tc.epochs, loss, lr, examples_per_s, rate, w.world,
        100 * (1 - m.tokens / max(1, m.padded_tokens)), _fmt_duration(eta),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- evaluate


def evaluate(w: Worker) -> dict:
    """Every rank predicts its part of the eval set; one all-reduce sums the entity/class
    counts, the eval loss and the training counters; returns the report's metrics."""
    tc = w.cfg.train
    t0 = time.perf_counter()
    names = w.spec.metric_names(w.labels)
    counts = np.zeros((len(names), 3), dtype=np.int64)
    loss_sum, batches = 0.0, 0
    if w.cfg.data.eval:
        # Under ZeRO-3 every forward all-gathers parameters, so all ranks run as many batches as
        # the largest eval segment needs; each rank can work that number out by itself.
        most_rows = -(-w.eval_total // w.world)
        w.engine.eval()
        result = evaluate_rows(
            lambda b: w.engine(**b), w.eval_rows, task=w.cfg.task, labels=w.labels, names=names,
            tokenizer=w.tokenizer, max_length=w.cfg.data.max_length, batch_size=tc.batch_size,
            device=w.device, min_batches=-(-most_rows // tc.batch_size),
        )  # fmt: skip
        w.engine.train()
        counts, loss_sum, batches = (
            result.counts,
            result.loss_sum,
            (result.batches if w.eval_rows else 0),
        )
    m = w.meter
    local = [
        m.examples,
        m.tokens,
        m.padded_tokens,
        m.seconds,
        m.timed_seconds,
        *m.phase_seconds.values(),
    ]
    summed = _all_reduce(counts.reshape(-1).tolist() + [loss_sum, batches] + local, w.device)
    n = counts.size
    counts = np.asarray(summed[:n], dtype=np.int64).reshape(len(names), 3)
    eval_loss, eval_batches = summed[n], summed[n + 1]
    examples, tokens, padded, seconds, timed, *phases = summed[n + 2 :]
    seconds /= w.world  # ranks train concurrently: mean wall time, not the sum
    metrics: dict = {
        "step": w.state.step, "epoch": w.state.epoch, "first_step_unix": w.first_step_unix,
        "elapsed_seconds": t0 - w.t_start,  # since this worker group started training
        "train_examples": examples, "train_tokens": tokens, "train_seconds": seconds,
        "examples_per_s": examples / seconds if seconds else 0.0,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "padding_fraction": 1 - tokens / padded if padded else 0.0,
        "step_breakdown": {p: s / timed if timed else 0.0 for p, s in zip(PHASES, phases, strict=True)},
        "data_wait_fraction": phases[0] / timed if timed else 0.0,
        "precision": w.precision, "zero_stage": w.zero_stage, "workers": w.world,
        "threads_per_worker": torch.get_num_threads(),
        "words_without_subwords": w.stats.words_without_subwords,
        "sentences_split": w.stats.sentences_split,
        "padding_examples_per_epoch": w.segment_len * w.world - w.manifest.num_examples,
        "trainable_params": w.params[0], "total_params": w.params[1],
        "peak_memory_mb": _peak_memory_mb(w.device),  # this rank's (ranks are alike)
        "peft": w.cfg.model.peft.method,
    }  # fmt: skip
    if w.cfg.data.eval:
        scores = scores_from_counts(counts, names)
        metrics.update(
            eval_f1=scores["micro"]["f1"], eval_precision=scores["micro"]["precision"],
            eval_recall=scores["micro"]["recall"], eval_macro_f1=scores["macro"]["f1"],
            eval_loss=eval_loss / max(1.0, eval_batches), eval_counts=counts.tolist(),
            eval_macro_precision=scores["macro"]["precision"],
            eval_macro_recall=scores["macro"]["recall"],
            eval_f1_per_label={name: row["f1"] for name, row in scores["per_type"].items()},
        )  # fmt: skip
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


# --------------------------------------------------------------------------------------- report


def report(w: Worker, metrics: dict, final: bool = False) -> None:
    """Checkpoint (on an optimizer-step boundary) and hand metrics + checkpoint to Ray Train."""

    st = w.state
    if "eval_f1" in metrics:  # every rank holds the same all-reduced F1: the same decision
        st.eval_f1_history = (*st.eval_f1_history, metrics["eval_f1"])
        es = w.cfg.train.early_stopping
        w.stop_reason = early_stop_reason(list(st.eval_f1_history), es.patience, es.min_delta)
    metrics["stopped_early"] = w.stop_reason
    metrics["final"] = final or w.stop_reason is not None
    if w.rank == 0:
        metrics["train_loss_points"], w.loss_points = w.loss_points, []
        _record_evaluation(w, metrics)
    # Mid-accumulation gradients are not part of DeepSpeed's state and would be lost on resume.
    at_boundary = st.micro_step % w.cfg.train.grad_accum == 0
    _save_and_report(w, metrics, metrics, at_boundary)
    w.last_report_step = st.step
    w.last_metrics = metrics
    if w.rank == 0 and w.stop_reason:
        log.info("stopping early at step %d: %s", st.step, w.stop_reason)
    if w.rank == 0 and "eval_f1" in metrics:
        b = metrics["step_breakdown"]
        log.info(
            "eval @ step %d: micro-F1 %.4f P %.4f R %.4f loss %.4f | %.0f tok/s, step time: "
            "data %.0f%% forward %.0f%% backward %.0f%% optimizer+comm %.0f%%, padding %.0f%%%s",
            st.step, metrics["eval_f1"], metrics["eval_precision"], metrics["eval_recall"],
            metrics["eval_loss"], metrics["tokens_per_s"], *(100 * b[p] for p in PHASES),
            100 * metrics["padding_fraction"],
            "" if at_boundary else " (no checkpoint: mid-accumulation)",
        )  # fmt: skip


def checkpoint_only(w: Worker) -> None:
    """A checkpoint between evaluations (train.checkpoint_every; always at an optimizer-step
    boundary). It carries no eval metrics: eval_f1 NaN ranks it below every evaluated one for
    Ray's retention and for export, without Ray logging a missing score attribute."""
    st = w.state
    metrics = {"step": st.step, "epoch": st.epoch, "checkpoint_only": True}
    to_ray = {**metrics, "eval_f1": float("nan")} if w.cfg.data.eval else metrics
    _save_and_report(w, metrics, to_ray, True)


def _save_and_report(w: Worker, metrics: dict, to_ray: dict, at_boundary: bool) -> None:
    """Every rank: flush the ledger, save this rank's checkpoint part locally and hand it to Ray
    Train, which uploads it in a background thread under train.checkpoint_upload=async (and
    deletes the local copy after): training goes on while the bytes travel, and the checkpoint
    counts only once every rank's upload finished, so a failure meanwhile resumes from the
    previous one, which the ledger's committed view follows (attempt headers name the step)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    st = w.state
    if w.ledger:
        w.ledger.flush()  # before the checkpoint exists: a resume from it never misses lines
    mode = (CheckpointUploadMode.ASYNC if w.cfg.train.checkpoint_upload == "async"
            else CheckpointUploadMode.SYNC)  # fmt: skip
    local = tempfile.mkdtemp(prefix="shardtune-ckpt-")
    handed = False
    try:
        checkpoint = None
        if at_boundary:
            ckpt.save(
                w.engine, local, rank=w.rank, world_size=w.world, state=st, tokenizer=w.tokenizer,
                meta={"metrics": {k: v for k, v in metrics.items() if k != "eval_counts"}},
            )  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(local)
        ray.train.report(
            to_ray, checkpoint=checkpoint, checkpoint_upload_mode=mode,
            checkpoint_dir_name=ckpt.new_checkpoint_name(st.step, w.taken) if checkpoint else None,
        )  # fmt: skip
        handed = checkpoint is not None and mode == CheckpointUploadMode.ASYNC
    finally:
        if not handed:  # an async upload still reads it; Ray deletes it when done
            shutil.rmtree(local, ignore_errors=True)
    if at_boundary:
        w.last_checkpoint_t = time.perf_counter()
        w.last_checkpoint_step = st.step


def _record_evaluation(w: Worker, metrics: dict) -> None:
    """Rank 0, before the checkpoint: this evaluation's metrics as one object in storage (the
    report's history lists every one, not only the checkpoints retention kept), and its points
    to the trackers, whose files then go to storage."""
    step = w.state.step
    storage.write_text(
        storage.join(w.cfg.run_uri, EVALS_DIR, f"eval-{step:08d}.json"),
        json.dumps(metrics, default=float), w.cfg.storage,
    )  # fmt: skip
    if w.tracker is None:
        return
    if "eval_f1" in metrics:
        w.tracker.log(step, eval_scalars(metrics))
    w.tracker.flush(step)


# ---------------------------------------------------------------------------------------- close


def close(w: Worker) -> None:
    """Always runs: stop the stream's prefetch thread. (Ray Train owns the process group and
    destroys it when the worker group ends.)"""
    if w.stream is not None:
        w.stream.close()
        w.stream = None
    if w.tracker is not None:  # training failed: keep what was logged, without final metrics
        try:
            w.tracker.close(w.state.step, None)
        except Exception as exc:  # never hide the failure that brought us here
            log.warning("tracking: could not save the last points: %s", exc)
        w.tracker = None


# ------------------------------------------------------------------------------------- helpers


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: the GPU's allocations, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
