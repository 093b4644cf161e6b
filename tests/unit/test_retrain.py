"""Retraining from a fine-tuned model (training/model.py): the label plan, head rows carried
over by label, and a checkpoint that cannot serve the task refused by the CLI before Ray starts
(one line naming the model, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from shardtune.cluster import cli
from shardtune.training.model import ModelError, build_model, check_model_for_task, label_plan

from tests import testkit

OLD = ["O", "B-PER", "B-MISC"]
NEW = ["B-LOC", "B-PER", "O"]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=dict(enumerate(OLD)),
        label2id={v: i for i, v in enumerate(OLD)},
    )  # fmt: skip
    out = tmp_path_factory.mktemp("fine-tuned")
    model.save_pretrained(out)
    return str(out), model


def test_label_plan_groups():
    plan = label_plan(OLD, NEW)
    assert (plan.kept, plan.new, plan.dropped) == (["B-PER", "O"], ["B-LOC"], ["B-MISC"])
    assert plan.describe() == "kept 2 (B-PER, O); new 1 (B-LOC); dropped 1 (B-MISC)"


def test_head_rows_of_shared_labels_are_carried_over(fine_tuned):
    path, old = fine_tuned
    model = build_model(path, "ner", NEW)
    assert model.config.id2label == dict(enumerate(NEW)) and model.num_labels == 3
    for i, label in enumerate(NEW):
        row = model.classifier.weight[i]
        if label in OLD:
            assert torch.equal(row, old.classifier.weight[OLD.index(label)])
            assert model.classifier.bias[i] == old.classifier.bias[OLD.index(label)]
        else:
            assert not any(torch.equal(row, r) for r in old.classifier.weight)
    assert check_model_for_task(path, "ner", NEW).dropped == ["B-MISC"]


def test_model_that_cannot_serve_the_task_is_one_line_before_ray(tmp_path, fine_tuned, capsys):
    from shardtune.data.prepare import prepare

    conll = testkit.write_conll(tmp_path / "c.conll", testkit.synthetic_sentences(30, seed=2))
    prepare("ner", [str(conll)], str(tmp_path / "ds"), seed=0)
    path, _ = fine_tuned
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    config["architectures"] = ["BertForSequenceClassification"]
    (classifier / "config.json").write_text(json.dumps(config))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model, reason in ((classifier, "has a classify head"), (broken, "unreadable")):
        job = tmp_path / "job.yaml"
        job.write_text(json.dumps({
            "task": "ner", "model": {"name_or_path": str(model)},
            "data": {"train": str(tmp_path / "ds")},
            "run": {"name": "r", "output": str(tmp_path / "runs")},
        }))  # fmt: skip
        assert cli.main(["train", "--config", str(job)]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # log lines of prepare too
        errors = [line for line in err if line.startswith("error:")]
        assert errors == err[-1:] and str(model) in err[-1] and reason in err[-1], err
        assert "Traceback" not in "\n".join(err)
    with pytest.raises(ModelError):
        check_model_for_task(str(classifier), "ner", NEW)
