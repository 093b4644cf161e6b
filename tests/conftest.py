"""Shared fixtures: a tiny randomly initialised BERT with the real MiniLM tokenizer, and a small
synthetic-but-learnable NER corpus in CoNLL form (both built by tests.testkit)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests import testkit


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
