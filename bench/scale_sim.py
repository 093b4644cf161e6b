"""Scale simulation (issue 13): the costs that used to grow with shards or ranks, measured on
this machine before (the code at BASE, loaded from git) and after (the working tree).

    python bench/scale_sim.py [--shards 10000 100000 1000000] [--ranks 256]

Measured: per-row plan lookup cost, plan build time and memory (tracemalloc peak), manifest
bytes a rank reads per start (JSON read twice per rank vs the compact index once per node of 8),
GETs and bytes one rank makes on resume from a fake 256-rank ZeRO-2 checkpoint on the S3
endpoint on loopback (file sizes scaled down 1000x, bytes reported scaled back up). Worked out
from XLM-R-large's parameter count rather than measured: bytes written per checkpoint by rank 0
and by the others, and the split assignment's memory in `prepare`. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path

from shardtune.cluster.testkit import LocalS3, use_dummy_credentials
from shardtune.data import storage
from shardtune.data.manifest import Manifest, ShardInfo, to_index
from shardtune.data.shard_plan import EpochPlan
from shardtune.training import checkpoint as ckpt

BASE = "fbefd52"  # the last commit before issue 13's changes
ROOT = Path(__file__).resolve().parent.parent
ROWS = 1_000_000_000
XLMR_PARAMS = 560_000_000
RANKS_PER_NODE = 8
SCALE = 1000  # fake checkpoint files are this many times smaller than XLM-R-large's


def old_module(path: str) -> types.ModuleType:
    """A module as it was at BASE (its own imports resolve against the working tree)."""
    src = subprocess.run(["git", "show", f"{BASE}:{path}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    mod = types.ModuleType(f"base_{path.replace('/', '_').removesuffix('.py')}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def plan_costs(plan_cls, shards: int, per_row_walk: bool) -> tuple[float, float, float]:
    """(µs per row of lookups, plan build seconds, peak MB) for one epoch plan."""
    sizes = tuple([ROWS // shards] * shards)
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = plan_cls(sizes, 1, 0)
    plan.locate(0)  # builds the cached arrays
    built = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    n, start = 20_000, ROWS // 3
    t0 = time.perf_counter()
    if per_row_walk:  # what the stream did: a lookup for every row
        for pos in range(start, start + n):
            plan.locate(pos)
    else:  # one lookup per shard run
        pos = start
        while pos < start + n:
            pos += min(plan.span(pos)[2], start + n - pos)
    return (time.perf_counter() - t0) / n * 1e6, built, peak


def manifest_bytes(shards: int) -> tuple[int, int]:
    m = Manifest(task="ner", labels=["O", "B-PER", "I-PER"], num_examples=ROWS, num_tokens=ROWS * 14,
                 shards=[ShardInfo(f"shard-{i:05d}.parquet", ROWS // shards, 14 * ROWS // shards,
                                   f"{i:064x}") for i in range(shards)])  # fmt: skip
    return len(m.to_json().encode()), len(to_index(m))


def fake_checkpoint(uri: str, ranks: int, options: storage.StorageOptions) -> None:
    """DeepSpeed ZeRO-2 names and XLM-R-large sizes / SCALE, plus the old hf_model/ on rank 0."""
    shared = b"m" * (2 * XLMR_PARAMS // SCALE)  # bf16 module weights, every rank loads them
    part = b"p" * (12 * XLMR_PARAMS // ranks // SCALE)  # fp32 master + 2 Adam moments, 1/ranks
    for r in range(ranks):
        files = {f"ds/ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt": part,
                 f"rank-{r:05d}.state.pt": b"s" * 2048}  # fmt: skip
        if r == 0:
            files["ds/ds/mp_rank_00_model_states.pt"] = shared
            files["meta.json"] = json.dumps({"world_size": ranks, "step": 100}).encode()
            files["hf_config/config.json"] = b"{}"
        for rel, data in files.items():
            storage.write_bytes(storage.join(uri, rel), data, options)
        listed = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
        record = {"rank": r, "world_size": ranks, "files": listed}
        storage.write_text(
            storage.join(uri, f"rank-{r:05d}.complete.json"), json.dumps(record), options
        )


class Counting:
    """Counts object GETs and bytes through data.storage while active."""

    def __init__(self):
        self.gets = self.bytes = self.lists = 0

    def __enter__(self):
        self.saved = storage.read_bytes, storage.download_file, storage.filesystem
        read_bytes, download_file, filesystem = self.saved

        def counted_read(uri, options=None):
            data = read_bytes(uri, options)
            self.gets, self.bytes = self.gets + 1, self.bytes + len(data)
            return data

        def counted_download(uri, local, options=None):
            download_file(uri, local, options)
            self.gets, self.bytes = self.gets + 1, self.bytes + os.path.getsize(local)

        storage.read_bytes, storage.download_file = counted_read, counted_download
        return self

    def __exit__(self, *exc):
        storage.read_bytes, storage.download_file, storage.filesystem = self.saved


def resume_costs(uri: str, ranks: int, options) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # before: every rank downloaded the whole checkpoint (one GET per object) and hashed it
        fs, path = storage.filesystem(uri, options)
        found = fs.find(path, detail=True)
        out["before"] = (len(found), sum(e["size"] for e in found.values()))
        with Counting() as c:
            ckpt.fetch_rank_part(uri, os.path.join(tmp, "r"), rank=ranks // 2, world_size=ranks,
                                 options=options)  # fmt: skip
        out["after"] = (c.gets, c.bytes)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ranks", type=int, default=256)
    args = p.parse_args()
    old = old_module("data/shard_plan.py")
    rows = []
    for n in args.shards:
        b_us, b_s, b_mb = plan_costs(old.EpochPlan, n, per_row_walk=True)
        a_us, a_s, a_mb = plan_costs(EpochPlan, n, per_row_walk=False)
        rows.append(
            (f"plan lookup per row, {n:,} shards", f"{b_us * 1000:.0f} ns", f"{a_us * 1000:.1f} ns")
        )
        rows.append((f"plan build, {n:,} shards", f"{b_s:.3f} s / {b_mb:.1f} MB",
                     f"{a_s:.3f} s / {a_mb:.1f} MB"))  # fmt: skip
        js, idx = manifest_bytes(n)
        rows.append((f"manifest bytes read per rank per start, {n:,} shards",
                     f"{2 * js / 1e6:.1f} MB (JSON x2)", f"{idx / RANKS_PER_NODE / 1e6:.2f} MB "
                     f"(index, 1 per node of {RANKS_PER_NODE})"))  # fmt: skip
    use_dummy_credentials()
    with LocalS3() as server:
        server.create_bucket("scale-sim")
        options = storage.StorageOptions(endpoint_url=server.endpoint_url)
        uri = "s3://scale-sim/run/checkpoint-00000100"
        t0 = time.perf_counter()
        fake_checkpoint(uri, args.ranks, options)
        made = time.perf_counter() - t0
        r = resume_costs(uri, args.ranks, options)
    hf_model = 4 * XLMR_PARAMS  # fp32 safetensors rank 0 wrote into every old checkpoint
    rows.append((f"GETs per rank on resume, {args.ranks} ranks", f"{r['before'][0]:,} (+hf_model/)",
                 f"{r['after'][0]}"))  # fmt: skip
    rows.append((f"bytes per rank on resume, {args.ranks} ranks (XLM-R-large)",
                 f"{(r['before'][1] * SCALE + hf_model) / 1e9:.1f} GB",
                 f"{r['after'][1] * SCALE / 1e9:.2f} GB"))  # fmt: skip
    shared, part = 2 * XLMR_PARAMS, 12 * XLMR_PARAMS // args.ranks
    rows.append(("bytes written per checkpoint, rank 0 (XLM-R-large)",
                 f"{(shared + part + hf_model) / 1e9:.2f} GB", f"{(shared + part) / 1e9:.2f} GB"))  # fmt: skip
    rows.append(("bytes written per checkpoint, each other rank", f"{part / 1e6:.0f} MB",
                 f"{part / 1e6:.0f} MB"))  # fmt: skip
    rows.append(("prepare: split-assignment memory at 1e9 rows", "10 GB (permutation + array)",
                 "O(1) (hash per example)"))  # fmt: skip
    w = max(len(a) for a, _, _ in rows)
    print(f"{'cost':<{w}}  {'before (' + BASE + ')':<34}  after")
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:<34}  {c}")
    print(f"(fake {args.ranks}-rank checkpoint written to the loopback S3 in {made:.0f} s)")


if __name__ == "__main__":
    main()
