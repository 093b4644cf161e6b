"""One Ray bootstrap (cluster/ray_runtime.py) for every verb: which Ray it picks, the State API
guard of a local Ray, and that `train`, `prepare --ray` and `serve` all go through it. Ray's own
start is replaced by a recorder: no Ray runs here (tests/integration/test_own_cluster.py runs it)."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from shardtune.cluster import cli, ray_runtime

from tests.unit.test_cli_errors import MODEL, assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init recorded (with the RAY_API_SERVER_ADDRESS its processes would copy); a list of
    the calls' keyword arguments."""
    calls: list[dict] = []

    def init(**kwargs):
        calls.append({**kwargs, "api_server": os.environ.get("RAY_API_SERVER_ADDRESS")})

    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append({"shutdown": True}))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="x:1"))
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_explicit_address_then_ray_address_then_a_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_runtime.cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "job-head:6379")  # what Ray sets for a job's driver
    assert ray_runtime.cluster_address(None) == "job-head:6379"
    assert ray_runtime.cluster_address("head:6379") == "head:6379"


def test_local_ray_is_our_own_and_its_state_api_guarded_only_while_starting(fake_ray):
    assert ray_runtime.connect(num_cpus=3) is True
    (init,) = fake_ray
    assert init["address"] == "local" and init["num_cpus"] == 3 and init["include_dashboard"]
    assert init["api_server"] == f"http://127.0.0.1:{init['dashboard_port']}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # would redirect later Jobs API clients
    assert ray_runtime.connect() is False and len(fake_ray) == 1  # already up: used as is


def test_joining_sets_no_guard_and_ignores_num_cpus(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "job-head:6379")
    ray_runtime.connect("head:6379", num_cpus=3)
    (init,) = fake_ray
    assert init == {"address": "head:6379", "logging_level": "WARNING", "api_server": None}


def test_a_ray_without_dashboard_has_no_state_api_to_point_at(fake_ray):
    with ray_runtime.session(dashboard=False):
        pass
    init, stop = fake_ray
    assert init["include_dashboard"] is False and init["api_server"] is None
    assert stop == {"shutdown": True}


def test_ray_init_is_called_in_one_module():
    """Every verb starts or joins Ray through cluster/ray_runtime.py and nowhere else."""
    callers = set()
    for package in ("cluster", "serving", "training", "data"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "init" and getattr(node.func.value, "id", "") == "ray"):  # fmt: skip
                    callers.add(str(path.relative_to(ROOT)))
    assert callers == {"cluster/ray_runtime.py"}


@pytest.fixture
def connects(monkeypatch) -> list[tuple]:
    """ray_runtime.connect recorded: (address, keyword arguments) per call."""
    calls: list[tuple] = []

    def connect(address=None, **kwargs):
        calls.append((address, kwargs))
        return False

    monkeypatch.setattr(ray_runtime, "connect", connect)
    return calls


def test_train_joins_cluster_address_through_the_bootstrap(connects):
    from shardtune.cluster.config import validate_tree
    from shardtune.cluster.job import connect_ray

    job = validate_tree(
        {"task": "ner", "model": {"name_or_path": "/m"}, "data": {"train": "/d"},
         "cluster": {"address": "head:6379"}, "run": {"name": "r", "output": "/o"}}, "test",
    )  # fmt: skip
    connect_ray(job)
    assert connects[0][0] == "head:6379"


def test_prepare_ray_passes_address_to_the_bootstrap(connects, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "a.conll"
    corpus.write_text("alice\tB-PER\nwent\tO\n")
    monkeypatch.setattr(ray, "remote", lambda **_: lambda fn: SimpleNamespace(remote=fn))
    monkeypatch.setattr(ray, "get", lambda results: results)  # the pool runs in this process
    argv = ["prepare", "--task", "ner", "--input", str(corpus), "--output", str(tmp_path / "o"),
            "--ray", "--address", "head:6379"]  # fmt: skip
    assert cli.main(argv) == 0
    assert connects == [("head:6379", {})]


def test_serve_hands_the_bootstrap_to_the_server(connects, monkeypatch, capsys):
    import shardtune.serving.server as server

    handed = {}
    monkeypatch.setattr(server, "run_server", lambda *a, **kw: handed.update(kw) or 0)
    argv = ["serve", "--model", MODEL, "--address", "head:6379"]
    assert cli.main(argv) == 0
    assert handed["joined"] is True
    with handed["ray_session"]():
        pass
    assert connects == [("head:6379", {"dashboard": False})]


def test_an_unreachable_cluster_is_one_line_and_exit_2(fake_ray, monkeypatch, tmp_path, capsys):
    def refused(**kwargs):
        raise ConnectionError(f"Could not find any running Ray instance at {kwargs['address']}.\n")

    monkeypatch.setattr(ray, "init", refused)
    corpus = tmp_path / "a.conll"
    corpus.write_text("alice\tB-PER\nwent\tO\n")
    argv = ["prepare", "--task", "ner", "--input", str(corpus), "--output", str(tmp_path / "o"),
            "--ray", "--address", "head:6379"]  # fmt: skip
    rc, lines = run_cli(argv, capsys)
    assert_user_error(rc, lines, "head:6379")
    assert len(lines) == 1
