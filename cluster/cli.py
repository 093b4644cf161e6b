"""The command line: prepare | train | evaluate | report | demo (the default), as `shardtune VERB`,
`python -m shardtune VERB` or `python launch.py VERB` in a checkout. Parses arguments, sets up
logging (--log-level) and calls the package; user-input errors become one line on stderr and exit
status 2, with no traceback (a bug in shardtune still shows its traceback).

shardtune                                          # the demo: local Ray + S3 on loopback
shardtune prepare --task ner --input corpus.conll --output s3://bucket/ds --split train=0.8,dev=0.1,test=0.1
shardtune train --config configs/demo.yaml train.lr=1e-4 cluster.num_workers=4
    (rerunning it resumes run.name from its latest complete checkpoint; --fresh starts over)
shardtune evaluate --model s3://bucket/runs/x/model --data s3://bucket/ds/test [--json]
shardtune report s3://bucket/runs/x                 # the report table again; plots redrawn
shardtune --log-level DEBUG train ...              # progress and status lines go to stderr
shardtune serve --model s3://bucket/runs/x/model [--port 8000]   # HTTP API until Ctrl-C
    (train, prepare --ray, serve: --address / cluster.address, else RAY_ADDRESS inside a Ray
    job, else a fresh local Ray of their own; cluster/ray_runtime.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, get_args, get_type_hints

log = logging.getLogger(__name__)


class UsageError(Exception):
    """An argument the user gave is wrong; the message names the option and the value."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the usage block first; one line (and where to look) is easier to
        # read in `ray job logs` and keeps every user-input error the same shape.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float | None = None, high: float | None = None) -> Callable:
    """argparse `type` for an int or float within [low, high]; the message names the bound."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return parse


_positive_int = _number(int, low=1)


def _split(text: str) -> dict[str, float]:
    from shardtune.data.prepare import parse_split

    try:
        return parse_split(text)  # raises ValueError only about `text` itself
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url", help="S3-compatible endpoint (credentials from the AWS environment)"
    )
    p.add_argument("--profile", help="named AWS profile")


def _address_arg(p: argparse.ArgumentParser, when: str = "") -> None:
    p.add_argument(
        "--address",
        help=f"join this Ray cluster{when} (default: RAY_ADDRESS inside a Ray job, else a fresh "
        "local Ray of its own)",
    )


def _settings_args(p: argparse.ArgumentParser, model: type) -> None:
    """One --flag per field of a settings dataclass (serving/settings.py), its type, default,
    bounds, choices and help read from the field, so a default is written once, in the model."""
    hints = get_type_hints(model)
    for f in dataclasses.fields(model):
        kind = next(t for t in get_args(hints[f.name]) or [hints[f.name]] if t is not type(None))
        meta, required = f.metadata, f.default is dataclasses.MISSING
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, required=required,
            default=None if required else f.default, choices=meta["choices"],
            type=_number(kind, meta["low"], meta["high"]) if kind in (int, float) else kind,
            help=meta["doc"] + ("" if required or f.default is None else " (default: %(default)s)"),
        )  # fmt: skip


def _settings(model: type, args: argparse.Namespace) -> Any:
    return model(**{f.name: getattr(args, f.name) for f in dataclasses.fields(model)})


def _options(args: argparse.Namespace):
    from shardtune.data.storage import StorageOptions

    return StorageOptions(endpoint_url=args.endpoint_url, profile=args.profile)


def _check_model(uri: str, options, option: str, *, local_here: bool = True) -> None:
    """Fail before any work (and before Ray starts) when `uri` is not a model directory.
    `local_here=False`: a local path names the workers' disk, which this process may not see."""
    from shardtune.data import storage
    from shardtune.training.model import resolve_model_dir

    if storage.is_local(uri) or uri.startswith("package:"):
        if not local_here:
            return
        try:
            resolve_model_dir(uri, options)  # local: only looks, copies nothing
        except FileNotFoundError as exc:  # its way of saying "not a model directory"
            raise UsageError(f"{option}: {str(exc).removeprefix('model.name_or_path: ')}") from None
    elif not storage.exists(storage.join(uri, "config.json"), options):
        raise UsageError(f"{option}: {uri} has no config.json (not a model directory)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from shardtune.data import storage
    from shardtune.data.prepare import prepare

    manifests = prepare(
        args.task, args.input, args.output, shards=args.shards, shard_size=args.shard_size,
        split=args.split, seed=args.seed, options=_options(args), fmt=args.format,
        append=args.append, pool=ray_pool(args.address) if args.ray else None,
    )  # fmt: skip
    for name, m in manifests.items():
        log.info(
            "%s: version %d, %d examples, %d tokens, %d shard(s), %d labels",
            storage.join(args.output, name) if name else args.output, m.version,
            m.num_examples, m.num_tokens, len(m.shards), len(m.labels),
        )  # fmt: skip
    return 0


def ray_pool(address: str | None = None):
    """`prepare --ray`'s map: one Ray task per work item (an input file), results in input
    order, on the Ray that `train` would use (cluster/ray_runtime.py)."""
    import ray
    from shardtune.cluster import ray_runtime

    ray_runtime.connect(address)

    def pool(fn, items: list) -> list:
        task = ray.remote(num_cpus=1, max_retries=2)(fn)  # a lost node reruns its files
        return ray.get([task.remote(item) for item in items])

    return pool


def cmd_train(args: argparse.Namespace) -> int:
    from shardtune.cluster.config import load_job_config

    job = load_job_config(args.config, args.overrides)  # fails here, before Ray starts
    _check_model(job.model.name_or_path, job.storage_options(), "model.name_or_path",
                 local_here=not job.cluster.address)  # fmt: skip
    from shardtune.cluster.job import TrainingFailed, run_training
    from shardtune.cluster.report import run_summary

    try:
        report = run_training(job, fresh=args.fresh)
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(run_summary(report))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from shardtune.training.evaluation import evaluate_exported
    from shardtune.training.metrics import format_report

    _check_model(args.model, _options(args), "--model")
    report = evaluate_exported(
        args.model,
        args.data,
        options=_options(args),
        batch_size=args.batch_size,
        max_length=args.max_length,
        precision=args.precision,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['model']} on {report['data']}: {report['examples']} examples "
            f"({report['device']}, {report['precision']})"
        )
        print(format_report(report))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from shardtune.cluster.plots import write_plots
    from shardtune.cluster.report import run_summary
    from shardtune.data import storage
    from shardtune.data.run_layout import RunLayout

    options = _options(args)
    uri = RunLayout(args.run).report
    if not storage.exists(uri, options):
        raise UsageError(f"RUN_URI: {args.run} has no report.json (not a finished run directory)")
    report = json.loads(storage.read_text(uri, options))
    report["plots"] = write_plots(report, args.run, options)  # redrawn from report.json alone
    print(run_summary(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shardtune.cluster.demo import run_demo

    run_demo(args.overrides if hasattr(args, "overrides") else [])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import functools

    from shardtune.cluster import ray_runtime

    # Lazy: Ray Serve and FastAPI load only for this verb (and only with the `serve` extra).
    from shardtune.serving.server import check_port, resolve_ingress, run_server
    from shardtune.serving.settings import ServerOptions, ServeSettings

    joined = ray_runtime.cluster_address(args.address) is not None
    try:
        settings, server = _settings(ServeSettings, args), _settings(ServerOptions, args)
        resolve_ingress(server.ingress, replicas=settings.replicas, joined=joined)
        if not joined:  # a joined cluster's port belongs to its Serve proxy
            check_port(server.host, server.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # No dashboard: Serve runs no Ray Train, whose placement groups need the State API guard.
    session = functools.partial(ray_runtime.session, args.address, dashboard=False)
    return run_server(settings, server, ray_session=session, joined=joined)


def build_parser() -> argparse.ArgumentParser:
    from shardtune.data.device import INFERENCE_PRECISIONS
    from shardtune.data.hf_corpus import KINDS as HF_KINDS
    from shardtune.data.tasks import TASK_NAMES
    from shardtune.serving.settings import ServerOptions, ServeSettings

    parser = _Parser(
        prog="shardtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="progress and status lines on stderr at this level or above (default INFO)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="verb")

    def verb(
        name: str, fn: Callable, help: str, *, storage: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        if storage:
            _storage_args(p)
        return p

    p = verb("prepare", cmd_prepare, "raw corpus (CoNLL/JSONL/CSV, or a Hugging Face dataset: "
             "save_to_disk directory, Parquet) -> Parquet shards + manifest.json")  # fmt: skip
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    p.add_argument(
        "--input", nargs="+", required=True,
        help="files, URIs or globs; a Dataset/DatasetDict.save_to_disk directory (local or "
        "s3://) or a .parquet file is read with `datasets`",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=["conll", "jsonl", "csv", *HF_KINDS],
        help="input format when the file name does not say (default: by extension or "
        "directory contents); hf-json / hf-csv read JSON Lines / CSV through `datasets`",
    )  # fmt: skip
    p.add_argument("--output", required=True,
                   help="dataset URI (with --split: one dataset per split under it)")  # fmt: skip
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shards", type=_positive_int, help="number of shards")
    size.add_argument("--shard-size", type=_positive_int, help="examples per shard (default 10000)")
    p.add_argument("--split", type=_split,
                   help="e.g. train=0.8,dev=0.1,test=0.1 (deterministic by --seed)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--append", action="store_true",
        help="add --input (new examples only) to the dataset(s) at --output as a new manifest "
        "version; old shards are not rewritten and no old example changes split",
    )  # fmt: skip
    p.add_argument(
        "--ray", action="store_true",
        help="validate and write shards as Ray tasks, one per input file, in parallel (for "
        "corpora given as many files; the same output)",
    )  # fmt: skip
    _address_arg(p, " with --ray")

    p = verb("train", cmd_train, "run a job file on Ray (local, or cluster.address)", storage=False)
    p.add_argument("--config", required=True, help="YAML job file")
    p.add_argument(
        "--fresh", action="store_true",
        help="delete {output}/{name} first instead of resuming an earlier run of that name",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")

    p = verb("evaluate", cmd_evaluate,
             "entity-level report of an exported model on a prepared dataset")  # fmt: skip
    p.add_argument("--model", required=True, help="exported model URI")
    p.add_argument("--data", required=True, help="prepared dataset URI")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-length", type=_positive_int,
                   help="default: the model's training max_length")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--precision", choices=INFERENCE_PRECISIONS, default="fp32",
        help="fp32: the weights as plain transformers runs them; auto: as `serve` runs them "
        "(bf16 on a CPU or GPU that computes it natively)",
    )  # fmt: skip

    p = verb("report", cmd_report, "print a finished run's report table and redraw its plots")
    p.add_argument("run", metavar="RUN_URI", help="{run.output}/{run.name} of a finished run")

    p = verb("demo", cmd_demo, "the default: fine-tune MiniLM on tweet NER, local Ray + S3 on "
             "loopback", storage=False)  # fmt: skip
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of configs/demo.yaml")

    # serve: one option per settings field (serving/settings.py), --endpoint-url/--profile too.
    p = verb("serve", cmd_serve, "HTTP inference over an exported model (Ray Serve + FastAPI)",
             storage=False)  # fmt: skip
    _settings_args(p, ServeSettings)
    _settings_args(p, ServerOptions)
    _address_arg(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shardtune.cluster.config import ConfigError
    from shardtune.cluster.ray_runtime import RayUnavailable
    from shardtune.cluster.run_state import RunStateError
    from shardtune.data.corpus import CorpusError
    from shardtune.data.logs import setup_logging
    from shardtune.data.manifest import DatasetError
    from shardtune.training.model import ModelError

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    fn = getattr(args, "fn", cmd_demo)
    try:
        return fn(args)
    except (
        UsageError,
        ConfigError,
        CorpusError,
        DatasetError,
        ModelError,
        RayUnavailable,
        RunStateError,
    ) as exc:
        # The final word of the command, not a progress line: plain, like argparse's errors.
        # Multi-problem errors (every bad field or line) follow their one summary line.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
