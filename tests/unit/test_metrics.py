"""Summed per-part counts give the scores seqeval and sklearn compute over the whole set."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqeval.metrics import classification_report as seqeval_report
from seqeval.metrics.sequence_labeling import get_entities
from shardtune.data.tasks.classify import classification_counts
from shardtune.data.tasks.ner import entity_spans, entity_types, ner_counts
from shardtune.training.metrics import format_report, scores_from_counts
from sklearn.metrics import classification_report as sklearn_report

TYPES = ["LOC", "MISC", "ORG", "PER"]
AVERAGES = {"micro": "micro avg", "macro": "macro avg", "weighted": "weighted avg"}


def _quiet(fn, *args, **kwargs):
    # seqeval/sklearn warn on undefined precision/recall and on non-NE tags; the values are
    # what is compared.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _assert_row(ours: dict, ref: dict) -> None:
    for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
        expected = float(ref[ref_key])
        if math.isnan(expected):
            # Our one documented difference: a mean over no types is 0.0, not NaN.
            expected = 0.0
        assert ours[key] == pytest.approx(expected, abs=1e-9), key
    assert ours["support"] == int(ref["support"])


def _split_points(draw, n: int) -> list[int]:
    cuts = draw(st.lists(st.integers(0, n), max_size=4))
    return sorted({0, n, *cuts})


@st.composite
def tagged_corpus(draw, tags: list[str]):
    sentences = draw(st.lists(st.integers(1, 12), min_size=1, max_size=25))
    gold = [draw(st.lists(st.sampled_from(tags), min_size=n, max_size=n)) for n in sentences]
    pred = [draw(st.lists(st.sampled_from(tags), min_size=n, max_size=n)) for n in sentences]
    return gold, pred, _split_points(draw, len(sentences))


@st.composite
def ner_corpus(draw):
    types = TYPES[: draw(st.integers(2, 4))]
    # Mostly IOB2/IOB1 tags (I- starts and type switches come from random order); E-/S- too.
    tags = ["O", "O", "O"] + [f"{p}-{t}" for t in types for p in "BBII"] + [f"E-{types[0]}"]
    tags += [f"S-{types[1]}"]
    gold, pred, cuts = draw(tagged_corpus(tags))
    return types, gold, pred, cuts


@settings(max_examples=300, deadline=None)
@given(ner_corpus())
def test_summed_ner_counts_equal_seqeval_on_whole_set(corpus) -> None:
    types, gold, pred, cuts = corpus
    counts = sum(
        ner_counts(gold[a:b], pred[a:b], types) for a, b in zip(cuts, cuts[1:], strict=False)
    )
    scores = scores_from_counts(counts, types)
    reference = _quiet(seqeval_report, gold, pred, output_dict=True)

    ref_types = {k: v for k, v in reference.items() if k not in AVERAGES.values()}
    assert set(scores["per_type"]) == set(ref_types)
    for name, row in scores["per_type"].items():
        _assert_row(row, ref_types[name])
    for ours, theirs in AVERAGES.items():
        _assert_row(scores[ours], reference[theirs])


ODD_TAGS = ["O", "B-PER", "I-PER", "I-LOC", "E-PER", "S-LOC", "E-LOC", "S-PER"]
ODD_TAGS += ["PER", "LOC", "B", "I", "E", "S", ".", "X", "B-", "O-PER", "BX-PER", "I-A-B"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(ODD_TAGS), max_size=15))
def test_entity_spans_equal_seqeval_get_entities(tags: list[str]) -> None:
    assert _quiet(entity_spans, tags) == _quiet(get_entities, tags)


@st.composite
def class_corpus(draw):
    num_classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 60))
    labels = st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)
    return num_classes, draw(labels), draw(labels), _split_points(draw, n)


@settings(max_examples=200, deadline=None)
@given(class_corpus())
def test_summed_classification_counts_equal_sklearn(corpus) -> None:
    num_classes, gold, pred, cuts = corpus
    counts = sum(
        classification_counts(gold[a:b], pred[a:b], num_classes)
        for a, b in zip(cuts, cuts[1:], strict=False)
    )
    scores = scores_from_counts(counts, [str(c) for c in range(num_classes)])
    reference = _quiet(sklearn_report, gold, pred, output_dict=True)

    present = sorted({*gold, *pred})
    assert list(scores["per_type"]) == [str(c) for c in present]
    for name, row in scores["per_type"].items():
        _assert_row(row, reference[name])
    for ours in ("macro", "weighted"):
        _assert_row(scores[ours], reference[AVERAGES[ours]])
    # Single-label: sklearn reports micro as accuracy.
    for key in ("precision", "recall", "f1"):
        assert scores["micro"][key] == pytest.approx(reference["accuracy"], abs=1e-9)
    assert scores["micro"]["support"] == len(gold)


def test_hand_written_ner_case() -> None:
    gold = [["O", "B-MISC", "I-MISC", "B-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "B-MISC", "I-MISC", "B-MISC", "I-MISC"], ["B-PER", "I-PER", "O"]]
    counts = ner_counts(gold, pred, ["MISC", "PER"])
    assert counts.tolist() == [[1, 2, 2], [1, 1, 1]]
    assert counts.dtype == np.int64
    scores = scores_from_counts(counts, ["MISC", "PER"])
    assert scores["micro"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert scores["macro"]["f1"] == pytest.approx(0.75)


def test_odd_tag_sequences() -> None:
    assert entity_spans(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]  # I- after O starts
    assert entity_spans(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # type change
    assert entity_spans(["B-PER", "E-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 2, 2)]
    assert entity_spans(["S-PER", "S-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert _quiet(entity_spans, ["PER", "PER"]) == [("ER", 0, 1)]  # seqeval's reading of a bare tag
    assert entity_spans([]) == []


def test_entities_do_not_cross_sentences() -> None:
    # The I-PER opening sentence 2 is its own entity, not the tail of sentence 1's B-PER.
    counts = ner_counts([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]], ["PER"])
    assert counts.tolist() == [[2, 2, 2]]


def test_unknown_type_and_malformed_tag_raise() -> None:
    with pytest.raises(ValueError, match="'LOC'"):
        ner_counts([["B-LOC"]], [["O"]], ["PER"])
    with pytest.raises(ValueError, match="'LOC'"):
        ner_counts([["O"]], [["I-LOC"]], ["PER"])
    with pytest.raises(ValueError, match="'PER'"):  # a bare tag seqeval would read as type "ER"
        ner_counts([["PER"]], [["O"]], ["PER"])
    with pytest.raises(ValueError, match="2 gold tags but 1"):
        ner_counts([["O", "O"]], [["O"]], ["PER"])


def test_entity_types_from_label_set() -> None:
    assert entity_types(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "S-ORG"]) == [
        "LOC",
        "ORG",
        "PER",
    ]
    with pytest.raises(ValueError, match="ORG"):
        entity_types(["O", "ORG"])


def test_no_entities_at_all_gives_zero_scores() -> None:
    counts = ner_counts([["O", "O"]], [["O", "O"]], ["PER"])
    scores = scores_from_counts(counts, ["PER"])
    assert scores["per_type"] == {}
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["micro"] == scores["macro"] == scores["weighted"] == zero


def test_only_predictions_no_gold() -> None:
    scores = scores_from_counts(ner_counts([["O"]], [["B-PER"]], ["PER"]), ["PER"])
    reference = _quiet(seqeval_report, [["O"]], [["B-PER"]], output_dict=True)
    _assert_row(scores["per_type"]["PER"], reference["PER"])
    for ours, theirs in AVERAGES.items():
        _assert_row(scores[ours], reference[theirs])


def test_classification_counts_layout_and_checks() -> None:
    counts = classification_counts([0, 1, 1, 2], [0, 1, 2, 2], num_classes=4)
    assert counts.tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="outside"):
        classification_counts([0, 4], [0, 0], num_classes=4)
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        classification_counts([0, 1], [0], num_classes=4)


def test_scores_reject_inconsistent_counts() -> None:
    with pytest.raises(ValueError, match="true positives"):
        scores_from_counts(np.array([[2, 1, 2]]), ["PER"])
    with pytest.raises(ValueError, match="shape"):
        scores_from_counts(np.zeros((2, 3)), ["PER"])


def test_format_report_lists_types_and_averages() -> None:
    counts = ner_counts([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]], ["LOC", "PER"])
    text = format_report(scores_from_counts(counts, ["LOC", "PER"]))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1", "support"]
    assert lines[2].split() == ["LOC", "0.0000", "0.0000", "0.0000", "1"]
    assert lines[3].split() == ["PER", "1.0000", "1.0000", "1.0000", "1"]
    assert lines[5].split() == ["micro", "avg", "1.0000", "0.5000", "0.6667", "2"]
    assert [line.split()[0] for line in lines[5:]] == ["micro", "macro", "weighted"]
