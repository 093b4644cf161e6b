"""An S3 outage during a checkpoint upload (issue 18.2): the endpoint goes away for 10 s from the
first PUT/POST under the run's checkpoint prefix (the upload's own request is cut), with
cluster.max_failures 0, so only the storage retry policy stands between the outage and the
run. The run finishes with the weights and the data ledger of an undisturbed run."""

from __future__ import annotations

import glob
import os
import re
import time
from pathlib import Path

from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import run_training
from shardtune.data import storage
from shardtune.data.ledger import read_committed
from shardtune.training.checkpoint import verify

from tests.integration.flaky_proxy import FlakyProxy

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py
RUNS = f"s3://{BUCKET}/outage-runs"
OUTAGE_S = 10.0


def job_for(name: str, endpoint: str, prepared: dict, model: str):
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": model},
            "data": {"train": prepared["train"], "max_length": 32},
            "train": {
                "epochs": 1,  # 11 steps, as one epoch in test_faults.py
                "lr": 3e-3,
                "batch_size": 8,
                "zero_stage": 2,
                "seed": 1,
                "eval_every": 4,  # checkpoints at steps 4, 8 and 11 (no eval set: by step)
                "log_every": 100,
                "ledger": True,
            },  # fmt: skip
            "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
            "run": {"name": name, "output": RUNS, "keep_checkpoints": 2},
            "storage": {"endpoint_url": endpoint},
        },
        "test",
    )


def final_weights(report: dict, options) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(storage.join(report["model"], "model.safetensors"), options))


def ledger(run: str, options) -> dict:
    return {
        (e["rank"], e["micro_step"]): e["ids"] for e in read_committed(f"{RUNS}/{run}", options)
    }


def worker_logs(ray_module) -> str:
    logs = ray_module._private.worker._global_node.get_logs_dir_path()
    return "".join(
        Path(p).read_text(errors="replace") for p in glob.glob(os.path.join(logs, "worker-*.err"))
    )


def test_outage_during_checkpoint_upload_is_ridden_out(
    s3, local_ray, prepared, tiny_model_dir, tmp_path
):
    direct = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    reference = run_training(
        job_for("upload-undisturbed", s3.endpoint_url, prepared, tiny_model_dir)
    )

    proxy = FlakyProxy(s3.port).start()
    try:
        proxy.go_down_on(f"/{BUCKET}/outage-runs/upload-outage/checkpoint-", nth=1,
                         seconds=OUTAGE_S, methods=("PUT", "POST"))  # fmt: skip
        started = time.monotonic()
        report = run_training(
            job_for("upload-outage", proxy.endpoint_url, prepared, tiny_model_dir)
        )
        took = time.monotonic() - started
    finally:
        proxy.stop()

    assert len(proxy.outages) == 1  # the outage happened, during an upload (what it cut is below)
    retries = [
        line for line in worker_logs(local_ray).splitlines()
        if "upload-outage/checkpoint-" in line and "; retry " in line
    ]  # fmt: skip
    assert retries, "no checkpoint upload was retried"
    print(f"\noutage run: {took:.1f}s, {len(retries)} checkpoint retries, first: {retries[0]}")
    assert report["history"][-1]["step"] == reference["history"][-1]["step"] == 11
    got, want = final_weights(report, direct), final_weights(reference, direct)
    assert sorted(got) == sorted(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-6, f"largest weight difference {worst}"
    assert ledger("upload-outage", direct) == ledger("upload-undisturbed", direct)
    # the checkpoints left in storage, the one written through the outage included, verify
    names = [n for n in storage.list_names(f"{RUNS}/upload-outage", direct)
             if re.fullmatch(r"checkpoint-\d{8}", n)]  # fmt: skip
    assert names
    for name in names:
        local = tmp_path / name
        storage.download_dir(f"{RUNS}/upload-outage/{name}", str(local), direct)
        verify(str(local), name)
