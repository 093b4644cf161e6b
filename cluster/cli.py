"""The command line: prepare | train | evaluate | demo (the default), as `shardtune VERB`,
`python -m shardtune VERB` or `python launch.py VERB` in a checkout. Parses arguments and calls
the package; user-input errors become one line on stderr and exit status 2.

shardtune                                          # the demo: local Ray + S3 on loopback
shardtune prepare --task ner --input corpus.conll --output s3://bucket/ds --split train=0.8,dev=0.1,test=0.1
shardtune train --config configs/demo.yaml train.lr=1e-4 cluster.num_workers=4
    (rerunning it resumes run.name from its latest complete checkpoint; --fresh starts over)
shardtune evaluate --model s3://bucket/runs/x/model --data s3://bucket/ds/test [--json]
"""

from __future__ import annotations

import argparse
import json
import sys


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (credentials from the AWS environment)"
    )
    p.add_argument("--profile", help="named AWS profile")


def _options(args: argparse.Namespace):
    from shardtune.data.storage import StorageOptions

    return StorageOptions(endpoint_url=args.endpoint_url, profile=args.profile)


def cmd_prepare(args: argparse.Namespace) -> int:
    from shardtune.data import storage
    from shardtune.data.prepare import parse_split, prepare

    split = parse_split(args.split) if args.split else None
    manifests = prepare(
        args.task, args.input, args.output, shards=args.shards, shard_size=args.shard_size,
        split=split, seed=args.seed, options=_options(args),
    )  # fmt: skip
    for name, m in manifests.items():
        print(
            f"{storage.join(args.output, name) if name else args.output}: {m.num_examples} examples, {m.num_tokens} tokens, {len(m.shards)} shard(s), {len(m.labels)} labels"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from shardtune.cluster.config import load_job_config

    job = load_job_config(args.config, args.overrides)  # fails here, before Ray starts
    from shardtune.cluster.job import TrainingFailed, run_training
    from shardtune.cluster.report import print_report

    try:
        report = run_training(job, fresh=args.fresh)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from shardtune.training.evaluation import evaluate_exported
    from shardtune.training.metrics import format_report

    report = evaluate_exported(
        args.model,
        args.data,
        options=_options(args),
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['model']} on {report['data']}: {report['examples']} examples")
        print(format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shardtune.cluster.demo import run_demo

    run_demo(args.overrides if hasattr(args, "overrides") else [])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="verb")

    p = sub.add_parser(
        "prepare", help="raw corpus (CoNLL/JSONL/CSV) -> Parquet shards + manifest.json"
    )
    p.add_argument("--task", choices=["ner", "classify"], required=True)
    p.add_argument("--input", nargs="+", required=True, help="files, URIs or globs")
    p.add_argument(
        "--output", required=True, help="dataset URI (with --split: one dataset per split under it)"
    )
    p.add_argument("--shards", type=int, help="number of shards")
    p.add_argument("--shard-size", type=int, help="examples per shard (default 10000)")
    p.add_argument("--split", help="e.g. train=0.8,dev=0.1,test=0.1 (deterministic by --seed)")
    p.add_argument("--seed", type=int, default=0)
    _storage_args(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="run a job file on Ray (local, or cluster.address)")
    p.add_argument("--config", required=True, help="YAML job file")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete {output}/{name} first instead of resuming an earlier run of that name",
    )
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "evaluate", help="entity-level report of an exported model on a prepared dataset"
    )
    p.add_argument("--model", required=True, help="exported model URI")
    p.add_argument("--data", required=True, help="prepared dataset URI")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="default: the model's training max_length")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _storage_args(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser(
        "demo", help="the default: fine-tune MiniLM on tweet NER, local Ray + S3 on loopback"
    )
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of configs/demo.yaml")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shardtune.cluster.config import ConfigError
    from shardtune.data.corpus import CorpusError
    from shardtune.data.manifest import DatasetError

    args = build_parser().parse_args(argv)
    fn = getattr(args, "fn", cmd_demo)
    try:
        return fn(args)
    except (ConfigError, CorpusError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
