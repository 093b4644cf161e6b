"""Checkpoint save/load on a worker: DeepSpeed engine state, per-rank stream position and RNG,
and (rank 0) a consolidated Hugging Face model for export.

Layout of one checkpoint directory (the union of what every rank writes; Ray Train merges
the ranks' local directories in storage):
  ds/...                    DeepSpeed's files (model, ZeRO optimizer partitions, scheduler)
  rank-00003.state.pt       rank 3's stream position and RNG states
  hf_model/                 rank 0: full weights (safetensors), config with label maps, tokenizer
  meta.json                 rank 0: step, epoch, world size, metrics, resolved config
  rank-00003.complete.json  written LAST by each rank: sha256 of every file that rank wrote
A checkpoint is complete only when all `world_size` completion files exist and match.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from data.manifest import sha256_hex

DS_TAG = "ds"


class CheckpointError(Exception):
    """A checkpoint is incomplete or corrupt; the message names the file."""


@dataclass
class TrainState:
    """What a rank needs, beyond the engine, to continue exactly where it stopped."""

    epoch: int = 0
    position: int = 0  # examples of this epoch's segment this rank has consumed
    step: int = 0  # optimizer steps done (same on every rank)
    micro_step: int = 0  # micro-batches done


def _file_digests(root: str, names: list[str]) -> dict[str, str]:
    out = {}
    for rel in names:
        with open(os.path.join(root, rel), "rb") as f:
            out[rel] = sha256_hex(f.read())
    return out


def _walk(root: str) -> set[str]:
    found = set()
    for base, _dirs, files in os.walk(root):
        for name in files:
            found.add(os.path.relpath(os.path.join(base, name), root).replace(os.sep, "/"))
    return found


def gather_full_state_dict(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere). Every rank must call this: under ZeRO-3
    the parameters are partitioned and gathering them is a collective."""
    import deepspeed

    module = engine.module
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank != 0:
            return None
        return {k: v.detach().to(torch.float32).cpu().clone() for k, v in module.state_dict().items()}


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
    torch.save({"train_state": asdict(state), "rng": rng}, os.path.join(local_dir, f"rank-{rank:05d}.state.pt"))
    full = gather_full_state_dict(engine, rank)
    if rank == 0:
        hf_dir = os.path.join(local_dir, "hf_model")
        engine.module.save_pretrained(hf_dir, state_dict=full)
        if tokenizer is not None:
            tokenizer.save_pretrained(hf_dir)
        with open(os.path.join(local_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"world_size": world_size, **asdict(state), **(meta or {})}, f, indent=2, sort_keys=True)
    written = sorted(_walk(local_dir) - before)
    complete = {"rank": rank, "world_size": world_size, "files": _file_digests(local_dir, written)}
    with open(os.path.join(local_dir, f"rank-{rank:05d}.complete.json"), "w", encoding="utf-8") as f:
        json.dump(complete, f, indent=1, sort_keys=True)


def verify(ckpt_dir: str) -> dict:
    """Check a downloaded checkpoint: every rank's completion file present and every listed
    file matching its sha256. Returns meta.json; raises CheckpointError naming the problem."""
    meta_path = os.path.join(ckpt_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{ckpt_dir}: meta.json missing (incomplete checkpoint)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    for r in range(meta["world_size"]):
        path = os.path.join(ckpt_dir, f"rank-{r:05d}.complete.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{ckpt_dir}: rank {r} never finished writing (no {os.path.basename(path)})")
        with open(path, encoding="utf-8") as f:
            listed = json.load(f)["files"]
        for rel, digest in listed.items():
            full = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(full):
                raise CheckpointError(f"{ckpt_dir}: {rel} (rank {r}) is missing")
            with open(full, "rb") as fh:
                if sha256_hex(fh.read()) != digest:
                    raise CheckpointError(f"{ckpt_dir}: {rel} (rank {r}) does not match its sha256")
    return meta


def load(engine: Any, ckpt_dir: str, *, rank: int, world_size: int) -> TrainState:
    """Restore engine, RNG and stream position; fails loudly rather than starting fresh."""
    meta = verify(ckpt_dir)
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"{ckpt_dir}: written by {meta['world_size']} workers, now {world_size}; "
            "resuming with a different world size is not supported yet"
        )
    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, DS_TAG), tag=DS_TAG)
    if path is None:  # DeepSpeed returns (None, None) instead of raising when nothing loaded
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no checkpoint under {DS_TAG}/")
    blob = torch.load(os.path.join(ckpt_dir, f"rank-{rank:05d}.state.pt"), weights_only=False)
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    return TrainState(**blob["train_state"])
