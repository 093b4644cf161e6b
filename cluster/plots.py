"""The report's plots (PNG, drawn on the head from report.json alone, so `report RUN_URI` can
redraw them): training loss and dev F1 over steps, F1 per entity type or class, and a confusion
matrix for classification."""

from __future__ import annotations

import os
from typing import Any

from shardtune.data.run_layout import PLOT_CONFUSION, PLOT_PER_LABEL, PLOT_TRAINING, RunLayout
from shardtune.training.records import EvalRecord

TRAINING, PER_LABEL, CONFUSION = PLOT_TRAINING, PLOT_PER_LABEL, PLOT_CONFUSION


def draw_plots(report: dict[str, Any], out_dir: str) -> list[str]:
    """Write the plots this report has data for into `out_dir`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a head node or in CI
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    history = [EvalRecord.from_dict(h) for h in report.get("history") or []]
    loss = [p for h in history for p in h.train_loss_points]
    evals = [(h.step, h.scores) for h in history if h.scores is not None]
    if loss or evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        if loss:
            ax.plot(*zip(*loss, strict=True), label="training loss", color="tab:blue")
        if evals:
            steps = [step for step, _ in evals]
            ax.plot(
                steps, [s.eval_loss for _, s in evals], "o--", label="dev loss", color="tab:cyan"
            )
            f1_ax = ax.twinx()
            f1_ax.plot(
                steps, [s.eval_f1 for _, s in evals], "o-", color="tab:red", label="dev micro-F1"
            )
            f1_ax.set_ylabel("dev micro-F1")
            f1_ax.set_ylim(0, 1)
            f1_ax.legend(loc="upper right")
        stop = (report.get("early_stopping") or {}).get("step")
        if stop is not None:
            ax.axvline(stop, color="grey", linestyle=":", label="stopped early")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(loc="upper left")
        ax.set_title(f"{report['run']}: training")
        written.append(_save(fig, out_dir, TRAINING))
    per_label, source = _per_label_f1(report)
    if per_label:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(per_label) + 1.2))
        names = sorted(per_label, key=per_label.get)
        ax.barh(names, [per_label[n] for n in names], color="tab:green")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"F1 ({source})")
        ax.set_title(f"{report['run']}: F1 per {'class' if report.get('confusion') else 'label'}")
        written.append(_save(fig, out_dir, PER_LABEL))
    confusion = (report.get("test") or {}).get("confusion")
    if confusion:
        labels, matrix = confusion["labels"], confusion["matrix"]
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title("test confusion matrix")
        written.append(_save(fig, out_dir, CONFUSION))
    return written


def _per_label_f1(report: dict[str, Any]) -> tuple[dict[str, float], str]:
    """F1 per entity type or class: the test set's when there is one, else the best dev eval's."""
    test = report.get("test") or {}
    if test.get("per_type"):
        return {name: row["f1"] for name, row in test["per_type"].items()}, "test set"
    best_f1 = (report.get("best_eval") or {}).get("eval_f1")
    for h in report.get("history") or []:
        scores = EvalRecord.from_dict(h).scores
        if scores is not None and scores.eval_f1_per_label and scores.eval_f1 == best_f1:
            return scores.eval_f1_per_label, "best dev evaluation"
    return {}, ""


def _save(fig: Any, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def write_plots(report: dict[str, Any], run_uri: str, options: Any = None) -> list[str]:
    """Draw the plots and put them next to report.json in `run_uri`; returns their URIs."""
    import tempfile

    from shardtune.data import storage

    with tempfile.TemporaryDirectory(prefix="shardtune-plots-") as tmp:
        names = draw_plots(report, tmp)
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(RunLayout(run_uri).plot(name), f.read(), options)
    return [RunLayout(run_uri).plot(name) for name in names]
