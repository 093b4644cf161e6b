"""What a worker reports and the head reads: one evaluation's record, typed.

Rank 0 writes each `EvalRecord` to {run}/evals/ (data/run_layout.py) and hands the same flat dict
to `ray.train.report`; the head (cluster/job.py) reads the files back with `EvalRecord.from_dict`.
The JSON keys are the field names of the parts, flat, so report.json's history and Ray's metrics
(`eval_f1` is the checkpoint score attribute) keep one key per number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True)
class TrainingStats:
    """Throughput of the worker group since it started, summed over ranks."""

    first_step_unix: float | None  # wall clock of the group's first step (restart latency)
    elapsed_seconds: float  # since this worker group started training
    train_examples: float
    train_tokens: float  # non-pad tokens
    train_seconds: float  # mean over ranks of the wall time inside train steps
    examples_per_s: float
    tokens_per_s: float
    padding_fraction: float
    step_breakdown: dict[str, float]  # fraction of step time per phase (data, forward, ...)
    data_wait_fraction: float


@dataclass(frozen=True)
class RunFacts:
    """How this worker group runs: precision, sharding, size, what tokenization had to do."""

    precision: str
    zero_stage: int
    workers: int
    threads_per_worker: int
    words_without_subwords: int  # rank 0's alignment counters
    sentences_split: int
    padding_examples_per_epoch: int
    trainable_params: int
    total_params: int
    peak_memory_mb: float  # this rank's (ranks are alike)
    peft: str


@dataclass(frozen=True)
class EvalScores:
    """Dev-set scores from counts summed over ranks (equal to seqeval over the whole set).
    Only micro-F1 is required of a reader: a checkpoint between evaluations reports it alone, as -1
    (Ray's snapshot cannot hold a NaN), and plots redrawn from an older report.json may lack the rest."""

    eval_f1: float
    eval_precision: float | None = None
    eval_recall: float | None = None
    eval_macro_f1: float | None = None
    eval_loss: float | None = None
    eval_counts: list[list[int]] | None = None  # [name][tp, predicted, gold]; not in report.json
    eval_macro_precision: float | None = None
    eval_macro_recall: float | None = None
    eval_f1_per_label: dict[str, float] | None = None


@dataclass(frozen=True)
class EvalRecord:
    """One report of a worker group: at an evaluation, or (`checkpoint_only`) a checkpoint
    between evaluations that carries no metrics."""

    step: int
    epoch: int
    stats: TrainingStats | None = None
    facts: RunFacts | None = None
    scores: EvalScores | None = None  # None without an eval set
    eval_seconds: float | None = None
    stopped_early: str | None = None  # early stopping's reason, the same on every rank
    final: bool = False
    train_loss_points: list[list[float]] = field(default_factory=list)  # rank 0: [step, loss]
    checkpoint_only: bool = False

    def to_dict(self, *, counts: bool = True) -> dict[str, Any]:
        """The flat dict written to evals/ and sent to Ray (`counts=False`: report.json's and a
        checkpoint's copy, without the raw count matrix)."""
        if self.checkpoint_only:
            out: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "checkpoint_only": True}
            return out | ({"eval_f1": self.scores.eval_f1} if self.scores else {})
        out = {"step": self.step, "epoch": self.epoch}
        for part in (self.stats, self.facts):
            if part is not None:
                out.update(dataclasses.asdict(part))
        if self.scores is not None:
            scores = dataclasses.asdict(self.scores)
            out.update({k: v for k, v in scores.items() if v is not None})
        out["eval_seconds"] = self.eval_seconds
        out.update(
            stopped_early=self.stopped_early,
            final=self.final,
            train_loss_points=self.train_loss_points,
        )
        if not counts:
            out.pop("eval_counts", None)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalRecord:
        """The record `to_dict` wrote. A part whose fields are missing is None; a missing field
        of a part that is there raises KeyError naming it (worker and head disagree)."""
        return cls(
            step=int(d["step"]),
            epoch=int(d["epoch"]),
            stats=_part(TrainingStats, d, "train_examples"),
            facts=_part(RunFacts, d, "precision"),
            scores=_part(EvalScores, d, "eval_f1"),
            eval_seconds=d.get("eval_seconds"),
            stopped_early=d.get("stopped_early"),
            final=bool(d.get("final", False)),
            train_loss_points=list(d.get("train_loss_points") or []),
            checkpoint_only=bool(d.get("checkpoint_only", False)),
        )

    def eval_summary(self) -> dict[str, Any]:
        """The report's `best_eval`: the scores (no counts) and how long evaluating took."""
        return {k: v for k, v in self.to_dict(counts=False).items() if k.startswith("eval_")}

    def final_metrics(self) -> dict[str, float]:
        """The tracker's hyperparameter metrics at the end of training."""
        out: dict[str, float | None] = {}
        if self.stats is not None:
            out["tokens_per_s"] = self.stats.tokens_per_s
        if self.scores is not None:
            s = self.scores
            out.update(eval_f1=s.eval_f1, eval_macro_f1=s.eval_macro_f1, eval_loss=s.eval_loss)
        return {k: v for k, v in out.items() if v is not None}


def record_keys() -> set[str]:
    """Every key `EvalRecord.to_dict` can write: the contract the head reads against."""
    keys = {f.name for f in dataclasses.fields(EvalRecord)} - {"stats", "facts", "scores"}
    for part in (TrainingStats, RunFacts, EvalScores):
        keys |= {f.name for f in dataclasses.fields(part)}
    return keys


def _part(cls: type[_T], d: dict[str, Any], marker: str) -> _T | None:
    if marker not in d:
        return None
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]  # type: ignore[arg-type]
    missing = [n for n in required if n not in d]
    if missing:
        raise KeyError(f"{cls.__name__} record lacks {', '.join(missing)}")
    return cls(**{n: d[n] for n in names if n in d})
