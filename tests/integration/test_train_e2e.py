"""End to end on a local Ray: 2 workers, a tiny random BERT, data and output in S3 (moto on
loopback), ZeRO stages 0, 2 and 3. The exported model must load with plain transformers and
predict what `evaluate` reports; distributed eval must equal seqeval over the whole set."""

from __future__ import annotations

import json

import pytest
import torch
from seqeval.metrics import classification_report
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import run_training
from shardtune.data import storage
from shardtune.data.manifest import read_all_rows
from shardtune.training.evaluation import evaluate_exported

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py


def job_for(stage: int, s3, prepared, tiny_model_dir, **train):
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": tiny_model_dir},
            "data": {
                "train": prepared["train"],
                "eval": prepared["dev"],
                "test": prepared["test"],
                "max_length": 32,
            },
            "train": {
                "epochs": 4,
                "lr": 3e-3,
                "batch_size": 8,
                "warmup": 0.1,
                "zero_stage": stage,
                "seed": 1,
                "log_every": 5,
                **train,
            },  # fmt: skip
            "cluster": {"num_workers": 2, "cpus_per_worker": 1},
            "run": {
                "name": f"tiny-zero{stage}",
                "output": f"s3://{BUCKET}/runs",
                "keep_checkpoints": 2,
            },
            "storage": {"endpoint_url": s3.endpoint_url},
        },
        "test",
    )


def plain_transformers_predictions(model_dir: str, rows: list[dict]) -> list[list[str]]:
    """What a user does with the exported directory and nothing of shardtune."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for row in rows:
        enc = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).tolist()
        seen, tags = set(), []
        for pos, word in enumerate(enc.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                tags.append(model.config.id2label[ids[pos]])
        out.append(tags)
    return out


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_train_export_evaluate(stage, s3, local_ray, prepared, tiny_model_dir, tmp_path):
    job = job_for(stage, s3, prepared, tiny_model_dir)
    options = job.storage_options()
    report = run_training(job)

    # report.json in storage is what the driver returned
    stored = json.loads(
        storage.read_text(f"s3://{BUCKET}/runs/tiny-zero{stage}/report.json", options)
    )
    assert stored["best_checkpoint"] == report["best_checkpoint"]
    history = report["history"]
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]  # it learned
    assert (
        report["throughput"]["train_examples_per_s"] > 0
        and report["throughput"]["train_tokens_per_s"] > 0
    )
    assert report["timing"]["wall_seconds"] > 0 and report["test"]["examples"] > 0
    assert "secret" not in json.dumps(report).lower()

    # retention: 4 evaluations wrote 4 checkpoints; the latest, the best and the next
    # keep_checkpoints (2) best by eval_f1 stay (Ray: the top 3 by score plus the latest)
    names = storage.list_names(f"s3://{BUCKET}/runs/tiny-zero{stage}", options)
    assert "model" in names
    f1_at = {h["step"]: h["eval_f1"] for h in history if h.get("eval_f1") is not None}
    assert len(f1_at) == 4, history
    kept = sorted(n for n in names if n.startswith("checkpoint-"))
    kept_steps = {int(n.removeprefix("checkpoint-")) for n in kept}  # checkpoint-{step:08d}
    ranked = sorted(f1_at, key=lambda s: (f1_at[s], s), reverse=True)
    assert kept_steps == {*ranked[:3], max(f1_at)}, (kept, f1_at)
    assert report["best_checkpoint"] in kept
    assert f1_at[int(report["best_checkpoint"].removeprefix("checkpoint-"))] == max(f1_at.values())

    # the exported directory loads with plain transformers and predicts what `evaluate` reports
    local = tmp_path / "model"
    storage.download_dir(report["model"], str(local), options)
    assert (local / "model.safetensors").exists()
    _, test_rows = read_all_rows(prepared["test"], options)
    ours = evaluate_exported(
        report["model"], prepared["test"], options=options, keep_predictions=True
    )
    theirs = plain_transformers_predictions(str(local), test_rows)
    assert [ours["predictions"][r["id"]] for r in test_rows] == theirs
    gold = [r["tags"] for r in test_rows]
    expected = classification_report(gold, theirs, output_dict=True, zero_division=0)
    assert ours["micro"]["f1"] == pytest.approx(expected["micro avg"]["f1-score"], abs=1e-12)
    assert report["test"]["micro"]["f1"] == pytest.approx(ours["micro"]["f1"], abs=1e-12)

    # distributed eval (2 ranks, all-reduced counts) equals seqeval over the whole dev set
    _, dev_rows = read_all_rows(prepared["dev"], options)
    dev_pred = plain_transformers_predictions(str(local), dev_rows)
    dev_expected = classification_report(
        [r["tags"] for r in dev_rows], dev_pred, output_dict=True, zero_division=0
    )
    assert report["best_eval"]["eval_f1"] == pytest.approx(
        dev_expected["micro avg"]["f1-score"], abs=1e-9
    )
    assert report["best_eval"]["eval_f1"] > 0.3  # a learnable corpus: the model really trained
