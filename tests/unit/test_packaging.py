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
def build(tmp_path_factory) -> tuple[Path, str]:
    """The wheel, and what building it printed."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(out), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (path,) = out.glob("shardtune-*.whl")
    return path, done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(build) -> Path:
    return build[0]


def test_wheel_holds_only_the_shardtune_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"shardtune"}, sorted(top)
    assert len(dist_info) == 1
    for module in ("data/prepare.py", "training/loop.py", "cluster/cli.py", "__main__.py"):
        assert f"shardtune/{module}" in names
    # every module of the package folders ships (a sub-package missing from pyproject's
    # explicit list would import from a checkout and fail when installed)
    for folder in ("data", "training", "cluster", "serving"):
        for module in (ROOT / folder).rglob("*.py"):
            assert f"shardtune/{module.relative_to(ROOT).as_posix()}" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/entry_points.txt").decode()
    assert "shardtune = shardtune.cluster.cli:main" in entry_points


def test_wheel_ships_the_job_files_and_nothing_of_the_checkout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    configs = {f"shardtune/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert configs and configs <= set(names)
    checkout_only = ("tests", "bench", "docs", "k8s", ".ci", "build", "site")
    assert not [n for n in names if n.startswith(tuple(f"shardtune/{d}/" for d in checkout_only))]
    # only Python modules, the job files and dist-info: no stray data (a .orig, a README)
    stray = [n for n in names if n.startswith("shardtune/") and not n.endswith(".py")]
    assert not set(stray) - configs, stray


def test_building_prints_no_warnings(build):
    """A wheel build and an editable build (what `make setup` runs) print no setuptools warning:
    every folder is declared as shipped or not, and the license is an SPDX expression."""
    assert "warning" not in build[1].lower(), build[1]
    hook = (
        "import sys, tempfile; sys.path.insert(0, '.ci'); import build_backend; "
        "build_backend.build_editable(tempfile.mkdtemp())"
    )
    editable = subprocess.run(
        [sys.executable, "-c", hook], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert editable.returncode == 0, editable.stderr[-3000:]
    assert "warning" not in editable.stderr.lower(), editable.stderr


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
