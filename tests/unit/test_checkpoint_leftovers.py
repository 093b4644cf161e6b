"""Leftovers of failed attempts (issue 18.6), on real files without Ray: staging folders of dead
processes, checkpoint directories Ray never registered, names of partial uploads, and
evaluation records written after the step a run resumes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from shardtune.data.run_layout import RunLayout
from shardtune.training import checkpoint as ckpt
from shardtune.training import checkpointer as cp
from shardtune.training.checkpoint import TrainState
from shardtune.training.meter import Progress
from shardtune.training.records import EvalRecord
from shardtune.training.session import Placement


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staging_folders_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f"shardtune-ckpt-{dead_pid()}-abc"
    mine = tmp_path / f"shardtune-ckpt-{os.getpid()}-def"
    other = tmp_path / "shardtune-resume-xyz"
    for d in (dead, mine, other):
        (d / "ds").mkdir(parents=True)
    assert cp.remove_stale_staging(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and mine.exists() and other.exists()


def test_unregistered_leftovers_are_older_than_latest_and_not_in_flight():
    names = ["checkpoint-00000004", "checkpoint-00000008", "checkpoint-00000010",
             "checkpoint-00000012", "checkpoint-00000016", "model", "evals"]  # fmt: skip
    registered = {"checkpoint-00000008", "checkpoint-00000012"}
    got = cp.unregistered_leftovers(
        names, registered, "checkpoint-00000012", keep={"checkpoint-00000010"}
    )
    assert got == ["checkpoint-00000004"]  # 16: newer than the latest, maybe uploading


def snapshot(names: list[str], latest: str) -> str:
    result = lambda n: {"checkpoint_dir_name": n, "metrics": {}}  # noqa: E731
    return json.dumps(
        {
            "checkpoint_results": [result(n) for n in names],
            "latest_checkpoint_result": result(latest),
        }
    )


def checkpointer(run: str, handed: list[str]) -> cp.Checkpointer:
    def report(metrics, *, checkpoint_dir, name, upload):
        handed.append(name)
        return False  # as if synchronous: the caller removes its staging folder

    return cp.Checkpointer(run, None, Placement(0, 1), upload="sync", report=report)


def test_a_fresh_start_avoids_names_of_partial_uploads_and_removes_them_later(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    (run / "checkpoint-00000004").mkdir(parents=True)  # an attempt died while uploading it
    (run / "checkpoint-00000004" / "stale.bin").write_bytes(b"x")
    monkeypatch.setattr(ckpt, "save", lambda *a, **k: None)
    handed: list[str] = []
    ck = checkpointer(str(run), handed)
    assert ck.resume(None, None, num_examples=10) is None  # Ray restored nothing
    save = dict(tokenizer=None, meta={}, to_ray={}, at_boundary=True)
    ck.save(None, TrainState(step=4), **save)
    assert handed == ["checkpoint-00000004-1"]  # never into the partial one's directory

    (run / "checkpoint-00000004-1").mkdir()
    (run / "checkpoint_manager_snapshot.json").write_text(
        snapshot(["checkpoint-00000004-1"], "checkpoint-00000004-1")
    )
    ck.save(None, TrainState(step=8), **save)  # after a commit: the partial one goes
    assert sorted(os.listdir(run)) == ["checkpoint-00000004-1", "checkpoint_manager_snapshot.json"]
    assert handed[-1] == "checkpoint-00000008"
    stale = [n for n in os.listdir(os.path.dirname(ck.run_uri) or ".")
             if n.startswith(f"shardtune-ckpt-{os.getpid()}-")]  # fmt: skip
    assert stale == []


def test_a_failure_before_handing_over_removes_the_staging_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save", broken)
    ck = checkpointer(str(tmp_path / "run"), [])
    with pytest.raises(OSError, match="disk full"):
        ck.save(None, TrainState(step=4), tokenizer=None, meta={}, to_ray={}, at_boundary=True)
    assert [n for n in os.listdir(tmp_path) if n.startswith("shardtune-ckpt-")] == []


def test_resume_rolls_back_evaluation_records_of_a_lost_attempt(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    progress = Progress(rank=0, world=1, layout=layout, options=None, epochs=1, log_every=1,
                        grad_accum=1)  # fmt: skip
    for step in (4, 8, 12, 16):
        progress.record(EvalRecord(step=step, epoch=0))
    assert progress.roll_back(8) == ["eval-00000012.json", "eval-00000016.json"]
    assert sorted(os.listdir(layout.evals)) == ["eval-00000004.json", "eval-00000008.json"]
