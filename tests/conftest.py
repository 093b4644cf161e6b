"""Shared fixtures: a tiny randomly initialised BERT with the real MiniLM tokenizer, and a small
synthetic-but-learnable NER corpus in CoNLL form (both built by tests.testkit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import testkit

TESTS = Path(__file__).resolve().parent
TIER_MARKERS = {"integration": pytest.mark.integration, "slow": pytest.mark.slow}
# Unit tests (no Ray) that still take minutes: `slow` too, so `-m "not slow"` is a quick loop.
# CI runs every folder in full whatever the markers say.
SLOW_UNIT_TESTS = {
    "unit/test_ledger.py::test_reading_streams_with_bounded_memory",  # 50k entries under
    # tracemalloc: ~130 s on 2 loaded cores
}


def pytest_collection_modifyitems(items):
    """A test's tier marker from its folder (tests/integration/ -> integration, tests/slow/ ->
    slow), so `-m "not slow"` and `-m "not integration and not slow"` select what the folders
    hold."""
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in TIER_MARKERS:
            item.add_marker(TIER_MARKERS[parts[0]])
        if f"{'/'.join(parts)}::{item.name}" in SLOW_UNIT_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return testkit.tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 64-wide BERT with random weights and the real uncased WordPiece tokenizer."""
    return testkit.random_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def synthetic_conll(tmp_path_factory) -> Path:
    return testkit.write_conll(
        tmp_path_factory.mktemp("corpus") / "synthetic.conll",
        testkit.synthetic_sentences(240, seed=1),
    )
