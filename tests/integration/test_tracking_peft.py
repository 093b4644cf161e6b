"""Issue 10 end to end on a local Ray (2 workers, a tiny BERT, S3 on loopback), in two runs:
- LoRA under ZeRO-2 bf16 with TensorBoard, MLflow (file store) and W&B (offline), early
  stopping, and a worker that fails mid-run and is resumed: the TensorBoard points equal the
  report's history (every evaluation), the step axis has no duplicate or backward point, the
  trackers keep one run id, the plots exist and `report RUN_URI` redraws them;
- retraining a 3-label token-classification checkpoint on the 5-label corpus with LoRA under
  ZeRO-3 fp32: the driver's label line, a non-empty adapter, and the merged export equal to the
  adapter model (and unlike the base model)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from shardtune.cluster import cli
from shardtune.cluster.config import validate_tree
from shardtune.cluster.job import run_training
from shardtune.data import storage

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py


def job(name, s3, prepared, model, *, train=None, peft=None, tracking=None, cluster=None):
    return validate_tree(
        {
            "task": "ner",
            "model": {"name_or_path": model, "peft": peft or {"method": "none"}},
            "data": {"train": prepared["train"], "eval": prepared["dev"], "test": prepared["test"],
                     "max_length": 32},
            "train": {"epochs": 3, "lr": 3e-3, "batch_size": 8, "seed": 1, **(train or {})},
            "cluster": {"num_workers": 2, "cpus_per_worker": 1, **(cluster or {})},
            "run": {"name": name, "output": f"s3://{BUCKET}/issue10", "keep_checkpoints": 1},
            "storage": {"endpoint_url": s3.endpoint_url},
            "tracking": tracking or {},
        },
        "test",
    )  # fmt: skip


def scalars(tb_dir: str) -> tuple[dict[str, list[tuple[int, float]]], object]:
    """Every scalar series with TensorBoard's own reader, (step, value) in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return series, acc


def test_lora_zero2_bf16_tracking_early_stopping_resume(s3, local_ray, prepared, tiny_model_dir,
                                                         tmp_path, monkeypatch, capsys):  # fmt: skip
    fault_dir = tmp_path / "fault"
    monkeypatch.setenv("SHARDTUNE_FAULT", f"raise@step=5,rank=1,times=1,dir={fault_dir}")
    j = job(
        "lora-z2", s3, prepared, tiny_model_dir,
        train={"zero_stage": 2, "precision": "bf16", "eval_every": 3, "log_every": 2,
               "early_stopping": {"patience": 2, "min_delta": 1.0}},  # 1.0: never enough gain
        peft={"method": "lora", "r": 4, "alpha": 8},
        tracking={"mlflow": {"tracking_uri": f"file://{tmp_path}/mlruns", "experiment": "it"},
                  "wandb": {"project": "it", "mode": "offline"}},
        cluster={"max_failures": 1},
    )  # fmt: skip
    options = j.storage_options()
    run = f"s3://{BUCKET}/issue10/lora-z2"
    report = run_training(j)
    assert (fault_dir / "fired-1").exists()  # the worker did fail and the run resumed

    # early stopping: the 3rd evaluation is the 2nd without a gain of 1.0; all ranks stopped
    history = report["history"]
    assert [h["step"] for h in history] == [3, 6, 9]  # every evaluation, 1 checkpoint kept
    assert report["early_stopping"]["stopped"] and report["early_stopping"]["step"] == 9
    assert "did not improve" in report["early_stopping"]["reason"]
    best = max(history, key=lambda h: (h["eval_f1"], h["step"]))
    assert report["best_checkpoint"] == f"checkpoint-{best['step']:08d}"
    assert 0 < report["parameters"]["trainable"] < report["parameters"]["total"] / 5

    # TensorBoard, read back with its own reader: eval F1 = the report's history; one point
    # per step and tag, in increasing step order, across the restart
    local_tb = tmp_path / "tb"
    storage.download_dir(f"{run}/tensorboard", str(local_tb), options)
    series, acc = scalars(str(local_tb))
    assert series["eval/f1"] == [(h["step"], pytest.approx(h["eval_f1"])) for h in history]
    for tag, points in series.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: duplicate or backward steps {steps}"
    assert [s for s, _ in series["train/loss"]] == [1, 2, 4, 6, 8]
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s",
                "eval/macro_f1", "eval/loss", "eval_f1/PER", "eval_f1/ORG"):  # fmt: skip
        assert tag in series, tag
    assert "config" in " ".join(acc.Tags()["tensors"])  # the resolved job config as text

    # MLflow and W&B: one run id across the restart, the same eval points
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only so
    client = mlflow.MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert len(runs) == 1
    f1 = client.get_metric_history(runs[0].info.run_id, "eval/f1")
    assert sorted((m.step, m.value) for m in f1) == [(h["step"], pytest.approx(h["eval_f1"])) for h in history]  # fmt: skip
    state = json.loads(storage.read_text(f"{run}/tracking.json", options))
    assert state["mlflow_run_id"] == runs[0].info.run_id
    wandb_files = [n for n in storage.list_names(f"{run}/wandb", options) if n.startswith("offline-run-")]  # fmt: skip
    assert wandb_files and all(n.endswith(state["wandb_run_id"]) for n in wandb_files)

    # plots next to report.json, and `report RUN_URI` prints the table and redraws them
    for name in ("plot-training.png", "plot-f1-per-label.png"):
        assert storage.exists(f"{run}/{name}", options)
        storage.remove(f"{run}/{name}", options)
    capsys.readouterr()
    assert cli.main(["report", run, "--endpoint-url", s3.endpoint_url]) == 0
    out = capsys.readouterr().out
    assert "stopped early:   at step 9" in out and "trainable of" in out
    assert storage.exists(f"{run}/plot-training.png", options)

    # the export: a merged plain model (no LoRA keys) with adapter/ beside it
    local = tmp_path / "model"
    storage.download_dir(report["model"], str(local), options)
    from safetensors.torch import load_file

    assert not [k for k in load_file(local / "model.safetensors") if "lora" in k or "base_layer" in k]  # fmt: skip
    adapter = load_file(local / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and (local / "adapter" / "adapter_config.json").exists()  # fmt: skip


def test_retrain_3_label_checkpoint_lora_zero3(s3, local_ray, prepared, tiny_model_dir, tmp_path, caplog):  # fmt: skip
    """A fine-tuned 3-label model retrained on the 5-label corpus, LoRA under ZeRO-3, fp32."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    old_labels = ["O", "B-PER", "B-MISC"]
    old = AutoModelForTokenClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label=dict(enumerate(old_labels)),
        label2id={v: i for i, v in enumerate(old_labels)},
    )  # fmt: skip
    old_dir = tmp_path / "last-month"
    old.save_pretrained(old_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(old_dir)

    j = job(
        "retrain-z3", s3, prepared, str(old_dir),
        train={"epochs": 1, "zero_stage": 3, "precision": "fp32", "log_every": 100},
        peft={"method": "lora", "r": 4, "alpha": 8}, tracking={"tensorboard": False},
    )  # fmt: skip
    said = []
    report = run_training(j, say=said.append)
    line = next(s for s in said if s.startswith("retraining"))
    assert "kept 2 (B-PER, O); new 3 (B-LOC, B-ORG, I-ORG); dropped 1 (B-MISC)" in line

    local = tmp_path / "model"
    storage.download_dir(report["model"], str(local), j.storage_options())
    merged = AutoModelForTokenClassification.from_pretrained(local).eval()
    assert [merged.config.id2label[i] for i in range(5)] == ["B-LOC", "B-ORG", "B-PER", "I-ORG", "O"]  # fmt: skip

    # ZeRO-3 partitions every weight: the saved adapter must still hold the real ones
    adapter = load_file(local / "adapter" / "adapter_model.safetensors")
    a = adapter["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    b = adapter["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and b.abs().sum() > 0
    assert sum(v.numel() for k, v in adapter.items() if "classifier" in k) == 5 * 64 + 5

    # merged == base + adapter (fp32, 1e-4), and training changed it
    base = AutoModelForTokenClassification.from_pretrained(
        str(old_dir), num_labels=5, ignore_mismatched_sizes=True
    )  # fmt: skip
    with_adapter = PeftModel.from_pretrained(base, str(local / "adapter")).eval()
    x = AutoTokenizer.from_pretrained(local)(["alice met bob in paris ."], return_tensors="pt")
    with torch.no_grad():
        ours, theirs = merged(**x).logits, with_adapter(**x).logits
        with with_adapter.disable_adapter():
            before = with_adapter(**x).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, before, atol=1e-2)
    assert os.path.isfile(local / "config.json")
