"""The job file: one validated tree (pydantic) loaded from YAML plus dotted `key=value` overrides.

An invalid job fails here, before Ray starts, with every bad field named by its dotted path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """Every problem found in a job file, each naming its field path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid job config {source} ({len(problems)} problem(s)):\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = Field(
        description="Local directory or URI of a Hugging Face model (weights + tokenizer). "
        "Never fetched from a hub at run time."
    )
    dropout: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Override hidden/attention dropout; None keeps the model's.",
    )


class DataSection(_Section):
    train: str = Field(
        description="URI of the prepared training set (directory with manifest.json)."
    )
    eval: str | None = Field(default=None, description="URI of the prepared evaluation set.")
    test: str | None = Field(
        default=None, description="URI of the prepared test set (final report)."
    )
    max_length: int = Field(
        default=128, ge=8, le=8192,
        description="Max sub-word tokens per window incl. special tokens; longer NER "
        "sentences are split into windows, never truncated.",
    )  # fmt: skip
    shards_in_memory: int = Field(
        default=2, ge=1, description="Shards each worker holds at once (current + prefetched)."
    )


class TrainSection(_Section):
    epochs: int = Field(default=3, ge=1, description="Passes over the training set.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optional cap on optimizer steps."
    )
    lr: float = Field(default=5e-5, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Sentences (or texts) per micro-batch, per worker; a long sentence adds several windows.",
    )
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    warmup: float = Field(
        default=0.1, ge=0, le=1, description="Fraction of steps of linear warmup."
    )
    grad_clip: float = Field(default=1.0, ge=0, description="Gradient norm clip; 0 disables.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision."
    )
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    offload: Literal["none", "cpu"] = Field(
        default="none",
        description="ZeRO offload of optimizer state (stage>=1) and params (stage 3).",
    )
    seed: int = Field(default=0, description="Seed for init, data order and dropout.")
    eval_every: int | Literal["epoch"] = Field(
        default="epoch",
        description="Evaluate (and checkpoint) every N optimizer steps, or each epoch.",
    )
    checkpoint_every_minutes: float | None = Field(
        default=None, gt=0,
        description="Also evaluate and checkpoint when this many minutes passed since the last "
        "checkpoint (checked after each optimizer step; rank 0's clock decides for all ranks). "
        "None: only eval_every.",
    )  # fmt: skip
    log_every: int = Field(default=10, ge=1, description="Progress line every N optimizer steps.")
    ledger: bool = Field(
        default=False,
        description="Record the example ids every rank consumes, per micro-batch, under "
        "{run.output}/{run.name}/ledger/ (flushed at each report; data/ledger.py reads back what "
        "the run committed across restarts). For audits and tests; costs one small write per report.",
    )  # fmt: skip

    @field_validator("eval_every")
    @classmethod
    def _positive_eval_every(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of steps or 'epoch'")
        return v


class ClusterSection(_Section):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (one per GPU on GPU).")
    use_gpu: bool = Field(default=False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(
        default=0,
        ge=-1,
        description="Worker-group restarts from the latest checkpoint; -1 = unlimited.",
    )
    address: str | None = Field(
        default=None,
        description="Ray address to join ('auto', 'ray://...'); unset = start a local Ray.",
    )


class RunSection(_Section):
    name: str = Field(description="Run name: outputs go to {output}/{name}/.")
    output: str = Field(description="URI for checkpoints, report.json and the exported model.")
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Checkpoints kept (best by eval F1)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (it becomes a storage prefix)")
        return v


class StorageSection(_Section):
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, moto); credentials come from the "
        "environment (AWS_ACCESS_KEY_ID/...), never from this file.",
    )  # fmt: skip
    profile: str | None = Field(default=None, description="Named AWS profile.")


class JobConfig(_Section):
    task: Literal["ner", "classify"] = Field(
        description="Token classification or sequence classification."
    )
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    run: RunSection
    storage: StorageSection = Field(default_factory=StorageSection)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        problems = []
        t = self.train
        if t.offload == "cpu" and t.zero_stage == 0:
            problems.append("train.offload: 'cpu' needs train.zero_stage >= 1")
        if t.precision == "fp16" and not self.cluster.use_gpu:
            problems.append(
                "train.precision: fp16 needs cluster.use_gpu: true (use bf16 or fp32 on CPU)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def storage_options(self):
        from shardtune.data.storage import StorageOptions

        return StorageOptions(endpoint_url=self.storage.endpoint_url, profile=self.storage.profile)


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
