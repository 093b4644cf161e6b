"""Scale simulation (issue 13): the costs that used to grow with shards or ranks, measured on
this machine before (the code at BASE, loaded from git) and after (the working tree).

    python -m bench.scale_sim [--shards 10000 100000 1000000] [--ranks 256]

Measured: per-row plan lookup cost, plan build time and memory (tracemalloc peak), manifest
bytes a rank reads per start (JSON read twice per rank vs the compact index once per node of 8),
GETs and bytes one rank makes on resume from a fake 256-rank ZeRO-2 checkpoint on the S3
endpoint on loopback (file sizes scaled down 1000x, bytes reported scaled back up). Worked out
from XLM-R-large's parameter count rather than measured: bytes written per checkpoint by rank 0
and by the others, and the split assignment's memory in `prepare`. Also: ledger bytes per epoch
(the old line-per-micro-batch format sampled, the compact writer run over one rank's epoch),
eval read amplification at 256 ranks (real row-group reads), and `prepare` rows/s and peak RSS
one process vs `--ray` on a synthetic corpus (1e6 sentences by default: 1e7 takes long on 2
shared cores). `--skip plan resume ledger eval prepare` leaves parts out. Not a test.
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

from tests.testkit import LocalS3, use_dummy_credentials
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


def ledger_bytes(ranks: int, batch: int, grouping: int, flush_every: int) -> tuple[float, float]:
    """(before, after) ledger bytes per epoch of ROWS examples on `ranks` ranks: before, one
    JSON line of ids per micro-batch (measured on a sample, times the micro-batches); after,
    one rank's whole epoch through the compact LedgerWriter (flushed every `flush_every`
    optimizer steps, as reports do), times the ranks."""
    import random

    from shardtune.data.ledger import LedgerWriter

    per_rank = -(-ROWS // ranks)
    micro = -(-per_rank // batch)
    rng = random.Random(0)
    sample = 10_000
    old = sum(len(json.dumps({"epoch": 0, "step": m, "micro_step": m,
                              "ids": [rng.randrange(ROWS) for _ in range(batch)]})) + 1
              for m in range(1, sample + 1))  # fmt: skip
    before = old / sample * micro * ranks
    plan = EpochPlan(tuple([ROWS // 100_000] * 100_000), 1, 0)
    group = batch * grouping
    with tempfile.TemporaryDirectory() as tmp:
        w = LedgerWriter(tmp, rank=7, attempt=1, world_size=ranks, resumed_step=None,
                         data_uri="s3://b/d", batch_size=batch, length_grouping=grouping)  # fmt: skip
        w.positions(epoch=0, plan=plan, ranges=((7 * per_rank, 8 * per_rank),))
        order = list(range(group))
        for m in range(1, micro + 1):
            g, k = divmod(m - 1, grouping)
            if k == 0 and grouping > 1:  # a length group: batches of scattered offsets
                rng.shuffle(order)
            idx = order[k * batch : (k + 1) * batch] if grouping > 1 else range(batch)
            w.record(epoch=0, step=m, micro_step=m, group_step=k,
                     offsets=[g * group + i for i in idx if g * group + i < per_rank])  # fmt: skip
            if m % flush_every == 0:
                w.flush()
        w.flush()
        after = sum(p.stat().st_size for p in Path(tmp).rglob("*.jsonl")) * ranks
    return before, after


def eval_amplification(ranks: int, rows: int, shard_rows: int) -> tuple[float, float]:
    """(before, after) bytes all ranks fetch / bytes of the eval set: before, every shard a
    rank's slice touches read whole; after, data.stream.read_span (row groups). Measured on a
    real prepared classification set on local disk."""
    from shardtune.data.manifest import read_manifest
    from shardtune.data.prepare import prepare
    from shardtune.data.shard_plan import eval_segment
    from shardtune.data.stream import read_span

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "eval.jsonl")
        src.write_text("".join(json.dumps({"text": f"sentence number {i} of the eval set",
                                           "label": "ab"[i % 2]}) + "\n" for i in range(rows)))  # fmt: skip
        data = str(Path(tmp, "d"))
        prepare("classify", [str(src)], data, shard_size=shard_rows)
        m = read_manifest(data)
        sizes = [Path(data, s.name).stat().st_size for s in m.shards]
        whole = sum(sizes)
        before = after = 0
        for rank in range(ranks):
            seg = eval_segment(m.num_examples, ranks, rank)
            first, last = seg.start // shard_rows, (seg.stop - 1) // shard_rows
            before += sum(sizes[first : last + 1]) if len(seg) else 0
            after += read_span(data, m, seg.start, seg.stop)[1]
    return before / whole, after / whole


def synthetic_corpus(root: Path, sentences: int, files: int) -> list[str]:
    """A classification corpus as `files` JSONL files (how large corpora arrive)."""
    out = []
    per = -(-sentences // files)
    for f in range(files):
        path = root / f"part-{f:03d}.jsonl"
        with open(path, "w") as fh:
            for i in range(f * per, min(sentences, (f + 1) * per)):
                fh.write(json.dumps({"text": f"sentence {i} about item {i * 7919 % 100_003}",
                                     "label": "abc"[i % 3]}) + "\n")  # fmt: skip
        out.append(str(path))
    return out


PREPARE_CHILD = """
import json, logging, resource, sys, time
from shardtune.data.prepare import prepare
inputs, out, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
pool, worker_peaks = None, []
if mode == "ray":
    import ray
    from shardtune.cluster.cli import ray_pool
    map_ = ray_pool()
    def peak():
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    def pool(fn, items):
        results = map_(fn, items)
        worker_peaks.extend(ray.get([ray.remote(num_cpus=1)(peak).remote() for _ in items]))
        return results
t0 = time.perf_counter()
prepare("classify", inputs, out, split={"train": 0.8, "dev": 0.1, "test": 0.1}, pool=pool)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "driver_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_peak_kb": max(worker_peaks, default=0)}))
"""


def prepare_costs(sentences: int, files: int) -> dict:
    """rows/s and peak memory of `prepare` on a synthetic corpus, one process vs Ray tasks (a
    fresh process each: peak RSS is per process)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = synthetic_corpus(Path(tmp), sentences, files)
        for mode in ("single", "ray"):
            run = subprocess.run(
                [sys.executable, "-c", PREPARE_CHILD, json.dumps(inputs), f"{tmp}/{mode}", mode],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            out[mode]["rows_per_s"] = sentences / out[mode]["seconds"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ranks", type=int, default=256)
    p.add_argument("--prepare-sentences", type=int, default=1_000_000,
                   help="synthetic corpus size for the prepare figures (1e7 takes long on 2 cores)")  # fmt: skip
    p.add_argument("--prepare-files", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["plan", "resume", "ledger", "eval",
                                                              "prepare"])  # fmt: skip
    args = p.parse_args()
    old = old_module("data/shard_plan.py")
    rows = []
    for n in args.shards if "plan" not in args.skip else []:
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
    if "resume" not in args.skip:
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
    if "ledger" not in args.skip:
        for grouping in (1, 64):  # 64: the default length_grouping
            b, a = ledger_bytes(args.ranks, batch=16, grouping=grouping, flush_every=500)
            rows.append((f"ledger bytes per epoch, 1e9 rows, batch 16, length_grouping {grouping}",
                         f"{b / 1e9:.1f} GB", f"{a / 1e6:.1f} MB"))  # fmt: skip
    if "eval" not in args.skip:
        b, a = eval_amplification(args.ranks, rows=100_000, shard_rows=10_000)
        rows.append((f"eval read amplification, 1e5-row eval set, {args.ranks} ranks",
                     f"{b:.1f}x", f"{a:.1f}x"))  # fmt: skip
    if "prepare" not in args.skip:
        n = args.prepare_sentences
        c = prepare_costs(n, args.prepare_files)
        one, ray = c["single"], c["ray"]
        rows.append((f"prepare rows/s, {n:,} sentences in {args.prepare_files} files "
                     f"({os.cpu_count()} cores)", f"{one['rows_per_s']:,.0f} (one process)",
                     f"{ray['rows_per_s']:,.0f} (--ray)"))  # fmt: skip
        rows.append(("prepare peak memory", f"{one['driver_peak_kb'] / 1e3:.0f} MB",
                     f"{ray['driver_peak_kb'] / 1e3:.0f} MB driver, "
                     f"{ray['worker_peak_kb'] / 1e3:.0f} MB per task process"))  # fmt: skip
    w = max(len(a) for a, _, _ in rows)
    print(f"{'cost':<{w}}  {'before (' + BASE + ')':<34}  after")
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:<34}  {c}")
    if "resume" not in args.skip:
        print(f"(fake {args.ranks}-rank checkpoint written to the loopback S3 in {made:.0f} s)")


if __name__ == "__main__":
    main()
