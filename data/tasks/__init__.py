"""The tasks shardtune trains, one spec each, chosen once by name: everything that differs
between tasks (row schema, corpus reader, encoder, model head, metric counting) lives in a spec.

A new task is one module defining a spec object plus one line in REGISTRY below.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from shardtune.data import corpus, storage
from shardtune.data.alignment import AlignmentStats
from shardtune.data.tasks import classify, ner


class TaskSpec(Protocol):
    """What prepare, training and evaluation ask of a task. Specs are stateless singletons."""

    name: str
    """The task's name in job files, manifests and exported configs (`shardtune_task`)."""
    head_class: str
    """The transformers Auto class of the model head, e.g. "AutoModelForTokenClassification"."""
    labels_per_token: bool
    """True when the head predicts one label per token (batch labels [batch, seq]); False for
    one label per sequence ([batch])."""
    implicit_labels: frozenset[str]
    """Labels every prepared label set of the task includes, read or not (ner: "O")."""

    # ---- prepare: corpus examples -> prepared rows
    def read(
        self,
        uri: str,
        options: storage.StorageOptions | None,
        fmt: str | None,
        report: corpus.ReadReport,
        split: str | None = None,
    ) -> Iterator[Any]:
        """Valid examples of one input (file, or `datasets` directory / DatasetDict `split`);
        problems go to `report` (see corpus.iter_ner)."""

    def example_labels(self, example: Any) -> Iterable[str]:
        """The labels one example uses, for the manifest's label set."""

    def notes(self, conversions: Counter) -> dict:
        """Manifest notes from what reading converted (ner: tag-scheme conversions)."""

    def row_schema(self) -> Any:
        """The pyarrow schema of a shard's rows; the first field is `id` (int64)."""

    def to_row(self, id_: int, example: Any) -> dict:
        """An example as a shard row with corpus index `id_`."""

    def num_tokens(self, row: dict) -> int:
        """Tokenizer-independent size of a row for the manifest (words)."""

    # ---- training and evaluation: prepared rows -> model inputs -> counts
    def metric_names(self, labels: Sequence[str]) -> list[str]:
        """Rows of the count tensor for a label set (ner: entity types; classify: classes)."""

    def encode(
        self,
        row: dict,
        tokenizer: Any,
        label2id: dict[str, int],
        max_length: int,
        stats: AlignmentStats,
    ) -> list:
        """A row's model inputs (ner: Windows; classify: one EncodedText); labels unknown to
        `label2id` get IGNORE_INDEX."""

    def gold(self, row: dict) -> Any:
        """A row's gold labels, in the form `prediction` returns."""

    def prediction(
        self, encoded: Sequence[Any], logits: Sequence[Any], labels: Sequence[str]
    ) -> Any:
        """A row's predicted labels from the model's logits for its encoded inputs (numpy,
        one entry of `logits` per entry of `encoded`, padding positions included)."""

    def counts(self, gold: Sequence[Any], pred: Sequence[Any], names: Sequence[str]) -> np.ndarray:
        """Mergeable [len(names), 3] int64 counts (tasks.counts.TP, PREDICTED, GOLD)."""


REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in (ner.SPEC, classify.SPEC)}
TASK_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get_task(name: str) -> TaskSpec:
    """The spec of task `name`; ValueError naming the known tasks otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"task must be one of {sorted(REGISTRY)}, got {name!r}") from None
