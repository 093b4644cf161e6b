"""Early stopping is a pure decision over the dev micro-F1 history (training/schedule.py)."""

from __future__ import annotations

from shardtune.training.schedule import early_stop_reason


def test_stops_after_patience_evaluations_without_enough_gain():
    assert early_stop_reason([0.5, 0.6, 0.6], patience=2, min_delta=0.0) is None  # 0.6 gained
    assert early_stop_reason([0.5, 0.6, 0.6, 0.59], patience=2, min_delta=0.0) is not None
    reason = early_stop_reason([0.5, 0.52, 0.53], patience=2, min_delta=0.05)
    assert reason and "0.0500" not in reason and ">= 0.05 over 0.5000" in reason


def test_never_stops_without_patience_or_before_enough_evaluations():
    assert early_stop_reason([0.9, 0.1, 0.1, 0.1], patience=None, min_delta=0.0) is None
    assert early_stop_reason([0.9, 0.1], patience=2, min_delta=0.0) is None
    assert early_stop_reason([0.1, 0.2, 0.3, 0.4], patience=1, min_delta=0.05) is None
