"""Parameter-efficient fine-tuning (model.peft): LoRA through the `peft` library and BitFit, and
the export of such a model as a merged plain Hugging Face directory with `adapter/` beside it."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from shardtune.training.config import PeftSection

log = logging.getLogger(__name__)

# The attention projections and every dense layer of a BERT-like encoder (attention output,
# intermediate, output, pooler); `peft` matches these as module-name suffixes.
BERT_LIKE_TARGETS = ["query", "key", "value", "dense"]
HEAD_NAMES = ("classifier", "score")  # the task heads of transformers' *ForXClassification
ADAPTER_DIR = "adapter"
# peft's task type for each task head class: with it peft trains and saves the head with the adapter
PEFT_TASK_TYPES = {
    "AutoModelForTokenClassification": "TOKEN_CLS",
    "AutoModelForSequenceClassification": "SEQ_CLS",
}


def apply_peft(model: Any, section: PeftSection, head_class: str, base_uri: str) -> Any:
    """`model` made parameter-efficient as `section` says (the same model when method is none).
    `head_class` (the task's Auto class) picks peft's task type, with which peft keeps the task
    head trainable and saves it with the adapter. `base_uri` goes into adapter_config.json so the adapter names
    the model it belongs on rather than a worker's temporary copy."""
    if section.method == "none":
        return model
    if section.method == "bitfit":
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith(".bias") or _in_head(name)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=PEFT_TASK_TYPES[head_class], r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=section.target_modules or BERT_LIKE_TARGETS,
    )  # fmt: skip
    wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base_uri
    return wrapped


def lora_module_names(model: Any) -> list[str]:
    """Names of the modules LoRA wrapped (for the log line: what the adapter really touches)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _in_head(name: str) -> bool:
    return name.split(".", 1)[0] in HEAD_NAMES


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters. Under ZeRO-3 a partitioned parameter is empty on each
    rank and `ds_numel` holds its real size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def is_peft_model(module: Any) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def save_adapter_config(module: Any, out_dir: str) -> None:
    """Rank 0, into a checkpoint's config directory: the adapter's config, so export can rebuild
    the PEFT model around the consolidated weights (nothing, for a model without an adapter)."""
    if is_peft_model(module):
        module.peft_config["default"].save_pretrained(os.path.join(out_dir, ADAPTER_DIR))
        # The wrapped model's config names peft's wrapper (PeftModelForTokenClassification)
        # once training ran; export rebuilds the transformers class the weights belong to.
        base = module.get_base_model()
        base.config.architectures = [type(base).__name__]
        base.config.save_pretrained(out_dir)


def has_adapter(config_dir: str) -> bool:
    return os.path.isfile(os.path.join(config_dir, ADAPTER_DIR, "adapter_config.json"))


def save_merged(model_cls: Any, config: Any, full_state: dict[str, torch.Tensor],
                config_dir: str, out_dir: str) -> None:  # fmt: skip
    """Write a LoRA model as a plain Hugging Face directory in `out_dir` (LoRA merged into the
    weights, no adapter keys left) with its adapter (config and weights, the task head
    included) in `out_dir/adapter/`. `full_state` holds the consolidated fp32 weights of the
    whole PEFT model; peft itself rebuilds the model around them and merges."""
    from peft import PeftConfig, get_peft_model

    peft_config = PeftConfig.from_pretrained(os.path.join(config_dir, ADAPTER_DIR))
    base = model_cls(config)
    base.config._name_or_path = peft_config.base_model_name_or_path  # else peft renames it
    model = get_peft_model(base, peft_config)
    missing, unexpected = model.load_state_dict(full_state, strict=False)
    missing = [k for k in missing if k in dict(model.named_parameters())]  # buffers rebuild
    if missing or unexpected:
        raise RuntimeError(
            f"PEFT weights do not fit {model_cls.__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.save_pretrained(os.path.join(out_dir, ADAPTER_DIR))
    model.merge_and_unload().save_pretrained(out_dir)
