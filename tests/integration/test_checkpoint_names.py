"""Checkpoint names and retention on a local Ray, one worker, a tiny BERT, S3 on loopback:
- `train.checkpoint_every` dividing the epoch length (its checkpoints land on the epoch's and
  the end's reports): every step is saved once, under one name, with and without an eval set;
  every checkpoint in Ray's snapshot verifies, the final one is exported, a rerun finishes;
- retention keeps the latest and the best, so a damaged latest leaves one to resume from
  even under `keep_checkpoints: 1`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import run_layout, run_training
from shardtune.data import storage
from shardtune.training.checkpoint import checkpoint_key, checkpoint_step, verify

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py
RUNS = f"s3://{BUCKET}/name-runs"
EPOCH_STEPS = 22  # 175 training examples / 1 worker / batch 8


def job_for(name: str, s3, prepared: dict, model: str, *, with_eval: bool, keep: int = 2, **train):
    data = {"train": prepared["train"], "max_length": 32}
    if with_eval:
        data["eval"] = prepared["dev"]
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": model},
            "data": data,
            "train": {
                "epochs": 2,
                "lr": 3e-3,
                "batch_size": 8,
                "seed": 1,
                "log_every": 100,
                **train,
            },  # fmt: skip
            "cluster": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            "run": {"name": name, "output": RUNS, "keep_checkpoints": keep},
            "storage": {"endpoint_url": s3.endpoint_url},
        },
        "test",
    )


def snapshot(job) -> dict:
    return json.loads(storage.read_text(run_layout(job).snapshot, job.storage_options()))


def registered(job) -> list[str]:
    return [r["checkpoint_dir_name"] for r in snapshot(job)["checkpoint_results"]]


def checkpoint_dirs(job) -> list[str]:
    names = storage.list_names(run_layout(job).root, job.storage_options())
    return sorted(n for n in names if checkpoint_key(n) is not None)


@pytest.mark.parametrize("with_eval", [True, False], ids=["eval", "no-eval"])
def test_checkpoint_every_on_epoch_ends_saves_each_step_once(
    with_eval, s3, local_ray, prepared, tiny_model_dir, tmp_path
):
    name = f"every11-{'eval' if with_eval else 'noeval'}"
    # 11 divides the epoch's 22 steps: checkpoint-only saves at 22 and 44 meet the epoch's and
    # the end's reports
    job = job_for(name, s3, prepared, tiny_model_dir, with_eval=with_eval, checkpoint_every=11)
    options = job.storage_options()
    report = run_training(job)

    names = registered(job)
    assert len(names) == len(set(names)), Counter(names)
    latest = snapshot(job)["latest_checkpoint_result"]
    assert latest["checkpoint_dir_name"] == f"checkpoint-{2 * EPOCH_STEPS:08d}"
    assert not latest["metrics"].get("checkpoint_only")  # the end's report, not a bare save
    for n in names:  # every registered checkpoint is complete
        local = tmp_path / n
        storage.download_dir(run_layout(job).checkpoint(n), str(local), options)
        verify(str(local))
    assert checkpoint_dirs(job) == sorted(names)  # nothing unregistered left beside them
    if not with_eval:  # ranked by step: the final one is the best
        assert report["best_checkpoint"] == latest["checkpoint_dir_name"]
    assert report["best_checkpoint"] in names
    assert storage.exists(storage.join(report["model"], "model.safetensors"), options)

    again = run_training(job)  # the same command again: restores the finished run, ends cleanly
    names = registered(job)
    assert len(names) == len(set(names)), Counter(names)
    assert checkpoint_step(again["best_checkpoint"] or "") is not None
    assert again["history"][-1]["step"] == 2 * EPOCH_STEPS


def test_retention_keeps_latest_and_best_so_a_damaged_latest_has_a_fallback(
    s3, local_ray, prepared, tiny_model_dir, capsys
):
    """keep_checkpoints: 1 without an eval set (ranked by step, so the latest is also the
    best): another checkpoint must stay, and a rerun after the latest is damaged resumes from
    it instead of refusing."""
    job = job_for("keep1", s3, prepared, tiny_model_dir, with_eval=False, keep=1, epochs=1,
                  eval_every=5)  # fmt: skip
    options = job.storage_options()
    run_training(job)
    kept = checkpoint_dirs(job)
    latest = f"checkpoint-{EPOCH_STEPS:08d}"
    assert latest in kept and len(kept) >= 2, kept  # the latest (= best) and a fallback
    fallback = max((n for n in kept if n != latest), key=checkpoint_key)

    victim = storage.join(run_layout(job).checkpoint(latest), "rank-00000.state.pt")
    storage.write_bytes(victim, storage.read_bytes(victim, options)[:100], options)
    report = run_training(job)
    assert report["history"][-1]["step"] == EPOCH_STEPS
    assert report["best_checkpoint"] == f"{latest}-1"  # retaken from the fallback
    assert checkpoint_step(fallback) == 20
