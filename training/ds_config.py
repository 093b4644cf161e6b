"""Build the DeepSpeed config dict from the job's train section (pure; unit-tested)."""

from __future__ import annotations

from typing import Any


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
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision: {precision!r} is not fp32, bf16 or fp16")
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
                # With offload DeepSpeed needs its own CPU Adam; otherwise plain torch AdamW
                # avoids compiling fused CUDA/CPU kernels on machines that cannot.
                "torch_adam": offload != "cpu",
                "adam_w_mode": True,
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
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
