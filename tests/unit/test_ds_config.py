"""The DeepSpeed config builder."""

import pytest
from shardtune.training.ds_config import build_deepspeed_config, total_optimizer_steps

BASE = dict(batch_size=8, grad_accum=2, world_size=4, lr=1e-4, weight_decay=0.01, warmup=0.1,
            total_steps=100, precision="fp32", zero_stage=2, offload="none", grad_clip=1.0)  # fmt: skip


def test_batch_sizes_and_schedule():
    cfg = build_deepspeed_config(**BASE)
    assert cfg["train_batch_size"] == 8 * 2 * 4
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 2
    sched = cfg["scheduler"]["params"]
    assert sched["warmup_num_steps"] == 10 and sched["total_num_steps"] == 100
    assert sched["warmup_type"] == "linear" and sched["warmup_max_lr"] == 1e-4
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert "bf16" not in cfg and "fp16" not in cfg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages(stage):
    zero = build_deepspeed_config(**{**BASE, "zero_stage": stage})["zero_optimization"]
    assert zero["stage"] == stage
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)


def test_precision_blocks():
    assert build_deepspeed_config(**{**BASE, "precision": "bf16"})["bf16"] == {"enabled": True}
    fp16 = build_deepspeed_config(**{**BASE, "precision": "fp16"})["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling


def test_offload():
    z2 = build_deepspeed_config(**{**BASE, "offload": "cpu"})
    assert z2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in z2["zero_optimization"]
    assert z2["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's CPU Adam
    z3 = build_deepspeed_config(**{**BASE, "offload": "cpu", "zero_stage": 3})
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        build_deepspeed_config(**{**BASE, "offload": "cpu", "zero_stage": 0})


def test_no_warmup_and_bad_values():
    assert (
        build_deepspeed_config(**{**BASE, "warmup": 0.0})["scheduler"]["params"]["warmup_num_steps"]
        == 0
    )
    with pytest.raises(ValueError, match="precision"):
        build_deepspeed_config(**{**BASE, "precision": "fp8"})
    with pytest.raises(ValueError, match="zero_stage"):
        build_deepspeed_config(**{**BASE, "zero_stage": 4})


def test_total_optimizer_steps():
    assert total_optimizer_steps(100, 16, 1, 3, None) == (7, 21)
    assert total_optimizer_steps(100, 16, 2, 3, None) == (7, 10)
    assert total_optimizer_steps(100, 16, 1, 3, 5) == (7, 5)
    assert total_optimizer_steps(1, 16, 4, 1, None) == (1, 1)


def test_auto_precision_is_gated_on_the_device():
    from shardtune.training.ds_config import resolve_precision

    bf16_cpu, old_cpu = "fpu sse2 avx512f avx512_bf16", "fpu sse2 avx2"
    assert (
        resolve_precision("auto", on_gpu=False, gpu_bf16=False, cpu_flags=bf16_cpu) == "bf16-mixed"
    )
    assert (
        resolve_precision("auto", on_gpu=False, gpu_bf16=False, cpu_flags="amx_bf16")
        == "bf16-mixed"
    )
    assert resolve_precision("auto", on_gpu=False, gpu_bf16=False, cpu_flags=old_cpu) == "fp32"
    # a GPU run never sees the CPU's choice, whatever the host CPU has
    assert resolve_precision("auto", on_gpu=True, gpu_bf16=True, cpu_flags=bf16_cpu) == "bf16"
    assert resolve_precision("auto", on_gpu=True, gpu_bf16=False, cpu_flags=bf16_cpu) == "fp32"
    assert resolve_precision("fp32", on_gpu=False, gpu_bf16=False, cpu_flags=bf16_cpu) == "fp32"


def test_bf16_mixed_is_torch_autocast_and_the_optimizer_is_fused():
    cfg = build_deepspeed_config(
        batch_size=8, grad_accum=1, world_size=2, lr=1e-4, weight_decay=0.0, warmup=0.0,
        total_steps=10, precision="bf16-mixed", zero_stage=2, offload="none", grad_clip=1.0,
    )  # fmt: skip
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in cfg  # fp32 weights and optimizer state
    assert cfg["optimizer"]["params"]["fused"] is True and cfg["optimizer"]["params"]["torch_adam"]
    offloaded = build_deepspeed_config(
        batch_size=8, grad_accum=1, world_size=2, lr=1e-4, weight_decay=0.0, warmup=0.0,
        total_steps=10, precision="fp32", zero_stage=2, offload="cpu", grad_clip=1.0,
    )  # fmt: skip
    assert "fused" not in offloaded["optimizer"]["params"]  # DeepSpeed's CPU Adam takes over


def test_a_single_worker_runs_zero_0_unless_offloading():
    from shardtune.training.ds_config import effective_zero_stage

    assert effective_zero_stage(2, 1, "none") == 0
    assert effective_zero_stage(3, 1, "cpu") == 3
    assert effective_zero_stage(2, 4, "none") == 2
