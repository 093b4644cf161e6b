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
            {"step": 2, "epoch": 0, "eval_f1": 0.6, "eval_loss": 0.9, "train_loss_points": [[1, 1.2], [2, 1.0]]},
            {"step": 4, "epoch": 1, "eval_f1": 0.8, "eval_loss": 0.7, "train_loss_points": [[3, 0.8], [4, 0.6]],
             "eval_f1_per_label": {"neg": 0.7, "pos": 0.9}},
        ],
        "test": {"per_type": {"neg": {"f1": 0.75}, "pos": {"f1": 0.85}},
                 "confusion": {"labels": ["neg", "pos"], "matrix": [[9, 1], [2, 8]]}},
    }  # fmt: skip
    assert draw_plots(report, str(tmp_path)) == [TRAINING, PER_LABEL, CONFUSION]
    for name in (TRAINING, PER_LABEL, CONFUSION):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 200


def drawn(monkeypatch) -> dict:
    """The figures draw_plots makes, by file name, read before they are saved and closed."""
    from shardtune.cluster import plots

    figures, save = {}, plots._save

    def keep(fig, out_dir, name):
        figures[name] = [
            {"bars": {tick.get_text(): patch.get_width()
                      for tick, patch in zip(ax.get_yticklabels(), ax.patches, strict=True)}
                     if ax.patches else {},
             "lines": {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()},
             "xlabel": ax.get_xlabel()}
            for ax in fig.axes
        ]  # fmt: skip
        return save(fig, out_dir, name)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_ner_report_without_test_set_uses_the_best_dev_evaluation(tmp_path, monkeypatch):
    figures = drawn(monkeypatch)
    report = {
        "run": "r", "best_eval": {"eval_f1": 0.5}, "test": None,
        "history": [{"step": 3, "epoch": 0, "eval_f1": 0.5, "eval_loss": 1.0,
                     "eval_f1_per_label": {"PER": 0.4, "LOC": 0.6}},
                    {"step": 6, "epoch": 1, "eval_f1": 0.3, "eval_loss": 0.9,
                     "eval_f1_per_label": {"PER": 0.1, "LOC": 0.2, "ORG": 0.9}}],
    }  # fmt: skip
    assert draw_plots(report, str(tmp_path)) == [TRAINING, PER_LABEL]
    (bars,) = figures[PER_LABEL]  # the best evaluation's (step 3), not the latest's (step 6)
    assert bars["bars"] == {"PER": 0.4, "LOC": 0.6}
    assert bars["xlabel"] == "F1 (best dev evaluation)"
    loss_ax, f1_ax = figures[TRAINING]
    assert loss_ax["lines"]["dev loss"] == [[3, 1.0], [6, 0.9]]
    assert f1_ax["lines"]["dev micro-F1"] == [[3, 0.5], [6, 0.3]]
