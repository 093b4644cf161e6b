"""Scores from mergeable evaluation counts: precision/recall/F1 per name and averages, and their
text report. The counts themselves come from each task's spec (shardtune.data.tasks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from shardtune.data.tasks.counts import GOLD, PREDICTED, TP


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # Zero division gives 0, as seqeval and sklearn do with their default zero_division="warn".
    safe = np.where(denominator == 0, 1, denominator)
    return np.where(denominator == 0, 0.0, numerator / safe)


def _prf(tp: np.ndarray, predicted: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, ...]:
    precision = _divide(tp.astype(np.float64), predicted)
    recall = _divide(tp.astype(np.float64), gold)
    f1 = _divide(2 * precision * recall, precision + recall)
    return precision, recall, f1


def _row(precision: float, recall: float, f1: float, support: int) -> dict[str, float | int]:
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "support": int(support),
    }


def scores_from_counts(counts: np.ndarray, names: Sequence[str]) -> dict:
    """Precision/recall/F1/support per name and micro/macro/weighted averages from summed counts.

    Conventions are those of ``seqeval.metrics.classification_report(output_dict=True)`` (NER) and
    sklearn's ``classification_report`` (classification): only names with a gold or predicted
    instance appear in ``per_type`` and in the averages; a zero division gives 0; "weighted" weighs
    by gold support and is all 0 when there is no gold instance; every average's support is the
    total gold count. For single-label classification, micro precision = recall = F1 = accuracy.
    One deliberate difference: with no gold and no predicted instance at all, macro is 0.0 where
    seqeval returns NaN (a mean of nothing), so the report stays valid JSON and comparable.

    Returns {"per_type": {name: row}, "micro": row, "macro": row, "weighted": row}, where a row is
    {"precision", "recall", "f1", "support"}.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape != (len(names), 3):
        raise ValueError(f"counts of shape {counts.shape} for {len(names)} names; need [n, 3]")
    tp, predicted, gold = counts[:, TP], counts[:, PREDICTED], counts[:, GOLD]
    if (counts < 0).any() or (tp > predicted).any() or (tp > gold).any():
        raise ValueError("counts must be non-negative with true positives <= predicted, gold")

    present = (predicted > 0) | (gold > 0)
    tp, predicted, gold = tp[present], predicted[present], gold[present]
    present_names = [name for name, keep in zip(names, present, strict=True) if keep]
    precision, recall, f1 = _prf(tp, predicted, gold)
    total_gold = int(gold.sum())

    micro = _prf(tp.sum(keepdims=True), predicted.sum(keepdims=True), gold.sum(keepdims=True))
    if present.any():
        macro = [float(np.mean(values)) for values in (precision, recall, f1)]
    else:
        macro = [0.0, 0.0, 0.0]
    if total_gold:
        weighted = [float(np.average(v, weights=gold)) for v in (precision, recall, f1)]
    else:
        weighted = [0.0, 0.0, 0.0]

    return {
        "per_type": {
            name: _row(precision[i], recall[i], f1[i], gold[i])
            for i, name in enumerate(present_names)
        },
        "micro": _row(micro[0][0], micro[1][0], micro[2][0], total_gold),
        "macro": _row(*macro, total_gold),
        "weighted": _row(*weighted, total_gold),
    }


def format_report(scores: dict, digits: int = 4) -> str:
    """Plain-text table of ``scores_from_counts`` output: one line per type, then the averages."""
    averages = [(f"{key} avg", scores[key]) for key in ("micro", "macro", "weighted")]
    width = max([len(name) for name in scores["per_type"]] + [len("weighted avg")])
    header = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"

    def line(name: str, row: dict) -> str:
        values = "  ".join(f"{row[key]:>9.{digits}f}" for key in ("precision", "recall", "f1"))
        return f"{name:>{width}}  {values}  {row['support']:>9}"

    lines = [header, ""]
    lines += [line(name, row) for name, row in scores["per_type"].items()]
    lines += [""] + [line(name, row) for name, row in averages]
    return "\n".join(lines) + "\n"
