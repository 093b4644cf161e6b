"""Lost or damaged run state and data changed under a run (issue 18, items 4 and 5), on local Ray
+ S3: a run stopped by a fault at step 5 (checkpoints 2 and 4 registered) is rerun after
(a) Ray's snapshot was deleted, (b) truncated, (c) its latest checkpoint directory was deleted by
hand, (d) `prepare --append` added data: it resumes from the newest checkpoint that verifies,
never from step 0, and finishes on the manifest version it started on. The ledger (the ids each
step consumed, with the attempt's `resumed_step`) shows where each rerun started and what it
read."""

from __future__ import annotations

import json
import os

import pytest
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import data_versions, run_training
from shardtune.data import storage
from shardtune.data.ledger import read_committed
from shardtune.data.prepare import prepare

from tests import testkit

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py
DATA = f"s3://{BUCKET}/data/run-state"
RUNS = f"s3://{BUCKET}/run-state-runs"
STEPS = 8


@pytest.fixture(scope="module")
def data(s3, synthetic_conll):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    split = {"train": 0.7, "dev": 0.15, "test": 0.15}
    first = prepare("ner", [str(synthetic_conll)], DATA, split=split, shard_size=8, seed=0,
                    options=options)  # fmt: skip
    return {"options": options, "split": split, "train_examples": first["train"].num_examples}


def job_for(name: str, s3, model: str, *, test: bool = False):
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": model},
            "data": {
                "train": f"{DATA}/train",
                "eval": f"{DATA}/dev",
                "test": f"{DATA}/test" if test else None,
                "max_length": 32,
            },
            "train": {
                "epochs": 1,
                "max_steps": STEPS,
                "lr": 3e-3,
                "batch_size": 8,
                "eval_every": 2,
                "seed": 1,
                "log_every": 100,
                "ledger": True,
                "checkpoint_upload": "sync",
            },  # registered before the fault fires
            "cluster": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            "run": {"name": name, "output": RUNS, "keep_checkpoints": 3},
            "storage": {"endpoint_url": s3.endpoint_url},
        },  # fmt: skip
        "test",
    )


def stopped_at_step_5(job, tmp_path) -> None:
    """Train until a fault at step 5 ends the run: checkpoints 2 and 4 are registered."""
    os.environ["SHARDTUNE_FAULT"] = f"raise@step=5,rank=0,times=1,dir={tmp_path}"
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            run_training(job)
    finally:
        del os.environ["SHARDTUNE_FAULT"]
    names = storage.list_names(f"{RUNS}/{job.run.name}", job.storage_options())
    assert {"checkpoint-00000002", "checkpoint-00000004"} <= set(names)


@pytest.fixture(scope="module")
def stopped(s3, local_ray, data, tiny_model_dir, tmp_path_factory):
    """One stopped run, copied for each scenario (a rerun changes its folder)."""
    job = job_for("stopped", s3, tiny_model_dir)
    stopped_at_step_5(job, tmp_path_factory.mktemp("fault"))
    fs, _ = storage.filesystem(RUNS, job.storage_options())
    root = f"{BUCKET}/run-state-runs"

    def copy(name: str):
        fs.copy(f"{root}/stopped", f"{root}/{name}", recursive=True)
        return job_for(name, s3, tiny_model_dir)

    return copy


def resumed_step(job) -> int | None:
    """Where the rerun's attempt started, as its ledger header records it (None: step 0)."""
    header = storage.read_text(f"{RUNS}/{job.run.name}/ledger/attempt-00002.json",
                               job.storage_options())  # fmt: skip
    return json.loads(header)["resumed_step"]


def finished(report: dict) -> None:
    steps = [h["step"] for h in report["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps


@pytest.mark.parametrize(
    ("damage", "want_step", "said"),
    [
        ("snapshot deleted", 4, "snapshot is missing"),
        ("snapshot truncated", 4, "snapshot is unreadable"),
        ("latest checkpoint deleted", 2, "names checkpoint-00000004, which no longer exist"),
    ],
)
def test_rerun_over_lost_run_state_resumes_from_the_newest_verified_checkpoint(
    stopped, damage, want_step, said, capsys
):
    job = stopped(damage.replace(" ", "-"))
    run, options = f"{RUNS}/{job.run.name}", job.storage_options()
    snapshot = f"{run}/checkpoint_manager_snapshot.json"
    if damage == "snapshot deleted":
        storage.remove(snapshot, options)
    elif damage == "snapshot truncated":
        storage.write_text(snapshot, storage.read_text(snapshot, options)[:100], options)
    else:
        storage.remove_tree(f"{run}/checkpoint-00000004", options)
    capsys.readouterr()
    report = run_training(job)
    err = capsys.readouterr().err
    assert said in err and f"resuming from checkpoint-{want_step:08d} (step {want_step})" in err
    assert resumed_step(job) == want_step  # not step 0
    finished(report)
    steps = sorted({e["step"] for e in read_committed(run, options)})
    assert steps == list(range(1, STEPS + 1))  # each step once: no restart from 0


def test_rerun_after_prepare_append_finishes_on_the_pinned_version(
    s3, local_ray, data, tiny_model_dir, synthetic_conll, tmp_path
):
    job = job_for("appended", s3, tiny_model_dir, test=True)
    stopped_at_step_5(job, tmp_path / "fault")
    more = testkit.write_conll(tmp_path / "more.conll", testkit.synthetic_sentences(120, seed=7))
    grown = prepare("ner", [str(more)], DATA, split=data["split"], shard_size=8, seed=0,
                    append=True, options=data["options"])  # fmt: skip
    assert grown["train"].version == 2 and grown["train"].num_examples > data["train_examples"]

    report = run_training(job)
    assert resumed_step(job) == 4
    finished(report)
    assert report["data"]["manifest_versions"] == {"train": 1, "eval": 1, "test": 2}
    assert report["data"]["train_examples"] == data["train_examples"]
    # Every id the run consumed, before and after the append, is of the old corpus (ids of
    # appended examples continue after it), and the ledger resolves on the pinned plan.
    ids = {i for e in read_committed(f"{RUNS}/appended", job.storage_options()) for i in e["ids"]}
    old_ids = set(range(240))  # synthetic_conll's sentences: appended ones are numbered after
    assert ids and ids <= old_ids
    # A new run (or --fresh) takes the new version.
    assert data_versions(job, None)["train"].version == 2
