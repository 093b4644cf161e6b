"""The report says which manifest version a run trained on (`prepare --append` adds versions;
test scores of two retrainings compare only with the versions named), and a checkpoint taken
between evaluations (train.checkpoint_every, eval_f1 NaN) never ranks as the best."""

from __future__ import annotations

from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import build_report, rank_checkpoints
from shardtune.data.manifest import Manifest
from shardtune.training.records import EvalRecord, EvalScores

JOB = {
    "task": "ner",
    "model": {"name_or_path": "/models/bert"},
    "data": {"train": "s3://b/train"},
    "run": {"name": "r", "output": "s3://b/runs"},
}


def test_the_report_names_the_manifest_version():
    job = validate_tree(dict(JOB), "test")
    manifest = Manifest(task="ner", labels=["O"], num_examples=5, num_tokens=9, shards=[],
                        version=3)  # fmt: skip
    best = EvalRecord(step=4, epoch=0, scores=EvalScores(eval_f1=0.5))
    test_set = Manifest(task="ner", labels=["O"], num_examples=2, num_tokens=4, shards=[],
                        version=5)  # fmt: skip
    versions = {"train": manifest, "eval": None, "test": test_set}
    report = build_report(job, best=("checkpoint-00000004", best), history=[],
                          test=None, model_uri="m", wall_s=1.0, versions=versions)  # fmt: skip
    assert report["data"]["manifest_version"] == 3
    assert report["data"]["manifest_versions"] == {"train": 3, "eval": None, "test": 5}
    assert report["data"]["train_examples"] == 5


def test_a_checkpoint_without_evaluation_never_ranks_best():
    ranked = rank_checkpoints(
        [("checkpoint-00000004", {"step": 4, "eval_f1": 0.4}),
         ("checkpoint-00000006", {"step": 6, "eval_f1": float("nan"), "checkpoint_only": True}),
         ("checkpoint-00000002", {"step": 2, "eval_f1": 0.1})],
        has_eval=True,
    )  # fmt: skip
    assert [name for name, _ in ranked] == [
        "checkpoint-00000004", "checkpoint-00000002", "checkpoint-00000006",
    ]  # fmt: skip
