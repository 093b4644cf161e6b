"""The shard plan: disjoint per epoch, complete, equal step counts, deterministic, reshuffled."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from shardtune.data.shard_plan import (
    EpochPlan,
    eval_segment,
    ranges_len,
    reshard_rest_of_epoch,
    segment_ranges,
    segment_rows,
    train_segment,
)

sizes_st = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8).filter(
    lambda s: sum(s) > 0
)


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
    rows = [
        row for r in range(world) for row in segment_rows(plan, eval_segment(sum(sizes), world, r))
    ]
    assert sorted(rows) == rows and len(rows) == len(set(rows)) == sum(sizes)


def test_deterministic_and_changes_with_epoch():
    sizes = (30, 25, 40, 5)
    a = segment_rows(EpochPlan(sizes, 7, 1), train_segment(100, 3, 1))
    b = segment_rows(EpochPlan(sizes, 7, 1), train_segment(100, 3, 1))
    c = segment_rows(EpochPlan(sizes, 7, 2), train_segment(100, 3, 1))
    assert a == b and a != c
    # seed 7: epochs 1 and 3 order the shards [0, 2, 3, 1] and [0, 1, 2, 3]
    assert EpochPlan(sizes, 7, 1).shard_order != EpochPlan(sizes, 7, 3).shard_order
    assert EpochPlan(sizes, 7, 1).shard_order != EpochPlan(sizes, 8, 1).shard_order
    assert sorted(EpochPlan(sizes, 7, 1).shard_order) == [0, 1, 2, 3]
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


def _positions(ranges) -> list[int]:
    return [p for start, stop in ranges for p in range(start, stop)]


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 120), old_world=st.integers(1, 7), new_world=st.integers(1, 7),
    fraction=st.floats(0, 1), second=st.integers(1, 5), fraction2=st.floats(0, 1),
)  # fmt: skip
def test_reshard_rest_of_epoch_is_exactly_once(
    total, old_world, new_world, fraction, second, fraction2
):
    old = [segment_ranges(train_segment(total, old_world, r), total) for r in range(old_world)]
    done = int(fraction * ranges_len(old[0]))  # ranks run in lockstep: one position for all
    consumed = [(ranges, done) for ranges in old]
    before = Counter(p for ranges in old for p in _positions(ranges)[:done])

    def check(shares, before):
        assert len({len(s) for s in shares}) == 1  # equal step counts on the new ranks
        new = Counter(p for s in shares for p in _positions(s.ranges))
        assert all(0 <= p < total for p in new)
        assert not set(new) & set(before)  # nothing consumed before is read again
        assert set(new) | set(before) == set(range(total))  # nothing is skipped
        assert sum(c - 1 for c in new.values()) == sum(s.padding for s in shares)  # counted
        rest = total - len(before)
        assert sum(s.padding for s in shares) == len(shares[0]) * len(shares) - rest < len(shares)

    shares = reshard_rest_of_epoch(total, consumed, new_world)
    check(shares, before)
    # a second restart, with yet another world size, part-way through the new shares
    done2 = int(fraction2 * len(shares[0]))
    consumed2 = consumed + [(s.ranges, done2) for s in shares]
    before2 = before + Counter(p for s in shares for p in _positions(s.ranges)[:done2])
    check(reshard_rest_of_epoch(total, consumed2, second), before2)


def test_segment_ranges_wrap_to_the_start():
    assert segment_ranges(train_segment(10, 3, 2), 10) == ((8, 10), (0, 2))
    assert segment_ranges(train_segment(5, 4, 3), 5) == ((1, 3),)  # starts past the end
    plan = EpochPlan((4, 6), 2, 0)
    seg = train_segment(10, 3, 2)
    assert [plan.locate(p) for p in _positions(segment_ranges(seg, 10))] == [
        plan.locate(p) for p in range(seg.start, seg.stop)
    ]


class _CountingPlan(EpochPlan):
    """The real plan, counting lookups."""

    def span(self, position):
        object.__setattr__(self, "lookups", getattr(self, "lookups", 0) + 1)
        return super().span(position)


def test_one_lookup_per_shard_not_per_row():
    plan = _CountingPlan(tuple([50] * 40), 5, 0)
    segment = train_segment(2000, 2, 1)
    rows = segment_rows(plan, segment)
    assert len(rows) == 1000 and plan.lookups <= 21  # 20 shards of this half (+ a boundary)


def test_plan_for_a_million_shards_is_small():
    """Memory only: how long the build takes is a bench figure (bench/scale_sim.py measures it),
    not a unit-test claim that a loaded CI machine could break."""
    plan = EpochPlan(tuple([1000] * 1_000_000), 1, 2)
    shard, offset = plan.locate(123_456_789)
    arrays = plan._sizes.nbytes + plan._order.nbytes + plan._starts.nbytes
    assert arrays == 3 * 8 * 1_000_000  # three int64 arrays, nothing per row
    assert 0 <= offset < 1000 and plan.span(123_456_789)[:2] == (shard, offset)
    assert plan.identity == EpochPlan(tuple([1000] * 1_000_000), 1, 2).identity
    assert plan.identity != EpochPlan(tuple([1000] * 1_000_000), 1, 3).identity
