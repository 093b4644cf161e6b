"""The report's plots (PNG, drawn on the head from report.json alone, so `report RUN_URI` can
redraw them): training loss and dev F1 over steps, F1 per entity type or class, and a confusion
matrix for classification."""

from __future__ import annotations

import os

TRAINING = "plot-training.png"
PER_LABEL = "plot-f1-per-label.png"
CONFUSION = "plot-confusion.png"


def draw_plots(report: dict, out_dir: str) -> list[str]:
    """Write the plots this report has data for into `out_dir`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a head node or in CI
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    history = report.get("history") or []
    loss = [p for h in history for p in h.get("train_loss_points") or []]
    evals = [h for h in history if h.get("eval_f1") is not None]
    if loss or evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        if loss:
            ax.plot(*zip(*loss, strict=True), label="training loss", color="tab:blue")
        if evals:
            steps = [h["step"] for h in evals]
            ax.plot(
                steps, [h["eval_loss"] for h in evals], "o--", label="dev loss", color="tab:cyan"
            )
            f1_ax = ax.twinx()
            f1_ax.plot(
                steps, [h["eval_f1"] for h in evals], "o-", color="tab:red", label="dev micro-F1"
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


def _per_label_f1(report: dict) -> tuple[dict[str, float], str]:
    """F1 per entity type or class: the test set's when there is one, else the best dev eval's."""
    test = report.get("test") or {}
    if test.get("per_type"):
        return {name: row["f1"] for name, row in test["per_type"].items()}, "test set"
    best = next((h for h in report.get("history") or [] if h.get("eval_f1_per_label")
                 and h.get("eval_f1") == (report.get("best_eval") or {}).get("eval_f1")), None)  # fmt: skip
    return (best["eval_f1_per_label"], "best dev evaluation") if best else ({}, "")


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def write_plots(report: dict, run_uri: str, options=None) -> list[str]:
    """Draw the plots and put them next to report.json in `run_uri`; returns their URIs."""
    import tempfile

    from shardtune.data import storage

    with tempfile.TemporaryDirectory(prefix="shardtune-plots-") as tmp:
        names = draw_plots(report, tmp)
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(run_uri, name), f.read(), options)
    return [storage.join(run_uri, name) for name in names]
