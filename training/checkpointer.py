"""When and how a worker's checkpoints happen: resume from the one Ray Train restored (falling
back past a corrupt one, all ranks agreeing), save this rank's part and hand it to Ray with the
report, and the bookkeeping the schedule asks about (last report, last checkpoint's step and
time, names already taken). The file format itself is training/checkpoint.py's."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shardtune.data.storage import StorageOptions
from shardtune.training import checkpoint as ckpt
from shardtune.training import session
from shardtune.training.session import Placement

if TYPE_CHECKING:  # names for readers and the checker; imported only where a worker runs them
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        run_uri: str,
        options: StorageOptions,
        place: Placement,
        *,
        upload: str,
        report: Callable[..., bool] = session.report,
    ) -> None:
        self.run_uri, self.options, self.rank, self.world = (
            run_uri,
            options,
            place.rank,
            place.world,
        )
        self.upload = upload  # train.checkpoint_upload: "async" | "sync"
        self._report = report  # session.report; a test passes its own
        self.taken: list[str] = []  # checkpoint names already in storage: new ones avoid them
        self.last_report_step = -1
        self.last_checkpoint_step = -1
        self.last_checkpoint_t = time.perf_counter()

    def minutes_since_checkpoint(self) -> float:
        return (time.perf_counter() - self.last_checkpoint_t) / 60

    def resume(
        self, engine: DeepSpeedEngine, latest: str | None, *, num_examples: int
    ) -> ckpt.TrainState | None:
        """Restore engine, RNG and stream position from `latest` (Ray's), or from the newest
        complete one before it when it is corrupt; every rank loads the same one."""
        if latest is None:
            return None
        with tempfile.TemporaryDirectory(prefix="shardtune-resume-") as tmp:
            name, local, self.taken = ckpt.agree_on_checkpoint(
                self.run_uri,
                latest,
                tmp,
                rank=self.rank,
                world_size=self.world,
                options=self.options,
                warn=log.warning,
            )
            state = ckpt.load(
                engine,
                local,
                rank=self.rank,
                world_size=self.world,
                where=f"{self.run_uri}/{name}",
                num_examples=num_examples,
            )
        if self.rank == 0:
            log.info(
                "resumed from %s/%s: epoch %d, step %d", self.run_uri, name, state.epoch, state.step
            )
        return state

    def save(
        self,
        engine: DeepSpeedEngine,
        state: ckpt.TrainState,
        *,
        tokenizer: Tokenizer,
        meta: dict,
        to_ray: dict,
        at_boundary: bool,
    ) -> None:
        """Every rank: save this rank's checkpoint part locally (only `at_boundary`) and hand it
        with `to_ray` to Ray Train, which uploads it in a background thread under
        train.checkpoint_upload=async: training goes on while the bytes travel, and the
        checkpoint counts only once every rank's upload finished, so a failure meanwhile
        resumes from the previous one."""
        local = tempfile.mkdtemp(prefix="shardtune-ckpt-")
        handed = False
        try:
            if at_boundary:
                ckpt.save(
                    engine,
                    local,
                    rank=self.rank,
                    world_size=self.world,
                    state=state,
                    tokenizer=tokenizer,
                    meta={"metrics": meta},
                )
            name = ckpt.new_checkpoint_name(state.step, self.taken) if at_boundary else None
            handed = self._report(
                to_ray, checkpoint_dir=local if at_boundary else None, name=name, upload=self.upload
            )
        finally:
            if not handed:  # an async upload still reads it; Ray deletes it when done
                shutil.rmtree(local, ignore_errors=True)
        if at_boundary:
            self.last_checkpoint_t = time.perf_counter()
            self.last_checkpoint_step = state.step
