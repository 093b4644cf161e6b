"""The prepared-dataset format: Parquet shards plus `manifest.json`, and reading them back.

A prepared dataset at URI `D` is `D/manifest.json` and `D/shard-00000.parquet`, ... Shard rows
follow the task's `row_schema()` (shardtune.data.tasks); every row has `id` (int64), its index
in the corpus. The manifest is written last, so a directory without one is an unfinished `prepare`.
Each version also stays as `manifest.v00002.json` (`prepare --append` adds versions), and
`manifest.index` is the compact form workers read: the header as JSON plus per-shard arrays
(54 bytes a shard against ~190 of JSON), same content.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from shardtune.data import storage

FORMAT = "shardtune.prepared/1"
MANIFEST = "manifest.json"


class DatasetError(Exception):
    """A prepared dataset is missing, incomplete or corrupt; the message names the object."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the dataset directory
    num_examples: int
    num_tokens: int  # the task's tokenizer-independent size: words
    sha256: str


@dataclass(frozen=True)
class Manifest:
    task: str  # a name in shardtune.data.tasks.TASK_NAMES
    labels: list[str]  # sorted; ner: BIO tags incl. "O"; classify: class names
    num_examples: int
    num_tokens: int
    shards: list[ShardInfo]
    sources: list[str] = field(default_factory=list)  # input URIs, for provenance
    notes: dict = field(default_factory=dict)  # e.g. tag-scheme conversions applied
    format: str = FORMAT
    version: int = 1  # 1 + the number of `prepare --append`s; a run's report names it

    def shard_sizes(self) -> tuple[int, ...]:
        if isinstance(self.shards, ShardTable):
            return tuple(self.shards.sizes.tolist())
        return tuple(s.num_examples for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "shards": [asdict(s) for s in self.shards]},
                          indent=2, sort_keys=True)  # fmt: skip

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise DatasetError(f"{where}: format is {raw.get('format')!r}, expected {FORMAT!r}")
            shards = [ShardInfo(**s) for s in raw.pop("shards")]
            return cls(shards=shards, **raw)
        except DatasetError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise DatasetError(f"{where}: not a valid manifest ({exc})") from exc


def plan_identity(manifest: Manifest, seed: int) -> str:
    """What a stream position means: equal identities plan the same rows in the same order
    for every epoch and world size (example count, the shard sizes in order, the seed)."""
    sizes = np.asarray(manifest.shard_sizes(), dtype=np.int64)
    digest = hashlib.sha256(sizes.tobytes()).hexdigest()[:16]
    return f"n{manifest.num_examples}-s{seed}-{digest}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ShardTable(Sequence):
    """The shards of a compact manifest: arrays, with a ShardInfo built only when asked for
    (a million ShardInfo objects would take ~300 MB per rank)."""

    def __init__(self, names: list[str] | None, versions: np.ndarray, locals_: np.ndarray,
                 sizes: np.ndarray, tokens: np.ndarray, digests: np.ndarray):  # fmt: skip
        self.names, self.versions, self.locals = names, versions, locals_
        self.sizes, self.tokens, self.digests = sizes, tokens, digests

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        name = self.names[i] if self.names is not None else shard_name(
            int(self.versions[i]), int(self.locals[i]))  # fmt: skip
        return ShardInfo(
            name, int(self.sizes[i]), int(self.tokens[i]), self.digests[i].tobytes().hex()
        )


def shard_name(version: int, n: int) -> str:
    """Shard file names prepare writes: version 1 keeps the historic names."""
    return f"shard-{n:05d}.parquet" if version == 1 else f"shard-v{version:03d}-{n:05d}.parquet"


_SHARD_NAME = re.compile(r"^shard-(?:v(\d{3})-)?(\d{5})\.parquet$")
INDEX = "manifest.index"


def to_index(manifest: Manifest) -> bytes:
    """The compact form: a .npz of the header JSON and per-shard arrays."""
    parsed = [_SHARD_NAME.match(s.name) for s in manifest.shards]
    regular = all(parsed)
    versions = np.array([int(m[1] or 1) if m else 0 for m in parsed], dtype=np.uint16)
    locals_ = np.array([int(m[2]) if m else 0 for m in parsed], dtype=np.uint32)
    header = {**asdict(manifest), "shards": None}
    header["names"] = None if regular else [s.name for s in manifest.shards]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        header=np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8),
        versions=versions, locals=locals_,
        sizes=np.array([s.num_examples for s in manifest.shards], dtype=np.int64),
        tokens=np.array([s.num_tokens for s in manifest.shards], dtype=np.int64),
        digests=np.array([bytes.fromhex(s.sha256) for s in manifest.shards], dtype="S32")
        .view(np.uint8).reshape(-1, 32),
    )  # fmt: skip
    return buffer.getvalue()


def from_index(data: bytes, where: str = INDEX) -> Manifest:
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        header = json.loads(z["header"].tobytes())
        names = header.pop("names")
        header.pop("shards")
        table = ShardTable(names, z["versions"], z["locals"], z["sizes"], z["tokens"], z["digests"])
        if header.get("format") != FORMAT:
            raise DatasetError(f"{where}: format is {header.get('format')!r}, expected {FORMAT!r}")
        return Manifest(shards=table, **header)  # type: ignore[arg-type]
    except DatasetError:
        raise
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise DatasetError(f"{where}: not a valid manifest index ({exc})") from exc


def write_manifest(
    dataset_uri: str, manifest: Manifest, options: storage.StorageOptions | None = None
) -> None:
    """The versioned copy, then `manifest.json` (what marks this version finished), then the
    index: a reader of the index between the two sees the previous version, whose shards an
    append never touches, so it is consistent either way."""
    text = manifest.to_json()
    storage.write_text(storage.join(dataset_uri, versioned_name(manifest.version)), text, options)
    storage.write_text(storage.join(dataset_uri, MANIFEST), text, options)
    storage.write_bytes(storage.join(dataset_uri, INDEX), to_index(manifest), options)


def read_manifest_compact(
    dataset_uri: str, options: storage.StorageOptions | None = None
) -> Manifest:
    """What workers read: the compact index through this node's cache (one download per node
    and content; data.storage.node_cached), or manifest.json where no index was written."""
    uri = storage.join(dataset_uri, INDEX)
    try:
        path = storage.node_cached(uri, options)
    except FileNotFoundError:
        return read_manifest(dataset_uri, options)
    with open(path, "rb") as f:
        return from_index(f.read(), where=uri)


def versioned_name(version: int) -> str:
    """The copy of one version that every later `prepare --append` leaves in place."""
    return f"manifest.v{version:05d}.json"


def read_manifest_version(
    dataset_uri: str,
    version: int | None,
    options: storage.StorageOptions | None = None,
    *,
    compact: bool = True,
) -> Manifest:
    """The manifest of `version` (None: the latest): the latest's (the compact index, or with
    `compact=False` manifest.json) while it is that version, else that version's JSON copy. A
    run pins the version it started on, so a `prepare --append` between two attempts cannot
    re-plan the data under a checkpoint's stream positions (an append never touches the shards
    earlier versions name)."""
    read = read_manifest_compact if compact else read_manifest
    latest = read(dataset_uri, options)
    if version is None or latest.version == version:
        return latest
    uri = storage.join(dataset_uri, versioned_name(version))
    try:
        text = storage.read_text(uri, options)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{uri} not found: version {version} of {dataset_uri} (now at version "
            f"{latest.version}) is gone"
        ) from exc
    return Manifest.from_json(text, where=uri)


def read_manifest(dataset_uri: str, options: storage.StorageOptions | None = None) -> Manifest:
    uri = storage.join(dataset_uri, MANIFEST)
    try:
        text = storage.read_text(uri, options)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{uri} not found: {dataset_uri} is not a prepared dataset "
            "(run `launch.py prepare`, or it was interrupted before finishing)"
        ) from exc
    return Manifest.from_json(text, where=uri)


def read_shard_rows(
    dataset_uri: str, shard: ShardInfo, options: storage.StorageOptions | None = None
) -> list[dict]:
    """Read one shard whole, verifying its sha256 on the very bytes that get parsed."""
    return read_shard_rows_sized(dataset_uri, shard, options)[0]


def read_shard_rows_sized(
    dataset_uri: str, shard: ShardInfo, options: storage.StorageOptions | None = None
) -> tuple[list[dict], int]:
    """read_shard_rows and the bytes fetched."""
    import pyarrow.parquet as pq

    uri = storage.join(dataset_uri, shard.name)
    try:
        data = storage.read_bytes(uri, options)
    except FileNotFoundError as exc:
        raise DatasetError(f"shard {shard.name} is missing: {uri}") from exc
    digest = sha256_hex(data)
    if digest != shard.sha256:
        raise DatasetError(
            f"shard {shard.name} is corrupt: sha256 {digest[:12]}... != manifest "
            f"{shard.sha256[:12]}... ({uri})"
        )
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    if len(rows) != shard.num_examples:
        raise DatasetError(
            f"shard {shard.name}: {len(rows)} rows, manifest says {shard.num_examples}"
        )
    return rows, len(data)


def read_shard_slice(
    dataset_uri: str,
    shard: ShardInfo,
    start: int,
    stop: int,
    options: storage.StorageOptions | None = None,
) -> tuple[list[dict], int]:
    """Rows [start, stop) of one shard in stored order and the bytes fetched: the footer and
    only the row groups holding them (ranged reads), not the whole object. The sha256 covers
    whole objects, so a slice is checked by Parquet's page checksums (prepare writes them) and
    the footer's row count instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = storage.join(dataset_uri, shard.name)

    def read(f) -> tuple[list[dict], int]:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        meta = pf.metadata
        if meta.num_rows != shard.num_examples:
            raise DatasetError(
                f"shard {shard.name}: {meta.num_rows} rows, manifest says {shard.num_examples}"
            )
        groups, first, seen, fetched = [], None, 0, meta.serialized_size + 8
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if seen < stop and seen + n > start:
                groups.append(g)
                first = seen if first is None else first
                rg = meta.row_group(g)
                fetched += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
            seen += n
        if not groups:
            return [], fetched
        table: pa.Table = pf.read_row_groups(groups)
        return table.slice(start - first, stop - start).to_pylist(), fetched

    try:
        return storage.read_ranges(uri, read, options)
    except FileNotFoundError as exc:
        raise DatasetError(f"shard {shard.name} is missing: {uri}") from exc


def read_all_rows(
    dataset_uri: str, options: storage.StorageOptions | None = None
) -> tuple[Manifest, list[dict]]:
    """Whole dataset in corpus order (for evaluation of small sets and for tests)."""
    manifest = read_manifest(dataset_uri, options)
    rows: list[dict] = []
    for shard in manifest.shards:
        rows.extend(read_shard_rows(dataset_uri, shard, options))
    rows.sort(key=lambda r: r["id"])
    return manifest, rows
