"""The ledger: an opt-in record of the example ids every rank consumed, per micro-batch, and the
reconstruction of what a run committed across restarts.

Layout under a run directory `R` ({run.output}/{run.name}):
  R/ledger/attempt-00002.json                  rank 0, at start: world size, step it resumed from
  R/ledger/attempt-00002/rank-00001.00003.jsonl  rank 1's third flush of that attempt
A line is {"epoch", "step", "micro_step", "ids"}: `step` is the optimizer step the micro-batch
counts towards (1-based), `micro_step` the micro-batch number (1-based). Object stores cannot
append, so each flush (at every report, before the checkpoint is handed to Ray) writes a new
small object holding only the lines since the previous flush: cost O(lines), not O(lines^2).
"""

from __future__ import annotations

import json
import re

from shardtune.data import storage

LEDGER_DIR = "ledger"
_ATTEMPT = re.compile(r"^attempt-(\d{5})\.json$")
_PART = re.compile(r"^rank-(\d{5})\.(\d{5})\.jsonl$")


def next_attempt(run_uri: str, options: storage.StorageOptions | None = None) -> int:
    """1 + the highest attempt recorded so far (rank 0 asks; the others get it by collective)."""
    found = [
        int(m[1])
        for n in storage.list_names(storage.join(run_uri, LEDGER_DIR), options)
        if (m := _ATTEMPT.match(n))
    ]
    return max(found, default=0) + 1


class LedgerWriter:
    """One rank's ledger for one attempt; buffers lines in memory between flushes."""

    def __init__(
        self,
        run_uri: str,
        *,
        rank: int,
        attempt: int,
        world_size: int,
        resumed_step: int | None,
        options: storage.StorageOptions | None = None,
    ):
        self.dir = storage.join(run_uri, LEDGER_DIR)
        self.rank, self.attempt, self.options = rank, attempt, options
        self._lines: list[str] = []
        self._parts = 0
        if rank == 0:
            header = {"attempt": attempt, "world_size": world_size, "resumed_step": resumed_step}
            storage.write_text(
                storage.join(self.dir, f"attempt-{attempt:05d}.json"), json.dumps(header), options
            )

    def record(self, *, epoch: int, step: int, micro_step: int, ids: list[int]) -> None:
        self._lines.append(
            json.dumps({"epoch": epoch, "step": step, "micro_step": micro_step, "ids": ids})
        )

    def flush(self) -> None:
        if not self._lines:
            return
        self._parts += 1
        name = f"rank-{self.rank:05d}.{self._parts:05d}.jsonl"
        uri = storage.join(self.dir, f"attempt-{self.attempt:05d}", name)
        storage.write_text(uri, "\n".join(self._lines) + "\n", self.options)
        self._lines = []


def read_committed(run_uri: str, options: storage.StorageOptions | None = None) -> list[dict]:
    """The ledger of what the run committed: attempts in order, where an attempt that resumed
    from step s discards every earlier entry past s (work of a failed attempt after the
    checkpoint it was restarted from). Entries get "rank", "attempt" and "world_size" added;
    sorted by (micro_step, rank)."""
    root = storage.join(run_uri, LEDGER_DIR)
    names = storage.list_names(root, options)
    committed: list[dict] = []
    for name in names:
        m = _ATTEMPT.match(name)
        if not m:
            continue
        header = json.loads(storage.read_text(storage.join(root, name), options))
        resumed = header["resumed_step"] or 0
        committed = [e for e in committed if e["step"] <= resumed]
        part_dir = storage.join(root, f"attempt-{int(m[1]):05d}")
        for part in storage.list_names(part_dir, options):
            pm = _PART.match(part)
            if not pm:
                continue
            for line in storage.read_text(storage.join(part_dir, part), options).splitlines():
                entry = json.loads(line)
                entry.update(
                    rank=int(pm[1]), attempt=header["attempt"], world_size=header["world_size"]
                )
                committed.append(entry)
    committed.sort(key=lambda e: (e["micro_step"], e["rank"]))
    return committed
