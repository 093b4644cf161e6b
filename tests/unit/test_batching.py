"""Length-grouped micro-batches: pure grouping, the worker's epoch batches over a real prepared
dataset and the real tokenizer (same seed and epoch -> same batches; a resume mid-epoch yields
exactly the remaining batches; a resplit for another world size sees every example once)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shardtune.data.batching import group_batches, group_starts, padding_fraction
from shardtune.data.manifest import read_manifest
from shardtune.data.prepare import prepare
from shardtune.data.shard_plan import train_segment
from shardtune.data.storage import StorageOptions
from shardtune.data.tasks import get_task
from shardtune.training import checkpoint as ckpt
from shardtune.training.config import DataSection, TrainSection
from shardtune.training.feed import DataFeed, advance

from tests.testkit import synthetic_sentences, tokenizer_dir, write_conll

BATCH, GROUPING = 4, 3  # groups of 12 rows


@given(st.lists(st.integers(1, 60), max_size=80), st.integers(1, 9), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_group_batches_cover_every_row_once_longest_first(lengths, batch_size, seed):
    batches = group_batches(lengths, batch_size, key=(seed, 1))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == batch_size for b in batches[:-1] if len(b) != len(lengths) % batch_size)
    assert sum(len(b) < batch_size for b in batches) <= 1  # only one partial micro-batch
    if lengths:
        assert max(lengths[i] for i in batches[0]) == max(lengths)
        # rows of a batch are neighbours in length order: no other batch's row lies between
        ranked = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        for b in batches:
            pos = sorted(ranked.index(i) for i in b)
            assert pos == list(range(pos[0], pos[0] + len(b)))
    assert batches == group_batches(lengths, batch_size, key=(seed, 1))


def test_grouping_cuts_padding():
    lengths = [5, 40, 6, 38, 7, 41, 5, 39]
    stream_order = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert padding_fraction(lengths, stream_order) > 0.4
    assert padding_fraction(lengths, group_batches(lengths, 2, key=(0,))) < 0.05


def test_group_starts_refuse_a_position_inside_a_group():
    assert list(group_starts(30, 4, 3, 12)) == [12, 24]
    with pytest.raises(ValueError, match="not a group start"):
        group_starts(30, 4, 3, 5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("grouped")
    corpus = write_conll(root / "c.conll", synthetic_sentences(61, seed=4))
    prepare("ner", [str(corpus)], str(root / "train"), shards=3)
    return str(root / "train")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


@dataclasses.dataclass
class Fed:
    """A rank's data feed and the position it reads from (what a checkpoint holds)."""

    feed: DataFeed
    state: ckpt.TrainState


def worker(dataset, tokenizer, *, rank=0, world=1, state=None, seed=5, grouping=GROUPING) -> Fed:
    feed = DataFeed(
        DataSection(train=dataset),
        TrainSection(batch_size=BATCH, length_grouping=grouping, seed=seed), StorageOptions(),
        manifest=read_manifest(dataset), spec=get_task("ner"), tokenizer=tokenizer,
        rank=rank, world=world,
    )  # fmt: skip
    assert feed.segment_len == len(train_segment(61, world, rank))
    return Fed(feed, state or ckpt.TrainState())


def run(w: Fed, limit: int | None = None) -> list[list[int]]:
    """Example ids of each micro-batch, advancing the state as train_step does."""
    out = []
    for batch in w.feed.batches(w.state):
        if limit is not None and len(out) == limit:
            break
        out.append([row["id"] for row in batch.rows])
        advance(w.state, batch)
    w.feed.close()
    return out


def test_same_seed_and_epoch_give_the_same_batches(dataset, tokenizer):
    a = run(worker(dataset, tokenizer))
    assert a == run(worker(dataset, tokenizer))
    assert a != run(worker(dataset, tokenizer, seed=6))
    assert a != run(worker(dataset, tokenizer, state=ckpt.TrainState(epoch=1)))
    assert Counter(i for b in a for i in b) == Counter(range(61))  # one worker: each once
    assert len(a) == -(-61 // BATCH) and sum(len(b) < BATCH for b in a) == 1


@pytest.mark.parametrize("done", [1, 2, 3, 7, 12])  # inside a group, at its end, in the last
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(dataset, tokenizer, done):
    full = run(worker(dataset, tokenizer, rank=1, world=2))
    first = worker(dataset, tokenizer, rank=1, world=2)
    head = run(first, limit=done)
    saved = ckpt.TrainState(**dataclasses.asdict(first.state))  # what a checkpoint holds
    rest = run(worker(dataset, tokenizer, rank=1, world=2, state=saved))
    assert head + rest == full


@pytest.mark.parametrize(("old_world", "new_world", "done"), [(2, 1, 2), (2, 3, 5), (3, 2, 4)])
def test_resplit_mid_group_sees_every_example_once(dataset, tokenizer, old_world, new_world, done):
    seen = Counter()
    states = []
    for r in range(old_world):
        w = worker(dataset, tokenizer, rank=r, world=old_world)
        seen.update(i for b in run(w, limit=done) for i in b)
        states.append(ckpt.TrainState(**dataclasses.asdict(w.state)))
    total = 61
    shares = ckpt.rest_of_epoch(states, total, new_world)
    padding = (
        sum(s.padding for s in shares) + len(train_segment(total, old_world, 0)) * old_world - total
    )
    for r, share in enumerate(shares):
        state = ckpt.TrainState(ranges=share.ranges)
        seen.update(
            i
            for b in run(worker(dataset, tokenizer, rank=r, world=new_world, state=state))
            for i in b
        )
    assert set(seen) == set(range(total))
    # every example once; the only repeats are the counted wrap-around padding of either plan
    assert sum(seen.values()) - total <= padding


def test_an_epoch_resplit_twice_still_sees_every_example_once(dataset, tokenizer):
    """2 workers -> 1 (a node lost) -> 2 (capacity back), each time mid-group: the second
    resplit must hand out only what the first one assigned and nobody consumed since."""
    total, seen, padding = 61, Counter(), 0
    states = []
    for r in range(2):
        w = worker(dataset, tokenizer, rank=r, world=2)
        seen.update(i for b in run(w, limit=2) for i in b)
        states.append(ckpt.TrainState(**dataclasses.asdict(w.state)))
    padding += len(train_segment(total, 2, 0)) * 2 - total
    (share,) = ckpt.rest_of_epoch(states, total, 1)
    padding += share.padding
    alone = worker(dataset, tokenizer, state=ckpt.TrainState(ranges=share.ranges))
    seen.update(i for b in run(alone, limit=4) for i in b)
    shares = ckpt.rest_of_epoch([ckpt.TrainState(**dataclasses.asdict(alone.state))], total, 2)
    for r, share in enumerate(shares):
        padding += share.padding
        state = ckpt.TrainState(ranges=share.ranges)
        seen.update(
            i for b in run(worker(dataset, tokenizer, rank=r, world=2, state=state)) for i in b
        )
    assert set(seen) == set(range(total))
    assert sum(seen.values()) - total <= padding
    assert max(seen.values()) <= 2
