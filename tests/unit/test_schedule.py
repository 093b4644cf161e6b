"""When a worker reports (evaluates and checkpoints): the pure decision the loop asks."""

from __future__ import annotations

from shardtune.training.schedule import Cadence, report_due


def due_steps(cadence: Cadence, steps: int, **kw) -> list[int]:
    return [
        s
        for s in range(1, steps + 1)
        if report_due(cadence, "step", step=s, last_report_step=0, **kw)
    ]


def test_every_n_steps():
    assert due_steps(Cadence(eval_every=5), 17) == [5, 10, 15]
    assert due_steps(Cadence(eval_every="epoch"), 17) == []


def test_epoch_and_end_are_not_reported_twice_at_one_step():
    epoch = Cadence(eval_every="epoch")
    assert report_due(epoch, "epoch", step=10, last_report_step=5)
    assert not report_due(epoch, "epoch", step=10, last_report_step=10)
    assert not report_due(Cadence(eval_every=4), "epoch", step=10, last_report_step=8)
    assert report_due(epoch, "end", step=12, last_report_step=10)
    assert not report_due(epoch, "end", step=12, last_report_step=12)


def test_the_clock_adds_reports_and_makes_rank_0_decide():
    timed = Cadence(eval_every="epoch", checkpoint_every_minutes=2.0)
    assert timed.uses_clock and not Cadence(eval_every=3).uses_clock
    assert not report_due(timed, "step", step=7, last_report_step=0, minutes_since_checkpoint=1.9)
    assert report_due(timed, "step", step=7, last_report_step=0, minutes_since_checkpoint=2.0)


def test_checkpoints_have_their_own_cadence_apart_from_evaluation():
    from shardtune.training.schedule import checkpoint_due

    cadence = Cadence(eval_every=10, checkpoint_every=3)
    assert not cadence.uses_clock  # counters only: every rank decides alone, no collective
    ckpts = [s for s in range(1, 21)
             if not report_due(cadence, "step", step=s, last_report_step=0)
             and checkpoint_due(cadence, step=s, last_checkpoint_step=0)]  # fmt: skip
    assert ckpts == [3, 6, 9, 12, 15, 18]  # 10 and 20 come with an evaluation
    assert not checkpoint_due(cadence, step=6, last_checkpoint_step=6)
    assert not checkpoint_due(Cadence(eval_every=10), step=6, last_checkpoint_step=0)


def test_checkpoint_every_and_upload_mode_are_validated():
    import pytest
    from pydantic import ValidationError
    from shardtune.training.config import TrainSection

    assert TrainSection().checkpoint_upload == "async"
    assert TrainSection(checkpoint_every=50).checkpoint_every == 50
    with pytest.raises(ValidationError):
        TrainSection(checkpoint_every=0)
    with pytest.raises(ValidationError):
        TrainSection(checkpoint_upload="later")
