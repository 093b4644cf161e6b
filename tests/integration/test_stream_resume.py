"""Streaming under failure, checked with the ledger (the ids each rank consumed per step):
(a) an interrupted-and-resumed run consumes exactly what an uninterrupted one does;
(b) after a restart with another world size, every example of the interrupted epoch is seen
exactly once; the S3 endpoint going away for seconds mid-run does not stop training. (A corrupt
shard is covered at the stream level in tests/unit/test_stream.py: a job-level run costs
another worker-group start.)"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import run_training
from shardtune.data import storage
from shardtune.data.ledger import read_committed
from shardtune.data.manifest import read_manifest, read_shard_rows
from shardtune.data.prepare import prepare

from tests.integration.flaky_proxy import FlakyProxy

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py
DATA = f"s3://{BUCKET}/data/ledger"
RUNS = f"s3://{BUCKET}/ledger-runs"
EXAMPLES, SHARD_SIZE = 240, 8  # 30 small shards: every micro-batch of 8 starts a new shard


@pytest.fixture(scope="module")
def ledger_data(s3, synthetic_conll):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    (manifest,) = prepare(
        "ner", [str(synthetic_conll)], DATA, shard_size=SHARD_SIZE, options=options
    ).values()
    assert manifest.num_examples == EXAMPLES
    return DATA


def job_for(name, endpoint, model, *, workers=2, max_failures=0, **train):
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": model},
            "data": {
                "train": DATA,
                "max_length": 32,
                "shards_in_memory": train.pop("shards_in_memory", 2),
            },
            "train": {
                "epochs": 2,
                "lr": 3e-3,
                "batch_size": 8,
                "zero_stage": 2,
                "seed": 1,
                "log_every": 100,
                "ledger": True,
                **train,
            },  # fmt: skip
            "cluster": {"num_workers": workers, "cpus_per_worker": 1, "max_failures": max_failures},
            "run": {"name": name, "output": RUNS, "keep_checkpoints": 2},
            "storage": {"endpoint_url": endpoint},
        },
        "test",
    )


def by_rank_and_step(entries: list[dict]) -> dict[tuple[int, int, int], list[int]]:
    return {(e["rank"], e["step"], e["micro_step"]): e["ids"] for e in entries}


@pytest.fixture(scope="module")
def reference(s3, local_ray, ledger_data, tiny_model_dir):
    """The uninterrupted run, through a proxy that drops the S3 endpoint for 5 s while the
    workers read shards (one shard in memory, no prefetch; no checkpoint until the end, so the
    outage cannot hit an upload)."""
    proxy = FlakyProxy(s3.port).start()
    try:
        # 2 ranks x 2 epochs x 15 shards each = 60 train-shard reads; the 12th is mid-epoch 1.
        proxy.go_down_on(f"/{BUCKET}/data/ledger/shard-", nth=12, seconds=5)
        job = job_for(
            "ledger-reference",
            proxy.endpoint_url,
            tiny_model_dir,
            eval_every=1000,
            shards_in_memory=1,
        )
        report = run_training(job)
    finally:
        proxy.stop()
    return {
        "report": report,
        "proxy": proxy,
        "ledger": read_committed(
            f"{RUNS}/ledger-reference", storage.StorageOptions(endpoint_url=s3.endpoint_url)
        ),
    }


def test_reads_fail_while_s3_is_down_and_return_undisturbed_rows_after(s3, ledger_data, capsys):
    """The retrying read path the workers use, without Ray: a shard read made while the
    endpoint is down fails and retries (logged), returns only after the endpoint is back, and
    returns what an undisturbed read returns."""
    direct = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    shard = read_manifest(DATA, direct).shards[3]
    undisturbed = read_shard_rows(DATA, shard, direct)
    proxy = FlakyProxy(s3.port).start()
    try:
        capsys.readouterr()
        proxy.down_for(6)  # longer than botocore's own 3 quick attempts, as in the run above
        rows = read_shard_rows(DATA, shard, storage.StorageOptions(endpoint_url=proxy.endpoint_url))
        returned_at = time.monotonic()
    finally:
        proxy.stop()
    retries = [line for line in capsys.readouterr().err.splitlines() if "; retry " in line]
    assert retries and all(f"storage: read {DATA}/{shard.name}" in line for line in retries), (
        retries
    )
    assert returned_at >= proxy.outages[0][1]  # nothing came back while the endpoint was down
    assert rows == undisturbed


def test_s3_outage_mid_run_is_ridden_out(reference, local_ray):
    proxy, report = reference["proxy"], reference["report"]
    assert len(proxy.outages) == 1  # the outage happened (what the run did about it is below)
    assert (
        report["history"][-1]["step"] == 30
        and report["history"][-1]["train_examples"] == 2 * EXAMPLES
    )
    for epoch in (0, 1):  # every example of both epochs was trained on, once, outage or not
        seen = Counter(i for e in reference["ledger"] if e["epoch"] == epoch for i in e["ids"])
        assert seen == Counter(range(EXAMPLES)), f"epoch {epoch}"
    assert 0 <= report["history"][-1]["data_wait_fraction"] < 1
    # the workers' read path saw the outage and said so (Python logging -> worker stderr)
    logs = local_ray._private.worker._global_node.get_logs_dir_path()
    text = "".join(
        Path(p).read_text(errors="replace") for p in glob.glob(os.path.join(logs, "worker-*.err"))
    )
    assert "storage: read s3://shardtune-it/data/ledger/shard-" in text and "; retry 1/" in text


def test_interrupted_run_consumes_what_the_uninterrupted_one_does(
    s3, local_ray, ledger_data, tiny_model_dir, reference, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHARDTUNE_FAULT", f"raise@step=5,rank=1,times=1,dir={tmp_path}")
    job = job_for(
        "ledger-interrupted", s3.endpoint_url, tiny_model_dir, eval_every=2, max_failures=1
    )
    run_training(job)
    assert os.path.exists(tmp_path / "fired-1")  # the fault really fired
    names = storage.list_names(f"{RUNS}/ledger-interrupted/ledger", job.storage_options())
    assert {"attempt-00001.json", "attempt-00002.json"} <= set(names)
    got = by_rank_and_step(read_committed(f"{RUNS}/ledger-interrupted", job.storage_options()))
    want = by_rank_and_step(reference["ledger"])
    assert len(want) == 2 * 2 * 15 and got == want  # per rank, per step: the same ids


def test_resume_with_fewer_workers_sees_each_example_once(
    s3, local_ray, ledger_data, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SHARDTUNE_FAULT", f"raise@step=5,rank=1,times=1,dir={tmp_path}")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_training(job_for("ledger-resize", s3.endpoint_url, tiny_model_dir, eval_every=2))
    monkeypatch.delenv("SHARDTUNE_FAULT")
    # the same run name with 1 worker: Ray restores checkpoint-00000004 (2 workers, mid-epoch 1)
    job = job_for("ledger-resize", s3.endpoint_url, tiny_model_dir, workers=1, eval_every=2)
    run_training(job)
    entries = read_committed(f"{RUNS}/ledger-resize", job.storage_options())
    for epoch in (0, 1):
        seen = Counter(i for e in entries if e["epoch"] == epoch for i in e["ids"])
        assert seen == Counter(range(EXAMPLES)), f"epoch {epoch}: not every example exactly once"
    first = [e for e in entries if e["epoch"] == 0]
    assert {e["world_size"] for e in first} == {1, 2}
    # Steps after the checkpoint the second run resumed from are dropped. Checkpoints upload
    # asynchronously (train.checkpoint_upload), so the fault right after step 4's report may
    # beat that upload: Ray then restores checkpoint-2, and the ledger follows whichever it was.
    header = json.loads(storage.read_text(
        f"{RUNS}/ledger-resize/ledger/attempt-00002.json", job.storage_options()))  # fmt: skip
    assert header["resumed_step"] in (2, 4)
    assert max(e["step"] for e in first if e["world_size"] == 2) == header["resumed_step"]
