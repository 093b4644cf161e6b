"""The worker's one door to Ray Train: where this rank sits in the group, which checkpoint Ray
restored, and handing a report (metrics + checkpoint directory) to Ray. Every other worker module
takes plain values, so it runs in a unit test without Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    rank: int
    world: int


def placement() -> Placement:
    import ray.train

    ctx = ray.train.get_context()
    return Placement(ctx.get_world_rank(), ctx.get_world_size())


def restored_checkpoint() -> str | None:
    """The name of the checkpoint Ray Train restores this group from (its latest), if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else os.path.basename(checkpoint.path.rstrip("/"))


def report(metrics: dict, *, checkpoint_dir: str | None, name: str | None, upload: str) -> bool:
    """Hand metrics, and a checkpoint directory named `name` when given, to Ray Train. Under
    upload="async" Ray uploads it in a background thread and deletes the directory after;
    returns True then (the caller must leave the directory alone)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    mode = CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC
    checkpoint = (
        None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(checkpoint_dir)
    )
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_upload_mode=mode,
        checkpoint_dir_name=name if checkpoint else None,
    )
    return checkpoint is not None and mode == CheckpointUploadMode.ASYNC
