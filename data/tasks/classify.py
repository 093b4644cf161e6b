"""The `classify` task: one label per text, encoded as one truncated sequence, scored per class
(sklearn's single-label report) from mergeable counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from shardtune.data import corpus, storage
from shardtune.data.alignment import IGNORE_INDEX, AlignmentStats, EncodedText, encode_text
from shardtune.data.tasks.counts import GOLD, PREDICTED, TP


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


class ClassifyTask:
    """Prepared rows: id (int64), text (string), label (string)."""

    name = "classify"
    head_class = "AutoModelForSequenceClassification"
    labels_per_token = False
    implicit_labels: frozenset[str] = frozenset()

    def read(
        self,
        uri: str,
        options: storage.StorageOptions | None,
        fmt: str | None,
        report: corpus.ReadReport,
        split: str | None = None,
    ) -> Iterator[corpus.TextExample]:
        return corpus.iter_classify(uri, options, fmt, report, split)

    def example_labels(self, example: corpus.TextExample) -> list[str]:
        return [example.label]

    def notes(self, conversions: Counter) -> dict:
        return {}

    def row_schema(self) -> Any:
        import pyarrow as pa

        return pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())])

    def to_row(self, id_: int, example: corpus.TextExample) -> dict:
        return {"id": id_, "text": example.text, "label": example.label}

    def num_tokens(self, row: dict) -> int:
        return len(row["text"].split())  # whitespace words: tokenizer-independent

    def metric_names(self, labels: Sequence[str]) -> list[str]:
        return list(labels)

    def encode(
        self,
        row: dict,
        tokenizer: Any,
        label2id: dict[str, int],
        max_length: int,
        stats: AlignmentStats,
    ) -> list[EncodedText]:
        label = label2id.get(row["label"], IGNORE_INDEX)
        return [encode_text(row["id"], row["text"], label, tokenizer, max_length, stats)]

    def gold(self, row: dict) -> str:
        return row["label"]

    def prediction(
        self, encoded: Sequence[EncodedText], logits: Sequence[Any], labels: Sequence[str]
    ) -> str:
        return labels[int(np.argmax(logits[0]))]

    def counts(self, gold: Sequence[str], pred: Sequence[str], names: Sequence[str]) -> np.ndarray:
        row = {name: i for i, name in enumerate(names)}
        return classification_counts([row[g] for g in gold], [row[p] for p in pred], len(names))


SPEC = ClassifyTask()
