"""Evaluation over a list of prepared rows: encode, predict, and count mergeable metrics.

The same function serves a training worker (DeepSpeed engine, its part of the eval set, then an
all-reduce of the counts) and the `evaluate` verb (a plain transformers model, the whole set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from shardtune.data.alignment import IGNORE_INDEX, AlignmentStats
from shardtune.data.collate import collate
from shardtune.data.device import autocast, resolve_inference_precision
from shardtune.data.tasks import get_task
from shardtune.training import metrics


def metric_names(task: str, labels: Sequence[str]) -> list[str]:
    """Rows of the count tensor: entity types (ner) or class names (classify)."""
    return get_task(task).metric_names(labels)


def encode_row(
    task: str,
    row: dict,
    tokenizer: Any,
    label2id: dict[str, int],
    max_length: int,
    stats: AlignmentStats,
) -> list:
    """One prepared row -> its model inputs (NER: one or more windows; classify: one text).
    Labels unknown to the model (possible only when evaluating foreign data) get IGNORE_INDEX."""
    return get_task(task).encode(row, tokenizer, label2id, max_length, stats)


@dataclass
class EvalResult:
    counts: np.ndarray  # [len(names), 3] tp, predicted, gold
    loss_sum: float = 0.0  # summed over batches
    batches: int = 0
    examples: int = 0
    predictions: list[list[str]] | list[str] = field(default_factory=list)  # per row, if kept


def evaluate_rows(
    forward: Callable[[dict[str, torch.Tensor]], Any],
    rows: Sequence[dict],
    *,
    task: str,
    labels: Sequence[str],
    names: Sequence[str],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    min_batches: int = 0,
    keep_predictions: bool = False,
) -> EvalResult:
    """Predict `rows` in batches of `batch_size` rows and count against their gold labels.

    `min_batches`: run dummy forward passes until this many batches ran. Under ZeRO-3 every
    forward all-gathers parameters, so ranks holding fewer eval rows must keep stepping in
    lockstep or the others hang.
    """
    spec = get_task(task)
    label2id = {label: i for i, label in enumerate(labels)}
    stats = AlignmentStats()
    counts = np.zeros((len(names), 3), dtype=np.int64)
    result = EvalResult(counts=counts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    last_batch = None
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        per_row = [spec.encode(row, tokenizer, label2id, max_length, stats) for row in chunk]
        items = [item for encoded in per_row for item in encoded]
        batch = collate(items, pad_id)
        batch.pop("num_tokens")
        batch = {k: v.to(device) for k, v in batch.items()}
        last_batch = batch
        with torch.no_grad():
            out = forward(batch)
        result.loss_sum += float(out.loss.float()) if out.loss is not None else 0.0
        result.batches += 1
        # Logits, not argmax ids: how scores become labels is the task's call (multi-label
        # thresholds them).
        logits = out.logits.float().cpu().numpy()
        gold, pred = [], []
        k = 0
        for row, encoded in zip(chunk, per_row, strict=True):
            n = len(encoded)
            gold.append(spec.gold(row))
            pred.append(spec.prediction(encoded, list(logits[k : k + n]), labels))
            k += n
        counts += spec.counts(gold, pred, names)
        if keep_predictions:
            result.predictions.extend(pred)
        result.examples += len(chunk)
    while result.batches < min_batches:  # lockstep padding; output discarded
        if last_batch is None:
            last_batch = _dummy_batch(pad_id, device, spec.labels_per_token)
        with torch.no_grad():
            forward(last_batch)
        result.batches += 1
    return result


def _dummy_batch(
    pad_id: int, device: torch.device | str, labels_per_token: bool
) -> dict[str, torch.Tensor]:
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    shape = (1, 2) if labels_per_token else (1,)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def confusion_matrix(gold: Sequence[str], pred: Sequence[str], names: Sequence[str]) -> dict:
    """{"labels": names, "matrix": rows = gold label, columns = predicted label} (pure)."""
    index = {name: i for i, name in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for g, p in zip(gold, pred, strict=True):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return {"labels": list(names), "matrix": matrix}


def eval_device(cuda_available: bool) -> torch.device:
    """Where `evaluate_exported` runs the model: the GPU when this process sees one (the Ray task
    of a GPU job reserves one and Ray sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    return torch.device("cuda", 0) if cuda_available else torch.device("cpu")


def evaluate_exported(
    model_uri: str,
    data_uri: str,
    *,
    options: Any = None,
    batch_size: int = 32,
    max_length: int | None = None,
    keep_predictions: bool = False,
    precision: str = "fp32",
) -> dict:
    """Entity-level (or per-class) report for an exported model on a prepared dataset, in one
    process with plain transformers: what `launch.py evaluate` prints and report.json holds.
    `precision` ("fp32" | "bf16" | "auto", data/device.py): fp32 scores the weights exactly as
    plain transformers runs them; "auto" scores them as `serve` runs them by default on the same
    kind of device (both resolve auto for the device they run on)."""
    import time

    from shardtune.data.manifest import DatasetError, read_all_rows
    from shardtune.training.model import load_exported, resolve_model_dir

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model_uri, options)
    model, tokenizer, task = load_exported(model_dir)
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    manifest, rows = read_all_rows(data_uri, options)
    if manifest.task != task:
        raise DatasetError(
            f"{data_uri} is a {manifest.task!r} dataset but {model_uri} is a {task!r} model"
        )
    # The model's label set and the data's can differ (foreign data); count over both.
    names = sorted(set(metric_names(task, labels)) | set(metric_names(task, manifest.labels)))
    max_length = max_length or getattr(model.config, "shardtune_max_length", None) or 128
    device = eval_device(torch.cuda.is_available())
    model.to(device).eval()  # batches follow it in evaluate_rows
    precision = resolve_inference_precision(precision, device)

    def forward(batch: dict[str, torch.Tensor]) -> Any:
        with autocast(precision, device):
            return model(**batch)

    result = evaluate_rows(
        forward, rows, task=task, labels=labels, names=names, tokenizer=tokenizer,
        max_length=max_length, batch_size=batch_size, device=device,
        keep_predictions=True,  # also for the confusion matrix
    )  # fmt: skip
    report = {
        "model": model_uri,
        "data": data_uri,
        "task": task,
        "examples": result.examples,
        "loss": result.loss_sum / max(1, result.batches),
        "seconds": time.perf_counter() - t0,
        "device": device.type,
        "precision": precision,
        **metrics.scores_from_counts(result.counts, names),
    }
    gold = [get_task(task).gold(row) for row in rows]
    if gold and all(isinstance(g, str) for g in gold):  # one label per example: a confusion matrix
        report["confusion"] = confusion_matrix(gold, result.predictions, names)
    if keep_predictions:
        report["predictions"] = {
            row["id"]: p for row, p in zip(rows, result.predictions, strict=True)
        }
    return report
