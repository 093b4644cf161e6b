"""The ledger: flushes are cheap appends, and the committed view drops a failed attempt's work
past the checkpoint the next attempt resumed from."""

from shardtune.data.ledger import LedgerWriter, next_attempt, read_committed


def _attempt(run, attempt, world, resumed, steps):
    writers = [
        LedgerWriter(run, rank=r, attempt=attempt, world_size=world, resumed_step=resumed)
        for r in range(world)
    ]
    for step in steps:
        for r, w in enumerate(writers):
            w.record(epoch=0, step=step, micro_step=step, ids=[100 * r + step])
            if step % 2 == 0:
                w.flush()
    for w in writers:
        w.flush()


def test_committed_ledger_drops_work_after_the_resumed_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    assert next_attempt(run) == 1
    _attempt(run, 1, 2, None, range(1, 8))  # failed after step 7; its checkpoint was step 4
    assert next_attempt(run) == 2
    _attempt(run, 2, 1, 4, range(5, 10))  # resumed from step 4 with one worker
    committed = read_committed(run)
    assert [(e["step"], e["rank"], e["attempt"]) for e in committed] == [
        (s, r, 1) for s in range(1, 5) for r in range(2)
    ] + [(s, 0, 2) for s in range(5, 10)]
    assert committed[-1]["ids"] == [9] and committed[-1]["world_size"] == 1
    parts = sorted(p.name for p in (tmp_path / "run" / "ledger" / "attempt-00001").iterdir())
    assert parts[:3] == [
        "rank-00000.00001.jsonl",
        "rank-00000.00002.jsonl",
        "rank-00000.00003.jsonl",
    ]


def test_a_fresh_restart_discards_everything_before(tmp_path):
    run = str(tmp_path / "run")
    _attempt(run, 1, 1, None, range(1, 4))  # failed before any checkpoint
    _attempt(run, 2, 1, None, range(1, 3))
    assert [(e["step"], e["attempt"]) for e in read_committed(run)] == [(1, 2), (2, 2)]
