"""Lost nodes and elastic workers on a real multi-node Ray on this machine (ray.cluster_utils:
a CPU-less head and one 1-CPU node per worker, each node its own raylet and temp dir), from
s3:// to s3:// on the loopback S3 endpoint: model, data, checkpoints, export and test set all
in the store, so nothing relies on a worker sharing the driver's disk.

One run with cluster.num_workers [1, 2]: the node holding rank 1 is killed mid-epoch 0; the run
goes on with one worker (the interrupted epoch resplit), grows back to two when a node returns,
and finishes; the ledger shows every example exactly once per epoch, plus the counted padding
of the split that finished it. It prints the two figures the README quotes: the time from the
lost node to training again, and the examples consumed per epoch and world size."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml
from shardtune.data import storage
from shardtune.data.ledger import read_committed
from shardtune.data.manifest import read_manifest
from shardtune.data.prepare import prepare

from tests.testkit import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py
PREFIX = f"s3://{BUCKET}/multinode"
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (0 CPUs: driver, Ray Train controller) + two 1-CPU worker nodes. Started after the
    S3 credentials are in the environment (nodes copy it), in a RAY_TMPDIR of its own (Cluster
    advertises itself in the temp dir's address file; the machine's must stay untouched), with
    RAY_API_SERVER_ADDRESS naming its dashboard as `train` does for a local Ray."""
    from ray.cluster_utils import Cluster

    patch = pytest.MonkeyPatch()
    dashboard = free_port()
    patch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="mn", dir="/tmp"))
    patch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard}")
    head_args = {
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard,
        # A killed node is declared dead after ~3 s of missed health checks, not Ray's 30 s.
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    }  # fmt: skip
    c = Cluster(initialize_head=True, connect=False, head_node_args=head_args)
    try:
        nodes = [c.add_node(num_cpus=1) for _ in range(2)]
        yield c, nodes
    finally:
        with contextlib.suppress(Exception):
            c.shutdown()
        patch.undo()


@pytest.fixture(scope="module")
def s3_inputs(s3, synthetic_conll, tiny_model_dir):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    storage.upload_dir(tiny_model_dir, f"{PREFIX}/model-init", options)
    prepare("ner", [str(synthetic_conll)], f"{PREFIX}/data", shard_size=8,
            split={"train": 0.8, "test": 0.2}, seed=0, options=options)  # fmt: skip
    return options


class DriverLog:
    """The driver's combined output, each line with the monotonic time it arrived, also kept
    whole in `path` (a failure message shows only the tail, without Ray's state dumps)."""

    def __init__(self, proc: subprocess.Popen, path: Path):
        self.lines: list[tuple[float, str]] = []
        self.path = path
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        with open(self.path, "w") as out:
            for line in proc.stdout:
                self.lines.append((time.monotonic(), line))
                out.write(line)
                out.flush()

    def first(self, text: str, after: float = 0.0) -> float | None:
        return next((t for t, line in list(self.lines) if t > after and text in line), None)

    def text(self) -> str:
        lines = [line for _, line in self.lines if "[state-dump]" not in line]
        return f"(whole log: {self.path})\n" + "".join(lines)


def wait_until(what: str, check, proc: subprocess.Popen, log: DriverLog, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert proc.poll() is None, f"driver exited before {what}:\n{log.text()[-6000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s}s:\n{log.text()[-6000:]}"
        time.sleep(0.2)
    return found


def node_of(pid: int, nodes) -> object:
    """The cluster node whose raylet started process `pid` (Ray workers are its children)."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    return next(n for n in nodes if n.all_processes["raylet"][0].process.pid in ancestors)


def split_ids(uri: str, options: storage.StorageOptions) -> set[int]:
    """Every example id of a prepared split, read from its shards' `id` column (ids are the
    corpus's, not 0..n-1: the split takes a stable subset of them)."""
    import pyarrow.parquet as pq

    ids: set[int] = set()
    for shard in read_manifest(uri, options).shards:
        data = storage.read_bytes(storage.join(uri, shard.name), options)
        ids.update(pq.read_table(io.BytesIO(data), columns=["id"])["id"].to_pylist())
    return ids


def registered_checkpoint(run: str, options: storage.StorageOptions) -> str | None:
    """The latest checkpoint Ray Train's controller has registered for `run` (from the snapshot
    it writes to storage after each one), or None while there is none."""
    uri = storage.join(run, "checkpoint_manager_snapshot.json")
    if not storage.exists(uri, options):
        return None
    latest = json.loads(storage.read_text(uri, options)).get("latest_checkpoint_result")
    return latest and latest.get("checkpoint_dir_name")


def planned_padding(entries: list[dict]) -> int:
    """Positions of one attempt's epoch that repeat an example: the ranks' position lists
    (stream ranges) overlap by exactly the wrap-around padding of that attempt's split."""
    lists = {(e["rank"], json.dumps(e["list"]["ranges"])): e["list"]["ranges"] for e in entries}
    covered = [p for ranges in lists.values() for a, b in ranges for p in range(a, b)]
    return len(covered) - len(set(covered))


def test_lost_node_shrinks_then_grows_back_and_every_example_is_seen_once(
    cluster, s3, s3_inputs, tmp_path
):
    c, nodes = cluster
    options = s3_inputs
    examples = read_manifest(f"{PREFIX}/data/train", options).num_examples
    train_ids = split_ids(f"{PREFIX}/data/train", options)
    assert len(train_ids) == examples
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump({
            "task": "ner",
            "model": {"name_or_path": f"{PREFIX}/model-init"},
            "data": {"train": f"{PREFIX}/data/train", "test": f"{PREFIX}/data/test",
                     "max_length": 32},
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                      "zero_stage": 2, "seed": 1, "eval_every": 2, "log_every": 100,
                      "ledger": True},
            "cluster": {"address": c.address, "num_workers": [1, 2], "cpus_per_worker": 1,
                        "max_failures": 4, "resize_check_s": 3},
            "run": {"name": "elastic", "output": f"{PREFIX}/runs", "keep_checkpoints": 2},
            "storage": {"endpoint_url": s3.endpoint_url},
        })
    )  # fmt: skip
    fault = tmp_path / "fault"
    env = {
        **os.environ,
        "SHARDTUNE_FAULT": f"wait@step=5,rank=1,dir={fault}",
        # Right after the loss Ray Train still counts the dead node's CPU and first tries the
        # full size again, waiting this long for workers that cannot start before it shrinks
        # (Ray's default: 60 s). Propagated by Ray Train from the driver to its controller.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "25",
    }
    proc = subprocess.Popen(
        [sys.executable, "launch.py", "train", "--config", str(config)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    log = DriverLog(proc, tmp_path / "driver.log")
    try:
        pid_file = fault / "waiting.pid"
        wait_until("rank 1 at step 5", pid_file.exists, proc, log)
        # Ray Train's controller takes reports every 2 s: a node lost before it took the step-4
        # checkpoint's would (rightly) restart the run from step 0, which is not this test.
        wait_until(
            "a checkpoint registered by Ray Train",
            lambda: registered_checkpoint(f"{PREFIX}/runs/elastic", options), proc, log,
        )  # fmt: skip
        victim = node_of(int(pid_file.read_text()), nodes)
        lost_at = time.monotonic()
        c.remove_node(victim, allow_graceful=False)  # the node and its worker die mid-epoch 0
        resumed_at = wait_until(
            "resume after the lost node", lambda: log.first("resumed from", lost_at), proc, log
        )
        # The shrunken group trains and reports (a checkpoint past step 4), then capacity returns.
        wait_until(
            "a report of the shrunken group",
            lambda: log.first("Reporting training result", resumed_at), proc, log,
        )  # fmt: skip
        c.add_node(num_cpus=1)
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = f"{PREFIX}/runs/elastic"
    entries = list(read_committed(run, options))
    per_epoch = {ep: sum(len(e["ids"]) for e in entries if e["epoch"] == ep) for ep in (0, 1)}
    by_world = Counter((e["epoch"], e["world_size"]) for e in entries for _ in e["ids"])
    print(
        f"\nMEASURED lost node -> training again: {resumed_at - lost_at:.1f} s; examples per "
        f"epoch: {per_epoch}; examples consumed by (epoch, world size): {dict(sorted(by_world.items()))}"
    )
    assert proc.returncode == 0, log.text()[-6000:]
    sizes = [e["world_size"] for e in sorted(entries, key=lambda e: e["attempt"])]
    worlds = [w for i, w in enumerate(sizes) if i == 0 or w != sizes[i - 1]]
    assert worlds[:2] == [2, 1] and 2 in worlds[2:], f"world sizes by attempt: {worlds}"
    for epoch in (0, 1):
        of_epoch = [e for e in entries if e["epoch"] == epoch]
        seen = Counter(i for e in of_epoch for i in e["ids"])
        assert set(seen) == train_ids, f"epoch {epoch}: {sorted(train_ids ^ set(seen))}"
        # Wrap-around padding sits at the end of the ranks' streams, so only the attempt that
        # finished the epoch read any: exactly its split's padding comes on top, nothing else.
        last = max(e["attempt"] for e in of_epoch)
        padding = planned_padding([e for e in of_epoch if e["attempt"] == last])
        twice = {i: n for i, n in seen.items() if n > 1}
        assert sum(seen.values()) == examples + padding, (
            f"epoch {epoch}: {sum(seen.values())} seen for {examples} examples + {padding} "
            f"padding; seen more than once: {twice}"
        )
        assert all(n == 2 for n in twice.values()), f"epoch {epoch}: {twice}"
    report = json.loads(storage.read_text(f"{run}/report.json", options))
    assert report["test"]["examples"] > 0  # evaluated by a Ray task on a worker node, from S3
    assert storage.exists(f"{run}/model/config.json", options)
