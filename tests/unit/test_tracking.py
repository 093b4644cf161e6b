"""Rank 0's tracker without Ray: TensorBoard files read back with TensorBoard's own reader, a
restart that repeats steps writes no duplicate or backward point, and MLflow (file store) and
W&B (offline) keep one run id across the restart."""

from __future__ import annotations

import json
import os

import pytest
from shardtune.training.config import TrackingSection
from shardtune.training.records import EvalScores
from shardtune.training.tracking import Tracker, eval_scalars


def tracker(section, run_uri):
    return Tracker(section, run_uri, None, run_name="t", config_text="task: ner\n",
                   hparams={"train": {"lr": 1e-3}, "workers": 2})  # fmt: skip


def read_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}, acc


def test_restart_continues_the_step_axis_with_one_run_id(tmp_path):
    pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")
    pytest.importorskip("wandb", reason="the tracking extra (wandb) is not installed")
    run = str(tmp_path / "run")
    os.makedirs(run)
    section = TrackingSection.model_validate({
        "mlflow": {"tracking_uri": f"file://{tmp_path}/mlruns", "experiment": "unit"},
        "wandb": {"mode": "offline", "project": "unit"},
    })  # fmt: skip
    first = tracker(section, run)
    for step in range(1, 6):
        first.log(step, {"train/loss": 10.0 - step})
    first.flush(5)  # an evaluation at step 5: storage holds 1..5
    first.log(6, {"train/loss": 4.0})
    first.close(6, None)  # the worker failed after step 6 (loop.close runs in `finally`)

    second = tracker(section, run)  # resumed from the checkpoint at step 3: steps 4.. again
    for step in range(4, 9):
        second.log(step, {"train/loss": 10.0 - step})
    second.close(8, {"eval_f1": 0.5})

    series, acc = read_scalars(os.path.join(run, "tensorboard"))
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert series["hparams/eval_f1"] == [(8, 0.5)]
    assert any("config" in tag for tag in acc.Tags()["tensors"])
    state = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert state["through_step"] == 8

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]
    history = client.get_metric_history(state["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 7, 8]
    runs_dirs = os.listdir(os.path.join(run, "wandb"))
    offline = [d for d in runs_dirs if d.startswith("offline-run-")]
    assert len(offline) == 2 and all(d.endswith(state["wandb_run_id"]) for d in offline)


def test_eval_scalars_name_every_metric():
    scores = EvalScores(eval_f1=0.5, eval_precision=0.4, eval_recall=0.6, eval_loss=1.0,
                        eval_macro_f1=0.3, eval_macro_precision=0.2, eval_macro_recall=0.1,
                        eval_f1_per_label={"PER": 0.9, "LOC": 0.1})  # fmt: skip
    assert eval_scalars(scores) == {
        "eval/f1": 0.5, "eval/precision": 0.4, "eval/recall": 0.6, "eval/loss": 1.0,
        "eval/macro_f1": 0.3, "eval/macro_precision": 0.2, "eval/macro_recall": 0.1,
        "eval_f1/PER": 0.9, "eval_f1/LOC": 0.1,
    }  # fmt: skip
