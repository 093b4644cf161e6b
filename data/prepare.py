"""The `prepare` verb: validate a raw corpus, then write it (or each of its splits) as Parquet
shards plus a manifest, in the format owned by `data.manifest`."""

from __future__ import annotations

import io
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise

import numpy as np
from shardtune.data import corpus, storage
from shardtune.data.manifest import MANIFEST, Manifest, ShardInfo, sha256_hex

log = logging.getLogger(__name__)

TASKS = ("ner", "classify")
DEFAULT_SHARD_SIZE = 10_000
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # becomes a directory name


def parse_split(text: str) -> dict[str, float]:
    """'train=0.8,dev=0.1,test=0.1' -> {'train': 0.8, 'dev': 0.1, 'test': 0.1}, validated."""
    split: dict[str, float] = {}
    if not text.strip():
        raise ValueError("split is empty; expected e.g. 'train=0.8,dev=0.1,test=0.1'")
    for item in text.split(","):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not name or not value:
            raise ValueError(f"split item {item.strip()!r} is not NAME=FRACTION (in {text!r})")
        if name in split:
            raise ValueError(f"split {name!r} appears twice in {text!r}")
        try:
            split[name] = float(value)
        except ValueError:
            raise ValueError(f"split {name!r}: {value!r} is not a number (in {text!r})") from None
    check_split(split)
    return split


def check_split(split: dict[str, float]) -> None:
    """ValueError naming every problem: empty, bad names, fractions not > 0 or not summing to 1."""
    if not split:
        raise ValueError("split has no parts")
    problems = [
        f"split name {name!r} must match [A-Za-z0-9_-]+"
        for name in split
        if not _SPLIT_NAME.match(name)
    ]
    problems += [
        f"split {name!r}: fraction {frac!r} must be > 0"
        for name, frac in split.items()
        if not frac > 0  # written this way so NaN fails too
    ]
    total = sum(split.values())
    if not problems and abs(total - 1.0) > 1e-6:
        problems.append(f"split fractions sum to {total:.6g}, not 1")
    if problems:
        raise ValueError("; ".join(problems))


def shard_sizes(
    num_examples: int, shards: int | None = None, shard_size: int | None = None
) -> list[int]:
    """Example counts of consecutive shards. `shards=N`: N near-equal shards; `shard_size=K`:
    shards of K (the last may be smaller); neither: one per 10,000. Never an empty shard."""
    if shards is not None and shard_size is not None:
        raise ValueError("give shards or shard_size, not both")
    if shards is not None and shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if num_examples == 0:
        return []
    if shard_size is not None:
        full, rest = divmod(num_examples, shard_size)
        return [shard_size] * full + ([rest] if rest else [])
    if shards is None:
        shards = math.ceil(num_examples / DEFAULT_SHARD_SIZE)
    n = min(shards, num_examples)
    base, extra = divmod(num_examples, n)
    return [base + 1 if i < extra else base for i in range(n)]


def assign_splits(num_examples: int, split: dict[str, float], seed: int) -> np.ndarray:
    """Split index (position in `split`) of every example id, from a seeded permutation: the
    first fraction of the permuted ids goes to the first split, and so on."""
    check_split(split)
    order = np.random.default_rng(seed).permutation(num_examples)
    # Round the cumulative fractions, not each part, so the parts always add up to the total.
    bounds = [0] + [round(c * num_examples) for c in np.cumsum(list(split.values()))[:-1]]
    bounds.append(num_examples)
    assignment = np.empty(num_examples, dtype=np.int16)
    for k, (lo, hi) in enumerate(pairwise(bounds)):
        assignment[order[lo:hi]] = k
    return assignment


def expand_inputs(inputs: list[str], options: storage.StorageOptions | None = None) -> list[str]:
    """Globs expanded in order, duplicates dropped; a glob matching nothing is a CorpusError."""
    if not inputs:
        raise ValueError("no inputs given")
    uris: list[str] = []
    problems: list[str] = []
    for pattern in inputs:
        matches = list(storage.iter_glob(pattern, options))
        if not matches:
            problems.append(f"{pattern}: no file matches this pattern")
        uris += [m for m in matches if m not in uris]
    if problems:
        raise corpus.CorpusError(problems)
    return uris


def prepare(
    task: str,
    inputs: list[str],
    output: str,
    *,
    shards: int | None = None,
    shard_size: int | None = None,
    split: dict[str, float] | None = None,
    seed: int = 0,
    options: storage.StorageOptions | None = None,
    fmt: str | None = None,
) -> dict[str, Manifest]:
    """Validate `inputs` and write prepared datasets; returns {split name: manifest}, or
    {"": manifest} without `split` (then the dataset is `output` itself).

    The corpus is read twice so it need not fit in memory: pass 1 validates everything and
    raises one CorpusError before anything is written; pass 2 writes the shards, holding at
    most one shard's rows per split.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    shard_sizes(1, shards, shard_size)  # argument errors before any reading
    if split is not None:
        check_split(split)
    uris = expand_inputs(inputs, options)

    num_examples, labels, conversions = _survey(task, uris, options, fmt)
    parts = split or {"": 1.0}
    assignment = (
        assign_splits(num_examples, split, seed)
        if split
        else np.zeros(num_examples, dtype=np.int16)
    )
    counts = np.bincount(assignment, minlength=len(parts))
    empty = [name for name, count in zip(parts, counts, strict=True) if count == 0]
    if empty:
        raise ValueError(
            f"split {empty} would get no examples out of {num_examples}; use fewer splits, "
            "larger fractions or more data"
        )

    notes: dict = dict(sorted(conversions.items())) if task == "ner" else {}
    writers = []
    for name, count in zip(parts, counts, strict=True):
        dataset_notes = {**notes, "split": name, "split_fractions": split, "seed": seed}
        writers.append(
            _DatasetWriter(
                uri=storage.join(output, name) if name else output,
                task=task,
                sizes=shard_sizes(int(count), shards, shard_size),
                labels=labels,
                sources=uris,
                notes=dataset_notes if name else notes,
                options=options,
            )
        )
    for writer in writers:
        writer.clear_previous()

    report = corpus.ReadReport()
    seen = 0
    for seen, example in enumerate(_examples(task, uris, options, fmt, report), start=1):
        if seen > num_examples:
            break
        writers[assignment[seen - 1]].add(_row(task, seen - 1, example))
    # On either error no manifest is written, so what is on disk reads as an unfinished prepare.
    report.raise_if_problems()
    if seen != num_examples:
        found = "more" if seen > num_examples else str(seen)
        raise corpus.CorpusError(
            [f"inputs changed while preparing: first read {num_examples} examples, then {found}"]
        )
    return {name: writer.finish() for name, writer in zip(parts, writers, strict=True)}


def _examples(
    task: str,
    uris: list[str],
    options: storage.StorageOptions | None,
    fmt: str | None,
    report: corpus.ReadReport,
) -> Iterator[corpus.Sentence | corpus.TextExample]:
    read = corpus.iter_ner if task == "ner" else corpus.iter_classify
    for uri in uris:
        yield from read(uri, options, fmt, report)


def _survey(
    task: str, uris: list[str], options: storage.StorageOptions | None, fmt: str | None
) -> tuple[int, list[str], Counter]:
    """Pass 1: example count, sorted label set and tag conversions, or CorpusError."""
    report = corpus.ReadReport()
    labels: set[str] = {"O"} if task == "ner" else set()
    num_examples = 0
    for example in _examples(task, uris, options, fmt, report):
        num_examples += 1
        if isinstance(example, corpus.Sentence):
            labels.update(example.tags)
        else:
            labels.add(example.label)
    if not report.problems and num_examples == 0:
        report.problems.append(f"no examples in {uris}")
    report.raise_if_problems()
    if task == "ner":
        for key in ("iob1_to_iob2", "bioes_to_iob2"):
            report.conversions.setdefault(key, 0)
    return num_examples, sorted(labels), report.conversions


def _row(task: str, id_: int, example) -> dict:
    if task == "ner":
        return {"id": id_, "tokens": example.tokens, "tags": example.tags}
    return {"id": id_, "text": example.text, "label": example.label}


def _num_tokens(task: str, row: dict) -> int:
    return len(row["tokens"]) if task == "ner" else len(row["text"].split())


def _shard_bytes(task: str, rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if task == "ner":
        schema = pa.schema([("id", pa.int64()), ("tokens", pa.list_(pa.string())),
                            ("tags", pa.list_(pa.string()))])  # fmt: skip
    else:
        schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


class _DatasetWriter:
    """Writes one prepared dataset: shards as their rows arrive in id order, manifest last."""

    def __init__(
        self,
        uri: str,
        task: str,
        sizes: list[int],
        labels: list[str],
        sources: list[str],
        notes: dict,
        options: storage.StorageOptions | None,
    ):
        self.uri, self.task, self.sizes, self.options = uri, task, sizes, options
        self.labels, self.sources, self.notes = labels, sources, notes
        self.rows: list[dict] = []
        self.shards: list[ShardInfo] = []

    def __len__(self) -> int:
        return sum(self.sizes)

    def clear_previous(self) -> None:
        # Manifest first: if this is interrupted the directory reads as unfinished, never as
        # an old manifest vouching for shards that are being replaced.
        storage.remove(storage.join(self.uri, MANIFEST), self.options)
        for name in storage.list_names(self.uri, self.options):
            if name.startswith("shard-") and name.endswith(".parquet"):
                storage.remove(storage.join(self.uri, name), self.options)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) == self.sizes[len(self.shards)]:
            self._flush()

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.parquet"
        data = _shard_bytes(self.task, self.rows)
        storage.write_bytes(storage.join(self.uri, name), data, self.options)
        num_tokens = sum(_num_tokens(self.task, row) for row in self.rows)
        self.shards.append(ShardInfo(name, len(self.rows), num_tokens, sha256_hex(data)))
        self.rows = []

    def finish(self) -> Manifest:
        assert not self.rows and len(self.shards) == len(self.sizes), "shard plan not met"
        manifest = Manifest(
            task=self.task,
            labels=self.labels,
            num_examples=len(self),
            num_tokens=sum(s.num_tokens for s in self.shards),
            shards=self.shards,
            sources=self.sources,
            notes=self.notes,
        )
        storage.write_text(storage.join(self.uri, MANIFEST), manifest.to_json(), self.options)
        log.info("prepared %s: %d examples, %d shards", self.uri, len(self), len(self.shards))
        return manifest
