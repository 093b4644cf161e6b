"""Scale simulation (issue 13): the costs that used to grow with shards or ranks, before (the
code at BASE) and after (the working tree). Every row says, per column, whether its figure was
measured on this machine or modelled (worked out from sizes and counts, the old code not run):

    python -m bench.scale_sim [--shards 10000 100000 1000000] [--ranks 256] [--skip ...]

Measured, both columns: the per-row plan lookup and the plan build (time, tracemalloc peak), the
old plan loaded from git at BASE. Measured after, modelled before: GETs and bytes one rank makes
on resume from a fake 256-rank ZeRO-2 checkpoint on the S3 endpoint on loopback (file sizes
scaled down 1000x, bytes scaled back up; before = every object of the checkpoint, which is what
the old code fetched, plus XLM-R-large's fp32 hf_model/), ledger bytes per epoch (the compact
LedgerWriter run over one rank's epoch; before = the old one-JSON-line-per-micro-batch format
sampled), eval read amplification at 256 ranks (read_span's row-group reads; before = every shard
a rank's slice touches, whole), the split assignment's peak memory (split_of streamed over 1e5
and 1e6 keys; before = a 1e9-row permutation plus its index array). Measured sizes, modelled
reads: manifest bytes per rank per start (the JSON manifest and the compact index serialized for
real; the old code read the JSON twice per rank, the new one the index once per node of 8).
Modelled, both columns: bytes written per checkpoint (XLM-R-large's parameter count). `prepare`
rows/s and peak RSS are measured, one process vs `--ray` (both the current code). The table goes
to docs/bench/scale_sim.md (bench/results.py). `--skip plan resume ledger eval split prepare`
leaves parts out (`prepare` starts a local Ray). Not a test.
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

from shardtune.data import storage
from shardtune.data.manifest import Manifest, ShardInfo, to_index
from shardtune.data.shard_plan import EpochPlan
from shardtune.training import checkpoint as ckpt

from bench.results import publish
from tests.testkit import LocalS3, use_dummy_credentials

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


def split_assignment_peak(n: int) -> float:
    """tracemalloc peak (bytes) of assigning `n` examples to splits as `prepare` does: split_of
    on each example's key as it streams by, counted, nothing kept per example."""
    from shardtune.data.prepare import split_of

    split, counts = {"train": 0.8, "dev": 0.1, "test": 0.1}, [0, 0, 0]
    tracemalloc.start()
    for i in range(n):
        counts[split_of(f'{{"tokens": ["w{i}"]}}'.encode(), split, 0)] += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


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


MEASURED, MODELLED = "measured", "modelled"


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    """Markdown: cost, before, after, and whether each of the two was measured or modelled."""
    lines = [f"| cost | before ({BASE}) | after | before is | after is |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ranks", type=int, default=256)
    p.add_argument("--prepare-sentences", type=int, default=1_000_000,
                   help="synthetic corpus size for the prepare figures (1e7 takes long on 2 cores)")  # fmt: skip
    p.add_argument("--prepare-files", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["plan", "resume", "ledger", "eval",
                                                              "split", "prepare"])  # fmt: skip
    args = p.parse_args()
    old = old_module("data/shard_plan.py")
    rows = []
    notes = []
    for n in args.shards if "plan" not in args.skip else []:
        b_us, b_s, b_mb = plan_costs(old.EpochPlan, n, per_row_walk=True)
        a_us, a_s, a_mb = plan_costs(EpochPlan, n, per_row_walk=False)
        rows.append((f"plan lookup per row, {n:,} shards", f"{b_us * 1000:.0f} ns",
                     f"{a_us * 1000:.1f} ns", MEASURED, MEASURED))  # fmt: skip
        rows.append((f"plan build, {n:,} shards", f"{b_s:.3f} s / {b_mb:.1f} MB",
                     f"{a_s:.3f} s / {a_mb:.1f} MB", MEASURED, MEASURED))  # fmt: skip
        js, idx = manifest_bytes(n)
        rows.append((f"manifest bytes read per rank per start, {n:,} shards",
                     f"{2 * js / 1e6:.1f} MB (JSON x2)", f"{idx / RANKS_PER_NODE / 1e6:.2f} MB "
                     f"(index, 1 per node of {RANKS_PER_NODE})",
                     f"{MODELLED} (size {MEASURED})", f"{MODELLED} (size {MEASURED})"))  # fmt: skip
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
                     f"{r['after'][0]}", f"{MODELLED} (objects listed)", MEASURED))  # fmt: skip
        rows.append((f"bytes per rank on resume, {args.ranks} ranks (XLM-R-large)",
                     f"{(r['before'][1] * SCALE + hf_model) / 1e9:.1f} GB",
                     f"{r['after'][1] * SCALE / 1e9:.2f} GB",
                     f"{MODELLED} (objects listed)", f"{MEASURED} (1/{SCALE} scale)"))  # fmt: skip
        shared, part = 2 * XLMR_PARAMS, 12 * XLMR_PARAMS // args.ranks
        rows.append(("bytes written per checkpoint, rank 0 (XLM-R-large)",
                     f"{(shared + part + hf_model) / 1e9:.2f} GB", f"{(shared + part) / 1e9:.2f} GB",
                     MODELLED, MODELLED))  # fmt: skip
        rows.append(("bytes written per checkpoint, each other rank", f"{part / 1e6:.0f} MB",
                     f"{part / 1e6:.0f} MB", MODELLED, MODELLED))  # fmt: skip
        notes.append(f"The fake {args.ranks}-rank checkpoint took {made:.0f} s to write to the "
                     "loopback S3.")  # fmt: skip
    if "ledger" not in args.skip:
        for grouping in (1, 64):  # 64: the default length_grouping
            b, a = ledger_bytes(args.ranks, batch=16, grouping=grouping, flush_every=500)
            rows.append((f"ledger bytes per epoch, 1e9 rows, batch 16, length_grouping {grouping}",
                         f"{b / 1e9:.1f} GB", f"{a / 1e6:.1f} MB",
                         f"{MODELLED} (old format sampled)", MEASURED))  # fmt: skip
    if "eval" not in args.skip:
        b, a = eval_amplification(args.ranks, rows=100_000, shard_rows=10_000)
        rows.append((f"eval read amplification, 1e5-row eval set, {args.ranks} ranks",
                     f"{b:.1f}x", f"{a:.1f}x", f"{MODELLED} (whole shards)", MEASURED))  # fmt: skip
    if "split" not in args.skip:
        small, large = split_assignment_peak(100_000), split_assignment_peak(1_000_000)
        rows.append(("prepare: split-assignment memory", "10 GB at 1e9 rows (permutation + array)",
                     f"{small / 1e3:.0f} KB at 1e5 rows, {large / 1e3:.0f} KB at 1e6",
                     MODELLED, MEASURED))  # fmt: skip
    if "prepare" not in args.skip:
        n = args.prepare_sentences
        c = prepare_costs(n, args.prepare_files)
        one, ray = c["single"], c["ray"]
        rows.append((f"prepare rows/s, {n:,} sentences in {args.prepare_files} files "
                     f"({os.cpu_count()} cores): one process / --ray", f"{one['rows_per_s']:,.0f}",
                     f"{ray['rows_per_s']:,.0f}", f"{MEASURED} (one process)",
                     f"{MEASURED} (--ray)"))  # fmt: skip
        rows.append(("prepare peak memory: one process / --ray", f"{one['driver_peak_kb'] / 1e3:.0f} MB",
                     f"{ray['driver_peak_kb'] / 1e3:.0f} MB driver, "
                     f"{ray['worker_peak_kb'] / 1e3:.0f} MB per task process",
                     f"{MEASURED} (one process)", f"{MEASURED} (--ray)"))  # fmt: skip
    left_out = [part for part in ("plan", "resume", "ledger", "eval", "split", "prepare")
                if part in args.skip]  # fmt: skip
    if left_out:
        notes.append(f"Left out of this run (--skip): {', '.join(left_out)}.")
    text = table(rows)
    print(text)
    notes.insert(0, f"before: the code at {BASE} where measured; modelled figures come from "
                    "sizes and counts (see bench/scale_sim.py's docstring for each row).")  # fmt: skip
    print(f"wrote {publish('scale_sim', text, notes=' '.join(notes))}")


if __name__ == "__main__":
    main()
