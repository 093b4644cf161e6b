"""Checkpoint save/load on a worker: DeepSpeed engine state, per-rank stream position and RNG.
No consolidated model: training/export.py builds it from the ZeRO partitions at export.

Layout of one checkpoint directory (the union of what every rank writes; Ray Train merges
the ranks' local directories in storage):
  ds/...                    DeepSpeed's files (model, ZeRO optimizer partitions, scheduler)
  rank-00003.state.pt       rank 3's stream position and RNG states
  hf_config/                rank 0: config with label maps and the tokenizer (KBs, no weights)
  meta.json                 rank 0: step, epoch, world size, metrics, resolved config
  rank-00003.complete.json  written LAST by each rank: sha256 of every file that rank wrote
A checkpoint is complete only when all `world_size` completion files exist and match.

Resume (`agree_on_checkpoint`): Ray Train hands every rank the latest checkpoint it registered;
if that one turns out incomplete or corrupt, the previous complete one in storage is used
instead, with a line saying which file was wrong. `resume_candidates` decides the order (pure).
With the same world size each rank fetches and verifies only its own files plus rank 0's shared
ones (`rank_files`): a constant number of objects per rank however many ranks there are; the
ranks then agree by one all-gather whether every rank found its part complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from shardtune.data import storage

DS_TAG = "ds"
HF_CONFIG = "hf_config"

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint is incomplete or corrupt; the message names the file."""


@dataclass
class TrainState:
    """What a rank needs, beyond the engine, to continue exactly where it stopped."""

    epoch: int = 0
    # Offset into this epoch's position list (`ranges`) of the length group being read: every
    # position before it is consumed (data/batching.py).
    position: int = 0
    step: int = 0  # optimizer steps done (same on every rank)
    micro_step: int = 0  # micro-batches done
    # Stream ranges this rank reads this epoch (data.shard_plan.Ranges); None = the normal plan.
    # Explicit after a restart with another world size, until the epoch ends.
    ranges: tuple | None = None
    group_step: int = 0  # micro-batches of the current group done
    # Offsets (into `ranges`) of the current group's rows already consumed: what a resplit for
    # another world size must not hand out again.
    group_done: tuple = ()
    # Dev micro-F1 of every evaluation so far: early stopping decides from it after a restart too.
    eval_f1_history: tuple = ()
    # The data this run trains on (None: a checkpoint from before runs were pinned): a resume
    # reads these manifest versions, whatever `prepare --append` added since (cluster/run_state).
    manifest_version: int | None = None
    eval_version: int | None = None
    plan_identity: str | None = None  # data.manifest.plan_identity of the training set


HASH_CHUNK = 8 << 20  # hash files in 8 MB reads: a ZeRO partition can be many GB


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_digests(root: str, names: list[str]) -> dict[str, str]:
    return {rel: file_sha256(os.path.join(root, rel)) for rel in names}


def _walk(root: str) -> set[str]:
    found = set()
    for base, _dirs, files in os.walk(root):
        for name in files:
            found.add(os.path.relpath(os.path.join(base, name), root).replace(os.sep, "/"))
    return found


def save(
    engine: Any,
    local_dir: str,
    *,
    rank: int,
    world_size: int,
    state: TrainState,
    tokenizer: Any = None,
    meta: dict | None = None,
) -> None:
    """Write this rank's part of a checkpoint into `local_dir` (all ranks must call)."""
    before = _walk(local_dir)
    engine.save_checkpoint(os.path.join(local_dir, DS_TAG), tag=DS_TAG, save_latest=False)
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    torch.save(
        {"train_state": asdict(state), "rng": rng},
        os.path.join(local_dir, f"rank-{rank:05d}.state.pt"),
    )
    if rank == 0:  # what export needs beside the weights; the weights stay partitioned
        hf_dir = os.path.join(local_dir, HF_CONFIG)
        # The head class export rebuilds (save_pretrained on the model would record it too).
        engine.module.config.architectures = [type(engine.module).__name__]
        engine.module.config.save_pretrained(hf_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(hf_dir)
        from shardtune.training.parameter_efficient import save_adapter_config

        save_adapter_config(engine.module, hf_dir)  # LoRA: export merges it (training/export.py)
        with open(os.path.join(local_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"world_size": world_size, **asdict(state), **(meta or {})},
                f,
                indent=2,
                sort_keys=True,
            )
    written = sorted(_walk(local_dir) - before)
    complete = {"rank": rank, "world_size": world_size, "files": _file_digests(local_dir, written)}
    with open(
        os.path.join(local_dir, f"rank-{rank:05d}.complete.json"), "w", encoding="utf-8"
    ) as f:
        json.dump(complete, f, indent=1, sort_keys=True)


def _read_json(path: str, where: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:  # a truncated file is not valid JSON
        raise CheckpointError(f"{where}: {os.path.basename(path)} is unreadable ({exc})") from None


def verify(ckpt_dir: str, where: str | None = None) -> dict:
    """Check a downloaded checkpoint: every rank's completion file present and every listed
    file matching its sha256. Returns meta.json; raises CheckpointError naming the problem.
    `where` names the checkpoint in messages (its storage URI) instead of the local copy."""
    where = where or ckpt_dir
    meta_path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{where}: meta.json missing (incomplete checkpoint)")
    meta = _read_json(meta_path, where)
    for r in range(meta["world_size"]):
        path = os.path.join(ckpt_dir, f"rank-{r:05d}.complete.json")
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{where}: rank {r} never finished writing (no {os.path.basename(path)})"
            )
        check_files(ckpt_dir, _read_json(path, where)["files"], where=where, rank=r)
    return meta


def check_files(root: str, listed: dict[str, str], *, where: str, rank: int) -> None:
    """Every file a rank's completion record lists (path relative to `root` -> sha256) exists
    under `root` with that digest; CheckpointError names the first that does not."""
    for rel, digest in listed.items():
        full = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(full):
            raise CheckpointError(f"{where}: {rel} (rank {rank}) is missing")
        if file_sha256(full) != digest:
            raise CheckpointError(f"{where}: {rel} (rank {rank}) does not match its sha256")


_NAME = re.compile(r"checkpoint-(\d+)(?:-(\d+))?")


def checkpoint_key(name: str) -> tuple[int, int] | None:
    """Order of checkpoint directories: 'checkpoint-00000040' -> (40, 0), its retake after a
    fallback 'checkpoint-00000040-1' -> (40, 1); anything else (model/, ...) -> None."""
    m = _NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def checkpoint_step(name: str) -> int | None:
    """'checkpoint-00000040' -> 40; anything else (model/, report.json, ...) -> None."""
    key = checkpoint_key(name)
    return key[0] if key else None


def new_checkpoint_name(step: int, taken: Iterable[str] = ()) -> str:
    """'checkpoint-{step:08d}', or with a -N suffix when a directory of that name already
    exists: after falling back past a corrupt checkpoint the run reaches its step again, and
    Ray Train must not get two checkpoints sharing one directory (deleting the older by
    retention would delete the newer)."""
    taken = set(taken)
    name, n = f"checkpoint-{step:08d}", 0
    while name in taken:
        n += 1
        name = f"checkpoint-{step:08d}-{n}"
    return name


def resume_candidates(names: Iterable[str], latest: str) -> list[str]:
    """Checkpoints to try on resume, in order: Ray's latest registered one, then every older
    `checkpoint-N` found in storage, newest first. Directories newer than `latest` are left
    out: Ray never registered them (an upload that failed, a driver that died mid-upload), so
    they were never "the latest" and may hold a half-written state."""
    latest_key = checkpoint_key(latest)
    if latest_key is None:
        raise ValueError(f"{latest!r} is not a checkpoint-N directory name")
    keys = {n: checkpoint_key(n) for n in names}
    older = [n for n, k in keys.items() if k is not None and k < latest_key]
    return [latest, *sorted(older, key=lambda n: keys[n], reverse=True)]


def fetch_first_complete(
    run_uri: str,
    candidates: list[str],
    local_root: str,
    options: storage.StorageOptions | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[str, str] | None:
    """Download candidates in order; return (name, local dir) of the first that verifies, or
    None. Each rejected one is reported through `warn` with the file at fault."""
    warn = warn or log.warning
    for i, name in enumerate(candidates):
        uri = storage.join(run_uri, name)
        local = os.path.join(local_root, name)
        try:
            storage.download_dir(uri, local, options)
            verify(local, where=uri)
        except (CheckpointError, FileNotFoundError) as exc:
            shutil.rmtree(local, ignore_errors=True)
            then = (
                f"trying {candidates[i + 1]}"
                if i + 1 < len(candidates)
                else "no older checkpoint left"
            )
            warn(f"not resuming from {name}: {exc}; {then}")
            continue
        return name, local
    return None


_PER_RANK = re.compile(r"(^|/)(rank-\d{5}\.|[a-z0-9]*_?zero_pp_rank_\d+_)")


def rank_files(record0: dict, record: dict) -> dict[str, str]:
    """What one rank needs to resume with the same world size (pure): every file its own
    completion record lists, plus rank 0's files that are not per-rank (meta.json, DeepSpeed's
    mp_rank_00 model states), minus hf_config/ (export only). Path -> sha256."""
    shared = {rel: d for rel, d in record0["files"].items() if not _PER_RANK.search(rel)}
    return {rel: d for rel, d in {**shared, **record["files"]}.items()
            if not rel.startswith(f"{HF_CONFIG}/")}  # fmt: skip


def fetch_rank_part(
    uri: str, local: str, *, rank: int, world_size: int,
    options: storage.StorageOptions | None = None,
) -> None:  # fmt: skip
    """Download and verify this rank's part of the checkpoint at `uri` into `local`: its own
    and rank 0's completion records, then the files `rank_files` names, each checked against
    its sha256. GETs: 2 records + meta.json + the rank's files (state, ZeRO partition, shared
    model states) whatever the world size. A checkpoint written by another world size is
    fetched whole (the new ranks split the old ranks' states, and all of them are needed).
    Raises CheckpointError naming the file at fault."""

    def record(r: int) -> dict:
        name = f"rank-{r:05d}.complete.json"
        try:
            text = storage.read_text(storage.join(uri, name), options)
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: rank {r} never finished writing (no {name})") from None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"{uri}: {name} is unreadable ({exc})") from None

    record0 = record(0)
    if record0.get("world_size") != world_size:
        storage.download_dir(uri, local, options)
        verify(local, where=uri)
        return
    mine = rank_files(record0, record(rank) if rank else record0)
    for rel, _digest in mine.items():
        dst = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            storage.download_file(storage.join(uri, rel), dst, options)
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: {rel} (rank {rank}) is missing") from None
    check_files(local, mine, where=uri, rank=rank)
    if not os.path.isfile(os.path.join(local, "meta.json")):
        raise CheckpointError(f"{uri}: meta.json missing (incomplete checkpoint)")


def agree_on_checkpoint(
    run_uri: str,
    latest: str,
    local_root: str,
    *,
    rank: int,
    world_size: int | None = None,
    options: storage.StorageOptions | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[str, str, list[str]]:
    """Every rank calls this; returns (checkpoint name, verified local copy of this rank's part,
    names in the run directory), the same name on every rank. Rank 0 alone lists storage and
    orders the candidates, then broadcasts: ranks could see different listings while a deletion
    is under way. Each rank fetches its own part of a candidate (`fetch_rank_part`); one
    all-gather of the ranks' verdicts decides, so a candidate is taken only when every rank's
    part is complete, and loading different checkpoints can never mix states. Raises
    CheckpointError on every rank when no candidate is complete, so a run never starts fresh by
    accident. The returned copy is verified, so `load` need not hash it again."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    warn = warn or log.warning
    decision: list[Any] = [[], []]  # [candidates, listing]
    if rank == 0:
        decision[1] = storage.list_names(run_uri, options)
        decision[0] = resume_candidates(decision[1], latest)
    if distributed:
        dist.broadcast_object_list(decision, src=0)
    candidates, listing = decision
    for i, name in enumerate(candidates):
        uri = storage.join(run_uri, name)
        local = os.path.join(local_root, name)
        error = None
        try:
            fetch_rank_part(uri, local, rank=rank, world_size=world_size, options=options)
        except (CheckpointError, FileNotFoundError) as exc:
            error = str(exc)
        verdicts = [error]
        if distributed:
            verdicts = [None] * world_size
            dist.all_gather_object(verdicts, error)
        problems = [v for v in verdicts if v]
        if not problems:
            return name, local, listing
        shutil.rmtree(local, ignore_errors=True)
        if rank == 0:
            then = (
                f"trying {candidates[i + 1]}"
                if i + 1 < len(candidates)
                else "no older checkpoint left"
            )
            warn(f"not resuming from {name}: {problems[0]}; {then}")
    raise CheckpointError(
        f"{run_uri}: no complete checkpoint to resume from (tried {', '.join(candidates)}); "
        "refusing to start fresh: fix or remove the run directory (launch.py train --fresh)"
    )


def load(
    engine: Any, ckpt_dir: str, *, rank: int, world_size: int, where: str | None = None,
    num_examples: int | None = None,
) -> TrainState:  # fmt: skip
    """Restore engine, RNG and stream position from a copy `agree_on_checkpoint` returned
    (already verified: hashing a multi-GB checkpoint twice would slow every restart); fails
    loudly rather than starting fresh. `num_examples` (training set size) is needed only when
    the world size changed."""
    meta = _read_json(os.path.join(ckpt_dir, "meta.json"), where or ckpt_dir)
    if meta["world_size"] != world_size:
        return _load_other_world_size(engine, ckpt_dir, meta["world_size"], rank=rank,
                                      world_size=world_size, num_examples=num_examples)  # fmt: skip
    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, DS_TAG), tag=DS_TAG)
    if path is None:  # DeepSpeed returns (None, None) instead of raising when nothing loaded
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no checkpoint under {DS_TAG}/")
    blob = torch.load(os.path.join(ckpt_dir, f"rank-{rank:05d}.state.pt"), weights_only=False)
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    return TrainState(**blob["train_state"])


def check_pin(state: TrainState, pin: TrainState, where: str) -> None:
    """CheckpointError unless the checkpoint (`state`) trained on the data this attempt reads
    (`pin`'s manifest_version, eval_version, plan_identity): its stream positions mean
    nothing in another plan. A checkpoint from before runs were pinned is taken as is."""
    if state.plan_identity is None:
        return
    theirs = (state.manifest_version, state.eval_version, state.plan_identity)
    ours = (pin.manifest_version, pin.eval_version, pin.plan_identity)
    if theirs != ours:
        raise CheckpointError(
            f"{where}: trained on train/eval manifest versions {theirs[0]}/{theirs[1]} (plan "
            f"{theirs[2]}), this attempt reads {ours[0]}/{ours[1]} (plan {ours[2]}): its data "
            "positions would land on other examples; rerun `train` (it pins the run's versions) "
            "or start over with --fresh"
        )


def rest_of_epoch(old: list[TrainState], num_examples: int, world_size: int) -> list:
    """Each new rank's share (data.shard_plan.Share) of what the old ranks (their states, in
    rank order) had not consumed of the interrupted epoch: whole length groups before each
    old rank's `position`, plus the micro-batches it ran of the group it was in (pure)."""
    from shardtune.data.shard_plan import (
        offsets_to_ranges,
        reshard_rest_of_epoch,
        segment_ranges,
        train_segment,
    )

    consumed = []
    for r, s in enumerate(old):
        ranges = (
            s.ranges
            if s.ranges is not None
            else segment_ranges(train_segment(num_examples, len(old), r), num_examples)
        )
        consumed.append((ranges, s.position))
        done = offsets_to_ranges(ranges, list(s.group_done))
        consumed.append((done, len(done)))
    return reshard_rest_of_epoch(num_examples, consumed, world_size)


def _load_other_world_size(
    engine: Any,
    ckpt_dir: str,
    old_world: int,
    *,
    rank: int,
    world_size: int,
    num_examples: int | None,
) -> TrainState:
    """Resume with a different number of workers. Data: the new ranks split what the old ranks
    had not consumed of the interrupted epoch (data.shard_plan.reshard_rest_of_epoch). Model:
    DeepSpeed 0.19 refuses ZeRO optimizer partitions written for another DP size (only a
    universal checkpoint, converted offline, would carry them over), so ZeRO 1/2 restore the
    weights, scheduler and step counters and start the Adam moments from zero; plain fp32
    (ZeRO 0) keeps its optimizer state whole."""
    if num_examples is None:
        raise ValueError("num_examples is needed to resume with a different world size")
    stage = engine.zero_optimization_stage()
    if stage >= 3:
        raise CheckpointError(
            f"{ckpt_dir}: written by {old_world} ZeRO-3 workers, now {world_size}; ZeRO-3 "
            "partitions can only resume with the same number of workers (use stage 0-2 to change it)"
        )
    # Moments survive only from a plain (ZeRO-0, fp32) checkpoint into a plain engine: a single
    # worker runs stage 0 (ds_config.effective_zero_stage), so either side may be partitioned.
    written_by_zero = any(
        name.startswith("zero_pp_rank_")
        for _base, _dirs, files in os.walk(os.path.join(ckpt_dir, DS_TAG))
        for name in files
    )
    keep_moments = (
        stage == 0
        and not written_by_zero
        and not engine.bfloat16_enabled()
        and not engine.fp16_enabled()
    )
    path, _ = engine.load_checkpoint(
        os.path.join(ckpt_dir, DS_TAG), tag=DS_TAG, load_optimizer_states=keep_moments
    )
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no checkpoint under {DS_TAG}/")
    if not engine.zero_optimization() and hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()  # bf16 master weights from the loaded module
    blobs = [
        torch.load(os.path.join(ckpt_dir, f"rank-{r:05d}.state.pt"), weights_only=False)
        for r in range(old_world)
    ]
    old = [TrainState(**b["train_state"]) for b in blobs]
    share = rest_of_epoch(old, num_examples, world_size)[rank]
    rng = blobs[rank % old_world]["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rank == 0:
        moments = "kept" if keep_moments else "RESET to zero (ZeRO partitions are per worker count)"
        log.info(
            "resuming %d -> %d workers at step %d: weights, LR schedule and step restored, "
            "optimizer moments %s; the rest of epoch %d is split anew (%d examples per worker, "
            "%d padding)", old_world, world_size, old[0].step, moments, old[0].epoch + 1,
            len(share), share.padding,
        )  # fmt: skip
    # At position 0 of a normal epoch the share equals train_segment's plan for the new size.
    return replace(old[0], position=0, ranges=share.ranges, group_step=0, group_done=())
