"""The worker side's own typed config: the model, data and train sections of a job file (defined
here, composed into the job tree by shardtune.cluster.config) and `WorkerConfig`, the one object
a Ray Train worker receives. Nothing here knows about Ray, the head or the cluster section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from shardtune.data.storage import StorageOptions


class Section(BaseModel):
    """A job-file section: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PeftSection(Section):
    method: Literal["none", "lora", "bitfit"] = Field(
        default="none",
        description="none: full fine-tuning. lora: low-rank adapters (the `peft` library) on "
        "`target_modules`. bitfit: only biases train. The task head always trains.",
    )
    r: int = Field(default=8, ge=1, description="LoRA rank.")
    alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator (scale alpha/r).")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names (suffixes) LoRA wraps; None = the attention projections and "
        "dense layers of a BERT-like encoder (query, key, value, dense).",
    )


class ModelSection(Section):
    name_or_path: str = Field(
        description="Local directory or URI of a Hugging Face model (weights + tokenizer), or "
        "`package:NAME` for a model a Python package ships. Never fetched from a hub at run time."
    )
    dropout: float | None = Field(
        default=None, ge=0, lt=1, description="Override hidden/attention dropout; None keeps the model's."
    )  # fmt: skip
    peft: PeftSection = Field(
        default_factory=lambda: PeftSection(),
        description="Parameter-efficient fine-tuning (LoRA, BitFit); none = every weight trains.",
    )


class DataSection(Section):
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


Precision = Literal["auto", "fp32", "bf16-mixed", "bf16", "fp16"]


class EarlyStoppingSection(Section):
    patience: int | None = Field(
        default=None, ge=1,
        description="Stop after this many evaluations without a dev micro-F1 gain of at least "
        "`min_delta` over the best so far; None = never stop early (needs data.eval).",
    )  # fmt: skip
    min_delta: float = Field(default=0.0, ge=0, description="Smallest micro-F1 gain that counts.")


class TrainSection(Section):
    epochs: int = Field(default=3, ge=1, description="Passes over the training set.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optional cap on optimizer steps."
    )
    lr: float = Field(default=5e-5, gt=0, le=1, description="Peak learning rate (AdamW).")
    batch_size: int = Field(
        default=16, ge=1,
        description="Sentences (or texts) per micro-batch, per worker; a long sentence adds several windows.",
    )  # fmt: skip
    length_grouping: int = Field(
        default=64, ge=1,
        description="Micro-batches per length group: each worker reads this many micro-batches' "
        "worth of its stream, sorts those sentences by token length and cuts them into "
        "micro-batches (then shuffled, longest first), so a batch pads to similar lengths. "
        "1 = batches in plain stream order. The groups are a pure function of (seed, epoch, "
        "position), so resume stays exact.",
    )  # fmt: skip
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    warmup: float = Field(
        default=0.1, ge=0, le=1, description="Fraction of steps of linear warmup."
    )
    grad_clip: float = Field(default=1.0, ge=0, description="Gradient norm clip; 0 disables.")
    precision: Precision = Field(
        default="auto",
        description="auto: bf16 on a GPU that supports it, bf16-mixed on a CPU with bf16 "
        "instructions (avx512_bf16 or AMX), else fp32. bf16-mixed: fp32 weights and optimizer, "
        "matrix products in bf16 (torch autocast). bf16: DeepSpeed's bf16 weights with fp32 "
        "master copy. fp16: GPU only.",
    )  # fmt: skip
    zero_stage: int = Field(
        default=2, ge=0, le=3,
        description="DeepSpeed ZeRO stage 0-3 (a single worker always runs stage 0: there is "
        "nothing to partition, and ZeRO's bookkeeping costs time).",
    )  # fmt: skip
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
    checkpoint_every: int | None = Field(
        default=None, ge=1,
        description="Also checkpoint (without evaluating) every N optimizer steps: checkpoint "
        "cadence apart from evaluation's. None: checkpoints only come with evaluations.",
    )  # fmt: skip
    checkpoint_upload: Literal["async", "sync"] = Field(
        default="async",
        description="async: Ray Train uploads a checkpoint in a background thread while training "
        "goes on (it counts once every rank's upload finished); sync: training waits for it.",
    )  # fmt: skip
    log_every: int = Field(default=10, ge=1, description="Progress line every N optimizer steps.")
    early_stopping: EarlyStoppingSection = Field(default_factory=lambda: EarlyStoppingSection())
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


class MlflowSection(Section):
    tracking_uri: str = Field(
        description="MLflow tracking URI: an http(s) server, or a local file store "
        "(file:///path) for offline runs. Credentials come from the environment "
        "(MLFLOW_TRACKING_TOKEN, ...), never from this file."
    )
    experiment: str = Field(default="shardtune", description="MLflow experiment name.")


class WandbSection(Section):
    project: str = Field(default="shardtune", description="W&B project.")
    entity: str | None = Field(default=None, description="W&B entity (team or user).")
    mode: Literal["online", "offline"] = Field(
        default="offline",
        description="offline: records under {run.output}/{run.name}/wandb/ for `wandb sync` "
        "(WANDB_API_KEY from the environment for online).",
    )


class TrackingSection(Section):
    tensorboard: bool = Field(
        default=True,
        description="Rank 0 writes TensorBoard event files, copied to "
        "{run.output}/{run.name}/tensorboard/ at every evaluation and at the end.",
    )
    mlflow: MlflowSection | None = Field(default=None, description="Also log to MLflow.")
    wandb: WandbSection | None = Field(default=None, description="Also log to Weights & Biases.")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray Train worker needs, built by the head from the validated job."""

    task: str
    model: ModelSection
    data: DataSection
    train: TrainSection
    storage: StorageOptions
    run_uri: str
    """{run.output}/{run.name}: checkpoints, ledger."""
    tracking: TrackingSection = field(default_factory=TrackingSection)
    config_text: str = ""
    """The resolved job config (YAML, secrets removed), written to the tracking backends."""
    use_gpu: bool = False
    fault: str | None = None
    """Test-only fault spec (training/faults.py); travels here because Ray workers inherit the
    raylet's environment, not the driver's."""
    log_level: str = "INFO"
    train_version: int | None = None
    """Manifest versions to read (None: the latest): the head pins a run to the versions it
    started on, so a resume after `prepare --append` finishes on the same data."""
    eval_version: int | None = None
