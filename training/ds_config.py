"""Build the DeepSpeed config dict from the job's train section, and pick the precision and ZeRO
stage a worker actually runs (pure; unit-tested)."""

from __future__ import annotations

from typing import Any

from shardtune.data.device import cpu_has_bf16


def total_optimizer_steps(
    examples_per_rank: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None
) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps for the run). Every rank gets the same
    `examples_per_rank`, so both numbers are identical on all ranks."""
    micro_per_epoch = max(1, -(-examples_per_rank // batch_size))
    steps = max(1, (micro_per_epoch * epochs) // grad_accum)
    if max_steps is not None:
        steps = min(steps, max_steps)
    return micro_per_epoch, steps


def resolve_precision(requested: str, *, on_gpu: bool, gpu_bf16: bool, cpu_flags: str) -> str:
    """The precision a worker runs for `train.precision`: "auto" becomes bf16 on a GPU that
    supports it (DeepSpeed's bf16, the usual GPU recipe), bf16-mixed on a CPU with native bf16
    (autocast keeps fp32 weights and optimizer, so results stay close to fp32), fp32 otherwise.
    The CPU choice is gated on the device: a GPU run never sees it."""
    if requested != "auto":
        return requested
    if on_gpu:
        return "bf16" if gpu_bf16 else "fp32"
    return "bf16-mixed" if cpu_has_bf16(cpu_flags) else "fp32"


def effective_zero_stage(zero_stage: int, world_size: int, offload: str) -> int:
    """A single worker has nothing to partition: ZeRO 1-3 would only add bookkeeping (flat
    buffers, a reduce per bucket), so it runs stage 0 unless offload needs a ZeRO stage."""
    if world_size == 1 and offload == "none":
        return 0
    return zero_stage


def build_deepspeed_config(
    *,
    batch_size: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    total_steps: int,
    precision: str,
    zero_stage: int,
    offload: str,
    grad_clip: float,
) -> dict[str, Any]:
    """`precision` is a resolved one (see resolve_precision): fp32, bf16-mixed, bf16 or fp16."""
    if precision not in ("fp32", "bf16-mixed", "bf16", "fp16"):
        raise ValueError(f"precision: {precision!r} is not fp32, bf16-mixed, bf16 or fp16")
    if not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage: {zero_stage} is not in 0..3")
    if offload == "cpu" and zero_stage == 0:
        raise ValueError("offload: 'cpu' needs zero_stage >= 1")
    warmup_steps = max(1, round(warmup * total_steps)) if warmup > 0 else 0

    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        # overlap_comm would reorder reductions across buckets; off keeps CPU runs deterministic.
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if zero_stage == 3:
        # Gather full weights on save so the checkpoint also carries a consolidated model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": weight_decay,
                # With offload DeepSpeed needs its own CPU Adam; otherwise torch's AdamW, which
                # needs no compiled DeepSpeed op. fused=True (one vectorised kernel over all
                # parameters, on CPU and CUDA alike) takes about a third of the time of the
                # per-tensor default on CPU.
                "torch_adam": offload != "cpu",
                "adam_w_mode": True,
                **({"fused": True} if offload != "cpu" else {}),
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",  # DeepSpeed's default is "log"
                "total_num_steps": max(total_steps, warmup_steps + 1),
            },
        },
        "steps_per_print": 10**9,  # shardtune prints its own progress
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "bf16-mixed":
        # DeepSpeed runs the forward under torch.autocast and, for the layers autocast computes
        # in bf16 (Linear), reduces their gradients in bf16: half the bytes between workers.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
