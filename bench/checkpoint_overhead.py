"""Training-time overhead of checkpointing at the default frequency, as a ratio.

    python -m bench.checkpoint_overhead                      # tiny BERT, 2 CPU workers, S3 on loopback
    python -m bench.checkpoint_overhead --hidden 384 --layers 6 --epochs 3

The same job runs twice on one local Ray, data and checkpoints in S3 (moto on loopback), no eval
set (so only checkpointing differs): once with the default `train.eval_every: epoch` (a
checkpoint after every epoch, plus the final one) and once with checkpoints never taken until the
end (`eval_every` larger than the run). Printed: the workers' time from the first step to the
final report (`elapsed_seconds` of the last report: steps plus every checkpoint before the
final one) and the part of it spent in steps, both runs side by side, and the ratio
(steps + extra checkpointing time) / steps, plus the raw ratios. The final checkpoint is in
neither figure and the same in both. Ray start-up and worker start are excluded; the whole
`run_training` wall time is printed as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "shardtune-bench"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()

    from shardtune.cluster.config import validate_tree
    from shardtune.cluster.job import run_training
    from shardtune.data.logs import setup_logging
    from shardtune.data.prepare import prepare
    from shardtune.data.storage import StorageOptions

    from bench.results import publish
    from tests.testkit import (
        LocalS3,
        local_ray,
        random_bert,
        synthetic_sentences,
        use_dummy_credentials,
        write_conll,
    )

    setup_logging("INFO")
    use_dummy_credentials()
    with tempfile.TemporaryDirectory(prefix="shardtune-bench-") as tmp, LocalS3() as s3:
        s3.create_bucket(BUCKET)
        options = StorageOptions(endpoint_url=s3.endpoint_url)
        corpus = write_conll(Path(tmp, "corpus.conll"), synthetic_sentences(args.examples))
        data = f"s3://{BUCKET}/data"
        prepare("ner", [str(corpus)], data, shards=4, options=options)
        model = random_bert(Path(tmp, "model"), hidden=args.hidden, layers=args.layers,
                          heads=max(1, args.hidden // 64), intermediate=4 * args.hidden)  # fmt: skip
        with local_ray(num_cpus=max(args.workers, os.cpu_count() or 1), logging_level="ERROR"):
            results = {}
            for label, eval_every in (
                ("default (every epoch)", "epoch"),
                ("never until the end", 10**9),
            ):
                job = validate_tree(
                    {
                        "task": "ner",
                        "model": {"name_or_path": model},
                        "data": {"train": data, "max_length": 32},
                        "train": {
                            "epochs": args.epochs,
                            "batch_size": 8,
                            "zero_stage": args.zero_stage,
                            "eval_every": eval_every,
                            "log_every": 10**6,
                        },  # fmt: skip
                        "cluster": {"num_workers": args.workers, "cpus_per_worker": 1},
                        "run": {"name": f"overhead-{eval_every}", "output": f"s3://{BUCKET}/runs"},
                        "storage": {"endpoint_url": s3.endpoint_url},
                    },
                    "bench",
                )
                t0 = time.perf_counter()
                report = run_training(job, fresh=True)
                final = report["history"][-1]
                results[label] = (
                    final["elapsed_seconds"],
                    final["train_seconds"],
                    time.perf_counter() - t0,
                    final["step"],
                )

    lines = [
        f"{'checkpointing':<24}{'train loop s':>14}{'of which steps s':>18}{'run_training s':>16}{'steps':>7}"
    ]
    for label, (loop_s, step_s, wall_s, steps) in results.items():
        lines.append(f"{label:<24}{loop_s:>14.2f}{step_s:>18.2f}{wall_s:>16.2f}{steps:>7}")
    (d_loop, d_steps, d_wall, _), (n_loop, n_steps, n_wall, _) = results.values()
    # On a shared machine step time itself drifts between the runs; the time the loop spent
    # outside steps (checkpoints, reports) does not depend on it, so it gives the steadier ratio.
    extra = (d_loop - d_steps) - (n_loop - n_steps)
    lines += [
        "",
        f"checkpoint overhead at the default frequency: {extra:.2f} s of checkpointing for "
        f"{n_steps:.2f} s of steps = x{(n_steps + extra) / n_steps:.3f} "
        f"(raw train loop ratio x{d_loop / n_loop:.3f}, run_training wall x{d_wall / n_wall:.3f})",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    setup = (
        f"{args.examples} examples, {args.epochs} epochs, BERT {args.layers}x{args.hidden}, "
        f"{args.workers} workers, ZeRO-{args.zero_stage}, data and checkpoints in S3 (moto on loopback)"
    )
    path = publish("checkpoint_overhead", table, notes=setup + ".")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
