"""Every path of a run folder, `{output}/{name}/`, named once: the worker writes there, the head
reads there, and `report`, the demo and the ledger find the same files by the same names."""

from __future__ import annotations

from dataclasses import dataclass

from shardtune.data import storage

EVALS = "evals"  # one record per evaluation: evals/eval-{step:08d}.json
TENSORBOARD = "tensorboard"
TRACKING_STATE = "tracking.json"  # the tracker's run ids and how far storage holds its points
WANDB = "wandb"
LEDGER = "ledger"  # opt-in record of the ids each rank consumed (data/ledger.py)
MODEL = "model"  # the exported Hugging Face model of the best checkpoint
REPORT = "report.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's record of a run's checkpoints
PLOT_TRAINING = "plot-training.png"
PLOT_PER_LABEL = "plot-f1-per-label.png"
PLOT_CONFUSION = "plot-confusion.png"
PLOTS = (PLOT_TRAINING, PLOT_PER_LABEL, PLOT_CONFUSION)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder; `root` is a local path or any fsspec URI."""

    root: str

    def path(self, name: str) -> str:
        """A direct child of the run folder (a checkpoint directory, a plot)."""
        return storage.join(self.root, name)

    @property
    def evals(self) -> str:
        return self.path(EVALS)

    def eval_record(self, step: int) -> str:
        return storage.join(self.evals, f"eval-{step:08d}.json")

    @property
    def tensorboard(self) -> str:
        return self.path(TENSORBOARD)

    @property
    def tracking_state(self) -> str:
        return self.path(TRACKING_STATE)

    @property
    def wandb(self) -> str:
        return self.path(WANDB)

    @property
    def ledger(self) -> str:
        return self.path(LEDGER)

    @property
    def model(self) -> str:
        return self.path(MODEL)

    @property
    def report(self) -> str:
        return self.path(REPORT)

    @property
    def snapshot(self) -> str:
        return self.path(SNAPSHOT)

    def checkpoint(self, name: str) -> str:
        return self.path(name)

    def plot(self, name: str) -> str:
        return self.path(name)


def kept_for_people(name: str) -> str | None:
    """What a person opens after a run (the demo keeps these): "dir", "file" or None."""
    if name in (MODEL, TENSORBOARD):
        return "dir"
    if name == REPORT or name in PLOTS:
        return "file"
    return None
