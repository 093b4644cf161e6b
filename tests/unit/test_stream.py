"""ShardStream: plan order, bounded shards in memory, resume offset, corrupt/missing shards."""

from __future__ import annotations

import pytest
from shardtune.data.manifest import DatasetError, read_manifest
from shardtune.data.prepare import prepare
from shardtune.data.shard_plan import (
    EpochPlan,
    reshard_rest_of_epoch,
    segment_ranges,
    segment_rows,
    train_segment,
)
from shardtune.data.stream import ShardStream


@pytest.fixture
def dataset(tmp_path, synthetic_conll):
    out = str(tmp_path / "ds")
    prepare("ner", [str(synthetic_conll)], out, shards=6)
    return out, read_manifest(out)


def test_stream_follows_the_plan_and_bounds_memory(dataset):
    uri, manifest = dataset
    sizes = tuple(s.num_examples for s in manifest.shards)
    plan = EpochPlan(sizes, seed=3, epoch=1)
    segment = train_segment(manifest.num_examples, 2, 1)
    stream = ShardStream(uri, manifest, plan, shards_in_memory=2)
    got = []
    for _offset, row in stream.iter_from(segment):
        got.append(row["id"])
        assert len(stream._cache) <= 2
    stream.close()
    # the plan's (shard, row) pairs map to ids in shard order (ids are contiguous per shard)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert got == [starts[s] + r for s, r in segment_rows(plan, segment)]
    assert stream.stats.shard_reads <= 4  # only the shards this half overlaps (+ wrap)


def test_resume_offset_yields_the_tail(dataset):
    uri, manifest = dataset
    plan = EpochPlan(tuple(s.num_examples for s in manifest.shards), seed=0, epoch=0)
    segment = train_segment(manifest.num_examples, 3, 0)
    full = [row["id"] for _, row in ShardStream(uri, manifest, plan).iter_from(segment)]
    tail = [(o, row["id"]) for o, row in ShardStream(uri, manifest, plan).iter_from(segment, 17)]
    assert [i for _, i in tail] == full[17:] and tail[0][0] == 17


def test_corrupt_and_missing_shards_are_named(dataset, tmp_path):
    uri, manifest = dataset
    victim = manifest.shards[0].name
    path = tmp_path / "ds" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    plan = EpochPlan(tuple(s.num_examples for s in manifest.shards), 0, 0, shuffle=False)
    with pytest.raises(DatasetError, match=f"shard {victim} is corrupt"):
        list(ShardStream(uri, manifest, plan).iter_from(train_segment(manifest.num_examples, 1, 0)))
    path.unlink()
    with pytest.raises(DatasetError, match=f"shard {victim} is missing"):
        list(ShardStream(uri, manifest, plan).iter_from(train_segment(manifest.num_examples, 1, 0)))


def test_explicit_ranges_after_a_world_size_change(dataset):
    """The rest of an epoch split for a new world size streams exactly the planned positions,
    from any offset, with shards still bounded."""
    uri, manifest = dataset
    sizes = tuple(s.num_examples for s in manifest.shards)
    total = manifest.num_examples
    plan = EpochPlan(sizes, seed=5, epoch=2)
    old = [segment_ranges(train_segment(total, 3, r), total) for r in range(3)]
    shares = reshard_rest_of_epoch(total, [(r, 11) for r in old], 2)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def expected(ranges):
        out = []
        for p in (p for a, b in ranges for p in range(a, b)):
            shard, offset = plan.locate(p)
            out.append(starts[shard] + int(plan.row_order(shard)[offset]))
        return out

    seen = []
    for share in shares:
        stream = ShardStream(uri, manifest, plan, shards_in_memory=2)
        got = []
        for _offset, row in stream.iter_ranges(share.ranges):
            got.append(row["id"])
            assert len(stream._cache) <= 2
        assert got == expected(share.ranges)
        tail = [
            (o, r["id"]) for o, r in ShardStream(uri, manifest, plan).iter_ranges(share.ranges, 23)
        ]
        assert [i for _, i in tail] == got[23:] and tail[0][0] == 23
        seen += got
    before = [i for r in old for i in expected(r)[:11]]
    assert set(seen) | set(before) == set(range(total)) and not set(seen) & set(before)


def test_an_eval_slice_reads_only_its_row_groups(tmp_path):
    """A rank's eval slice: the same rows as reading its shards whole, for a fraction of the
    bytes (prepare writes row groups of ROW_GROUP rows)."""
    import json

    from shardtune.data import prepare as prep
    from shardtune.data.manifest import read_all_rows, read_manifest
    from shardtune.data.shard_plan import eval_segment
    from shardtune.data.stream import read_span

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"s {i}", "label": "ab"[i % 3 % 2]}) + "\n"
                           for i in range(6000)))  # fmt: skip
    data = str(tmp_path / "d")
    prep.prepare("classify", [str(src)], data, shards=2)  # 3 row groups per shard
    manifest, everything = read_manifest(data), read_all_rows(data)[1]
    whole = sum((tmp_path / "d" / s.name).stat().st_size for s in manifest.shards)
    got, fetched = [], 0
    for rank in range(8):
        seg = eval_segment(6000, 8, rank)
        rows, n = read_span(data, manifest, seg.start, seg.stop)
        assert [r["id"] for r in rows] == list(range(seg.start, seg.stop))
        got += rows
        fetched += n
    assert got == everything
    # 8 ranks over 2 shards: reading the shards they touch whole fetches 4x the dataset; row
    # groups of 1000 rows against slices of 750 rows: about 2x
    assert fetched < 0.6 * 4 * whole, (fetched, whole)
    rows, n = read_span(data, manifest, 0, 3000)  # exactly shard 0: read whole, sha-checked
    assert len(rows) == 3000 and n == (tmp_path / "d" / manifest.shards[0].name).stat().st_size
