"""Streaming benchmark: the same prepared corpus read from local files and from an S3 endpoint
(moto's server on loopback), side by side in one process.

    python -m bench.stream_bench [--examples 6000] [--shard-size 500] [--rounds 2]

Measures (1) the stream alone: examples/s of one rank's ShardStream over a whole epoch and the
time it blocked on storage; (2) training: 2 Ray Train workers, a tiny random BERT, examples/s
and `data_wait_fraction` (share of step time spent getting the micro-batch's rows) as the
workers report them. Rounds alternate local/S3 so drift hits both; the median is printed.
Targets (issue 3): training through S3 within 5% of local files; data wait under 2% of step time.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from shardtune.data import storage
from shardtune.data.logs import setup_logging
from shardtune.data.manifest import read_manifest
from shardtune.data.prepare import prepare
from shardtune.data.shard_plan import EpochPlan, train_segment
from shardtune.data.stream import ShardStream

from bench.results import publish
from tests.testkit import (
    LocalS3,
    local_ray,
    random_bert,
    synthetic_sentences,
    use_dummy_credentials,
    write_conll,
)

BUCKET = "shardtune-bench"


def stream_once(uri: str, options: storage.StorageOptions | None) -> tuple[float, float]:
    """(examples/s, fraction of the time blocked on storage) for one rank's epoch, 1 worker."""
    manifest = read_manifest(uri, options)
    plan = EpochPlan(tuple(s.num_examples for s in manifest.shards), seed=0, epoch=0)
    stream = ShardStream(uri, manifest, plan, options, shards_in_memory=2)
    t0 = time.perf_counter()
    n = sum(1 for _ in stream.iter_from(train_segment(manifest.num_examples, 1, 0)))
    secs = time.perf_counter() - t0
    stream.close()
    return n / secs, stream.stats.wait_s / secs


def train_once(name: str, data: str, output: str, endpoint: str, model: str) -> tuple[float, float]:
    """(training examples/s over 2 workers, data wait fraction) from the run's last report."""
    from shardtune.cluster.config import validate_tree
    from shardtune.cluster.job import run_training

    job = validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": model},
            "data": {"train": data, "max_length": 32},
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "zero_stage": 2,
                "lr": 1e-3,
                "log_every": 1000,
            },
            "cluster": {"num_workers": 2, "cpus_per_worker": 1},
            "run": {"name": name, "output": output},
            "storage": {"endpoint_url": endpoint},
        },
        "bench",
    )
    report = run_training(job)
    last = report["history"][-1]
    return last["examples_per_s"], last["data_wait_fraction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="training runs per source")
    args = parser.parse_args()

    setup_logging("INFO")
    use_dummy_credentials()
    with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp, LocalS3() as s3:
        s3.create_bucket(BUCKET)
        # the tests' learnable toy corpus
        corpus = write_conll(Path(tmp, "corpus.conll"), synthetic_sentences(args.examples, seed=1))
        s3_options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
        sources = {
            "local": (os.path.join(tmp, "data"), None, os.path.join(tmp, "runs")),
            "s3": (f"s3://{BUCKET}/data", s3_options, f"s3://{BUCKET}/runs"),
        }
        for uri, options, _ in sources.values():
            prepare("ner", [str(corpus)], uri, shard_size=args.shard_size, options=options)
        model = random_bert(os.path.join(tmp, "tiny-bert"))

        stream: dict[str, list[tuple[float, float]]] = {k: [] for k in sources}
        for _ in range(3):
            for key, (uri, options, _) in sources.items():
                stream[key].append(stream_once(uri, options))

        train: dict[str, list[tuple[float, float]]] = {k: [] for k in sources}
        with local_ray(num_cpus=max(2, os.cpu_count() or 2)):
            for r in range(args.rounds):
                for key, (uri, options, output) in sources.items():
                    endpoint = s3.endpoint_url if options else None
                    train[key].append(train_once(f"bench-{key}-{r}", uri, output, endpoint, model))

    def med(rows, i):
        return statistics.median(x[i] for x in rows)

    lines = [
        f"{args.examples} examples, shards of {args.shard_size}, {os.cpu_count()} CPUs; medians",
        f"{'':34}{'local':>12}{'S3 (moto)':>12}{'S3/local':>10}",
    ]
    rows = [
        ("stream alone, examples/s", stream, 0, "{:12.0f}"),
        ("stream alone, blocked on storage", stream, 1, "{:12.2%}"),
        ("training (2 workers), examples/s", train, 0, "{:12.1f}"),
        ("training, data wait of step time", train, 1, "{:12.2%}"),
    ]
    for label, values, i, fmt in rows:
        a, b = med(values["local"], i), med(values["s3"], i)
        ratio = f"{b / a:10.3f}" if a else f"{'-':>10}"
        lines.append(f"{label:34}{fmt.format(a)}{fmt.format(b)}{ratio}")
    table = "\n".join(lines)
    print("\n" + table)
    path = publish(
        "stream_bench", table,
        notes="Targets (issue 3): training through S3 within 5% of local files (the S3/local "
        "ratio of the training row at least 0.95); data wait under 2% of step time. The stream "
        "alone is slower from S3; prefetch (`data.shards_in_memory`) hides it from training.",
    )  # fmt: skip
    print(f"written to {path}")


if __name__ == "__main__":
    main()
