"""Resume decisions without Ray: which checkpoint to resume from (and why not the others), the
test-only fault spec, the driver's failure message, and --fresh / previous-run detection."""

from __future__ import annotations

import json
import os

import pytest
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import failure_message, previous_run, start_over
from shardtune.data import storage
from shardtune.data.manifest import sha256_hex
from shardtune.data.run_layout import SNAPSHOT
from shardtune.training import faults
from shardtune.training.checkpoint import (
    CheckpointError,
    checkpoint_step,
    fetch_first_complete,
    new_checkpoint_name,
    resume_candidates,
    verify,
)


def test_checkpoint_step_parses_only_checkpoint_dirs():
    assert checkpoint_step("checkpoint-00000040") == 40
    assert checkpoint_step("model") is None
    assert checkpoint_step("checkpoint-00000040.tmp") is None
    assert checkpoint_step(SNAPSHOT) is None


def test_resume_candidates_latest_first_then_older_newest_first():
    names = ["checkpoint-00000004", "checkpoint-00000012", "model", "checkpoint-00000008", SNAPSHOT]
    assert resume_candidates(names, "checkpoint-00000012") == [
        "checkpoint-00000012",
        "checkpoint-00000008",
        "checkpoint-00000004",
    ]


def test_resume_candidates_skip_unregistered_newer_dirs():
    # checkpoint-16 exists in storage but Ray never registered it (its upload failed)
    names = ["checkpoint-00000008", "checkpoint-00000016", "checkpoint-00000004"]
    assert resume_candidates(names, "checkpoint-00000008") == [
        "checkpoint-00000008",
        "checkpoint-00000004",
    ]


def test_retaken_checkpoints_get_their_own_directory():
    assert new_checkpoint_name(8) == "checkpoint-00000008"
    assert new_checkpoint_name(8, ["checkpoint-00000008"]) == "checkpoint-00000008-1"
    taken = ["checkpoint-00000008", "checkpoint-00000008-1", "checkpoint-00000012"]
    assert new_checkpoint_name(8, taken) == "checkpoint-00000008-2"
    assert checkpoint_step("checkpoint-00000008-2") == 8
    # a retake is newer than the directory it replaced, older than the next step
    names = [
        "checkpoint-00000004",
        "checkpoint-00000008",
        "checkpoint-00000008-1",
        "checkpoint-00000012",
    ]
    assert resume_candidates(names, "checkpoint-00000008-1") == [
        "checkpoint-00000008-1",
        "checkpoint-00000008",
        "checkpoint-00000004",
    ]


def test_resume_candidates_keep_latest_even_if_listing_lags():
    assert resume_candidates([], "checkpoint-00000003") == ["checkpoint-00000003"]
    with pytest.raises(ValueError):
        resume_candidates([], "model")


def fake_checkpoint(root, name: str, step: int, world_size: int = 2) -> str:
    """A checkpoint directory with the same completion protocol as training.checkpoint.save."""
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "ds"))
    for rank in range(world_size):
        files = {f"ds/rank{rank}.pt": os.urandom(64), f"rank-{rank:05d}.state.pt": os.urandom(32)}
        if rank == 0:
            meta = {"world_size": world_size, "step": step}
            files["meta.json"] = json.dumps(meta).encode()
        for rel, data in files.items():
            with open(os.path.join(d, rel), "wb") as f:
                f.write(data)
        listed = {rel: sha256_hex(data) for rel, data in files.items()}
        with open(os.path.join(d, f"rank-{rank:05d}.complete.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world_size, "files": listed}, f)
    return d


def test_verify_names_the_file_at_fault(tmp_path):
    d = fake_checkpoint(tmp_path, "checkpoint-00000004", 4)
    assert verify(d)["step"] == 4
    with open(os.path.join(d, "ds", "rank1.pt"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"ds/rank1.pt \(rank 1\) does not match its sha256"):
        verify(d, where="s3://b/run/checkpoint-00000004")
    os.remove(os.path.join(d, "ds", "rank1.pt"))
    with pytest.raises(CheckpointError, match=r"ds/rank1.pt \(rank 1\) is missing"):
        verify(d)
    os.remove(os.path.join(d, "rank-00001.complete.json"))
    with pytest.raises(CheckpointError, match="rank 1 never finished writing"):
        verify(d)


def test_verify_truncated_json_is_a_checkpoint_error(tmp_path):
    d = fake_checkpoint(tmp_path, "checkpoint-00000004", 4)
    with open(os.path.join(d, "rank-00000.complete.json"), "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="rank-00000.complete.json is unreadable"):
        verify(d)


def test_fetch_first_complete_falls_back_and_says_why(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, "checkpoint-00000004", 4)
    fake_checkpoint(run, "checkpoint-00000008", 8)
    newest = fake_checkpoint(run, "checkpoint-00000012", 12)
    os.remove(os.path.join(newest, "rank-00001.state.pt"))
    with open(os.path.join(run, "checkpoint-00000008", "meta.json"), "ab") as f:
        f.write(b" ")  # one byte more: checksum mismatch
    said: list[str] = []
    names = resume_candidates(storage.list_names(str(run)), "checkpoint-00000012")
    found = fetch_first_complete(str(run), names, str(tmp_path / "local"), warn=said.append)
    assert found is not None and found[0] == "checkpoint-00000004"
    assert verify(found[1])["step"] == 4
    assert len(said) == 2
    assert "checkpoint-00000012" in said[0] and "rank-00001.state.pt (rank 1) is missing" in said[0]
    assert "trying checkpoint-00000008" in said[0]
    assert "meta.json (rank 0) does not match its sha256" in said[1]


def test_fetch_first_complete_none_when_all_bad(tmp_path):
    run = tmp_path / "run"
    d = fake_checkpoint(run, "checkpoint-00000004", 4)
    os.remove(os.path.join(d, "meta.json"))
    said: list[str] = []
    assert (
        fetch_first_complete(
            str(run), ["checkpoint-00000004"], str(tmp_path / "l"), warn=said.append
        )
        is None
    )
    assert "no older checkpoint left" in said[0]


def test_fault_spec_parse_and_times_counted_across_restarts(tmp_path):
    assert faults.parse_fault(None) is None and faults.parse_fault("") is None
    spec = f"raise@step=3,rank=1,times=2,dir={tmp_path}"
    fault = faults.parse_fault(spec)
    assert fault == faults.Fault("raise", 3, 1, str(tmp_path), 2)
    faults.maybe_fail(fault, step=3, rank=0)  # other rank
    faults.maybe_fail(fault, step=2, rank=1)  # other step
    for n in (1, 2):
        with pytest.raises(faults.InjectedFault, match=f"{n}/2 at step 3 on rank 1"):
            faults.maybe_fail(faults.parse_fault(spec), step=3, rank=1)  # a "restarted" worker
    faults.maybe_fail(faults.parse_fault(spec), step=3, rank=1)  # fired twice: no more
    with pytest.raises(ValueError):
        faults.parse_fault("explode@step=1")


def job(tmp_path, max_failures=1):
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": "/m"},
            "data": {"train": "/d"},
            "cluster": {"max_failures": max_failures},
            "run": {"name": "r1", "output": str(tmp_path / "runs")},
        },
        "test",
    )


def test_failure_message_is_one_clear_paragraph(tmp_path):
    from ray.train import WorkerGroupError

    exc = WorkerGroupError(
        "boom", {1: faults.InjectedFault("injected fault 2/2 at step 3 on rank 1")}
    )
    msg = failure_message(job(tmp_path), exc, ("checkpoint-00000004", 4))
    assert "\n" not in msg
    assert "training run 'r1' failed after cluster.max_failures=1 restart(s)" in msg
    assert "rank 1: InjectedFault: injected fault 2/2 at step 3 on rank 1" in msg
    assert "checkpoint-00000004 (step 4)" in msg and "--fresh" in msg
    assert "No checkpoint was completed" in failure_message(job(tmp_path, -1), exc, None)


def test_previous_run_and_fresh(tmp_path):
    j = job(tmp_path)
    assert previous_run(j) is None
    run = tmp_path / "runs" / "r1"
    fake_checkpoint(run, "checkpoint-00000008", 8)
    snapshot = {
        "latest_checkpoint_result": {
            "checkpoint_dir_name": "checkpoint-00000008",
            "metrics": {"step": 8},
        }
    }
    (run / SNAPSHOT).write_text(json.dumps(snapshot))
    assert previous_run(j) == ("checkpoint-00000008", 8)
    said: list[str] = []
    removed = start_over(j, said.append)
    assert said == [f"--fresh: deleting {run}/ (checkpoint-00000008, {SNAPSHOT})"]
    assert str(run / SNAPSHOT) in removed and len(removed) == 8
    assert not run.exists() and previous_run(j) is None
    assert start_over(j, said.append) == [] and len(said) == 1


def test_export_prefers_the_retake_over_the_corrupt_checkpoint_it_replaced():
    from shardtune.cluster.job import rank_checkpoints, select_best

    cands = [("checkpoint-00000022", {"step": 22}), ("checkpoint-00000022-1", {"step": 22}),
             ("checkpoint-00000020", {"step": 20})]  # fmt: skip
    assert select_best(cands, has_eval=False)[0] == "checkpoint-00000022-1"
    assert [n for n, _ in rank_checkpoints(cands, has_eval=False)] == [
        "checkpoint-00000022-1", "checkpoint-00000022", "checkpoint-00000020",
    ]  # fmt: skip


def ds_like_checkpoint(root, name: str, world_size: int) -> str:
    """DeepSpeed's file names (ZeRO-2): rank 0's shared model states, one partition per rank."""
    d = os.path.join(root, name)
    for rank in range(world_size):
        files = {
            f"ds/ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": os.urandom(64),
            f"ds/ds/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": os.urandom(16),
            f"rank-{rank:05d}.state.pt": os.urandom(32),
        }
        if rank == 0:
            files["ds/ds/mp_rank_00_model_states.pt"] = os.urandom(128)
            files["meta.json"] = json.dumps({"world_size": world_size, "step": 4}).encode()
            files["hf_config/config.json"] = b"{}"
        for rel, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
            with open(os.path.join(d, rel), "wb") as f:
                f.write(data)
        listed = {rel: sha256_hex(data) for rel, data in files.items()}
        with open(os.path.join(d, f"rank-{rank:05d}.complete.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world_size, "files": listed}, f)
    return d


def test_a_rank_fetches_only_its_own_part(tmp_path):
    from shardtune.training.checkpoint import fetch_rank_part

    src = ds_like_checkpoint(tmp_path / "run", "checkpoint-00000004", world_size=16)
    local = tmp_path / "rank5"
    fetch_rank_part(src, str(local), rank=5, world_size=16)
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert got == [
        "ds/ds/bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt",
        "ds/ds/mp_rank_00_model_states.pt",
        "ds/ds/zero_pp_rank_5_mp_rank_00_optim_states.pt",
        "meta.json",
        "rank-00005.state.pt",
    ]
    os.remove(os.path.join(src, "ds/ds/zero_pp_rank_7_mp_rank_00_optim_states.pt"))
    fetch_rank_part(src, str(tmp_path / "again"), rank=5, world_size=16)  # not rank 5's problem
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_7_.* \(rank 7\) is missing"):
        fetch_rank_part(src, str(tmp_path / "r7"), rank=7, world_size=16)
    # another world size: the new ranks split every old rank's state, so all of it is fetched
    fetch_rank_part(
        ds_like_checkpoint(tmp_path / "run", "checkpoint-00000008", 4), str(tmp_path / "w"),
        rank=1, world_size=2,
    )  # fmt: skip
    assert (tmp_path / "w" / "rank-00003.state.pt").exists()


def test_agree_on_checkpoint_single_process_falls_back(tmp_path):
    from shardtune.training.checkpoint import agree_on_checkpoint

    run = tmp_path / "run"
    ds_like_checkpoint(run, "checkpoint-00000004", world_size=1)
    bad = ds_like_checkpoint(run, "checkpoint-00000008", world_size=1)
    os.remove(os.path.join(bad, "rank-00000.state.pt"))
    said: list[str] = []
    name, local, listing = agree_on_checkpoint(
        str(run), "checkpoint-00000008", str(tmp_path / "l"), rank=0, warn=said.append
    )
    assert name == "checkpoint-00000004" and "rank-00000.state.pt (rank 0) is missing" in said[0]
    assert listing == ["checkpoint-00000004", "checkpoint-00000008"]
