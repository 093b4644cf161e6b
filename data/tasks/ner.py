"""The `ner` task: sentences of IOB2-tagged words, encoded as labelled windows, scored per entity
type with seqeval's chunking (counted per sentence so that ranks can sum them)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from seqeval.metrics.sequence_labeling import get_entities
from shardtune.data import corpus, storage
from shardtune.data.alignment import (
    IGNORE_INDEX,
    AlignmentStats,
    Window,
    encode_sentence,
    word_predictions,
)
from shardtune.data.tasks.counts import GOLD, PREDICTED, TP

# The tags ner_counts accepts: "O" or a B-/I-/E-/S- prefix with a non-empty type. Anything else
# is rejected rather than read the seqeval way: seqeval takes "ORG" as the non-entity "O" and
# "PER" as type "ER", which would silently lose or rename entities, and odd typeless tags can
# carry chunk state across sentences in seqeval, which per-sentence counting could not match.
_NER_TAG = re.compile(r"O|[BIES]-(.+)", re.DOTALL)


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) chunks of ONE sentence, end inclusive: seqeval's default (lenient)
    ``get_entities``. One sentence per call on purpose: given a list of sentences seqeval joins
    them with "O", and counts must not depend on which sentences share a call."""
    return get_entities(list(tags))


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


class NerTask:
    """Prepared rows: id (int64), tokens (list<string>), tags (list<string>, IOB2)."""

    name = "ner"
    head_class = "AutoModelForTokenClassification"
    labels_per_token = True
    implicit_labels = frozenset({"O"})  # every NER label set has it, even with no "O" tag read

    def read(
        self,
        uri: str,
        options: storage.StorageOptions | None,
        fmt: str | None,
        report: corpus.ReadReport,
        split: str | None = None,
    ) -> Iterator[corpus.Sentence]:
        return corpus.iter_ner(uri, options, fmt, report, split)

    def example_labels(self, example: corpus.Sentence) -> list[str]:
        return example.tags

    def notes(self, conversions: Counter) -> dict:
        # Always both keys, so a manifest says "0 converted" rather than leaving it unsaid.
        return {key: conversions.get(key, 0) for key in ("bioes_to_iob2", "iob1_to_iob2")}

    def row_schema(self) -> Any:
        import pyarrow as pa

        return pa.schema([("id", pa.int64()), ("tokens", pa.list_(pa.string())),
                          ("tags", pa.list_(pa.string()))])  # fmt: skip

    def to_row(self, id_: int, example: corpus.Sentence) -> dict:
        return {"id": id_, "tokens": example.tokens, "tags": example.tags}

    def num_tokens(self, row: dict) -> int:
        return len(row["tokens"])

    def metric_names(self, labels: Sequence[str]) -> list[str]:
        return entity_types(labels)

    def encode(
        self,
        row: dict,
        tokenizer: Any,
        label2id: dict[str, int],
        max_length: int,
        stats: AlignmentStats,
    ) -> list[Window]:
        # Tags unknown to the model (only when evaluating foreign data) are not trained on.
        tag_ids = [label2id.get(tag, IGNORE_INDEX) for tag in row["tags"]]
        return encode_sentence(row["id"], row["tokens"], tag_ids, tokenizer, max_length, stats)

    def gold(self, row: dict) -> list[str]:
        return list(row["tags"])

    def prediction(
        self, encoded: Sequence[Window], logits: Sequence[Any], labels: Sequence[str]
    ) -> list[str]:
        return [labels[i] for i in word_predictions(encoded, logits)]

    def counts(
        self, gold: Sequence[list[str]], pred: Sequence[list[str]], names: Sequence[str]
    ) -> np.ndarray:
        return ner_counts(gold, pred, names)


SPEC = NerTask()
