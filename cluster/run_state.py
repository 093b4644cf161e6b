"""Where a rerun of a run starts, decided on the head before Ray does: Ray Train's controller
snapshot (`checkpoint_manager_snapshot.json`) checked against the checkpoints in storage, and the
data versions the run is pinned to.

Ray Train 2.60 restores a run only from that snapshot (v2 has no `resume_from_checkpoint`): a
missing one starts at step 0 over the existing run, a truncated one raises a JSONDecodeError in
the controller, and one naming a checkpoint deleted by hand makes it refuse the run. Each of those
is repaired here by rebuilding the snapshot in Ray's own format from the checkpoints in storage,
the newest that verifies as the latest; with none verifying the run stops before Ray starts."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass

from shardtune.data import storage
from shardtune.data.run_layout import SNAPSHOT, RunLayout

log = logging.getLogger(__name__)


class RunStateError(Exception):
    """The run folder cannot be resumed; one line: what is wrong and how to start over."""


@dataclass(frozen=True)
class Resume:
    """The checkpoint a rerun resumes from and the data versions its run trained on (None:
    a checkpoint from before runs were pinned)."""

    name: str
    step: int
    train_version: int | None = None
    eval_version: int | None = None


def checkpoint_key(name: str) -> tuple[int, int] | None:
    from shardtune.training.checkpoint import checkpoint_key as key  # torch: only when needed

    return key(name)


def snapshot_problem(text: str | None, listing: set[str]) -> str | None:
    """What is wrong with Ray's snapshot (pure): None when Ray can restore from it."""
    if text is None:
        return "is missing"
    try:
        state = json.loads(text)
    except ValueError as exc:
        return f"is unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("checkpoint_results"), list):
        return "is not a Ray Train checkpoint snapshot"
    named = [r.get("checkpoint_dir_name") for r in state["checkpoint_results"]]
    gone = [n for n in named if n not in listing]
    if gone:
        return f"names {', '.join(map(str, gone))}, which no longer exist(s)"
    return None


def snapshot_latest(text: str) -> tuple[str, int] | None:
    """(latest checkpoint name, its step) of a snapshot `snapshot_problem` accepted (pure)."""
    latest = json.loads(text).get("latest_checkpoint_result")
    if not latest:
        return None
    return latest["checkpoint_dir_name"], int(latest.get("metrics", {}).get("step", 0))


def rebuilt_snapshot(entries: list[tuple[str, dict]], has_eval: bool) -> str:
    """Ray's snapshot of checkpoints `entries` ((name, meta.json), oldest first; the last is
    the latest), as Ray's checkpoint manager writes it. Ray's metrics are those the worker
    reported; meta.json holds the same record, without the per-label counts. A checkpoint
    without eval scores gets eval_f1 -1, as `loop.checkpoint_only` reports it: Ray's retention
    ranks by that attribute, and a NaN would come back from the snapshot as null, which Ray's
    controller cannot compare."""
    import ray
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )  # the format the controller parses; building it with Ray's classes keeps it exact

    results = []
    for name, meta in entries:
        metrics = dict(meta.get("metrics") or {})
        metrics.setdefault("step", meta.get("step", 0))
        f1 = metrics.get("eval_f1")
        if has_eval and not (isinstance(f1, float | int) and math.isfinite(f1)):
            metrics["eval_f1"] = -1.0
        results.append(_TrainingResultState(checkpoint_dir_name=name, metrics=metrics))
    state = _CheckpointManagerState(
        ray_version=ray.__version__,
        checkpoint_results=results,
        checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1] if results else None,
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=len(results),
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    return state.json()


def _read_meta(layout: RunLayout, name: str, options: storage.StorageOptions) -> dict | None:
    try:
        meta = json.loads(
            storage.read_text(storage.join(layout.checkpoint(name), "meta.json"), options)
        )
    except (FileNotFoundError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _newest_verified(
    layout: RunLayout, names: list[str], options: storage.StorageOptions
) -> tuple[str | None, list[str]]:
    """The newest of `names` that verifies (downloaded whole, every file against its rank's
    sha256), and why each newer one was passed over."""
    from shardtune.training.checkpoint import CheckpointError, verify

    passed: list[str] = []
    for name in sorted(names, key=checkpoint_key, reverse=True):  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory(prefix="shardtune-verify-") as tmp:
            local = os.path.join(tmp, name)
            try:
                storage.download_dir(layout.checkpoint(name), local, options)
                verify(local, where=layout.checkpoint(name))
            except (CheckpointError, FileNotFoundError) as exc:
                passed.append(str(exc))
                continue
        return name, passed
    return None, passed


def recover(
    layout: RunLayout, options: storage.StorageOptions, *, run_name: str, has_eval: bool,
    say=log.warning,
) -> Resume | None:  # fmt: skip
    """The checkpoint a rerun resumes from, None for a new run (nothing to resume). A snapshot
    Ray cannot restore from while checkpoints exist is rebuilt (the damaged one kept beside it
    as `.damaged`), with one line saying so; RunStateError when no checkpoint verifies."""
    listing = set(storage.list_names(layout.root, options))
    checkpoints = [n for n in listing if checkpoint_key(n) is not None]
    text = None
    if SNAPSHOT in listing:
        text = storage.read_text(layout.snapshot, options)
    problem = snapshot_problem(text, listing)
    if problem is None:
        latest = snapshot_latest(text)  # type: ignore[arg-type]
        return _with_pin(layout, options, *latest, checkpoints) if latest else None
    if not checkpoints:
        if text is not None:  # nothing to resume: Ray must not choke on it either
            storage.write_text(layout.snapshot + ".damaged", text, options)
            storage.remove(layout.snapshot, options)
        return None
    name, passed = _newest_verified(layout, checkpoints, options)
    if name is None:
        raise RunStateError(
            f"run {run_name!r} in {layout.root}/ cannot resume: Ray's snapshot {problem} and no "
            f"checkpoint verifies ({'; '.join(passed)}); start over with --fresh or a new run.name"
        )
    key = checkpoint_key(name)
    metas = {n: _read_meta(layout, n, options) for n in checkpoints if checkpoint_key(n) <= key}  # type: ignore[operator]
    entries = [(n, m) for n, m in sorted(metas.items(), key=lambda e: checkpoint_key(e[0])) if m]  # type: ignore[arg-type, return-value]
    if text is not None:
        storage.write_text(layout.snapshot + ".damaged", text, options)
    storage.write_text(layout.snapshot, rebuilt_snapshot(entries, has_eval), options)
    step = int(metas[name]["step"])  # type: ignore[index]
    skipped = f" (passed over: {'; '.join(passed)})" if passed else ""
    say(
        f"run {run_name}: Ray's snapshot {problem}; rebuilt it from the {len(entries)} "
        f"checkpoint(s) in storage: resuming from {name} (step {step}), the newest that "
        f"verifies{skipped}"
    )
    return _with_pin(layout, options, name, step, checkpoints)


def _with_pin(
    layout: RunLayout, options: storage.StorageOptions, name: str, step: int, checkpoints: list[str]
) -> Resume:
    """The data versions the run trained on, from the meta.json of `name` or, when that one is
    unreadable (the worker then falls back past it), of the newest older checkpoint."""
    key = checkpoint_key(name)
    older = sorted((n for n in checkpoints if (checkpoint_key(n) or (-1, 0)) < key),  # type: ignore[operator]
                   key=checkpoint_key, reverse=True)  # type: ignore[arg-type]  # fmt: skip
    for candidate in (name, *older):
        meta = _read_meta(layout, candidate, options)
        if meta is not None:
            return Resume(name, step, meta.get("manifest_version"), meta.get("eval_version"))
    return Resume(name, step)
