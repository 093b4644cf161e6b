"""Where a benchmark's table goes: `docs/bench/<name>.md`, headed by the machine, the date and the
command that produced it, so the docs include measured figures that can only be stale by a dated,
visible amount (never a table retyped by hand)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

DOCS_BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"


def machine() -> str:
    """CPU model, cores, memory, GPU (if any) and the 1-minute load average, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = "no GPU"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
        gpu = f"{len(names)} x {names[0]}" if names else gpu
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # a shared machine's other work shows in the figures: say how busy it was
        load = f", load average {os.getloadavg()[0]:.1f} at the end"
    except OSError:
        load = ""
    return f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}{load}"


def command() -> str:
    """The command line this process was started with, as a user would type it."""
    module = sys.modules["__main__"].__spec__
    head = ["python", "-m", module.name] if module is not None else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def publish(name: str, table: str, *, notes: str = "", out_dir: Path | None = None) -> Path:
    """Write `table` to docs/bench/<name>.md with its provenance; return the path. A table whose
    first line starts with `|` is a Markdown table and goes in as is; anything else is plain text,
    shown as a code block. `notes` (Markdown) follows the table."""
    out_dir = out_dir or DOCS_BENCH
    out_dir.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = table.strip("\n")
    body = f"{table}\n" if table.lstrip().startswith("|") else f"```\n{table.rstrip()}\n```\n"
    text = (
        f"<!-- written by bench/{name}.py; do not edit by hand -->\n"
        f"Measured {when} on {machine()} with `{command()}`:\n\n{body}"
    )
    if notes:
        text += f"\n{notes.rstrip()}\n"
    path = out_dir / f"{name}.md"
    path.write_text(text)
    return path
