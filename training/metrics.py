"""Mergeable evaluation counts (NER entities, classification labels) and the scores built from them.

Each rank counts its part of the eval set; the summed counts give exactly seqeval / sklearn scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Count columns. Summing these across ranks is the only aggregation evaluation needs.
TP, PREDICTED, GOLD = 0, 1, 2

# The tags ner_counts accepts: "O" or a B-/I-/E-/S- prefix with a non-empty type. Anything else
# is rejected rather than read the seqeval way: seqeval takes "ORG" as the non-entity "O" and
# "PER" as type "ER", which would silently lose or rename entities, and odd typeless tags can
# carry chunk state across sentences in seqeval, which per-sentence counting could not match.
_NER_TAG = re.compile(r"O|[BIES]-(.+)", re.DOTALL)


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Return (type, start, end) chunks of one sentence, end inclusive, exactly as seqeval's
    default (conlleval-like) ``get_entities`` reads them: any tag is accepted, the first character
    is the chunk tag and the text after the first "-" is the type ("_" when empty)."""
    prev_tag, prev_type, begin = "O", "", 0
    spans: list[tuple[str, int, int]] = []
    # The trailing "O" closes a chunk that runs to the end of the sentence.
    for i, chunk in enumerate([*tags, "O"]):
        tag = chunk[0]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            spans.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return spans


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # seqeval.metrics.sequence_labeling.end_of_chunk, rule for rule.
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    # seqeval.metrics.sequence_labeling.start_of_chunk, rule for rule.
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def entity_types(labels: Sequence[str]) -> list[str]:
    """Sorted entity types named by a label set such as ["O", "B-PER", "I-PER"] (seqeval's order);
    raises ValueError naming every label that is not "O" or B-/I-/E-/S-<type>."""
    bad = [label for label in labels if not _NER_TAG.fullmatch(label)]
    if bad:
        raise ValueError(f"labels not of the form 'O' or B-/I-/E-/S-<type>: {bad}")
    return sorted({label[2:] for label in labels if label != "O"})


def ner_counts(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], types: Sequence[str]
) -> np.ndarray:
    """Per entity type (rows in the order of ``types``): true positives, predicted, gold entities.

    An entity is (type, start, end) within one sentence. Raises ValueError for a sentence whose
    gold and predicted lengths differ, a tag not of the form "O" / B-/I-/E-/S-<type>, or a type
    missing from ``types`` (pass the dataset's full type list, e.g. ``entity_types(labels)``), so
    that no entity is dropped from the fixed-shape tensor ranks all-reduce.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    row = {name: i for i, name in enumerate(types)}
    counts = np.zeros((len(types), 3), dtype=np.int64)
    seen_tags: set[str] = set()
    for n, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {n}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted"
            )
        new_tags = set(gold_tags).union(pred_tags) - seen_tags
        if new_tags:
            _check_tags(new_tags, row)
            seen_tags |= new_tags
        gold_spans = set(entity_spans(gold_tags))
        pred_spans = set(entity_spans(pred_tags))
        for span in gold_spans:
            counts[row[span[0]], GOLD] += 1
        for span in pred_spans:
            counts[row[span[0]], PREDICTED] += 1
            if span in gold_spans:
                counts[row[span[0]], TP] += 1
    return counts


def _check_tags(tags: set[str], row: dict[str, int]) -> None:
    for tag in sorted(tags):
        match = _NER_TAG.fullmatch(tag)
        if match is None:
            raise ValueError(f"tag {tag!r} is not 'O' or B-/I-/E-/S-<type>")
        if match.group(1) is not None and match.group(1) not in row:
            raise ValueError(
                f"entity type {match.group(1)!r} (tag {tag!r}) is not in the type list {list(row)}"
            )


def classification_counts(gold: Sequence[int], pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Per class id 0..num_classes-1: true positives, predicted, gold examples; [num_classes, 3]."""
    gold_ids = np.asarray(gold, dtype=np.int64).reshape(-1)
    pred_ids = np.asarray(pred, dtype=np.int64).reshape(-1)
    if gold_ids.shape != pred_ids.shape:
        raise ValueError(f"{gold_ids.size} gold labels but {pred_ids.size} predicted")
    for name, ids in (("gold", gold_ids), ("predicted", pred_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name} label ids outside 0..{num_classes - 1}")
    counts = np.zeros((num_classes, 3), dtype=np.int64)
    counts[:, TP] = np.bincount(gold_ids[gold_ids == pred_ids], minlength=num_classes)
    counts[:, PREDICTED] = np.bincount(pred_ids, minlength=num_classes)
    counts[:, GOLD] = np.bincount(gold_ids, minlength=num_classes)
    return counts


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
