"""The job file: one validated tree (pydantic) loaded from YAML plus dotted `key=value` overrides.

An invalid job fails here, before Ray starts, with every bad field named by its dotted path. The
model/data/train sections are the worker's own (shardtune.training.config); this module adds
the head's sections (cluster, run, storage) and composes the tree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from shardtune.training.config import (
    DataSection,
    ModelSection,
    Section,
    TrackingSection,
    TrainSection,
    WorkerConfig,
)


class ConfigError(Exception):
    """Every problem found in a job file, each naming its field path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:  # one problem, one line: the file and the field
            super().__init__(f"invalid job config {source}: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid job config {source} ({len(problems)} problem(s)):\n{lines}")


class ClusterSection(Section):
    num_workers: int | tuple[int, int] = Field(
        default=2,
        description="Ray Train workers (one per GPU on GPU); [min, max] makes them elastic: a "
        "restart after a lost node goes on with as many as fit (at least min), and a healthy "
        "group grows back towards max when capacity returns (both resume from the latest "
        "checkpoint, the interrupted epoch resplit over the new world size).",
    )
    resize_check_s: float = Field(
        default=60.0,
        gt=0,
        description="Elastic only: how often a healthy worker group checks whether more "
        "workers fit (Ray Train's elastic_resize_monitor_interval_s).",
    )
    use_gpu: bool = Field(default=False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(
        default=3,
        ge=-1,
        description="Worker-group restarts from the latest checkpoint; -1 = unlimited, 0 = the "
        "first failure ends the run. 3 by default: a restart resumes exactly (model, optimizer, "
        "data position), so a lost worker or node, a preempted instance or an outage longer "
        "than the storage retries costs the steps since the last checkpoint, not the run; a "
        "bug that fails every attempt still stops after 4 tries (Ray's own default of 0 suits "
        "a library whose caller decides, not a training job left running overnight).",
    )
    address: str | None = Field(
        default=None,
        description="Ray address to join ('auto', 'ray://...'); unset = a fresh local Ray of the "
        "job's own, or inside a Ray job (RAY_ADDRESS set) the job's cluster.",
    )

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (v, v) if isinstance(v, int) else v
        if low < 1 or high < low:
            raise ValueError("use a count >= 1 or [min, max] with 1 <= min <= max")
        return v

    @property
    def max_workers(self) -> int:
        """The most workers the job can run (what a local Ray is sized for)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class RunSection(Section):
    name: str = Field(description="Run name: outputs go to {output}/{name}/.")
    output: str = Field(description="URI for checkpoints, report.json and the exported model.")
    keep_checkpoints: int = Field(
        default=2, ge=1,
        description="Checkpoints kept besides the latest and the best: retention always keeps "
        "the latest (a resume starts there) and the best by dev F1 (by step without an eval "
        "set; export takes it), and besides those two up to `keep_checkpoints` more, the next "
        "best, so a damaged latest always leaves another to resume from. Checkpoint-only "
        "saves (train.checkpoint_every) rank below every evaluated one.",
    )  # fmt: skip

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (it becomes a storage prefix)")
        return v


class StorageSection(Section):
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto); credentials come from the "
        "environment (AWS_ACCESS_KEY_ID/...), never from this file.",
    )  # fmt: skip
    profile: str | None = Field(default=None, description="Named AWS profile.")


class JobConfig(Section):
    task: str = Field(
        description="What the model learns, by task spec name (shardtune.data.tasks): 'ner' "
        "(token classification) or 'classify' (sequence classification)."
    )
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    run: RunSection
    storage: StorageSection = Field(default_factory=StorageSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from shardtune.data.tasks import TASK_NAMES

        if v not in TASK_NAMES:
            raise ValueError(f"must be one of {', '.join(TASK_NAMES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        problems = []
        t = self.train
        if t.offload == "cpu" and t.zero_stage == 0:
            problems.append("train.offload: 'cpu' needs train.zero_stage >= 1")
        if t.precision == "fp16" and not self.cluster.use_gpu:
            problems.append(
                "train.precision: fp16 needs cluster.use_gpu: true (use auto, bf16-mixed, bf16 or fp32 on CPU)"
            )
        if t.early_stopping.patience is not None and self.data.eval is None:
            problems.append("train.early_stopping.patience: needs data.eval (it watches dev F1)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def storage_options(self):
        from shardtune.data.storage import StorageOptions

        return StorageOptions(endpoint_url=self.storage.endpoint_url, profile=self.storage.profile)

    def worker_config(self, *, fault: str | None = None, log_level: str = "INFO") -> WorkerConfig:
        """What the workers receive: their own sections, not this head-side tree."""
        from shardtune.data import storage

        return WorkerConfig(
            task=self.task, model=self.model, data=self.data, train=self.train,
            storage=self.storage_options(), run_uri=storage.join(self.run.output, self.run.name),
            tracking=self.tracking, config_text=yaml.safe_dump(to_public_dict(self), sort_keys=False),
            use_gpu=self.cluster.use_gpu, fault=fault, log_level=log_level,
        )  # fmt: skip


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError("overrides", [f"{dotted}: '{key}' is not a section"])
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.lr=1e-4 cluster.num_workers=4`: values parse as YAML scalars (1e-4, true, null)."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, float) or (
            isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value)
        ):
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
        _set_dotted(tree, key, value)
    if problems:
        raise ConfigError("overrides", problems)
    return tree


def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown field (typo?)"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{path}: {msg}{shown}"


def validate_tree(tree: Any, source: str) -> JobConfig:
    if not isinstance(tree, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections"])
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if err["type"] == "value_error" and not err["loc"]:
                problems.extend(
                    p.strip() for p in err["msg"].removeprefix("Value error, ").split(";")
                )
            else:
                problems.append(_format_error(err))
        raise ConfigError(source, problems) from None


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML job file (local path), apply overrides, validate; ConfigError lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(
            str(path), [f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]
        ) from None
    if isinstance(tree, dict):
        tree = apply_overrides(tree, overrides or [])
    return validate_tree(tree, str(path))


def to_public_dict(config: JobConfig) -> dict[str, Any]:
    """The resolved config as written into checkpoints and report.json (holds no secrets:
    the schema has no credential fields, and endpoint URLs lose any user:password part)."""
    tree = config.model_dump(mode="json")
    url = tree["storage"].get("endpoint_url")
    if url and "@" in url:
        scheme, _, rest = url.partition("://")
        tree["storage"]["endpoint_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return tree
