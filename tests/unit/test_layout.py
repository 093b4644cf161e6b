"""Architecture checks: imports flow shardtune.data <- .training <- .cluster <- launch.py, and
.serving imports only .data; the head-side decisions are pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from shardtune.cluster.job import select_best

ROOT = Path(__file__).resolve().parents[2]
# cluster (the head and the CLI) may start a server; serving never reaches into training.
ALLOWED = {"data": {"data"}, "training": {"data", "training"},
           "cluster": {"data", "training", "cluster", "serving"},
           "serving": {"data", "serving"}}  # fmt: skip


def imported_packages(path: Path) -> set[str]:
    """The shardtune sub-packages a module imports (`shardtune.data.x` -> "data"); a bare
    `import data` (the pre-namespace spelling) counts too, so it cannot sneak back."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    found = set()
    for name in modules:
        parts = name.split(".")
        if parts[0] == "shardtune" and len(parts) > 1:
            found.add(parts[1])
        elif parts[0] in ALLOWED:
            found.add(parts[0] + " (without the shardtune. prefix)")
    return found & set(ALLOWED) | {f for f in found if "prefix" in f}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    paths = sorted((ROOT / package).rglob("*.py"))
    assert paths
    for path in paths:
        bad = imported_packages(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_select_best_by_eval_f1_then_step():
    cands = [("c1", {"eval_f1": 0.5, "step": 10}), ("c2", {"eval_f1": 0.7, "step": 20}),
             ("c3", {"eval_f1": 0.7, "step": 30}), ("c4", {"eval_f1": 0.6, "step": 40})]  # fmt: skip
    assert select_best(cands, has_eval=True)[0] == "c3"
    assert select_best(cands, has_eval=False)[0] == "c4"
    with pytest.raises(RuntimeError, match="no checkpoint"):
        select_best([], has_eval=True)


def test_worker_side_never_needs_the_head(tmp_path):
    """The worker receives its own typed config (shardtune.training.config.WorkerConfig); it
    unpickles and the worker entry imports in a process where `shardtune.cluster` cannot be
    imported at all."""
    import pickle
    import subprocess
    import sys

    from shardtune.cluster.config import validate_tree

    job = validate_tree(
        {"task": "ner", "model": {"name_or_path": "/m"}, "data": {"train": "/d"},
         "run": {"name": "r", "output": "/o"}}, "test",
    )  # fmt: skip
    worker = job.worker_config()
    assert type(worker).__module__ == "shardtune.training.config"
    blob = tmp_path / "worker.pkl"
    blob.write_bytes(pickle.dumps({"worker": worker}))
    probe = (
        "import sys, pickle; sys.modules['shardtune.cluster'] = None; "  # any import of it fails
        f"cfg = pickle.load(open({str(blob)!r}, 'rb'))['worker']; "
        "from shardtune.training.loop import train_worker; "
        "assert not [m for m in sys.modules if m.startswith('shardtune.cluster.')]; "
        "print(type(cfg).__name__, cfg.train.batch_size, cfg.run_uri)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["WorkerConfig", "16", "/o/r"]
