"""Counting and telling: this rank's training counters (`Meter`), and rank 0's words about them
(`Progress`: progress lines, the evaluation records in {run}/evals/, the tracker's points).
Every `Progress` method is a no-op on ranks other than 0, so the loop calls them on all ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from shardtune.data import storage
from shardtune.data.run_layout import RunLayout
from shardtune.data.storage import StorageOptions
from shardtune.training.checkpoint import TrainState
from shardtune.training.config import WorkerConfig
from shardtune.training.records import EvalRecord
from shardtune.training.session import Placement
from shardtune.training.tracking import Tracker, eval_scalars

if TYPE_CHECKING:  # names for readers and the checker; imported only where a worker runs them
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)
PHASES = ("data", "forward", "backward", "optimizer")  # the per-step breakdown, in step order


@dataclass
class Meter:
    """Training counters and clocks of this rank since its worker group started."""

    examples: int = 0
    tokens: int = 0  # non-pad tokens
    padded_tokens: int = 0  # tokens the model computed, padding included
    micro_batches: int = 0
    seconds: float = 0.0  # wall time inside train steps
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    timed_seconds: float = 0.0  # the part of `seconds` whose phases were timed
    # Loss summed on the device since the last progress line, read only when logging: turning
    # it into a Python float every step would be a GPU-to-host sync point.
    loss_sum: torch.Tensor | float = 0.0
    loss_n: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_step_unix: float | None = None  # wall clock of the group's first step (restart latency)

    def add_data_time(self, seconds: float) -> None:
        """Reading and encoding a length group: the data phase of a timed step."""
        self.phase_seconds["data"] += seconds
        self.timed_seconds += seconds
        self.seconds += seconds

    def take_loss(self) -> float:
        mean = float(self.loss_sum) / self.loss_n if self.loss_n else float("nan")
        self.loss_sum, self.loss_n = 0.0, 0
        return mean

    def totals(self) -> list[float]:
        """The counters ranks sum at an evaluation, in `TrainingStats` order."""
        return [
            self.examples,
            self.tokens,
            self.padded_tokens,
            self.seconds,
            self.timed_seconds,
            *self.phase_seconds.values(),
        ]


class Progress:
    """Rank 0's progress lines, evaluation records and tracker; silent on other ranks."""

    def __init__(
        self,
        *,
        rank: int,
        world: int,
        layout: RunLayout,
        options: StorageOptions | None,
        epochs: int,
        log_every: int,
        grad_accum: int,
        tracker: Tracker | None = None,
    ) -> None:
        self.rank, self.world, self.layout, self.options = rank, world, layout, options
        self.epochs, self.log_every, self.grad_accum = epochs, log_every, grad_accum
        self.tracker = tracker
        self.loss_points: list[list[float]] = []  # [step, loss] since the last evaluation
        self.last: EvalRecord | None = None

    def on_step(
        self, state: TrainState, meter: Meter, engine: DeepSpeedEngine, total_steps: int
    ) -> None:
        """After an optimizer step: every `log_every` steps (and the first), one line."""
        step = state.step
        if self.rank != 0 or not (step % self.log_every == 0 or step == 1):
            return
        m, world = meter, self.world
        rate = m.tokens / m.seconds * world if m.seconds else 0.0  # ranks run concurrently
        eta = (total_steps - step) * m.seconds / max(1, m.micro_batches // self.grad_accum)
        loss, lr = m.take_loss(), engine.get_lr()[0]
        examples_per_s = m.examples / m.seconds * world if m.seconds else 0.0
        self.loss_points.append([step, loss])
        if self.tracker is not None:
            norm = engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
            self.tracker.log(
                step,
                {
                    "train/loss": loss,
                    "train/learning_rate": lr,
                    "train/tokens_per_s": rate,
                    "train/examples_per_s": examples_per_s,
                    "train/grad_norm": None if norm is None else float(norm),
                },
            )
        log.info(
            "step %d/%d epoch %d/%d loss %.4f lr %.2e %.1f ex/s %.0f tok/s (%d workers) pad %.0f%% eta %s",
            step,
            total_steps,
            state.epoch + 1,
            self.epochs,
            loss,
            lr,
            examples_per_s,
            rate,
            world,
            100 * (1 - m.tokens / max(1, m.padded_tokens)),
            fmt_duration(eta),
        )

    def record(self, record: EvalRecord) -> EvalRecord:
        """Rank 0, before the checkpoint: the record with the loss points since the last one,
        as one object in storage (the report's history lists every evaluation, not only the
        checkpoints retention kept), and its points to the trackers, whose files then go to
        storage. Other ranks get the record back as it was."""
        if self.rank != 0:
            return record
        record, self.loss_points = replace(record, train_loss_points=self.loss_points), []
        storage.write_text(
            self.layout.eval_record(record.step),
            json.dumps(record.to_dict(), default=float),
            self.options,
        )
        self.last = record
        if self.tracker is not None:
            if record.scores is not None:
                self.tracker.log(record.step, eval_scalars(record.scores))
            self.tracker.flush(record.step)
        return record

    def roll_back(self, step: int) -> list[str]:
        """Rank 0, on resume from `step`: delete the evaluation records of a lost attempt (after
        `step`), so the report's history holds each evaluation of the run once, in order."""
        if self.rank != 0:
            return []
        root, gone = self.layout.evals, []
        for name in storage.list_names(root, self.options):
            if name.startswith("eval-") and name.endswith(".json"):
                recorded = name.removeprefix("eval-").removesuffix(".json")
                if recorded.isdigit() and int(recorded) > step:
                    storage.remove(storage.join(root, name), self.options)
                    gone.append(name)
        return gone

    def after_report(self, record: EvalRecord, *, at_boundary: bool) -> None:
        if self.rank != 0:
            return
        if record.stopped_early:
            log.info("stopping early at step %d: %s", record.step, record.stopped_early)
        s, stats = record.scores, record.stats
        if s is None or stats is None:
            return
        b = stats.step_breakdown
        log.info(
            "eval @ step %d: micro-F1 %.4f P %.4f R %.4f loss %.4f | %.0f tok/s, step time: "
            "data %.0f%% forward %.0f%% backward %.0f%% optimizer+comm %.0f%%, padding %.0f%%%s",
            record.step,
            s.eval_f1,
            s.eval_precision,
            s.eval_recall,
            s.eval_loss,
            stats.tokens_per_s,
            *(100 * b[p] for p in PHASES),
            100 * stats.padding_fraction,
            "" if at_boundary else " (no checkpoint: mid-accumulation)",
        )

    def finish(self, step: int, started: float) -> None:
        """Training ended normally: the last line, and the tracker closed with final metrics."""
        if self.rank != 0:
            return
        log.info("training done in %s", fmt_duration(time.perf_counter() - started))
        if self.tracker is not None:
            final = self.last.final_metrics() if self.last else {}
            self.tracker.close(step, final)
            self.tracker = None

    def close(self, step: int) -> None:
        """Always runs: a tracker still open means training failed; keep what was logged."""
        if self.tracker is None:
            return
        try:
            self.tracker.close(step, None)
        except Exception as exc:  # never hide the failure that brought us here
            log.warning("tracking: could not save the last points: %s", exc)
        self.tracker = None


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def open_progress(cfg: WorkerConfig, place: Placement) -> Progress:
    """Progress for this rank; on rank 0 with the run's tracker (TensorBoard, MLflow, W&B)."""
    tc, tracker, rank, world = cfg.train, None, place.rank, place.world
    if rank == 0:
        hparams = {"model": cfg.model.model_dump(), "train": tc.model_dump(), "workers": world}
        tracker = Tracker(
            cfg.tracking,
            cfg.run_uri,
            cfg.storage,
            run_name=os.path.basename(cfg.run_uri),
            config_text=cfg.config_text,
            hparams=hparams,
        )
    return Progress(
        rank=rank,
        world=world,
        layout=RunLayout(cfg.run_uri),
        options=cfg.storage,
        epochs=tc.epochs,
        log_every=tc.log_every,
        grad_accum=tc.grad_accum,
        tracker=tracker,
    )
