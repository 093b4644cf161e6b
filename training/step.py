"""The model side of a worker: the DeepSpeed engine it builds (`build_engine`) and the step it
takes (`Trainer.train_step`: forward, backward, DeepSpeed's step) on the `TrainState` that
checkpoints save. No Ray: a unit test drives it on a one-process gloo group."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from shardtune.data.collate import collate
from shardtune.data.device import read_cpu_flags
from shardtune.data.tasks import get_task
from shardtune.training.checkpoint import TrainState
from shardtune.training.config import WorkerConfig
from shardtune.training.ds_config import (
    build_deepspeed_config,
    effective_zero_stage,
    resolve_precision,
)
from shardtune.training.feed import MicroBatch, advance
from shardtune.training.meter import PHASES, Meter
from shardtune.training.model import build_model, build_tokenizer, resolve_model_dir
from shardtune.training.parameter_efficient import apply_peft, parameter_counts

if TYPE_CHECKING:  # names for readers and the checker; imported only where a worker runs them
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase as Tokenizer

CUDA_TIMING_EVERY = 20  # on a GPU, time the phases of every 20th micro-batch (needs syncs)
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class Engine:
    """What `build_engine` made, and how it runs on this device and world size."""

    engine: DeepSpeedEngine
    tokenizer: Tokenizer
    precision: str
    zero_stage: int
    trainable_params: int
    total_params: int


def build_engine(cfg: WorkerConfig, labels: list[str], world: int, total_steps: int) -> Engine:
    """The model with its task head (and PEFT), wrapped by DeepSpeed with the precision and
    ZeRO stage this device and world size run (training/ds_config.py decides)."""
    import deepspeed

    tc = cfg.train
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.storage)
    tokenizer = build_tokenizer(model_dir)
    model = build_model(model_dir, cfg.task, labels, cfg.model.dropout)
    model.config.shardtune_task = cfg.task  # read back by `evaluate` and `serve`
    model.config.shardtune_max_length = cfg.data.max_length
    # The class the weights belong to (a bare encoder's config still names BertModel): what
    # export rebuilds and what the exported config.json tells transformers.
    model.config.architectures = [type(model).__name__]
    model = apply_peft(model, cfg.model.peft, get_task(cfg.task).head_class, cfg.model.name_or_path)
    trainable, total = parameter_counts(model)
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    precision = resolve_precision(
        tc.precision,
        on_gpu=on_gpu,
        cpu_flags=read_cpu_flags(),
        gpu_bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )
    stage = effective_zero_stage(tc.zero_stage, world, tc.offload)
    ds_config = build_deepspeed_config(
        batch_size=tc.batch_size,
        grad_accum=tc.grad_accum,
        world_size=world,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        warmup=tc.warmup,
        total_steps=total_steps,
        precision=precision,
        zero_stage=stage,
        offload=tc.offload,
        grad_clip=tc.grad_clip,
    )
    groups = param_groups(model, tc.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if world == 1 and stage == 0:
        # Alone, DeepSpeed still flattens every gradient into buckets, "all-reduces" them with
        # itself and copies them back after each backward: three passes over the gradients for
        # an identity. Skipping it changes no number.
        engine.enable_backward_allreduce = False
    return Engine(engine, tokenizer, precision, stage, trainable, total)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: no weight decay on biases and norms; frozen parameters get no Adam state."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not n.endswith(NO_DECAY)]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
    ]


@dataclass
class Trainer:
    """Runs micro-batches through the engine and counts them in the meter."""

    engine: DeepSpeedEngine
    grad_accum: int
    pad_id: int
    state: TrainState = field(default_factory=TrainState)
    meter: Meter = field(default_factory=Meter)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def train_step(self, batch: MicroBatch) -> bool:
        """Forward, backward and DeepSpeed's step (which applies the optimizer only at the end of
        an accumulation); advances the state. True when an optimizer step happened."""
        m, engine, device = self.meter, self.engine, self.device
        cuda = device.type == "cuda"
        timed = not cuda or m.micro_batches % CUDA_TIMING_EVERY == 0
        marks = [time.perf_counter()]

        def mark() -> None:
            if timed:
                if cuda:
                    torch.cuda.synchronize()  # attribute GPU time to the phase that queued it
                marks.append(time.perf_counter())

        tensors = collate(batch.items, self.pad_id)
        n_tokens = tensors.pop("num_tokens")
        tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        mark()
        loss = engine(**tensors).loss  # under torch.autocast when precision is bf16-mixed
        mark()
        engine.backward(loss)
        mark()
        engine.step()
        mark()
        end = time.perf_counter()
        if timed:
            for phase, (a, b) in zip(PHASES, zip(marks, marks[1:], strict=False), strict=True):
                m.phase_seconds[phase] += b - a
            m.timed_seconds += end - marks[0]
        m.seconds += end - marks[0]
        m.loss_sum = m.loss_sum + loss.detach().float()
        m.loss_n += 1
        m.examples += len(batch.rows)
        m.tokens += n_tokens
        m.padded_tokens += tensors["input_ids"].numel()
        m.micro_batches += 1
        advance(self.state, batch)
        return self.at_boundary

    @property
    def at_boundary(self) -> bool:
        """Whether no accumulation is under way: mid-accumulation gradients are not part of
        DeepSpeed's state and would be lost on resume, so checkpoints wait for a boundary."""
        return self.state.micro_step % self.grad_accum == 0

    def on_optimizer_step(self) -> None:
        self.state.step += 1
        self.meter.first_step_unix = self.meter.first_step_unix or time.time()
