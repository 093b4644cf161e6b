"""When a worker evaluates and checkpoints, and when it stops early (pure): the loop asks, this
module decides.

A report (evaluation, then a checkpoint on an optimizer-step boundary) is due
  - after an optimizer step when `eval_every` is a step count and the step is a multiple of it,
    or when `checkpoint_every_minutes` have passed since the last checkpoint;
  - at the end of an epoch that is not the last when `eval_every` is "epoch";
  - at the end of training unless the last step was just reported.
A checkpoint alone (no evaluation) is due every `checkpoint_every` steps (checkpoint_due), so
checkpoints can be frequent while evaluation stays rare; counters only, the same on all ranks.
Only the clock differs between ranks: with `checkpoint_every_minutes` set, rank 0's decision is
the one carried to all ranks (a rank deciding alone would enter evaluation's collectives without
the others and hang). Without it every rank reaches the same decision from the same counters,
so no collective is needed per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Point = Literal["step", "epoch", "end"]


@dataclass(frozen=True)
class Cadence:
    eval_every: int | str  # steps, or "epoch"
    checkpoint_every_minutes: float | None = None
    checkpoint_every: int | None = None  # steps

    @property
    def uses_clock(self) -> bool:
        """Whether decisions depend on a rank's clock (then rank 0 decides for all)."""
        return self.checkpoint_every_minutes is not None


def report_due(
    cadence: Cadence,
    point: Point,
    *,
    step: int,
    last_report_step: int,
    minutes_since_checkpoint: float = 0.0,
) -> bool:
    """Whether to evaluate and checkpoint now, at `point` after optimizer step `step`."""
    if point == "end":
        return step != last_report_step
    if point == "epoch":
        return cadence.eval_every == "epoch" and step != last_report_step
    if isinstance(cadence.eval_every, int) and step % cadence.eval_every == 0:
        return True
    return (
        cadence.checkpoint_every_minutes is not None
        and minutes_since_checkpoint >= cadence.checkpoint_every_minutes
    )


def checkpoint_due(cadence: Cadence, *, step: int, last_checkpoint_step: int) -> bool:
    """Whether to checkpoint without evaluating after optimizer step `step` (asked only when
    no report is due then)."""
    every = cadence.checkpoint_every
    return every is not None and step % every == 0 and step != last_checkpoint_step


def early_stop_reason(
    f1_history: list[float], patience: int | None, min_delta: float
) -> str | None:
    """Why to stop now, or None: the last `patience` evaluations brought no dev micro-F1 gain of
    at least `min_delta` over the best before them. Every rank gets the same all-reduced F1,
    so every rank reaches the same answer at the same step with no collective of its own."""
    if patience is None or len(f1_history) <= patience:
        return None
    best_before = max(f1_history[:-patience])
    recent = f1_history[-patience:]
    if max(recent) - best_before >= min_delta and max(recent) > best_before:
        return None
    return (
        f"dev micro-F1 did not improve by >= {min_delta:g} over {best_before:.4f} in the last "
        f"{patience} evaluation(s) (best of them {max(recent):.4f})"
    )
