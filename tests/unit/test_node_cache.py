"""One fetch per node (issue 13.6): the node-local cache of models and manifests is keyed by URI
and content, shared by concurrent ranks, and never serves a replaced object stale. memory://
entries have no ETag or mtime (only a size), so the replaced-content cases also run against the
S3 endpoint (moto's server on loopback) with content of the same size."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
from shardtune.data import storage

from tests.testkit import LocalS3, use_dummy_credentials


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


@pytest.fixture(scope="module")
def s3_model():
    """A bucket on moto's server holding a two-file model, and the options that reach it."""
    use_dummy_credentials()
    with LocalS3() as server:
        server.create_bucket("node-cache")
        options = storage.StorageOptions(endpoint_url=server.endpoint_url)
        fs, _ = storage.filesystem("s3://node-cache", options)
        fs.pipe({"node-cache/m/config.json": b'{"a": 1}', "node-cache/m/weights.bin": b"w" * 1000})
        yield fs, options


def test_same_size_replacement_on_s3_is_fetched_again(s3_model, tmp_path, monkeypatch):
    """A re-export of the same size (a fine-tune changes values, not shapes): only the ETag
    tells the two apart, so a key of size (and a second-resolution mtime) would serve it stale."""
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    fs, options = s3_model
    first_dir = storage.node_cached_dir("s3://node-cache/m", options)
    first_file = storage.node_cached("s3://node-cache/m/weights.bin", options)
    assert storage.node_cached_dir("s3://node-cache/m", options) == first_dir  # a hit
    assert storage.node_cached("s3://node-cache/m/weights.bin", options) == first_file

    fs.pipe({"node-cache/m/weights.bin": b"x" * 1000})
    second_dir = storage.node_cached_dir("s3://node-cache/m", options)
    second_file = storage.node_cached("s3://node-cache/m/weights.bin", options)
    assert second_dir != first_dir and second_file != first_file
    for path in (os.path.join(second_dir, "weights.bin"), second_file):
        with open(path, "rb") as f:
            assert f.read() == b"x" * 1000
    with open(os.path.join(second_dir, "config.json"), "rb") as f:
        assert f.read() == b'{"a": 1}'
