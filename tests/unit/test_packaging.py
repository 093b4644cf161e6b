"""Packaging: the wheel installs one top-level package, `shardtune`, with the entry points the
README documents; a checkout runs `launch.py` without any install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (path,) = out.glob("shardtune-*.whl")
    return path


def test_wheel_holds_only_the_shardtune_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"shardtune"}, sorted(top)
    assert len(dist_info) == 1
    for module in ("data/prepare.py", "training/loop.py", "cluster/cli.py", "__main__.py",
                   "configs/demo.yaml"):  # fmt: skip
        assert f"shardtune/{module}" in names
    assert not [n for n in names if n.startswith(("shardtune/tests/", "shardtune/bench/"))]
    # every module of the package folders ships (a sub-package missing from pyproject's
    # explicit list would import from a checkout and fail when installed)
    for folder in ("data", "training", "cluster", "serving"):
        for module in (ROOT / folder).rglob("*.py"):
            assert f"shardtune/{module.relative_to(ROOT).as_posix()}" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/entry_points.txt").decode()
    assert "shardtune = shardtune.cluster.cli:main" in entry_points


def test_console_entries_agree():
    """`python -m shardtune` and `launch.py` print the same usage."""
    a = subprocess.run([sys.executable, "-m", "shardtune", "--help"], capture_output=True, text=True, timeout=120)  # fmt: skip
    b = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "prepare" in a.stdout


def test_launch_from_a_checkout_uses_that_checkout(tmp_path):
    """`ray job submit --working-dir .` runs launch.py from an uploaded copy of the checkout:
    the copy's code must be what runs, even where another shardtune is installed."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in (
        "__init__.py",
        "__main__.py",
        "launch.py",
        "data",
        "training",
        "cluster",
        "configs",
    ):
        src = ROOT / name
        (copy / name).symlink_to(src, target_is_directory=src.is_dir())
    probe = (
        "import runpy, sys; sys.argv=['launch.py', '--help']; "
        f"sys.path.insert(0, {str(copy)!r}); import launch; launch.use_checkout(); "
        "import shardtune.cluster.cli as c; print(c.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=copy)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(copy / "cluster" / "cli.py")
