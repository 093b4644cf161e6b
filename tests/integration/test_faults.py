"""Faults on a local Ray with 2 workers, a tiny BERT and S3 on loopback:
- a worker SIGKILLed from outside mid-epoch -> Ray restarts the group from the latest
  checkpoint, and the run ends with the same steps, the same data ledger and (same seed, CPU)
  the same weights as an uninterrupted run;
- the latest checkpoint truncated -> a rerun resumes from the previous complete one, says why,
  and again ends with the same weights;
- more failures than cluster.max_failures -> `launch.py train` exits 1 with one clear paragraph;
- the driver killed (its whole process group, local Ray included) -> rerunning the same command
  starts a new local Ray, resumes the run, and its step counter continues (marked slow).
The faults come from the test-only SHARDTUNE_FAULT hook (training/faults.py)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml
from shardtune.cluster import cli
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import run_training
from shardtune.data import storage
from shardtune.data.ledger import read_committed
from shardtune.data.manifest import read_manifest

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py
RUNS = f"s3://{BUCKET}/fault-runs"
ROOT = Path(__file__).resolve().parents[2]
STEPS = 22  # 168 training examples / 2 ranks / batch 8 = 11 steps per epoch, 2 epochs


def job_tree(name: str, endpoint: str, prepared: dict, model: str, **cluster) -> dict:
    return {
        "task": "ner",
        "model": {"name_or_path": model},
        "data": {"train": prepared["train"], "max_length": 32},  # no eval/test: faults only
        "train": {
            "epochs": 2,
            "lr": 3e-3,
            "batch_size": 8,
            "zero_stage": 2,
            "seed": 1,
            "eval_every": 4,
            "log_every": 100,
            "ledger": True,
        },  # fmt: skip
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1, **cluster},
        "run": {"name": name, "output": RUNS, "keep_checkpoints": 2},
        "storage": {"endpoint_url": endpoint},
    }


def final_weights(report: dict, options) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(storage.join(report["model"], "model.safetensors"), options))


def assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-6, f"largest weight difference {worst}"


def ledger_by_rank_step(run: str, options) -> dict:
    return {
        (e["rank"], e["micro_step"]): e["ids"] for e in read_committed(f"{RUNS}/{run}", options)
    }


def worker_logs(ray_module) -> str:
    logs = ray_module._private.worker._global_node.get_logs_dir_path()
    return "".join(
        Path(p).read_text(errors="replace")
        for p in glob.glob(os.path.join(logs, "worker-*.[oe][ur][tr]"))  # .out and .err
    )


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def read_pid(fault_dir: Path) -> int | None:
    path = fault_dir / "waiting.pid"
    return int(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def reference(s3, local_ray, prepared, tiny_model_dir):
    """The uninterrupted run everything is compared with."""
    job = validate_tree(job_tree("reference", s3.endpoint_url, prepared, tiny_model_dir), "test")
    options = job.storage_options()
    report = run_training(job)
    return {
        "job": job,
        "report": report,
        "weights": final_weights(report, options),
        "ledger": ledger_by_rank_step("reference", options),
    }


def test_killed_worker_restarts_and_continues_exactly(s3, local_ray, prepared, tiny_model_dir, reference, tmp_path, monkeypatch):  # fmt: skip
    # rank 1 stops after step 6 (mid-epoch 1; checkpoint-4 is the latest) and waits to be killed
    fault_dir = tmp_path / "fault"
    monkeypatch.setenv("SHARDTUNE_FAULT", f"wait@step=6,rank=1,times=1,dir={fault_dir}")
    job = validate_tree(
        job_tree("killed-worker", s3.endpoint_url, prepared, tiny_model_dir), "test"
    )
    killed: dict = {}

    def kill_from_outside():
        try:
            pid = wait_for(lambda: read_pid(fault_dir), 300, "rank 1 to reach step 6")
            killed["cmdline"] = " ".join(psutil.Process(pid).cmdline())
            killed["at"] = time.time()
            os.kill(pid, signal.SIGKILL)
        except Exception as exc:  # reported by the assertions below
            killed["error"] = exc

    killer = threading.Thread(target=kill_from_outside, daemon=True)
    killer.start()
    report = run_training(job)
    killer.join(timeout=5)
    assert "error" not in killed and "RayTrainWorker" in killed["cmdline"]

    final = report["history"][-1]
    restart_s = final["first_step_unix"] - killed["at"]
    print(f"\n[fault test] killed worker -> training again after {restart_s:.1f} s")
    assert restart_s > 0  # the run after the kill is what produced the final report
    assert final["step"] == reference["report"]["history"][-1]["step"] == STEPS
    options = job.storage_options()
    attempts = storage.list_names(f"{RUNS}/killed-worker/ledger", options)
    assert {"attempt-00001.json", "attempt-00002.json"} <= set(attempts)  # it did restart
    assert ledger_by_rank_step("killed-worker", options) == reference["ledger"]
    assert_same_weights(final_weights(report, options), reference["weights"])


def test_truncated_latest_checkpoint_falls_back_to_previous(reference, local_ray, capsys):
    job, options = reference["job"], reference["job"].storage_options()
    run = f"{RUNS}/reference"
    latest = f"checkpoint-{STEPS:08d}"
    victim = storage.join(run, latest, "rank-00001.state.pt")
    storage.write_bytes(victim, storage.read_bytes(victim, options)[:100], options)  # truncate

    report = run_training(job)  # the same job again: Ray restores the run, latest is corrupt

    said = capsys.readouterr().err  # the head's log lines (conftest: as the CLI sets them up)
    assert f"resuming run reference from {latest} (step {STEPS})" in said
    logs = worker_logs(local_ray)
    assert (
        f"not resuming from {latest}: {run}/{latest}: rank-00001.state.pt (rank 1) does not match its sha256"
        in logs
    )
    assert f"resumed from {run}/checkpoint-00000020: epoch 1, step 20" in logs
    assert report["history"][-1]["step"] == STEPS
    assert report["best_checkpoint"] == f"{latest}-1"  # retaken under its own directory
    assert_same_weights(final_weights(report, options), reference["weights"])


def test_more_failures_than_max_failures_is_a_clear_error(s3, local_ray, prepared, tiny_model_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    # Restarts themselves are shown above; 0 allowed keeps this to one worker-group start.
    monkeypatch.setenv("SHARDTUNE_FAULT", f"raise@step=1,rank=1,times=3,dir={tmp_path / 'fault'}")
    tree = job_tree("too-many-failures", s3.endpoint_url, prepared, tiny_model_dir, max_failures=0)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tree))

    rc = cli.main(["train", "--config", str(config)])

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1
    assert len(list((tmp_path / "fault").glob("fired-*"))) == 1  # no restart allowed
    assert len(errors) == 1  # one paragraph (Ray's own log lines aside)
    assert errors[0].startswith(
        "error: training run 'too-many-failures' failed after cluster.max_failures=0 restart(s): "
    )
    assert "rank 1: InjectedFault: injected fault 1/3 at step 1 on rank 1" in errors[0]
    assert errors[0].endswith("No checkpoint was completed.")
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    assert not storage.exists(f"{RUNS}/too-many-failures/report.json", options)  # no silent success


def test_time_based_checkpoints_are_decided_together(s3, local_ray, prepared, tiny_model_dir):
    """train.checkpoint_every_minutes: rank 0's clock decides for all ranks (a rank deciding
    alone would hang the others in the eval collectives); steps are never the trigger here."""
    tree = job_tree("by-minutes", s3.endpoint_url, prepared, tiny_model_dir, max_failures=0)
    tree["train"].update(
        epochs=1, eval_every=1000, checkpoint_every_minutes=0.001, ledger=False
    )  # ~60 ms: due at nearly every step
    report = run_training(validate_tree(tree, "test"))
    steps = [h["step"] for h in report["history"]]
    assert steps[-1] == STEPS // 2  # one epoch
    assert len(steps) >= 2 and all(0 < s < STEPS // 2 for s in steps[:-1]), steps  # timed ones


def test_checkpoints_between_evaluations_resume_exactly(
    s3, local_ray, prepared, tiny_model_dir, tmp_path, monkeypatch
):
    """train.checkpoint_every: checkpoints every 3 steps without evaluating (evaluation only at
    the end), uploaded asynchronously; a worker failing at step 7 resumes from one of them and
    the committed ledger still holds every example exactly once."""
    monkeypatch.setenv("SHARDTUNE_FAULT", f"raise@step=7,rank=1,times=1,dir={tmp_path}")
    tree = job_tree("ckpt-every", s3.endpoint_url, prepared, tiny_model_dir)
    tree["train"].update(epochs=1, eval_every=1000, checkpoint_every=3)
    job = validate_tree(tree, "test")
    report = run_training(job)
    assert os.path.exists(tmp_path / "fired-1")
    assert [h["step"] for h in report["history"]] == [STEPS // 2]  # no evaluation at 3, 6, 9
    header = json.loads(
        storage.read_text(f"{RUNS}/ckpt-every/ledger/attempt-00002.json", job.storage_options())
    )
    assert header["resumed_step"] in (3, 6)  # a checkpoint_every one (6 unless 7 beat its upload)
    seen = Counter(i for e in read_committed(f"{RUNS}/ckpt-every", job.storage_options())
                   for i in e["ids"])  # fmt: skip
    n = read_manifest(prepared["train"], job.storage_options()).num_examples
    # every training example once, plus the epoch's counted padding (equal segments per rank)
    assert len(seen) == n and sum(seen.values()) == 2 * -(-n // 2)


# Two local Ray start-ups in subprocesses (~2 min on 2 shared cores): in the slow tier's time budget.
@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(
    s3, local_ray, prepared, tiny_model_dir, reference, tmp_path
):
    tree = job_tree("killed-driver", s3.endpoint_url, prepared, tiny_model_dir)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tree))
    fault_dir = tmp_path / "fault"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")
    }  # its own local Ray
    cmd = [sys.executable, "launch.py", "train", "--config", str(config)]
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    snapshot = f"{RUNS}/killed-driver/checkpoint_manager_snapshot.json"

    def latest_registered():
        if not storage.exists(snapshot, options):
            return None
        return (
            json.loads(storage.read_text(snapshot, options)).get("latest_checkpoint_result") or {}
        ).get("checkpoint_dir_name")

    first = subprocess.Popen(
        cmd, cwd=ROOT, env={**env, "SHARDTUNE_FAULT": f"wait@step=10,rank=1,times=1,dir={fault_dir}"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # training stands still at step 10 once checkpoint-8 is registered: kill the driver then
        waiting = wait_for(lambda: read_pid(fault_dir), 300, "the first run to reach step 10")
        wait_for(
            lambda: latest_registered() == "checkpoint-00000008",
            60,
            "checkpoint-8 to be registered",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.communicate()
    wait_for(lambda: not psutil.pid_exists(waiting), 60, "the orphaned worker to die with its Ray")

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout + second.stderr  # log lines on stderr, workers' lines as Ray forwards
    assert "resuming run killed-driver from checkpoint-00000008 (step 8)" in out
    assert f"resumed from {RUNS}/killed-driver/checkpoint-00000008: epoch 0, step 8" in out
    report = json.loads(storage.read_text(f"{RUNS}/killed-driver/report.json", options))
    steps = [h["step"] for h in report["history"]]
    # History lists every evaluation of the run across restarts (cluster/job.py
    # read_evaluations), each once; that the second run continued from 8 and not from 0 is
    # what its "resumed from" line above says.
    assert steps[-1] == STEPS and steps == sorted(set(steps))
    assert_same_weights(final_weights(report, options), reference["weights"])
