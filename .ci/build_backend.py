"""The build backend (pyproject.toml `backend-path = [".ci"]`): setuptools' own, minus one notice
that cannot apply here.

The repository root is the `shardtune` package (`package-dir = {shardtune = "."}`), a layout a
plain `.pth` path cannot express, so `pip install -e .` always gets setuptools' import-hook
editable install, which ends with "Please be careful with folders in your working directory with
the same name as your package". No folder of a checkout is named `shardtune`, so that one notice
is filtered here; every other setuptools warning still shows (tests/unit/test_packaging.py
checks that building prints none).
"""

import warnings

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517/660 hooks, unchanged)
from setuptools.warnings import InformationOnly

warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)

__all__ = _setuptools.__all__
