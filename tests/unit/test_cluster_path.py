"""Cluster-path decisions that need no Ray: elastic worker ranges in the job file, and the
device test evaluation runs on (the GPU its Ray task reserves, when the process sees one)."""

from __future__ import annotations

import pytest
import torch
from shardtune.cluster.config import ConfigError, apply_overrides, validate_tree
from shardtune.training.evaluation import eval_device

BASE = {
    "task": "ner",
    "model": {"name_or_path": "/models/bert"},
    "data": {"train": "s3://b/train"},
    "run": {"name": "r", "output": "s3://b/runs"},
}


def job_with(*overrides: str):
    return validate_tree(apply_overrides({**BASE}, list(overrides)), "test")


def test_num_workers_takes_a_count_or_an_elastic_range() -> None:
    fixed = job_with("cluster.num_workers=3")
    assert (fixed.cluster.num_workers, fixed.cluster.max_workers) == (3, 3)
    elastic = job_with("cluster.num_workers=[1, 4]", "cluster.resize_check_s=5")
    assert elastic.cluster.num_workers == (1, 4) and elastic.cluster.max_workers == 4
    assert elastic.cluster.resize_check_s == 5


@pytest.mark.parametrize("bad", ["0", "[0, 2]", "[3, 2]"])
def test_bad_worker_ranges_name_the_field(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        job_with(f"cluster.num_workers={bad}")
    assert err.value.problems == [
        f"cluster.num_workers: use a count >= 1 or [min, max] with 1 <= min <= max (got {bad})"
    ]


def test_evaluation_runs_on_the_gpu_when_the_process_sees_one() -> None:
    assert eval_device(True) == torch.device("cuda", 0)
    assert eval_device(False) == torch.device("cpu")


def test_exported_model_evaluation_reports_its_device(tmp_path, tiny_model_dir, synthetic_conll):
    """The real path on this CPU machine: the model is placed on the chosen device (CPU here)."""
    from shardtune.data.prepare import prepare
    from shardtune.training.evaluation import evaluate_exported
    from shardtune.training.model import build_model, build_tokenizer

    model = build_model(tiny_model_dir, "ner", ["O", "B-PER", "B-LOC", "B-ORG", "I-ORG"], 0.0)
    model.config.shardtune_task = "ner"
    model.save_pretrained(tmp_path / "model")
    build_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "model")
    prepare("ner", [str(synthetic_conll)], str(tmp_path / "data"), shards=1, seed=0)
    report = evaluate_exported(str(tmp_path / "model"), str(tmp_path / "data"), batch_size=64)
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["examples"] == 240
