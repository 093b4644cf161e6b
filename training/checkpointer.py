"""When and how a worker's checkpoints happen: resume from the one Ray Train restored (falling
back past a corrupt one, all ranks agreeing), save this rank's part and hand it to Ray with the
report, and the bookkeeping the schedule asks about (last report, last checkpoint's step and
time, names already taken). The file format itself is training/checkpoint.py's."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from shardtune.data import storage
from shardtune.data.run_layout import RunLayout
from shardtune.data.storage import StorageOptions
from shardtune.training import checkpoint as ckpt
from shardtune.training import session
from shardtune.training.session import Placement

if TYPE_CHECKING:  # names for readers and the checker; imported only where a worker runs them
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)
STAGING = "shardtune-ckpt-"  # + "{pid}-": a local checkpoint before Ray uploads it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(root: str | None = None) -> list[str]:
    """Delete staging folders whose process is gone (a SIGKILLed worker, an async upload that
    failed: Ray deletes a folder only after a successful upload); a live process's are its own."""
    gone = []
    for path in glob.glob(os.path.join(root or tempfile.gettempdir(), f"{STAGING}*")):
        pid = os.path.basename(path).removeprefix(STAGING).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def unregistered_leftovers(
    names: Iterable[str], registered: set[str], latest: str, keep: set[str]
) -> list[str]:
    """Checkpoint directories to delete (pure): older than Ray's latest registered one, never
    registered (a partial upload of a failed attempt; one retention already dropped) and not
    handed to Ray by this attempt (`keep`: it may still be registering)."""
    latest_key = ckpt.checkpoint_key(latest)
    if latest_key is None:
        return []
    return sorted(
        n
        for n in names
        if (key := ckpt.checkpoint_key(n)) is not None
        and key < latest_key
        and n not in registered
        and n not in keep
    )


def registered_checkpoints(snapshot_text: str) -> tuple[set[str], str | None]:
    """(names Ray's controller snapshot holds, its latest) from the snapshot's JSON."""
    snap = json.loads(snapshot_text)
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    names = {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
    return names | ({latest} if latest else set()), latest


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
        self.taken: list[str] = []  # checkpoint names in storage or handed: new ones avoid them
        self.handed: set[str] = set()  # names this attempt handed to Ray
        # Leftovers come only from earlier attempts, so once a checkpoint of this attempt is
        # Ray's latest, one pass has removed them all: no listing per checkpoint after that.
        self.leftovers_cleared = False
        self.last_report_step = -1
        self.last_checkpoint_step = -1
        self.last_checkpoint_t = time.perf_counter()
        remove_stale_staging()  # left by a killed worker of an earlier attempt on this node

    def minutes_since_checkpoint(self) -> float:
        return (time.perf_counter() - self.last_checkpoint_t) / 60

    def resume(
        self,
        engine: DeepSpeedEngine,
        latest: str | None,
        *,
        num_examples: int,
        pin: ckpt.TrainState | None = None,
    ) -> ckpt.TrainState | None:
        """Restore engine, RNG and stream position from `latest` (Ray's), or from the newest
        complete one before it when it is corrupt; every rank loads the same one. `pin` holds
        the data this attempt reads (ckpt.check_pin): a checkpoint of other data is refused."""
        if latest is None:  # a partial upload of an attempt that registered nothing: avoid it
            self.taken = self._listing()
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
        if pin is not None:
            ckpt.check_pin(state, pin, where=f"{self.run_uri}/{name}")
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
        if at_boundary and self.rank == 0 and not self.leftovers_cleared:
            self._remove_unregistered()
        local = tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-")
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
            if name is not None:
                self.taken.append(name)
                self.handed.add(name)
            handed = self._report(
                to_ray, checkpoint_dir=local if at_boundary else None, name=name, upload=self.upload
            )
        finally:
            if not handed:  # an async upload still reads it; Ray deletes it when done
                shutil.rmtree(local, ignore_errors=True)
        if at_boundary:
            self.last_checkpoint_t = time.perf_counter()
            self.last_checkpoint_step = state.step

    def _listing(self) -> list[str]:
        """Rank 0's listing of the run folder, the same on every rank (names must agree)."""
        import torch.distributed as dist

        listing = [storage.list_names(self.run_uri, self.options) if self.rank == 0 else []]
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(listing, src=0)
        return listing[0]

    def _remove_unregistered(self) -> None:
        """Rank 0: delete checkpoint directories Ray never registered, older than its latest
        (a restart's partial uploads). Nothing without a readable snapshot."""
        layout = RunLayout(self.run_uri)
        try:
            registered, latest = registered_checkpoints(
                storage.read_text(layout.snapshot, self.options)
            )
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return
        if latest is None:
            return
        names = storage.list_names(self.run_uri, self.options)
        for name in unregistered_leftovers(names, registered, latest, self.handed):
            log.info(
                "removing %s/%s: never registered with Ray (a partial upload)", self.run_uri, name
            )
            storage.remove_tree(layout.checkpoint(name), self.options)
        self.leftovers_cleared = latest in self.handed
