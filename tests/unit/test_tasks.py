"""Task specs: what each built-in task answers, that a new task is one spec plus one registry line,
and that no module outside data/tasks branches on a task's name."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from shardtune.data import corpus, storage, tasks
from shardtune.data import prepare as prep
from shardtune.data.alignment import IGNORE_INDEX, AlignmentStats, EncodedText, Window, encode_text
from shardtune.data.manifest import read_all_rows
from shardtune.data.tasks.counts import GOLD, PREDICTED, TP
from shardtune.training.evaluation import encode_row, evaluate_rows, metric_names

ROOT = Path(__file__).resolve().parents[2]


class FakeTokenizer:
    """One id per character, so window and truncation sizes are easy to reason about."""

    cls_token_id, sep_token_id, unk_token_id, pad_token_id = 1, 2, 3, 0

    def __call__(self, text, add_special_tokens=False, verbose=True):
        if isinstance(text, list):
            return {"input_ids": [[10 + ord(c) % 50 for c in word] for word in text]}
        return {"input_ids": [10 + ord(c) % 50 for c in text]}


def test_registry_names_and_errors():
    assert tasks.TASK_NAMES == ("ner", "classify")
    assert tasks.get_task("ner").head_class == "AutoModelForTokenClassification"
    assert tasks.get_task("classify").head_class == "AutoModelForSequenceClassification"
    with pytest.raises(ValueError, match="task must be one of \\['classify', 'ner'\\]"):
        tasks.get_task("tagging")


def test_ner_spec_encodes_windows_and_counts_entities():
    spec = tasks.get_task("ner")
    row = {"id": 7, "tokens": ["Anna", "lives", "in", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]}
    label2id = {"O": 0, "B-PER": 1, "B-LOC": 2}
    windows = encode_row("ner", row, FakeTokenizer(), label2id, 8, AlignmentStats())
    assert all(isinstance(w, Window) for w in windows)
    assert len(windows) == 3  # 15 one-character sub-words, at most 6 per window
    assert [w.example_id for w in windows] == [7] * len(windows)

    labels = ["O", "B-PER", "B-LOC"]
    # Logits that favour each position's gold tag, except Oslo's, which favour O.
    logits = [np.eye(3)[[max(t, 0) for t in w.labels]] for w in windows]
    logits[-1][:, 0] += logits[-1][:, 2]
    pred = spec.prediction(windows, logits, labels)
    assert pred == ["B-PER", "O", "O", "O"]
    names = metric_names("ner", labels)
    assert names == ["LOC", "PER"]
    counts = spec.counts([spec.gold(row)], [pred], names)
    assert counts[:, [TP, PREDICTED, GOLD]].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert spec.row_schema().names == ["id", "tokens", "tags"]
    assert spec.num_tokens(row) == 4


def test_classify_spec_encodes_one_text_and_counts_classes():
    spec = tasks.get_task("classify")
    row = {"id": 3, "text": "very good film", "label": "pos"}
    stats = AlignmentStats()
    [encoded] = encode_row("classify", row, FakeTokenizer(), {"neg": 0, "pos": 1}, 6, stats)
    assert isinstance(encoded, EncodedText) and encoded.truncated and encoded.label == 1
    assert stats.texts_truncated == 1
    assert spec.prediction([encoded], [np.array([0.3, -1.0])], ["neg", "pos"]) == "neg"
    counts = spec.counts(["pos", "neg"], ["neg", "neg"], metric_names("classify", ["neg", "pos"]))
    assert counts.tolist() == [[1, 2, 1], [0, 0, 1]]
    assert spec.num_tokens(row) == 3


class MultiLabelTask:
    """A toy third task: texts with any number of labels, from JSONL {"text", "labels"}."""

    name = "multilabel"
    head_class = "AutoModelForSequenceClassification"
    labels_per_token = False
    implicit_labels: frozenset[str] = frozenset()

    def read(self, uri, options, fmt, report, split=None):
        for lineno, line in enumerate(storage.read_text(uri, options).splitlines(), 1):
            obj = json.loads(line)
            if not obj["labels"]:
                report.problems.append(f"{uri}:{lineno}: no labels")
                continue
            yield corpus.TextExample(obj["text"], "|".join(obj["labels"]), uri, lineno)

    def example_labels(self, example):
        return example.label.split("|")

    def notes(self, conversions: Counter) -> dict:
        return {}

    def row_schema(self):
        return pa.schema([("id", pa.int64()), ("text", pa.string()),
                          ("labels", pa.list_(pa.string()))])  # fmt: skip

    def to_row(self, id_, example):
        return {"id": id_, "text": example.text, "labels": example.label.split("|")}

    def num_tokens(self, row):
        return len(row["text"].split())

    def metric_names(self, labels):
        return list(labels)

    def encode(self, row, tokenizer, label2id, max_length, stats):
        # The multi-hot target would need its own collate; evaluation only needs the inputs.
        return [encode_text(row["id"], row["text"], IGNORE_INDEX, tokenizer, max_length, stats)]

    def gold(self, row):
        return set(row["labels"])

    def prediction(self, encoded, logits, labels):
        return {labels[i] for i in np.flatnonzero(logits[0] > 0)}  # independent sigmoids

    def counts(self, gold, pred, names):
        counts = np.zeros((len(names), 3), dtype=np.int64)
        for i, name in enumerate(names):
            counts[i, TP] = sum(name in g and name in p for g, p in zip(gold, pred, strict=True))
            counts[i, PREDICTED] = sum(name in p for p in pred)
            counts[i, GOLD] = sum(name in g for g in gold)
        return counts


def test_a_third_task_is_one_spec_and_one_registration_line(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.REGISTRY, "multilabel", MultiLabelTask())  # the registration

    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"text": "rain and wind", "labels": ["weather"]}\n'
        '{"text": "match abandoned in storm", "labels": ["sport", "weather"]}\n'
    )
    manifest = prep.prepare("multilabel", [str(path)], str(tmp_path / "out"))[""]
    _, rows = read_all_rows(str(tmp_path / "out"))
    assert manifest.task == "multilabel"
    assert manifest.labels == ["sport", "weather"]
    assert manifest.num_tokens == 7
    assert rows[1] == {"id": 1, "text": "match abandoned in storm", "labels": ["sport", "weather"]}

    # Evaluation through the same path as ner/classify, with a model that always says
    # "weather" and never "sport".
    class Out:
        loss = None

    def forward(batch):
        out = Out()
        out.logits = torch.tensor([[-1.0, 2.0]]).expand(len(batch["input_ids"]), 2)
        return out

    names = metric_names("multilabel", manifest.labels)
    result = evaluate_rows(forward, rows, task="multilabel", labels=manifest.labels, names=names,
                           tokenizer=FakeTokenizer(), max_length=16, batch_size=1,
                           keep_predictions=True)  # fmt: skip
    assert result.predictions == [{"weather"}, {"weather"}]
    assert result.counts.tolist() == [[0, 0, 1], [2, 2, 2]]  # sport: missed; weather: right


def _compares_a_task_name(node: ast.AST) -> bool:
    if not isinstance(node, ast.Compare):
        return False
    operands = [node.left, *node.comparators]
    return any(isinstance(o, ast.Constant) and o.value in tasks.TASK_NAMES for o in operands)


@pytest.mark.parametrize("package", ["data", "training"])
def test_no_module_outside_the_specs_branches_on_a_task_name(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        if "tasks" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text())
        branches = [n.lineno for n in ast.walk(tree) if _compares_a_task_name(n)]
        assert not branches, f"{path.relative_to(ROOT)}:{branches} compares with a task name"
