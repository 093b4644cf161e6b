"""A training worker's evaluation: every rank predicts its part of the eval set, and one
all-reduce sums the entity/class counts, the eval loss and the training counters; the result is
an `EvalRecord` (training/records.py), the same on every rank."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from shardtune.data.manifest import read_manifest_version
from shardtune.data.shard_plan import eval_segment
from shardtune.data.storage import StorageOptions
from shardtune.data.stream import read_span
from shardtune.data.tasks import get_task
from shardtune.training.checkpoint import TrainState
from shardtune.training.collective import all_reduce
from shardtune.training.config import WorkerConfig
from shardtune.training.evaluation import evaluate_rows
from shardtune.training.meter import PHASES, Meter
from shardtune.training.metrics import scores_from_counts
from shardtune.training.records import EvalRecord, EvalScores, RunFacts, TrainingStats
from shardtune.training.session import Placement

if TYPE_CHECKING:  # names for readers and the checker; imported only where a worker runs them
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase as Tokenizer


def read_eval_rows(
    uri: str,
    options: StorageOptions,
    task: str,
    *,
    rank: int,
    world: int,
    version: int | None = None,
) -> tuple[list[dict], int]:
    """(this rank's disjoint part of the eval set (manifest `version`, None: the latest) in
    length order (fewer pads), the set's size), reading only the row groups the part lies in."""
    manifest = read_manifest_version(uri, version, options)
    segment = eval_segment(manifest.num_examples, world, rank)
    rows, _ = read_span(uri, manifest, segment.start, segment.stop, options)
    return sorted(rows, key=get_task(task).num_tokens), manifest.num_examples


@dataclass
class Evaluator:
    """This rank's eval rows and how to batch them. Without an eval set (`enabled` False) only
    the training counters are summed."""

    task: str
    labels: list[str]
    tokenizer: Tokenizer
    max_length: int
    batch_size: int
    world: int
    enabled: bool = False
    rows: Sequence[dict] = ()
    total: int = 0  # rows of the whole eval set

    def evaluate(
        self,
        engine: DeepSpeedEngine,
        meter: Meter,
        state: TrainState,
        facts: Callable[[], RunFacts] | None = None,
    ) -> EvalRecord:
        """Every rank calls it at the same step (collectives inside)."""
        t0 = time.perf_counter()
        names = get_task(self.task).metric_names(self.labels)
        counts, loss_sum, batches = np.zeros((len(names), 3), dtype=np.int64), 0.0, 0
        if self.enabled:
            counts, loss_sum, batches = self._predict(engine, names)
        summed = all_reduce(
            [*counts.reshape(-1).tolist(), loss_sum, batches, *meter.totals()], engine.device
        )
        n = counts.size
        counts = np.asarray(summed[:n], dtype=np.int64).reshape(len(names), 3)
        eval_loss, eval_batches = summed[n], summed[n + 1]
        stats = self._stats(
            summed[n + 2 :], elapsed=t0 - meter.started, first=meter.first_step_unix
        )
        scores = (
            _scores(counts, names, eval_loss / max(1.0, eval_batches)) if self.enabled else None
        )
        return EvalRecord(
            step=state.step,
            epoch=state.epoch,
            stats=stats,
            scores=scores,
            facts=facts() if facts else None,
            eval_seconds=time.perf_counter() - t0,
        )

    def _predict(self, engine: DeepSpeedEngine, names: list[str]) -> tuple[np.ndarray, float, int]:
        # Under ZeRO-3 every forward all-gathers parameters, so all ranks run as many batches as
        # the largest eval segment needs; each rank can work that number out by itself.
        most_rows = -(-self.total // self.world)
        engine.eval()
        result = evaluate_rows(
            lambda b: engine(**b),
            self.rows,
            task=self.task,
            labels=self.labels,
            names=names,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
            batch_size=self.batch_size,
            device=engine.device,
            min_batches=-(-most_rows // self.batch_size),
        )
        engine.train()
        return result.counts, result.loss_sum, (result.batches if self.rows else 0)

    def _stats(self, summed: list[float], *, elapsed: float, first: float | None) -> TrainingStats:
        examples, tokens, padded, seconds, timed, *phases = summed
        seconds /= self.world  # ranks train concurrently: mean wall time, not the sum
        return TrainingStats(
            first_step_unix=first,
            elapsed_seconds=elapsed,
            train_examples=examples,
            train_tokens=tokens,
            train_seconds=seconds,
            examples_per_s=examples / seconds if seconds else 0.0,
            tokens_per_s=tokens / seconds if seconds else 0.0,
            padding_fraction=1 - tokens / padded if padded else 0.0,
            step_breakdown={
                p: s / timed if timed else 0.0 for p, s in zip(PHASES, phases, strict=True)
            },
            data_wait_fraction=phases[0] / timed if timed else 0.0,
        )


def _scores(counts: np.ndarray, names: list[str], loss: float) -> EvalScores:
    s = scores_from_counts(counts, names)
    micro, macro = s["micro"], s["macro"]
    return EvalScores(
        eval_f1=micro["f1"],
        eval_precision=micro["precision"],
        eval_recall=micro["recall"],
        eval_macro_f1=macro["f1"],
        eval_loss=loss,
        eval_counts=counts.tolist(),
        eval_macro_precision=macro["precision"],
        eval_macro_recall=macro["recall"],
        eval_f1_per_label={name: row["f1"] for name, row in s["per_type"].items()},
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: the GPU's allocations, or on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def open_evaluator(
    cfg: WorkerConfig, place: Placement, tokenizer: Tokenizer, labels: list[str]
) -> Evaluator:
    """This rank's evaluator; its part of the eval set is read here, once."""
    rows: list[dict] = []
    total, world = 0, place.world
    if cfg.data.eval:
        uri = cfg.data.eval
        rows, total = read_eval_rows(
            uri, cfg.storage, cfg.task, rank=place.rank, world=world, version=cfg.eval_version
        )
    return Evaluator(
        cfg.task,
        labels,
        tokenizer,
        cfg.data.max_length,
        cfg.train.batch_size,
        world,
        enabled=bool(cfg.data.eval),
        rows=rows,
        total=total,
    )
