"""shardtune's one output channel for progress and status: the `shardtune` logger tree, set up
once per process (the CLI on the head, each Ray Train worker at its start) by `setup_logging`."""

from __future__ import annotations

import logging
import sys

DATEFMT = "%Y-%m-%d %H:%M:%S"


class _LineFormatter(logging.Formatter):
    """`2026-11-29 17:40:01 [shardtune] message`; levels other than INFO are named after the tag
    (`[shardtune] WARNING ...`), so the common line stays short."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s [shardtune]%(level_tag)s %(message)s", DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        record.level_tag = "" if record.levelno == logging.INFO else f" {record.levelname}"
        return super().format(record)


class _StderrNow(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not when the handler was
    made: pytest's capture, or a stream Ray swapped in, gets the lines (as logging's own
    last-resort handler does)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str | int = "INFO") -> logging.Logger:
    """Send every `shardtune.*` record at `level` or above to stderr as one line
    (`2026-11-29 17:40:01 [shardtune] message`). Safe to call again: it
    replaces its own handler rather than adding a second one.

    The records do not propagate to the root logger. In a Ray Train worker the root logger has
    Ray's console handler (and its print patch sends print() there and tees it to stdout), so a
    propagating record would print twice; stderr is what `ray job logs` and the driver show.
    """
    logger = logging.getLogger("shardtune")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrNow)]:
        logger.removeHandler(handler)
    handler = _StderrNow()
    handler.setFormatter(_LineFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    return logger
