"""Storage access: the one module that builds filesystems and touches bytes in storage.

Every URI in shardtune (local path, file://, s3://, any fsspec protocol) goes through here.
fsspec and s3fs are imported lazily so that pure modules and unit tests never pay for them.
Credentials are never taken as arguments: they come from the standard AWS environment
variables, a named profile, or the pod's service account, so nothing here can leak them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Holds no secrets on purpose."""

    endpoint_url: str | None = None  # S3-compatible store (MinIO, moto, Ceph); None = AWS
    profile: str | None = None  # named AWS profile; None = environment / instance role
    retries: int = 8  # attempts for transient errors (connection reset, 5xx, throttling)

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        kwargs: dict[str, Any] = {"use_listings_cache": False}  # checkpoints appear mid-run
        # botocore alone would retry a refused connection silently for ~7 s; keep its retries
        # short so an outage reaches `with_retries`, which backs off longer and logs each retry.
        kwargs["config_kwargs"] = {"retries": {"max_attempts": 3, "mode": "standard"}}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.profile:
            kwargs["profile"] = self.profile
        return kwargs


def split_protocol(uri: str) -> tuple[str, str]:
    """'s3://b/k' -> ('s3', 'b/k'); '/tmp/x' or 'x' -> ('file', absolute path)."""
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        if protocol == "file":
            return "file", os.path.abspath(path)
        return protocol, path
    return "file", os.path.abspath(uri)


def is_local(uri: str) -> bool:
    return split_protocol(uri)[0] == "file"


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return f"{protocol}://" + posixpath.join(path.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def filesystem(uri: str, options: StorageOptions | None = None):
    """Return (fsspec filesystem, path inside it) for a URI."""
    import fsspec

    options = options or StorageOptions()
    protocol, path = split_protocol(uri)
    fs = fsspec.filesystem(protocol, **options.fsspec_kwargs(protocol))
    return fs, path


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None):
    """(pyarrow FileSystem, path) wrapping the same fsspec filesystem, for Ray Train's
    `storage_filesystem`. pyarrow's own S3 client ignores AWS_ENDPOINT_URL, so wrapping the
    fsspec filesystem is what keeps data and checkpoints on one configuration; every call Ray
    makes through it (checkpoint uploads and downloads, the controller's snapshot) retries
    transient errors as `with_retries` does."""
    import pyarrow.fs

    protocol, path = split_protocol(uri)
    if protocol == "file":
        return pyarrow.fs.LocalFileSystem(), path
    from shardtune.data.retrying_fs import RetryingFSSpecHandler

    fs, path = filesystem(uri, options)
    return pyarrow.fs.PyFileSystem(RetryingFSSpecHandler(fs, options or StorageOptions())), path


def with_retries(what: str, fn: Callable[[], T], options: StorageOptions | None = None) -> T:
    """Run a storage call under the one retry policy (data/retry.py): transient errors are
    retried with exponential backoff and jitter, `options.retries` attempts in all."""
    from shardtune.data import retry

    return retry.call(what, fn, (options or StorageOptions()).retries)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    return with_retries(f"read {uri}", lambda: fs.cat_file(path), options)


def read_ranges(uri: str, read: Callable[[Any], T], options: StorageOptions | None = None) -> T:
    """`read(file)` on a seekable file whose reads are ranged GETs (a Parquet footer and the
    row groups asked for, not the whole object), retried as a whole like read_bytes."""
    fs, path = filesystem(uri, options)

    def attempt() -> T:
        with fs.open(path, "rb", cache_type="none") as f:
            return read(f)

    return with_retries(f"read {uri} (ranges)", attempt, options)


def read_text(uri: str, options: StorageOptions | None = None) -> str:
    return read_bytes(uri, options).decode("utf-8")


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a whole object. Local files are written to a temp name and renamed, so a reader
    never sees half a file (object stores give that for free)."""
    fs, path = filesystem(uri, options)
    if is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with_retries(f"write {uri}", lambda: fs.pipe_file(path, data), options)


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return with_retries(f"stat {uri}", lambda: fs.exists(path), options)


def list_names(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Names (not paths) directly under a directory URI; [] if it does not exist."""
    fs, path = filesystem(uri, options)
    if not with_retries(f"stat {uri}", lambda: fs.exists(path), options):
        return []
    entries = with_retries(f"list {uri}", lambda: fs.ls(path, detail=False), options)
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)


def upload_dir(local_dir: str, uri: str, options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, options)
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            dst = posixpath.join(path, rel) if not is_local(uri) else os.path.join(path, rel)
            if is_local(uri):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            with_retries(f"upload {rel} to {uri}", lambda s=src, d=dst: fs.put_file(s, d), options)


def download_dir(uri: str, local_dir: str, options: StorageOptions | None = None) -> None:
    fs, path = filesystem(uri, options)
    files = with_retries(f"list {uri}", lambda: fs.find(path), options)
    if not files:
        raise FileNotFoundError(f"nothing at {uri}")
    for remote in files:
        rel = posixpath.relpath(str(remote), path.rstrip("/"))
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with_retries(
            f"download {rel} from {uri}", lambda r=remote, d=dst: fs.get_file(r, d), options
        )


def download_file(uri: str, local_path: str, options: StorageOptions | None = None) -> None:
    """One object to a local file (one GET); FileNotFoundError if it does not exist."""
    fs, path = filesystem(uri, options)
    with_retries(f"download {uri}", lambda: fs.get_file(path, local_path), options)


def iter_glob(pattern: str, options: StorageOptions | None = None) -> Iterator[str]:
    """Expand a glob (local or remote) into URIs, sorted; a plain URI yields itself."""
    if not any(ch in pattern for ch in "*?["):
        yield pattern
        return
    fs, path = filesystem(pattern, options)
    protocol, _ = split_protocol(pattern)
    for match in sorted(fs.glob(path)):
        yield str(match) if protocol == "file" else f"{protocol}://{match}"


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Delete one file or object; one that is already gone is fine."""
    fs, path = filesystem(uri, options)
    with contextlib.suppress(FileNotFoundError):
        with_retries(f"remove {uri}", lambda: fs.rm_file(path), options)


def remove_tree(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Delete a directory (prefix) and everything under it; returns the URIs of the files it
    removed, so a caller can say what it deleted. One that does not exist yields []."""
    fs, path = filesystem(uri, options)
    if not with_retries(f"stat {uri}", lambda: fs.exists(path), options):
        return []
    protocol, _ = split_protocol(uri)
    found = with_retries(f"list {uri}", lambda: fs.find(path), options)
    removed = [str(f) if protocol == "file" else f"{protocol}://{f}" for f in found]
    with_retries(f"remove {uri}", lambda: fs.rm(path, recursive=True), options)
    return sorted(removed)


# ------------------------------------------------------------------------------ node-local cache


def cache_root() -> str:
    """Where a node keeps what its ranks share ($SHARDTUNE_CACHE, else the temp dir)."""
    return os.environ.get("SHARDTUNE_CACHE") or os.path.join(
        tempfile.gettempdir(), "shardtune-cache"
    )


@contextlib.contextmanager
def _node_lock(path: str) -> Iterator[None]:
    """An exclusive lock between the processes of one node (flock: released if a holder dies)."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _content_id(entry: dict) -> str:
    # S3 gives an ETag per object version; other stores a size and a modification time.
    return str(
        entry.get("ETag")
        or entry.get("etag")
        or (entry.get("size"), entry.get("mtime") or entry.get("LastModified"))
    )


def node_cached(uri: str, options: StorageOptions | None = None) -> str:
    """A local path holding the object at `uri`, downloaded at most once per node and content:
    the node's ranks share it. Keyed by URI and the object's ETag (one HEAD per call), so a
    replaced object is fetched again rather than served stale. Local files are used in place."""
    if is_local(uri):
        path = split_protocol(uri)[1]
        if not os.path.isfile(path):
            raise FileNotFoundError(uri)
        return path
    fs, path = filesystem(uri, options)
    info = with_retries(f"stat {uri}", lambda: fs.info(path), options)
    key = hashlib.sha256(f"{uri}\0{_content_id(info)}".encode()).hexdigest()[:32]
    dst = os.path.join(cache_root(), key, posixpath.basename(path))
    if os.path.isfile(dst):
        return dst
    with _node_lock(os.path.join(cache_root(), f"{key}.lock")):
        if not os.path.isfile(dst):  # another rank of this node may have fetched it meanwhile
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{os.getpid()}"
            with_retries(f"download {uri}", lambda: fs.get_file(path, tmp), options)
            os.replace(tmp, dst)  # atomic: a reader sees no file or the whole file
    return dst


def node_cached_dir(uri: str, options: StorageOptions | None = None) -> str:
    """node_cached for a directory (a model): one LIST gives every object's ETag, their hash
    keys the cache; the copy is built under a temp name and renamed whole."""
    fs, path = filesystem(uri, options)
    found = with_retries(f"list {uri}", lambda: fs.find(path, detail=True), options)
    if not found:
        raise FileNotFoundError(f"nothing at {uri}")
    root = path.strip("/")  # some filesystems (memory://) list with a leading "/"
    listing = sorted((str(p).strip("/")[len(root) :].lstrip("/"), _content_id(e))
                     for p, e in found.items())  # fmt: skip
    key = hashlib.sha256(f"{uri}\0{listing}".encode()).hexdigest()[:32]
    dst = os.path.join(cache_root(), key)
    if os.path.isdir(dst):
        return dst
    with _node_lock(f"{dst}.lock"):
        if not os.path.isdir(dst):
            tmp = f"{dst}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            for rel, _ in listing:
                local = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                remote = posixpath.join(path.rstrip("/"), rel)
                with_retries(f"download {rel} from {uri}",
                             lambda r=remote, d=local: fs.get_file(r, d), options)  # fmt: skip
            os.replace(tmp, dst)
    return dst
