"""The prepared-dataset format: Parquet shards plus `manifest.json`, and reading them back.

A prepared dataset at URI `D` is `D/manifest.json` and `D/shard-00000.parquet`, ... Shard rows
follow the task's `row_schema()` (shardtune.data.tasks); every row has `id` (int64), its index
in the corpus. The manifest is written last, so a directory without one is an unfinished `prepare`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    return rows


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
