"""The ledger: flushes are cheap appends of stream positions, ids resolve from the plan and the
manifest, consecutive micro-batches share a line, and the committed view drops a failed
attempt's work past the checkpoint the next attempt resumed from, streaming."""

import json
import tracemalloc

from shardtune.data import prepare as prep
from shardtune.data.ledger import LedgerWriter, iter_committed, next_attempt, read_committed
from shardtune.data.manifest import read_all_rows, read_manifest
from shardtune.data.shard_plan import EpochPlan, segment_ranges, segment_rows, train_segment


def _dataset(tmp_path, n=40, shards=3) -> str:
    src = tmp_path / "corpus.jsonl"
    src.write_text(
        "".join(
            json.dumps({"text": f"sentence {i}", "label": "ab"[i % 2]}) + "\n" for i in range(n)
        )
    )
    out = str(tmp_path / "data")
    prep.prepare("classify", [str(src)], out, shards=shards)
    return out


def _expected_ids(data, world, rank, epoch, lo, hi) -> list[int]:
    manifest, rows = read_all_rows(data)
    plan = EpochPlan(manifest.shard_sizes(), seed=0, epoch=epoch)
    ids_of = {}
    for shard, info in enumerate(manifest.shards):
        from shardtune.data.manifest import read_shard_rows

        ids_of[shard] = [r["id"] for r in read_shard_rows(data, info)]
    seg = train_segment(manifest.num_examples, world, rank)
    return [ids_of[s][r] for s, r in segment_rows(plan, seg)[lo:hi]]


def _attempt(run, data, attempt, world, resumed, steps, batch=2):
    manifest = read_manifest(data)
    plan = EpochPlan(manifest.shard_sizes(), seed=0, epoch=0)
    writers = [
        LedgerWriter(
            run, rank=r, attempt=attempt, world_size=world, resumed_step=resumed, data_uri=data
        )  # fmt: skip
        for r in range(world)
    ]
    for r, w in enumerate(writers):
        seg = train_segment(manifest.num_examples, world, r)
        w.positions(epoch=0, plan=plan, ranges=segment_ranges(seg, manifest.num_examples))
    for step in steps:
        for w in writers:
            offsets = range((step - 1) * batch, step * batch)
            w.record(epoch=0, step=step, micro_step=step, offsets=offsets)
            if step % 2 == 0:
                w.flush()
    for w in writers:
        w.flush()


def test_committed_ledger_drops_work_after_the_resumed_checkpoint(tmp_path):
    data, run = _dataset(tmp_path), str(tmp_path / "run")
    assert next_attempt(run) == 1
    _attempt(run, data, 1, 2, None, range(1, 8))  # failed after step 7; its checkpoint was step 4
    assert next_attempt(run) == 2
    _attempt(run, data, 2, 1, 4, range(5, 10))  # resumed from step 4 with one worker
    committed = read_committed(run)
    assert [(e["step"], e["rank"], e["attempt"]) for e in committed] == [
        (s, r, 1) for r in range(2) for s in range(1, 5)
    ] + [(s, 0, 2) for s in range(5, 10)]
    last = list(committed)[-1]  # a second pass streams again
    assert last["world_size"] == 1
    assert last["ids"] == _expected_ids(data, 1, 0, 0, 16, 18)
    for e in committed:
        lo = (e["micro_step"] - 1) * 2
        assert e["ids"] == _expected_ids(data, e["world_size"], e["rank"], 0, lo, lo + 2)
    parts = sorted(p.name for p in (tmp_path / "run" / "ledger" / "attempt-00001").iterdir())
    assert parts[:3] == [
        "rank-00000.00001.jsonl",
        "rank-00000.00002.jsonl",
        "rank-00000.00003.jsonl",
    ]


def test_a_fresh_restart_discards_everything_before(tmp_path):
    data, run = _dataset(tmp_path), str(tmp_path / "run")
    _attempt(run, data, 1, 1, None, range(1, 4))  # failed before any checkpoint
    _attempt(run, data, 2, 1, None, range(1, 3))
    assert [(e["step"], e["attempt"]) for e in read_committed(run)] == [(1, 2), (2, 2)]


def test_consecutive_batches_share_one_line_and_scattered_ones_keep_their_offsets(tmp_path):
    data, run = _dataset(tmp_path, n=40), str(tmp_path / "run")
    manifest = read_manifest(data)
    plan = EpochPlan(manifest.shard_sizes(), seed=0, epoch=0)
    w = LedgerWriter(run, rank=0, attempt=1, world_size=1, resumed_step=None, data_uri=data,
                     grad_accum=2)  # fmt: skip
    w.positions(epoch=0, plan=plan, ranges=((0, 40),))
    for m in range(1, 11):  # 10 micro-batches of 4 in stream order (batch order inside shuffled)
        w.record(epoch=0, step=(m + 1) // 2, micro_step=m, offsets=[4 * m - 1, 4 * m - 4, 4 * m - 3, 4 * m - 2])  # fmt: skip
    w.flush()
    w.positions(epoch=1, plan=EpochPlan(manifest.shard_sizes(), seed=0, epoch=1),
                ranges=((0, 40),))  # fmt: skip
    w.record(epoch=1, step=6, micro_step=11, offsets=[7, 2, 30])  # a length-grouped batch
    w.flush()
    part1 = (tmp_path / "run/ledger/attempt-00001/rank-00000.00001.jsonl").read_text()
    assert len(part1.splitlines()) == 2  # the position list and one line for 10 micro-batches
    entries = list(read_committed(run))
    assert [(e["micro_step"], e["step"]) for e in entries] == [
        (m, (m + 1) // 2) for m in range(1, 12)
    ]
    order = [i for e in entries[:10] for i in e["ids"]]
    assert sorted(order) == list(range(40))  # an epoch: every example once
    want = _expected_ids(data, 1, 0, 0, 0, 40)
    assert order == want
    epoch1 = EpochPlan(manifest.shard_sizes(), seed=0, epoch=1)
    from shardtune.data.manifest import read_shard_rows

    ids_of = {s: [r["id"] for r in read_shard_rows(data, info)]
              for s, info in enumerate(manifest.shards)}  # fmt: skip
    rows = segment_rows(epoch1, train_segment(40, 1, 0))
    assert entries[10]["ids"] == [ids_of[s][r] for s, r in (rows[2], rows[7], rows[30])]


def test_reading_streams_with_bounded_memory(tmp_path):
    """50k length-grouped micro-batches: a pass holds one entry at a time, not the ledger."""
    data, run = _dataset(tmp_path, n=40), str(tmp_path / "run")
    manifest = read_manifest(data)
    plan = EpochPlan(manifest.shard_sizes(), seed=0, epoch=0)
    w = LedgerWriter(run, rank=0, attempt=1, world_size=1, resumed_step=None, data_uri=data)
    w.positions(epoch=0, plan=plan, ranges=((0, 40),))
    n = 50_000
    for m in range(1, n + 1):
        w.record(epoch=0, step=m, micro_step=m, offsets=[(3 * m) % 40, (3 * m + 7) % 40])
        if m % 5000 == 0:
            w.flush()
    tracemalloc.start()
    count = sum(1 for _ in iter_committed(run))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB while streaming {n} entries"


def test_length_groups_cost_a_byte_per_example_and_a_cut_group_reads_back_exactly(tmp_path):
    """Length-grouped micro-batches (scattered offsets inside a group of batch * grouping): a
    byte per example, consecutive groups sharing a line, a group cut by a flush continuing in
    the next part from its batch index. Every micro-batch reads back with its own examples."""
    import random

    data, run = _dataset(tmp_path, n=40), str(tmp_path / "run")
    manifest = read_manifest(data)
    plan = EpochPlan(manifest.shard_sizes(), seed=0, epoch=0)
    batch, grouping, rng = 4, 3, random.Random(1)
    want, m = {}, 0
    w = LedgerWriter(run, rank=0, attempt=1, world_size=1, resumed_step=None, data_uri=data,
                     batch_size=batch, length_grouping=grouping)  # fmt: skip
    w.positions(epoch=0, plan=plan, ranges=((0, 40),))
    for start in range(0, 40, batch * grouping):
        group = list(range(start, min(40, start + batch * grouping)))
        rng.shuffle(group)
        for k in range(0, len(group), batch):
            m += 1
            w.record(epoch=0, step=m, micro_step=m, offsets=group[k : k + batch],
                     group_step=k // batch)  # fmt: skip
            want[m] = sorted(group[k : k + batch])
            if m == 5:
                w.flush()  # cuts the second group
    w.flush()
    lines = [
        json.loads(line)
        for p in sorted((tmp_path / "run/ledger/attempt-00001").iterdir())
        for line in p.read_text().splitlines()
    ]
    # one line per part: groups 1-2 up to the cut, then the rest of 2 (from its third batch)
    # with groups 3-4; no batch needed explicit offsets
    assert [("assign" in r, r.get("k0")) for r in lines if "ranges" not in r] == [
        (True, 0), (True, 2),
    ]  # fmt: skip
    ids_in_order = _expected_ids(data, 1, 0, 0, 0, 40)
    entries = list(read_committed(run))
    assert [e["micro_step"] for e in entries] == list(range(1, m + 1))
    for e in entries:
        assert e["ids"] == [ids_in_order[o] for o in want[e["micro_step"]]]


def test_an_attempt_resumed_mid_group_records_the_rest_of_that_group(tmp_path):
    data, run = _dataset(tmp_path, n=40), str(tmp_path / "run")
    plan = EpochPlan(read_manifest(data).shard_sizes(), seed=0, epoch=0)
    groups = [[5, 0, 7, 2, 1, 4, 6, 3], [9, 8, 15, 11, 10, 12, 14, 13]]  # 2 batches of 4 each
    batches = [g[k : k + 4] for g in groups for k in (0, 4)]
    for attempt, (resumed, todo) in enumerate([(None, range(0, 3)), (1, range(1, 4))], 1):
        w = LedgerWriter(run, rank=0, attempt=attempt, world_size=1, resumed_step=resumed,
                         data_uri=data, batch_size=4, length_grouping=2)  # fmt: skip
        w.positions(epoch=0, plan=plan, ranges=((0, 40),))
        for i in todo:  # attempt 2 resumes after step 1: mid-group, at group_step 1
            w.record(epoch=0, step=i + 1, micro_step=i + 1, offsets=batches[i], group_step=i % 2)
        w.flush()
    ids = _expected_ids(data, 1, 0, 0, 0, 40)
    got = [(e["attempt"], e["micro_step"], e["ids"]) for e in read_committed(run)]
    assert got == [(1, 1, [ids[o] for o in sorted(batches[0])])] + [
        (2, i + 1, [ids[o] for o in sorted(batches[i])]) for i in range(1, 4)
    ]
