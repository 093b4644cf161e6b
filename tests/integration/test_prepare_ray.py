"""`prepare --ray`: one Ray task per input file validates and writes shards; the output is the
single-process output byte for byte (manifest, every shard, split parts, an append), and a bad
line anywhere is the same one CorpusError naming file:line, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shardtune.cluster.cli import ray_pool
from shardtune.data import prepare as prep
from shardtune.data.corpus import CorpusError

from tests.testkit import synthetic_sentences, write_conll

SPLIT = {"train": 0.7, "dev": 0.15, "test": 0.15}


def _files(root: Path, sizes: list[int], seed: int = 0) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [
        str(write_conll(root / f"part-{i}.conll", synthetic_sentences(n, seed=seed + i)))
        for i, n in enumerate(sizes)
    ]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_parallel_prepare_writes_what_one_process_writes(tmp_path, local_ray):
    # Shards of 17 straddle the files (sizes 40/25/33 per file), so pieces are joined.
    files = _files(tmp_path / "in", [40, 25, 33])
    one, many = tmp_path / "one", tmp_path / "many"
    prep.prepare("ner", files, str(one), split=SPLIT, shard_size=17, seed=3)
    got = prep.prepare("ner", files, str(many), split=SPLIT, shard_size=17, seed=3,
                       pool=ray_pool())  # fmt: skip
    assert _tree(many) == _tree(one)
    assert sum(len(m.shards) for m in got.values()) > 3
    # an append through Ray continues ids and versions as one process does
    more = _files(tmp_path / "more", [9, 12], seed=50)
    prep.prepare("ner", more, str(one), split=SPLIT, shard_size=17, seed=3, append=True)
    prep.prepare("ner", more, str(many), split=SPLIT, shard_size=17, seed=3, append=True,
                 pool=ray_pool())  # fmt: skip
    assert _tree(many) == _tree(one)
    assert json.loads((many / "train" / "manifest.json").read_text())["version"] == 2


def test_a_bad_line_is_reported_through_ray_and_nothing_is_written(tmp_path, local_ray):
    files = _files(tmp_path / "in", [10, 10])
    bad = tmp_path / "in" / "bad.conll"
    bad.write_text("ok O\nlonely\n\nfine B-X\n")
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as one:
        prep.prepare("ner", [files[0], str(bad), files[1]], str(out), split=SPLIT)
    with pytest.raises(CorpusError) as many:
        prep.prepare("ner", [files[0], str(bad), files[1]], str(out), split=SPLIT,
                     pool=ray_pool())  # fmt: skip
    assert many.value.problems == one.value.problems
    assert [p.split(": ")[0] for p in many.value.problems] == [f"{bad}:2"]
    assert not out.exists()
