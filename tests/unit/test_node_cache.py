"""One fetch per node (issue 13.6): the node-local cache of models and manifests is keyed by URI
and content, shared by concurrent ranks, and never serves a replaced object stale."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
from shardtune.data import storage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe({"/models/m/config.json": b'{"a": 1}', "/models/m/weights.bin": b"w" * 1000})
    yield fs
    fs.rm("/models", recursive=True)


def test_concurrent_ranks_share_one_copy(cache, monkeypatch):
    gets = []
    real = type(cache).get_file

    def counted(self, remote, local, **kw):
        gets.append(remote)
        return real(self, remote, local, **kw)

    monkeypatch.setattr(type(cache), "get_file", counted)
    with ThreadPoolExecutor(8) as pool:
        dirs = set(pool.map(lambda _: storage.node_cached_dir("memory://models/m"), range(8)))
    assert len(dirs) == 1 and len(gets) == 2  # 8 "ranks", each object fetched once
    (path,) = dirs
    with open(os.path.join(path, "config.json")) as f:
        assert f.read() == '{"a": 1}'


def test_replaced_content_is_fetched_again(cache):
    first = storage.node_cached_dir("memory://models/m")
    cache.pipe({"/models/m/weights.bin": b"x" * 1001})  # a re-export to the same URI
    second = storage.node_cached_dir("memory://models/m")
    assert second != first and os.path.getsize(os.path.join(second, "weights.bin")) == 1001
    one = storage.node_cached("memory://models/m/config.json")
    assert storage.node_cached("memory://models/m/config.json") == one
