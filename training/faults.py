"""Test-only fault injection: make one rank fail at a chosen optimizer step, so tests can prove
restart, resume and the failure limit with real Ray worker failures. Nothing happens unless a
spec is given (SHARDTUNE_FAULT; see training/loop.py).

Spec: `ACTION@step=N,rank=R[,times=T],dir=D`
  raise  the rank raises InjectedFault after step N;
  wait   the rank writes its pid to D/waiting.pid and blocks, so a test can SIGKILL it from
         outside at a known step (it raises after 10 minutes if nobody does);
  pause  as wait, but the rank carries on once D/resume exists, so a test can do something to
         the cluster while training is known to be in progress.
`times` (default 1) counts across restarts through marker files in the local directory D:
a restarted worker group sees how many faults already fired.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

WAIT_LIMIT_S = 600


class InjectedFault(RuntimeError):
    """Raised on purpose by a test's fault spec."""


@dataclass(frozen=True)
class Fault:
    action: str  # "raise" | "wait" | "pause"
    step: int
    rank: int
    dir: str
    times: int = 1


def parse_fault(spec: str | None) -> Fault | None:
    """'raise@step=5,rank=1,times=2,dir=/tmp/f' -> Fault; None or '' -> None."""
    if not spec:
        return None
    action, _, rest = spec.partition("@")
    fields = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
    if action not in ("raise", "wait", "pause") or not {"step", "rank", "dir"} <= fields.keys():
        raise ValueError(
            f"fault spec {spec!r}: expected raise|wait|pause@step=N,rank=R[,times=T],dir=D"
        )
    return Fault(
        action, int(fields["step"]), int(fields["rank"]), fields["dir"], int(fields.get("times", 1))
    )


def maybe_fail(fault: Fault | None, *, step: int, rank: int) -> None:
    """Fire `fault` if it targets this (step, rank) and has fired fewer than `times` times."""
    if fault is None or (step, rank) != (fault.step, fault.rank):
        return
    os.makedirs(fault.dir, exist_ok=True)
    fired = sum(name.startswith("fired-") for name in os.listdir(fault.dir))
    if fired >= fault.times:
        return
    open(
        os.path.join(fault.dir, f"fired-{fired + 1}"), "w"
    ).close()  # before failing: restarts count it
    what = f"injected fault {fired + 1}/{fault.times} at step {step} on rank {rank}"
    if fault.action == "raise":
        raise InjectedFault(what)
    tmp = os.path.join(fault.dir, f".waiting.pid.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(fault.dir, "waiting.pid"))  # a reader never sees a partial pid
    if fault.action == "pause":
        deadline = time.monotonic() + WAIT_LIMIT_S
        while time.monotonic() < deadline:
            if os.path.exists(os.path.join(fault.dir, "resume")):
                return
            time.sleep(0.2)
        raise InjectedFault(f"{what}: paused {WAIT_LIMIT_S}s; nobody resumed it")
    time.sleep(WAIT_LIMIT_S)
    raise InjectedFault(f"{what}: waited {WAIT_LIMIT_S}s to be killed; nobody did")
