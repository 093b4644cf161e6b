"""The per-worker train function that Ray Train runs on every rank.

Reads top to bottom: setup (config, data plan, model, DeepSpeed engine, resume), the epoch
loop, and evaluate-checkpoint-report. Every rank runs the same number of micro-batches and
joins every collective; rank-0-only work is marked `if rank == 0`.

Test-only fault injection: `SHARDTUNE_FAULT="raise@step=5,rank=1,times=1,dir=/tmp/f"` (read by
the driver and passed in `config["fault"]`, since Ray workers inherit the raylet's environment,
not the driver's) makes rank 1 raise after optimizer step 5, or with `wait@...` block with its
pid in /tmp/f/waiting.pid until a test SIGKILLs it. See training/faults.py.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from shardtune.data import storage
from shardtune.data.alignment import AlignmentStats
from shardtune.data.collate import collate
from shardtune.data.ledger import LedgerWriter, next_attempt
from shardtune.data.manifest import read_manifest
from shardtune.data.shard_plan import (
    EpochPlan,
    eval_segment,
    ranges_len,
    segment_ranges,
    train_segment,
)
from shardtune.data.stream import ShardStream
from shardtune.training import checkpoint as ckpt
from shardtune.training import faults
from shardtune.training.ds_config import build_deepspeed_config, total_optimizer_steps
from shardtune.training.evaluation import encode_row, evaluate_rows, metric_names
from shardtune.training.metrics import scores_from_counts
from shardtune.training.model import build_model, build_tokenizer, resolve_model_dir


@dataclass
class Meter:
    """Training throughput since the run (re)started on this rank."""

    examples: int = 0
    tokens: int = 0  # non-pad tokens
    seconds: float = 0.0
    loss_sum: float = 0.0
    loss_n: int = 0
    data_seconds: float = 0.0  # part of `seconds` spent getting the micro-batch's rows


def say(message: str) -> None:
    """A progress line for the person watching. Written to fd 1 directly: Ray Train's print
    patch would otherwise emit every line twice (stdout and its logger)."""
    os.write(1, f"[shardtune] {message}\n".encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def train_worker(config: dict) -> None:
    """Ray Train entry point. `config` = {"job": the validated job tree (cluster.config.JobConfig,
    passed as an object so this package never imports the head side)}; values are read from
    here, never from module globals captured by pickling."""
    import deepspeed
    import ray.train

    job = config["job"]
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown progress
    tc = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    options = job.storage_options()
    seed_everything(tc.seed)

    # -- data plan: same step count on every rank --------------------------------------------
    manifest = read_manifest(job.data.train, options)
    labels = manifest.labels
    label2id = {label: i for i, label in enumerate(labels)}
    shard_sizes = tuple(s.num_examples for s in manifest.shards)
    segment_len = len(train_segment(manifest.num_examples, world, rank))
    micro_per_epoch, total_steps = total_optimizer_steps(
        segment_len, tc.batch_size, tc.grad_accum, tc.epochs, tc.max_steps
    )

    # -- model and engine --------------------------------------------------------------------
    model_dir = resolve_model_dir(job.model.name_or_path, options)
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, job.task, labels, job.model.dropout)
    model.config.shardtune_task = job.task  # read back by `evaluate` and `serve`
    model.config.shardtune_max_length = job.data.max_length
    ds_config = build_deepspeed_config(
        batch_size=tc.batch_size, grad_accum=tc.grad_accum, world_size=world, lr=tc.lr,
        weight_decay=tc.weight_decay, warmup=tc.warmup, total_steps=total_steps,
        precision=tc.precision, zero_stage=tc.zero_stage, offload=tc.offload, grad_clip=tc.grad_clip,
    )  # fmt: skip
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": tc.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    device = engine.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    run_uri = storage.join(job.run.output, job.run.name)  # checkpoints, ledger, snapshot
    state = ckpt.TrainState()
    taken: list[str] = []  # names in the run directory at resume: new checkpoints avoid them
    resumed_from = ray.train.get_checkpoint()  # Ray's latest registered; may prove corrupt
    if resumed_from is not None:
        with tempfile.TemporaryDirectory(prefix="shardtune-resume-") as tmp:
            name, local, taken = ckpt.agree_on_checkpoint(
                run_uri, os.path.basename(resumed_from.path.rstrip("/")), tmp, rank=rank,
                options=options, warn=say,
            )  # fmt: skip
            state = ckpt.load(engine, local, rank=rank, world_size=world, where=f"{run_uri}/{name}",
                              num_examples=manifest.num_examples)  # fmt: skip
        if rank == 0:
            say(f"resumed from {run_uri}/{name}: epoch {state.epoch}, step {state.step}")
    fault = faults.parse_fault(config.get("fault"))
    if state.ranges is not None:  # resumed with another world size: the epoch's rest was resplit
        rest = -(-(ranges_len(state.ranges) - state.position) // tc.batch_size)
        total_steps = (
            state.step + (rest + micro_per_epoch * (tc.epochs - state.epoch - 1)) // tc.grad_accum
        )
        total_steps = min(total_steps, tc.max_steps or total_steps)
    ledger = None
    if tc.ledger:  # opt-in record of the ids each rank consumes (data/ledger.py)
        attempt = int(
            _all_reduce([next_attempt(run_uri, options) if rank == 0 else 0], device, "max")[0]
        )
        ledger = LedgerWriter(run_uri, rank=rank, attempt=attempt, world_size=world, options=options,
                              resumed_step=state.step if resumed_from is not None else None)  # fmt: skip

    # -- eval rows: this rank's disjoint part, read once ----------------------------------------
    eval_rows: list[dict] = []
    names = metric_names(job.task, labels)
    if job.data.eval:
        eval_manifest = read_manifest(job.data.eval, options)
        plan = EpochPlan(
            tuple(s.num_examples for s in eval_manifest.shards), seed=0, epoch=0, shuffle=False
        )
        stream = ShardStream(job.data.eval, eval_manifest, plan, options, job.data.shards_in_memory)
        eval_rows = [
            row
            for _, row in stream.iter_from(eval_segment(eval_manifest.num_examples, world, rank))
        ]
        stream.close()

    meter = Meter()
    stats = AlignmentStats()
    t_start = time.perf_counter()
    last_report_step = -1
    last_checkpoint_t = time.perf_counter()  # rank 0's clock drives checkpoint_every_minutes
    first_step_unix = None  # wall clock of this worker group's first step (restart latency)

    def evaluate_and_report(final: bool = False) -> None:
        nonlocal last_report_step, last_checkpoint_t
        t0 = time.perf_counter()
        metrics: dict = {
            "step": state.step, "epoch": state.epoch, "final": final, "first_step_unix": first_step_unix,
            "elapsed_seconds": t0 - t_start,  # since this worker group started training
        }  # fmt: skip
        engine.eval()
        if eval_rows or job.data.eval:
            local_batches = -(-len(eval_rows) // tc.batch_size)
            max_batches = int(_all_reduce([local_batches], device, "max")[0])
            result = evaluate_rows(
                lambda b: engine(**b), eval_rows, task=job.task, labels=labels, names=names,
                tokenizer=tokenizer, max_length=job.data.max_length, batch_size=tc.batch_size,
                device=device, min_batches=max_batches,
            )  # fmt: skip
            flat = result.counts.reshape(-1).tolist() + [
                result.loss_sum,
                result.batches if eval_rows else 0,
            ]
            summed = _all_reduce(flat, device)
            counts = np.asarray(summed[:-2], dtype=np.int64).reshape(len(names), 3)
            scores = scores_from_counts(counts, names)
            metrics.update(
                eval_f1=scores["micro"]["f1"], eval_precision=scores["micro"]["precision"],
                eval_recall=scores["micro"]["recall"], eval_macro_f1=scores["macro"]["f1"],
                eval_loss=summed[-2] / max(1.0, summed[-1]), eval_counts=counts.tolist(),
            )  # fmt: skip
        engine.train()
        ex, tok, loss_sum, loss_n, secs, data_secs = _all_reduce(
            [
                meter.examples,
                meter.tokens,
                meter.loss_sum,
                meter.loss_n,
                meter.seconds,
                meter.data_seconds,
            ],
            device,
        )
        metrics["data_wait_fraction"] = data_secs / secs if secs else 0.0  # of step time, all ranks
        secs /= world  # ranks train concurrently: mean wall time, not the sum
        metrics.update(
            train_loss=loss_sum / max(1.0, loss_n), train_examples=ex, train_tokens=tok,
            train_seconds=secs, examples_per_s=ex / secs if secs else 0.0,
            tokens_per_s=tok / secs if secs else 0.0, eval_seconds=time.perf_counter() - t0,
            words_without_subwords=stats.words_without_subwords, sentences_split=stats.sentences_split,
            padding_examples_per_epoch=(segment_len * world - manifest.num_examples),
        )  # fmt: skip
        # A checkpoint is only taken on an optimizer-step boundary: mid-accumulation gradients
        # are not part of DeepSpeed's state and would be lost on resume.
        at_boundary = state.micro_step % tc.grad_accum == 0
        if ledger:
            ledger.flush()  # before the checkpoint exists: a resume from it never misses lines
        local = tempfile.mkdtemp(prefix="shardtune-ckpt-")
        try:
            checkpoint = None
            if at_boundary:
                ckpt.save(
                    engine, local, rank=rank, world_size=world, state=state, tokenizer=tokenizer,
                    meta={"metrics": {k: v for k, v in metrics.items() if k != "eval_counts"}},
                )  # fmt: skip
                checkpoint = ray.train.Checkpoint.from_directory(local)
            ray.train.report(
                metrics, checkpoint=checkpoint,
                checkpoint_dir_name=ckpt.new_checkpoint_name(state.step, taken) if checkpoint else None,
            )  # fmt: skip
        finally:
            shutil.rmtree(local, ignore_errors=True)
        last_report_step = state.step
        if at_boundary:
            last_checkpoint_t = time.perf_counter()
        if rank == 0 and "eval_f1" in metrics:
            say(
                f"eval @ step {state.step}: micro-F1 {metrics['eval_f1']:.4f} "
                f"P {metrics['eval_precision']:.4f} R {metrics['eval_recall']:.4f} "
                f"loss {metrics['eval_loss']:.4f}"
                + ("" if at_boundary else " (no checkpoint: mid-accumulation)")
            )

    # -- train ----------------------------------------------------------------------------------
    engine.train()
    if rank == 0:
        say(
            f"{world} workers, {manifest.num_examples} training examples, "
            f"{micro_per_epoch} micro-batches/epoch/worker, {total_steps} optimizer steps, "
            f"ZeRO-{tc.zero_stage} {tc.precision}"
        )
    done = state.step >= total_steps
    while not done and state.epoch < tc.epochs:
        plan = EpochPlan(shard_sizes, seed=tc.seed, epoch=state.epoch)
        ranges = state.ranges  # explicit only for the rest of an epoch resplit for a new world size
        if ranges is None:
            ranges = segment_ranges(
                train_segment(manifest.num_examples, world, rank), manifest.num_examples
            )
        stream = ShardStream(job.data.train, manifest, plan, options, job.data.shards_in_memory)
        rows = stream.iter_ranges(ranges, state.position)
        while True:
            t0 = time.perf_counter()
            chunk = [row for _, (_pos, row) in zip(range(tc.batch_size), rows, strict=False)]
            if not chunk:
                break
            meter.data_seconds += time.perf_counter() - t0
            if ledger:
                ids = [int(row["id"]) for row in chunk]
                ledger.record(
                    epoch=state.epoch, step=state.step + 1, micro_step=state.micro_step + 1, ids=ids
                )
            items = [
                w
                for row in chunk
                for w in encode_row(job.task, row, tokenizer, label2id, job.data.max_length, stats)
            ]
            batch = collate(items, pad_id)
            n_tokens = batch.pop("num_tokens")
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            state.micro_step += 1
            state.position += len(chunk)
            meter.examples += len(chunk)
            meter.tokens += n_tokens
            meter.loss_sum += float(loss.detach().float())
            meter.loss_n += 1
            meter.seconds += time.perf_counter() - t0
            if state.micro_step % tc.grad_accum != 0:
                continue
            state.step += 1
            first_step_unix = first_step_unix or time.time()
            faults.maybe_fail(fault, step=state.step, rank=rank)
            if rank == 0 and (state.step % tc.log_every == 0 or state.step == 1):
                rate = meter.examples / meter.seconds if meter.seconds else 0.0
                eta = (
                    (total_steps - state.step)
                    * meter.seconds
                    / max(1, meter.loss_n // tc.grad_accum)
                )
                say(
                    f"step {state.step}/{total_steps} epoch {state.epoch + 1}/{tc.epochs} "
                    f"loss {meter.loss_sum / meter.loss_n:.4f} lr {engine.get_lr()[0]:.2e} "
                    f"{rate * world:.1f} ex/s {meter.tokens / max(meter.seconds, 1e-9) * world:.0f} tok/s "
                    f"(~{world} workers) eta {_fmt_eta(eta)}"
                )
            due = isinstance(tc.eval_every, int) and state.step % tc.eval_every == 0
            if tc.checkpoint_every_minutes and not due:
                # Rank 0's clock decides for all: a rank that decided alone would enter the
                # evaluation collectives without the others and hang.
                late = (
                    rank == 0
                    and time.perf_counter() - last_checkpoint_t >= tc.checkpoint_every_minutes * 60
                )
                due = _all_reduce([float(late)], device, "max")[0] > 0
            if due:
                evaluate_and_report()
            if state.step >= total_steps:
                done = True
                break
        stream.close()
        if not done:
            state.epoch += 1
            state.position = 0
            state.ranges = None  # the normal plan again
            if tc.eval_every == "epoch":
                evaluate_and_report()
    if last_report_step != state.step:
        evaluate_and_report(final=True)
    if rank == 0:
        say(f"training done in {_fmt_eta(time.perf_counter() - t_start)}")
