"""A job talks to its own Ray and no other: unset cluster.address starts a fresh local Ray past
a stale or live address file, RAY_ADDRESS (set inside a Ray job) joins that cluster, and a
`ray start --head` elsewhere on the machine while a local job trains does not disturb it.

Each process here gets RAY_TMPDIR of the module's own, so the address file Ray advertises and
the foreign head are this test's, never the machine's /tmp/ray."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests import testkit
from tests.integration.test_ray_job_submit import _stop_ray
from tests.testkit import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
PROBE = (
    "import json, sys, ray\n"
    "from shardtune.cluster.config import validate_tree\n"
    "from shardtune.cluster.job import connect_ray\n"
    "connect_ray(validate_tree(json.loads(sys.argv[1]), 'probe'))\n"
    "print('GCS', ray.get_runtime_context().gcs_address, flush=True)\n"
    "ray.shutdown()\n"
)
TRAIN_TIMEOUT_S = 240


def env_for(ray_tmpdir: str, **extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or auth setting, Ray's temp dir ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER"))
    }
    return {**env, "RAY_TMPDIR": ray_tmpdir, **extra}


def probe(job: dict, env: dict[str, str]) -> str:
    """The GCS address connect_ray ends up on, from a fresh process (one Ray per process)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(job)], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("GCS "))


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class ForeignHead:
    """`ray start --head` on loopback in a RAY_TMPDIR, with token auth on and its own token."""

    def __init__(self, ray_tmpdir: str):
        self.ray_tmpdir, self.port, self.token = ray_tmpdir, free_port(), secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        ports = [
            "--port", self.port, "--dashboard-port", free_port(),
            "--ray-client-server-port", free_port(), "--node-manager-port", free_port(),
            "--object-manager-port", free_port(), "--dashboard-agent-listen-port", free_port(),
            "--dashboard-agent-grpc-port", free_port(), "--runtime-env-agent-port", free_port(),
            "--metrics-export-port", free_port(),
        ]  # fmt: skip
        cmd = [
            RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
            "--object-store-memory", str(100 * 1024**2), *ports,
        ]  # fmt: skip
        env = env_for(self.ray_tmpdir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        log = open(Path(self.ray_tmpdir) / "foreign-head.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        advertised = Path(self.ray_tmpdir) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not (
            advertised.exists() and advertised.read_text().strip().endswith(f":{self.port}")
        ):
            assert self.proc.poll() is None, (
                Path(self.ray_tmpdir) / "foreign-head.log"
            ).read_text()
            assert time.monotonic() < deadline, "the foreign head did not come up in 120 s"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_ray(self.proc)


@pytest.fixture(scope="module")
def ray_tmpdir():
    # Short: Ray's unix sockets live under it and paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="own", dir="/tmp")
    yield path


@pytest.fixture(scope="module")
def foreign(ray_tmpdir):
    head = ForeignHead(ray_tmpdir)
    yield head
    head.stop()


def probe_job(**cluster) -> dict:
    return {
        "task": "ner",
        "model": {"name_or_path": "/unused"},
        "data": {"train": "/unused"},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1, **cluster},
        "run": {"name": "probe", "output": "/unused"},
    }


def test_stale_address_file_does_not_stop_a_local_job(tmp_path) -> None:
    stale_dir = tempfile.mkdtemp(prefix="stl", dir="/tmp")
    (Path(stale_dir) / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: a head that has died
    (Path(stale_dir) / "ray" / "ray_current_cluster").write_text(dead)
    assert probe(probe_job(), env_for(stale_dir)) != dead


def test_foreign_head_started_mid_training_leaves_the_job_alone(foreign, ray_tmpdir, tmp_path):
    """Training pauses at step 2 (both ranks wait in the next collective); a foreign head comes
    up and advertises itself; Ray Train's placement-group cleaner polls every second; after 8 s
    training resumes. With max_failures 0 a removed placement group would fail the run."""
    model = testkit.random_bert(tmp_path / "model", hidden=32, intermediate=64)
    corpus = testkit.write_conll(tmp_path / "c.conll", testkit.synthetic_sentences(48))
    from shardtune.data.prepare import prepare

    prepare("ner", [str(corpus)], str(tmp_path / "data"), shards=2, seed=0)
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump({
            "task": "ner",
            "model": {"name_or_path": model},
            "data": {"train": str(tmp_path / "data"), "max_length": 32},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "precision": "fp32",
                      "eval_every": 1000, "log_every": 100},
            "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
            "run": {"name": "own", "output": str(tmp_path / "runs")},
        })
    )  # fmt: skip
    fault = tmp_path / "fault"
    env = env_for(ray_tmpdir, SHARDTUNE_FAULT=f"pause@step=2,rank=0,dir={fault}")
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            [sys.executable, "launch.py", "train", "--config", str(config)], cwd=ROOT, env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        while not (fault / "waiting.pid").exists():
            assert job.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "training never reached step 2"
            time.sleep(0.5)
        foreign.start()  # now the machine advertises the other cluster
        time.sleep(8)
        (fault / "resume").touch()
        rc = job.wait(timeout=TRAIN_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "Cleaning up placement group" not in text and "placement group was removed" not in text
    assert (tmp_path / "runs" / "own" / "model" / "config.json").is_file()


def test_live_foreign_head_is_not_joined_and_ray_address_is(foreign, ray_tmpdir) -> None:
    if foreign.proc is None:
        foreign.start()
    # Unset address with a live head advertised on the machine: a fresh Ray of our own.
    assert port_of(probe(probe_job(), env_for(ray_tmpdir))) != foreign.port
    # Inside a Ray job Ray sets RAY_ADDRESS (and the client holds the cluster's token): join it.
    joined = env_for(
        ray_tmpdir, RAY_ADDRESS=f"127.0.0.1:{foreign.port}", RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=foreign.token,
    )  # fmt: skip
    assert port_of(probe(probe_job(), joined)) == foreign.port


def prepare_ray(tmp_path: Path, env: dict[str, str], *extra: str) -> str:
    """`launch.py prepare --ray` in a fresh process; the Ray it used, from its status line."""
    corpus = testkit.write_conll(tmp_path / "p.conll", testkit.synthetic_sentences(12))
    out = subprocess.run(
        [sys.executable, "launch.py", "prepare", "--task", "ner", "--input", str(corpus),
         "--output", str(tmp_path / f"ds{len(extra)}"), "--ray", *extra],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    (line,) = [line for line in out.stderr.splitlines() if " Ray at " in line]
    return line


def test_prepare_ray_joins_address_and_else_starts_its_own(foreign, ray_tmpdir, tmp_path) -> None:
    """`prepare --ray` takes the one bootstrap `train` takes: --address joins that cluster (a
    token cluster, with its token in the environment), no address starts a Ray of its own."""
    if foreign.proc is None:
        foreign.start()
    own = prepare_ray(tmp_path, env_for(ray_tmpdir))
    assert "started a local Ray" in own and port_of(own) != foreign.port
    token = env_for(ray_tmpdir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=foreign.token)
    joined = prepare_ray(tmp_path, token, "--address", f"127.0.0.1:{foreign.port}")
    assert "joined Ray" in joined and port_of(joined) == foreign.port
