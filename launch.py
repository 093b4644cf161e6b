"""Thin entry point for a checkout: `python launch.py [verb] ...` runs the `shardtune` CLI
(shardtune.cluster.cli), so `ray job submit --working-dir . -- python launch.py train ...` works
from a checkout with no install. With no verb it runs the demo.

This file holds no logic beyond making the checkout importable as `shardtune` when no installed
`shardtune` comes from this same directory (`use_checkout`, also Ray's worker setup hook in
configs/runtime_env.yaml, so that Ray workers import the code that was submitted).
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def use_checkout() -> None:
    """Make `import shardtune` load this checkout (idempotent). A `shardtune` installed from
    this directory (pip install -e .) already does; any other one is shadowed by the checkout."""
    current = sys.modules.get("shardtune")
    if current is None:
        spec = importlib.util.find_spec("shardtune")
        if spec is not None and ROOT in [
            os.path.abspath(p) for p in spec.submodule_search_locations or []
        ]:
            return
    elif ROOT in [os.path.abspath(p) for p in getattr(current, "__path__", [])]:
        return
    for name in [n for n in sys.modules if n == "shardtune" or n.startswith("shardtune.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "shardtune", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["shardtune"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    use_checkout()
    from shardtune.cluster.cli import main

    sys.exit(main())
