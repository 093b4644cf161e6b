"""Run tracking on rank 0: TensorBoard event files (copied to {run}/tensorboard/), and optionally
MLflow and Weights & Biases, with one run id and a step axis that continues across restarts.

Object stores cannot append, so the TensorBoard writer is closed at every evaluation and its file
uploaded once, under a name that sorts by step; the next points go to a new file. Which step the
uploaded files reach ("through_step") and the MLflow / W&B run ids live in {run}/tracking.json:
after a restart, points at or before that step are already in storage and are not written again
(no duplicate and no backward points).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

from shardtune.data import storage
from shardtune.data.run_layout import TENSORBOARD, WANDB, RunLayout
from shardtune.training.config import TrackingSection
from shardtune.training.records import EvalScores

log = logging.getLogger(__name__)


def eval_scalars(scores: EvalScores) -> dict[str, float | None]:
    """An evaluation's scalars by tag (pure): micro and macro P/R/F1, loss, F1 per label."""
    s = scores
    out = {
        "eval/f1": s.eval_f1,
        "eval/precision": s.eval_precision,
        "eval/recall": s.eval_recall,
        "eval/loss": s.eval_loss,
        "eval/macro_f1": s.eval_macro_f1,
        "eval/macro_precision": s.eval_macro_precision,
        "eval/macro_recall": s.eval_macro_recall,
    }
    out.update({f"eval_f1/{name}": f1 for name, f1 in (s.eval_f1_per_label or {}).items()})
    return out


class Tracker:
    """Rank 0's writers. Every method is a no-op for points at or before `floor` (already in
    storage from an earlier attempt of this run)."""

    def __init__(
        self,
        section: TrackingSection,
        run_uri: str,
        options: Any,
        *,
        run_name: str,
        config_text: str,
        hparams: dict,
    ) -> None:
        self.section, self.layout, self.options = section, RunLayout(run_uri), options
        state_uri = self.layout.tracking_state
        self.state = (
            json.loads(storage.read_text(state_uri, options))
            if storage.exists(state_uri, options)
            else {"through_step": -1}
        )
        self.floor = int(self.state["through_step"])
        self.local = tempfile.mkdtemp(prefix="shardtune-tracking-")
        self.hparams = hparams
        self.tb = self._open_tb() if section.tensorboard else None
        self.mlflow = self._start_mlflow(run_name, config_text) if section.mlflow else None
        self.wandb = self._start_wandb(run_name) if section.wandb else None
        self._save_state()  # the run ids, before anything can fail
        if self.floor < 0 and self.tb is not None:
            self.tb.add_text("config", f"```yaml\n{config_text}\n```", 0)
        if self.floor >= 0:
            log.info("tracking: continuing after step %d (already in storage)", self.floor)

    # -- writers ---------------------------------------------------------------------------

    def _open_tb(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(os.path.join(self.local, TENSORBOARD, "open"), flush_secs=3600)

    def _start_mlflow(self, run_name: str, config_text: str) -> Any:
        import mlflow

        uri = self.section.mlflow.tracking_uri
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told; it is what an offline run has.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.section.mlflow.experiment)
        run_id = self.state.get("mlflow_run_id")
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        if not run_id:
            self.state["mlflow_run_id"] = run.info.run_id
            mlflow.log_params(_flat(self.hparams))
            mlflow.log_text(config_text, "config.yaml")
        return mlflow

    def _start_wandb(self, run_name: str) -> Any:
        import wandb

        w = self.section.wandb
        run_id = self.state.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        return wandb.init(  # into {dir}/wandb/, which close() copies to {run}/wandb/
            project=w.project,
            entity=w.entity,
            mode=w.mode,
            id=run_id,
            resume="allow",
            name=run_name,
            dir=self.local,
            config=self.hparams,
            settings=wandb.Settings(silent=True),
        )

    def _save_state(self) -> None:
        storage.write_text(
            self.layout.tracking_state, json.dumps(self.state, indent=1), self.options
        )

    # -- points ----------------------------------------------------------------------------

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step <= self.floor:
            return
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self, step: int) -> None:
        """At an evaluation: close this TensorBoard file, upload it once (named by step, so the
        files sort in step order), and record that storage holds every point up to `step`."""
        if step <= self.floor:
            return
        if self.tb is not None:
            self.tb.close()
            open_dir = os.path.join(self.local, TENSORBOARD, "open")
            for name in sorted(os.listdir(open_dir)):
                # TensorBoard reads any file with "tfevents" in its name, in name order.
                target = f"events.out.tfevents.{step:010d}.{time.time_ns()}.shardtune"
                with open(os.path.join(open_dir, name), "rb") as f:
                    storage.write_bytes(
                        storage.join(self.layout.tensorboard, target), f.read(), self.options
                    )
                os.remove(os.path.join(open_dir, name))
            self.tb = self._open_tb()
        self.state["through_step"] = self.floor = step
        self._save_state()

    def close(self, step: int, final: dict[str, float] | None) -> None:
        """At the end: hyperparameters with the final metrics, last upload, runs finished."""
        if final and self.tb is not None and step > self.floor:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(
                _flat(self.hparams), {f"hparams/{k}": v for k, v in final.items()}
            ):
                self.tb.file_writer.add_summary(summary, step)
            self.log(step, {f"hparams/{k}": v for k, v in final.items()})
        self.flush(step)
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()
            # offline runs: copied once, finished (an attempt's own directory never grows again)
            local = os.path.join(self.local, WANDB)
            storage.upload_dir(local, self.layout.wandb, self.options)
        shutil.rmtree(self.local, ignore_errors=True)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists as strings (hparams take scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                value if isinstance(value, int | float | str | bool) else str(value)
            )
    return out
