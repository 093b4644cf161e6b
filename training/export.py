"""Consolidation: a checkpoint's ZeRO partitions (any stage) -> one plain Hugging Face model
directory. Runs at export and on demand (`consolidate`), never inside a training step."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from typing import Any

import torch
from shardtune.training.checkpoint import DS_TAG, HF_CONFIG, CheckpointError

log = logging.getLogger(__name__)


def full_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a complete local checkpoint. ZeRO 1-3: DeepSpeed's
    zero_to_fp32 merges every rank's fp32 master partitions (the exact optimizer weights, not
    the bf16 copies). ZeRO-0 keeps whole weights in mp_rank_00_model_states.pt."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = os.path.join(ckpt_dir, DS_TAG)
    tag_dir = os.path.join(ds_dir, DS_TAG)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{ckpt_dir}: no DeepSpeed state under {DS_TAG}/{DS_TAG}/")
    if glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=DS_TAG)
    else:  # ZeRO-0 (also with DeepSpeed's bf16 optimizer, whose files zero_to_fp32 cannot read)
        blob = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"),
                          map_location="cpu", weights_only=False)  # fmt: skip
        state = blob["module"]
    return {
        k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in state.items()
    }


def consolidate(ckpt_dir: str, out_dir: str) -> dict[str, Any]:
    """Write `out_dir`: safetensors weights, config (label maps, task) and tokenizer, loadable
    by `AutoModelFor...from_pretrained` as is. `ckpt_dir` is a complete, verified local copy
    (every rank's partition). Returns the state dict written (for callers that check it)."""
    import transformers

    config_dir = os.path.join(ckpt_dir, HF_CONFIG)
    config = transformers.AutoConfig.from_pretrained(config_dir)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise CheckpointError(f"{ckpt_dir}: {HF_CONFIG}/config.json names no known architecture")
    state = full_state_dict(ckpt_dir)
    from shardtune.training.parameter_efficient import has_adapter, save_merged

    if has_adapter(config_dir):  # LoRA: the merged model, and adapter/ beside it
        shutil.copytree(config_dir, out_dir, dirs_exist_ok=True)  # tokenizer files
        save_merged(cls, config, state, config_dir, out_dir)
        return state
    with torch.device("meta"):  # no second random copy of the weights in memory
        model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # Buffers a model rebuilds itself (position ids) may be absent; a weight may not.
    missing = [k for k in missing if k in dict(model.named_parameters())]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir}: partitions do not match {arch}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    shutil.copytree(config_dir, out_dir, dirs_exist_ok=True)  # tokenizer files
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    log.info("consolidated %s -> %s (%d tensors)", ckpt_dir, out_dir, len(state))
    return state
