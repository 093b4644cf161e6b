"""The layout of mergeable evaluation counts, shared by every task: one row per metric name,
columns true positives, predicted, gold. Summing these across ranks is the only aggregation
evaluation needs."""

from __future__ import annotations

TP, PREDICTED, GOLD = 0, 1, 2
