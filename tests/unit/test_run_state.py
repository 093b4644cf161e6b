"""A rerun's starting point (cluster/run_state.py) on a local run folder: Ray's snapshot missing,
truncated or naming a deleted checkpoint is rebuilt from the newest checkpoint that verifies, and
with none verifying the run stops with one line; the data pin (training/checkpoint.check_pin)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shardtune.cluster.run_state import (
    RunStateError,
    rebuilt_snapshot,
    recover,
    snapshot_problem,
)
from shardtune.data.manifest import Manifest, plan_identity, read_manifest_version, write_manifest
from shardtune.data.run_layout import SNAPSHOT, RunLayout
from shardtune.training.checkpoint import CheckpointError, TrainState, check_pin, file_sha256


def fake_checkpoint(root: Path, step: int, f1: float | None, version: int = 1) -> str:
    """A one-rank checkpoint that `verify` accepts: meta.json and a state file, both listed with
    their sha256 in the rank's completion record."""
    name = f"checkpoint-{step:08d}"
    d = root / name
    d.mkdir(parents=True)
    metrics = {"step": step, **({"eval_f1": f1} if f1 is not None else {})}
    meta = {"world_size": 1, "step": step, "manifest_version": version, "eval_version": None,
            "metrics": metrics}  # fmt: skip
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "rank-00000.state.pt").write_bytes(b"state %d" % step)
    files = {n: file_sha256(str(d / n)) for n in ("meta.json", "rank-00000.state.pt")}
    (d / "rank-00000.complete.json").write_text(json.dumps({"rank": 0, "files": files}))
    return name


def ray_snapshot(latest: str, names: list[str]) -> str:
    results = [{"checkpoint_dir_name": n, "metrics": {"step": int(n[-8:])}} for n in names]
    return json.dumps({"checkpoint_results": results,
                       "latest_checkpoint_result": results[names.index(latest)]})  # fmt: skip


@pytest.fixture
def run(tmp_path) -> RunLayout:
    root = tmp_path / "runs" / "r"
    for step, f1 in ((2, 0.5), (4, None), (6, 0.7)):
        fake_checkpoint(root, step, f1)
    return RunLayout(str(root))


def parse_as_ray(text: str):
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )

    return _CheckpointManagerState.parse_obj(json.loads(text))


def test_snapshot_problems():
    listing = {"checkpoint-00000002", "checkpoint-00000004"}
    good = ray_snapshot("checkpoint-00000004", sorted(listing))
    assert snapshot_problem(good, listing) is None
    assert snapshot_problem(None, listing) == "is missing"
    assert snapshot_problem(good[:40], listing).startswith("is unreadable")
    gone = snapshot_problem(good, {"checkpoint-00000002"})
    assert gone is not None and "checkpoint-00000004" in gone


def test_missing_snapshot_is_rebuilt_from_the_newest_checkpoint(run):
    said: list[str] = []
    resume = recover(run, None, run_name="r", has_eval=True, say=said.append)
    assert (resume.name, resume.step, resume.train_version) == ("checkpoint-00000006", 6, 1)
    assert len(said) == 1 and "is missing" in said[0] and "checkpoint-00000006 (step 6)" in said[0]
    state = parse_as_ray(Path(run.snapshot).read_text())
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == [
        "checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006",
    ]  # fmt: skip
    assert state.latest_checkpoint_result.checkpoint_dir_name == "checkpoint-00000006"
    # checkpoint-only: -1 as loop.checkpoint_only reports it (a NaN would come back as null)
    assert state.checkpoint_results[1].metrics["eval_f1"] == -1.0
    again = recover(run, None, run_name="r", has_eval=True, say=said.append)
    assert again == resume and len(said) == 1  # the rebuilt snapshot is taken as is


def test_truncated_snapshot_is_rebuilt_and_kept_aside(run):
    text = ray_snapshot("checkpoint-00000006", ["checkpoint-00000002", "checkpoint-00000006"])
    Path(run.snapshot).write_text(text[:30])
    resume = recover(run, None, run_name="r", has_eval=True, say=lambda _: None)
    assert resume.name == "checkpoint-00000006"
    assert Path(run.snapshot + ".damaged").read_text() == text[:30]


def test_deleted_and_corrupt_checkpoints_fall_back_to_the_previous_one(run):
    names = ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006"]
    Path(run.snapshot).write_text(ray_snapshot("checkpoint-00000006", names))
    import shutil

    shutil.rmtree(Path(run.root) / "checkpoint-00000006")  # deleted by hand
    (Path(run.root) / "checkpoint-00000004" / "rank-00000.state.pt").write_bytes(b"torn")
    said: list[str] = []
    resume = recover(run, None, run_name="r", has_eval=False, say=said.append)
    assert (resume.name, resume.step) == ("checkpoint-00000002", 2)
    assert "names checkpoint-00000006" in said[0] and "does not match its sha256" in said[0]
    state = parse_as_ray(Path(run.snapshot).read_text())
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["checkpoint-00000002"]


def test_no_verifying_checkpoint_is_one_line_naming_fresh(run):
    for name in ("checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006"):
        (Path(run.root) / name / "meta.json").write_text("{")
    with pytest.raises(RunStateError) as exc:
        recover(run, None, run_name="r", has_eval=True)
    message = str(exc.value)
    assert "\n" not in message and "--fresh" in message and "is missing" in message


def test_a_new_run_or_a_damaged_snapshot_without_checkpoints_starts_fresh(tmp_path):
    empty = RunLayout(str(tmp_path / "nothing"))
    assert recover(empty, None, run_name="r", has_eval=True) is None
    (tmp_path / "nothing").mkdir()
    Path(empty.snapshot).write_text("{trunc")
    assert recover(empty, None, run_name="r", has_eval=True) is None
    assert not Path(empty.snapshot).exists()


def test_rebuilt_snapshot_without_checkpoints_has_no_latest():
    assert parse_as_ray(rebuilt_snapshot([], has_eval=True)).latest_checkpoint_result is None


def test_pinned_manifest_versions_are_read_and_checked(tmp_path):
    ds = str(tmp_path / "ds")
    old = Manifest(task="ner", labels=["O"], num_examples=5, num_tokens=9, shards=[], version=1)
    write_manifest(ds, old)
    write_manifest(ds, Manifest(task="ner", labels=["O"], num_examples=8, num_tokens=9,
                                shards=[], version=2))  # fmt: skip
    assert read_manifest_version(ds, None).version == 2
    assert read_manifest_version(ds, 1).num_examples == 5
    assert read_manifest_version(ds, 1, compact=False).num_examples == 5
    ckpt = TrainState(step=3, manifest_version=1, plan_identity=plan_identity(old, 1))
    check_pin(ckpt, TrainState(manifest_version=1, plan_identity=plan_identity(old, 1)), "c")
    check_pin(TrainState(step=3), TrainState(manifest_version=2, plan_identity="x"), "c")  # old
    with pytest.raises(CheckpointError, match="manifest versions 1/None"):
        check_pin(ckpt, TrainState(manifest_version=2, plan_identity="n8"), "c")
    with pytest.raises(CheckpointError, match="plan"):
        check_pin(ckpt, TrainState(manifest_version=1, plan_identity=plan_identity(old, 2)), "c")


def test_snapshot_name_is_rays():
    assert SNAPSHOT == "checkpoint_manager_snapshot.json"
