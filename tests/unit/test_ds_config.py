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
