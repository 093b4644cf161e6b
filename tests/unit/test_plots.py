"""The report's plots are drawn from report.json alone (cluster/plots.py): training curves,
F1 per label, and for classification a confusion matrix computed by training/evaluation.py."""

from __future__ import annotations

from shardtune.cluster.plots import CONFUSION, PER_LABEL, TRAINING, draw_plots
from shardtune.training.evaluation import confusion_matrix


def test_confusion_matrix_rows_are_gold_columns_predicted():
    got = confusion_matrix(
        ["pos", "pos", "neg", "neg"], ["pos", "neg", "neg", "neg"], ["neg", "pos"]
    )
    assert got == {"labels": ["neg", "pos"], "matrix": [[2, 0], [1, 1]]}


def test_classification_report_draws_all_three(tmp_path):
    from PIL import Image

    report = {
        "run": "r",
        "best_eval": {"eval_f1": 0.8},
        "early_stopping": {"stopped": True, "step": 4},
        "history": [
            {"step": 2, "eval_f1": 0.6, "eval_loss": 0.9, "train_loss_points": [[1, 1.2], [2, 1.0]]},
            {"step": 4, "eval_f1": 0.8, "eval_loss": 0.7, "train_loss_points": [[3, 0.8], [4, 0.6]],
             "eval_f1_per_label": {"neg": 0.7, "pos": 0.9}},
        ],
        "test": {"per_type": {"neg": {"f1": 0.75}, "pos": {"f1": 0.85}},
                 "confusion": {"labels": ["neg", "pos"], "matrix": [[9, 1], [2, 8]]}},
    }  # fmt: skip
    assert draw_plots(report, str(tmp_path)) == [TRAINING, PER_LABEL, CONFUSION]
    for name in (TRAINING, PER_LABEL, CONFUSION):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 200


def test_ner_report_without_test_set_uses_the_best_dev_evaluation(tmp_path):
    report = {
        "run": "r", "best_eval": {"eval_f1": 0.5}, "test": None,
        "history": [{"step": 3, "eval_f1": 0.5, "eval_loss": 1.0,
                     "eval_f1_per_label": {"PER": 0.4, "LOC": 0.6}}],
    }  # fmt: skip
    assert draw_plots(report, str(tmp_path)) == [TRAINING, PER_LABEL]
