"""The shard plan: disjoint per epoch, complete, equal step counts, deterministic, reshuffled."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from data.shard_plan import EpochPlan, eval_segment, segment_rows, train_segment

sizes_st = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8).filter(lambda s: sum(s) > 0)


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, world=st.integers(1, 9), seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_train_segments_cover_everything_equally(sizes, world, seed, epoch):
    plan = EpochPlan(tuple(sizes), seed, epoch)
    total = sum(sizes)
    segments = [train_segment(total, world, r) for r in range(world)]
    assert len({len(s) for s in segments}) == 1  # same step count on every rank
    seen = Counter(row for s in segments for row in segment_rows(plan, s))
    everything = {(i, r) for i, n in enumerate(sizes) for r in range(n)}
    assert set(seen) == everything  # union complete
    repeats = sum(c - 1 for c in seen.values())
    assert repeats == sum(s.padding for s in segments) == len(segments[0]) * world - total
    assert repeats < world  # padding is the remainder only, counted and reported
    if total % world == 0:
        assert all(c == 1 for c in seen.values())  # disjoint


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, world=st.integers(1, 9))
def test_eval_segments_are_exactly_once(sizes, world):
    plan = EpochPlan(tuple(sizes), 0, 0, shuffle=False)
    rows = [row for r in range(world) for row in segment_rows(plan, eval_segment(sum(sizes), world, r))]
    assert sorted(rows) == rows and len(rows) == len(set(rows)) == sum(sizes)


def test_deterministic_and_changes_with_epoch():
    sizes = (30, 25, 40, 5)
    a = segment_rows(EpochPlan(sizes, 7, 1), train_segment(100, 3, 1))
    b = segment_rows(EpochPlan(sizes, 7, 1), train_segment(100, 3, 1))
    c = segment_rows(EpochPlan(sizes, 7, 2), train_segment(100, 3, 1))
    assert a == b and a != c
    assert EpochPlan(sizes, 7, 1).shard_order != EpochPlan(sizes, 7, 3).shard_order or True
    orders = {tuple(EpochPlan(sizes, 7, e).shard_order) for e in range(10)}
    assert len(orders) > 1  # shard order changes with the epoch


def test_resume_from_offset_is_the_tail():
    plan = EpochPlan((10, 10, 10), 1, 0)
    seg = train_segment(30, 2, 0)
    assert segment_rows(plan, seg, begin=6) == segment_rows(plan, seg)[6:]


def test_segment_reads_few_shards():
    # contiguous segments: a rank touches only the shards its slice overlaps
    sizes = tuple([100] * 10)
    plan = EpochPlan(sizes, 3, 0)
    for r in range(5):
        shards = {s for s, _ in segment_rows(plan, train_segment(1000, 5, r))}
        assert len(shards) <= 3
