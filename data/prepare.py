"""The `prepare` verb: validate a raw corpus, then write it (or each of its splits) as Parquet
shards plus a manifest, in the format owned by `data.manifest`."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import numpy as np
from shardtune.data import corpus, hf_corpus, storage
from shardtune.data.manifest import (
    MANIFEST,
    Manifest,
    ShardInfo,
    sha256_hex,
    shard_name,
    write_manifest,
)
from shardtune.data.tasks import TaskSpec, get_task

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000
ROW_GROUP = 1_000  # rows per Parquet row group: the unit a partial shard read fetches
PROGRESS_SECONDS = 5.0  # between progress lines: readable under `ray job logs`, never a flood
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


def split_of(content: bytes, split: dict[str, float], seed: int) -> int:
    """Split index (position in `split`) of one example, a pure function of its content and the
    seed: a keyed hash mapped to [0, 1) against the cumulative fractions. Growing the corpus
    never moves an existing sentence, and identical sentences always share a split (no leak of
    a duplicate into the test set)."""
    digest = hashlib.blake2b(content, digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    u = int.from_bytes(digest.digest(), "little") / 2**64
    cumulative = 0.0
    for k, fraction in enumerate(split.values()):
        cumulative += fraction
        if u < cumulative:
            return k
    return len(split) - 1  # fractions summing to 1 - 1e-9


def example_key(spec: TaskSpec, example: Any) -> bytes:
    """What an example's split is keyed on: its row without the corpus index."""
    row = spec.to_row(0, example)
    row.pop("id")
    return json.dumps(row, sort_keys=True, ensure_ascii=False).encode()


def assign_splits(keys: Iterable[bytes], split: dict[str, float], seed: int) -> np.ndarray:
    """Split index of every example key (see split_of)."""
    check_split(split)
    return np.array([split_of(k, split, seed) for k in keys], dtype=np.int16)


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


_Source = tuple[str, "str | None"]  # (input URI, split of a DatasetDict input or None)
_T = TypeVar("_T")
_R = TypeVar("_R")


class Pool(Protocol):
    """Runs a pass's work items: map(fn, items) -> results in item order. The builtin `map`
    (the default: one process, lazily, item after item), an executor's `map`, or
    cluster/cli.py's ray_pool (`prepare --ray`: one Ray task per item)."""

    def __call__(self, fn: Callable[[_T], _R], items: list[_T], /) -> Iterable[_R]: ...


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
    append: bool = False,
    pool: Pool | None = None,
) -> dict[str, Manifest]:
    """Validate `inputs` and write prepared datasets; returns {split name: manifest}, or
    {"": manifest} without `split` (then the dataset is `output` itself).

    A Hugging Face DatasetDict directory (`save_to_disk`) brings its own splits: it must be the
    only input, `split` must be None, and its train / validation / test become `output`/train,
    /dev, /test, sharing one label set. Inputs and `fmt` as in corpus.iter_ner.

    An example's split is a hash of its content and `seed` (split_of), so preparing a grown
    corpus puts every old sentence where it was. `append=True` adds `inputs` (the new sentences
    only) to the datasets already at `output`: new shards under the next manifest version, old
    shards untouched, ids continuing after the old corpus, the same split fractions and seed.

    The corpus is read twice so it need not fit in memory: pass 1 validates everything (and
    counts each split's examples) and raises one CorpusError before anything is written; pass 2
    hashes again and writes the shards. Each pass is one work item per source (an input file,
    or a split of a DatasetDict) run by `pool` (default: the builtin map, in this process); an
    item's ids and shard positions follow from pass 1's counts, so any pool writes the same
    bytes. Both passes log progress every PROGRESS_SECONDS.
    """
    spec = get_task(task)
    shard_sizes(1, shards, shard_size)  # argument errors before any reading
    if split is not None:
        check_split(split)
    streams = _streams(expand_inputs(inputs, options), split, fmt, options)
    if append and any(streams):
        raise corpus.CorpusError(["--append takes corpus files, not a DatasetDict with splits"])
    job = _Job(task, fmt, options, split, seed, _Progress("validating"))
    counts, labels, notes = _survey(job, streams, pool or map)
    previous = _previous(output, split, seed, labels, options) if append else {}
    plans = []
    for name, sources in streams.items():
        part_counts = [sum(c) for c in zip(*counts[name], strict=True)]
        parts = _part_notes(name, sources, part_counts, split, seed, notes, append)
        uris = list(dict.fromkeys(uri for uri, _ in sources))
        datasets = {}
        for (part, part_notes), n in zip(parts.items(), part_counts, strict=True):
            uri = storage.join(output, part) if part else output
            sizes = shard_sizes(n, shards, shard_size)
            old = previous.get(part)
            datasets[part] = _Dataset(uri, spec, sizes, labels, uris, part_notes, options, old)
        plans.append(_StreamPlan(sources, counts[name], datasets))
    base = sum(m.num_examples for m in previous.values())
    _write(replace(job, progress=_Progress("writing")), plans, base, pool or map)
    return {name: dataset.finish() for plan in plans for name, dataset in plan.datasets.items()}


SPLIT_RULE = "blake2b(content, key=seed)"  # in split manifests' notes: how parts were drawn


def _route(spec: TaskSpec, split: dict[str, float] | None, seed: int) -> Callable[[Any], int]:
    """example -> index of the dataset (split part) it goes to; 0 without `split`."""
    if split is None:
        return lambda example: 0
    return lambda example: split_of(example_key(spec, example), split, seed)


def _part_notes(
    name: str,
    sources: list[_Source],
    counts: list[int],
    split: dict[str, float] | None,
    seed: int,
    notes: dict,
    append: bool,
) -> dict[str, dict]:
    """{dataset name: its manifest notes} of one stream: a part per split fraction, the split a
    DatasetDict brought, or "" (the output itself)."""
    if name:
        return {name: {**notes, "split": name, "source_split": sources[0][1]}}
    if split is None:
        return {"": notes}
    empty = [part for part, n in zip(split, counts, strict=True) if n == 0]
    if empty and not append:
        raise corpus.CorpusError([
            f"split {empty} would get no examples out of {sum(counts)}; use fewer splits, "
            "larger fractions or more data"
        ])  # fmt: skip
    drawn = {"split_fractions": split, "seed": seed, "split_rule": SPLIT_RULE}
    return {part: {**notes, "split": part, **drawn} for part in split}


def _previous(
    output: str,
    split: dict[str, float] | None,
    seed: int,
    labels: list[str],
    options: storage.StorageOptions | None,
) -> dict[str, Manifest]:
    """The manifests `--append` extends, by part name, checked against this call: same split
    fractions and seed (else old sentences would be drawn differently from new ones), and no
    label the old datasets lack (label ids are positions in the sorted label list)."""
    from shardtune.data.manifest import DatasetError, read_manifest

    parts = list(split) if split else [""]
    found, problems = {}, []
    for part in parts:
        uri = storage.join(output, part) if part else output
        try:
            found[part] = read_manifest(uri, options)
        except DatasetError as exc:
            problems.append(f"--append: {exc}")
            continue
        notes = found[part].notes
        if split and (notes.get("split_fractions") != split or notes.get("seed") != seed):
            problems.append(
                f"--append: {uri} was split with {notes.get('split_fractions')} seed "
                f"{notes.get('seed')}, not {split} seed {seed}"
            )
        if split and notes.get("split_rule") != SPLIT_RULE:
            problems.append(f"--append: {uri} was split by position, not by content; re-prepare it")
        new = sorted(set(labels) - set(found[part].labels))
        if new:
            problems.append(f"--append: labels {new} are not in {uri}; re-prepare without --append")
    if problems:
        raise corpus.CorpusError(problems)
    return found


class _Progress:
    """Logs one line per PROGRESS_SECONDS while examples are read (count and rate), and a
    summary line at the end; a large corpus would otherwise be silent for minutes. A copy sent
    to another process (a pool's worker) starts afresh and counts what that process reads."""

    def __init__(self, phase: str, clock: Callable[[], float] = time.monotonic):
        self.phase, self.clock, self.count = phase, clock, 0
        self.start = self.last = clock()

    def __getstate__(self) -> dict:
        return {"phase": self.phase, "clock": self.clock}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["phase"], state["clock"])

    def tick(self) -> None:
        self.count += 1
        now = self.clock()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            log.info(
                "%s: %d examples read (%s/s)", self.phase, self.count, self._rate(self.count, now)
            )

    def done(self, count: int) -> None:
        """The summary line: `count` examples read by every process of the pass."""
        now = self.clock()
        elapsed, rate = now - self.start, self._rate(count, now)
        log.info("%s: done, %d examples in %.1f s (%s/s)", self.phase, count, elapsed, rate)

    def _rate(self, count: int, now: float) -> str:
        elapsed = now - self.start
        return f"{count / elapsed:,.0f}" if elapsed > 0 else "-"


@dataclass(frozen=True)
class _Job:
    """What every work item of a pass shares. The builtin map hands each item this one object
    (so one progress meter counts the whole pass); a pool pickles a copy per item."""

    task: str
    fmt: str | None
    options: storage.StorageOptions | None
    split: dict[str, float] | None
    seed: int
    progress: _Progress


@dataclass(frozen=True)
class _Part:
    """A dataset as pass 2's items see it: where its shards go and how many rows each has."""

    uri: str
    version: int
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class _Item:
    """One source's work in a pass; pass 2 adds where its examples land: its first id, per part
    the index within the part of its first example there, pass 1's counts and the parts."""

    job: _Job
    uri: str
    given_split: str | None  # the split of a DatasetDict input
    id_start: int = 0
    part_starts: tuple[int, ...] = ()
    expected: tuple[int, ...] = ()
    parts: tuple[_Part, ...] = ()


@dataclass
class _Found:
    """What one item's pass 1 found: examples per part, labels, problems (file:line)."""

    counts: list[int]
    labels: list[str]
    problems: list[str]
    conversions: dict[str, int]


@dataclass
class _Written:
    """What one item's pass 2 did: examples per part, shards written (part, k, info), the
    rows of shards it shares with neighbouring items (part, k, rows), problems."""

    counts: list[int]
    problems: list[str]
    shards: list[tuple[int, int, ShardInfo]] = field(default_factory=list)
    pieces: list[tuple[int, int, list[dict]]] = field(default_factory=list)


@dataclass
class _StreamPlan:
    """One stream's sources, pass 1's counts per source and part, and its datasets by name."""

    sources: list[_Source]
    counts: list[list[int]]
    datasets: dict[str, _Dataset]


def _read(spec: TaskSpec, item: _Item, report: corpus.ReadReport) -> Iterator:
    job = item.job
    for example in spec.read(item.uri, job.options, job.fmt, report, item.given_split):
        job.progress.tick()
        yield example


def _survey_source(item: _Item) -> _Found:
    """Pass 1 over one source."""
    job, spec = item.job, get_task(item.job.task)
    report, route = corpus.ReadReport(), _route(spec, job.split, job.seed)
    counts = [0] * (len(job.split) if job.split else 1)
    labels: set[str] = set()
    for example in _read(spec, item, report):
        counts[route(example)] += 1
        labels.update(spec.example_labels(example))
    return _Found(counts, sorted(labels), report.problems, dict(report.conversions))


def _survey(
    job: _Job, streams: dict[str, list[_Source]], pool: Pool
) -> tuple[dict[str, list[list[int]]], list[str], dict]:
    """Pass 1: counts per stream, source and part, the sorted label set of all streams and the
    manifest notes, or one CorpusError with every problem (in input order)."""
    spec = get_task(job.task)
    items = [_Item(job, uri, given) for sources in streams.values() for uri, given in sources]
    report, labels, found = corpus.ReadReport(), set(spec.implicit_labels), []
    for result in pool(_survey_source, items):
        report.problems += result.problems
        report.conversions.update(result.conversions)
        labels.update(result.labels)
        found.append(result.counts)
    counts = {}
    for name, sources in streams.items():
        counts[name], found = found[: len(sources)], found[len(sources) :]
        if not report.problems and not any(map(sum, counts[name])):
            where = [f"{uri}[{given}]" if given else uri for uri, given in sources]
            report.problems.append(f"no examples in {where}")
    report.raise_if_problems()
    job.progress.done(sum(sum(map(sum, c)) for c in counts.values()))
    return counts, sorted(labels), spec.notes(report.conversions)


def _write_source(item: _Item) -> _Written:
    """Pass 2 over one source: a shard that lies wholly inside it is written here; the rows of
    a shard it shares with its neighbours come back as a piece. An item holds at most two
    shards' rows per part (the piece it began with and the shard it is filling)."""
    job, spec = item.job, get_task(item.job.task)
    report, route = corpus.ReadReport(), _route(spec, job.split, job.seed)
    ends = [np.cumsum(part.sizes) for part in item.parts]  # one past each shard's last index
    starts = item.part_starts
    k = [int(np.searchsorted(e, s, side="right")) for e, s in zip(ends, starts, strict=True)]
    rows: list[list[dict]] = [[] for _ in item.parts]
    out = _Written([0] * len(item.parts), report.problems)
    for id_, example in enumerate(_read(spec, item, report), start=item.id_start):
        p = route(example)
        out.counts[p] += 1
        if out.counts[p] > item.expected[p]:
            break  # more than pass 1 read: the caller reports the change
        rows[p].append(spec.to_row(id_, example))
        if starts[p] + out.counts[p] == ends[p][k[p]]:  # shard k[p] ends here
            part = item.parts[p]
            if len(rows[p]) == part.sizes[k[p]]:
                info = _write_shard(spec, part.uri, part.version, k[p], rows[p], job.options)
                out.shards.append((p, k[p], info))
            else:
                out.pieces.append((p, k[p], rows[p]))
            rows[p], k[p] = [], k[p] + 1
    out.pieces += [(p, k[p], rows[p]) for p in range(len(rows)) if rows[p]]
    return out


def _write(job: _Job, plans: list[_StreamPlan], id_base: int, pool: Pool) -> None:
    """Pass 2: every source again, as items whose ids and part indices continue exactly as one
    reader's would; here the pieces of shards that straddle two items are joined and written
    (with the builtin map, one item's result at a time, so memory stays a few shards per part).
    No manifest is written here, so on any error what is on disk reads as an unfinished
    prepare (or, when appending, as the previous version: its manifest names only old shards)."""
    spec, items = get_task(job.task), []
    for plan in plans:
        datasets = list(plan.datasets.values())
        for dataset in datasets:
            dataset.clear_previous()
        parts = tuple(_Part(d.uri, d.version, tuple(d.sizes)) for d in datasets)
        id_start, starts = id_base, [0] * len(parts)
        for (uri, given), counts in zip(plan.sources, plan.counts, strict=True):
            items.append(_Item(job, uri, given, id_start, tuple(starts), tuple(counts), parts))
            id_start += sum(counts)
            starts = [a + b for a, b in zip(starts, counts, strict=True)]
    shards: dict[str, dict[int, ShardInfo]] = {}
    held: dict[tuple[str, int], list[dict]] = {}  # rows of a straddling shard, by (uri, k)
    problems: list[str] = []
    for item, result in zip(items, pool(_write_source, items), strict=True):
        problems += result.problems
        if tuple(result.counts) != item.expected:
            more = any(n > e for n, e in zip(result.counts, item.expected, strict=True))
            problems.append(
                f"inputs changed while preparing: {item.uri} first read "
                f"{sum(item.expected)} examples, then {'more' if more else sum(result.counts)}"
            )
        if problems:
            continue  # keep reading every item's problems; write nothing more
        for p, k, info in result.shards:
            shards.setdefault(item.parts[p].uri, {})[k] = info
        for p, k, rows in result.pieces:
            part = item.parts[p]
            rows = held.pop((part.uri, k), []) + rows
            if len(rows) < part.sizes[k]:
                held[part.uri, k] = rows
            else:
                info = _write_shard(spec, part.uri, part.version, k, rows, job.options)
                shards.setdefault(part.uri, {})[k] = info
    corpus.ReadReport(problems).raise_if_problems()
    job.progress.done(sum(sum(item.expected) for item in items))
    for plan in plans:
        for dataset in plan.datasets.values():
            dataset.shards = [shards.get(dataset.uri, {})[k] for k in range(len(dataset.sizes))]


def _streams(
    uris: list[str],
    split: dict[str, float] | None,
    fmt: str | None,
    options: storage.StorageOptions | None,
) -> dict[str, list[_Source]]:
    """The example streams to read: {"": every input} or, for a DatasetDict input, one stream
    per split it brings: {"train": [(uri, "train")], "dev": [(uri, "validation")], ...}."""
    known_files = corpus.NER_FORMATS.keys() | corpus.CLASSIFY_FORMATS.keys()
    dicts = [
        uri
        for uri in uris
        if fmt in (None, "hf-disk")
        and posixpath.splitext(uri.lower())[1] not in known_files
        and hf_corpus.saved_kind(uri, options) == "dataset_dict"
    ]
    if not dicts:
        return {"": [(uri, None) for uri in uris]}
    # Conflicts with the inputs are CorpusErrors, so the CLI reports them as bad input (exit 2).
    if len(uris) > 1:
        raise corpus.CorpusError(
            [f"{dicts[0]} is a DatasetDict that brings its own splits; prepare it as the only "
             f"input (got {len(uris)} inputs)"]
        )  # fmt: skip
    try:
        given = hf_corpus.dataset_dict_splits(dicts[0], options)
    except ValueError as exc:
        raise corpus.CorpusError([str(exc)]) from None
    if split is not None:
        raise corpus.CorpusError(
            [f"{dicts[0]} is a DatasetDict with its own splits {list(given.values())} (written "
             f"as {list(given)}); drop the split fractions (--split)"]
        )  # fmt: skip
    return {name: [(dicts[0], theirs)] for name, theirs in given.items()}


def _write_shard(
    spec: TaskSpec,
    uri: str,
    version: int,
    k: int,
    rows: list[dict],
    options: storage.StorageOptions | None,
) -> ShardInfo:
    """Shard k of a dataset version: Parquet bytes, written, described for the manifest.
    Version 1 keeps the historic names; later versions' shards get their own names, so an
    append can never overwrite a shard an older manifest vouches for."""
    name = shard_name(version, k)
    data = _shard_bytes(spec, rows)
    storage.write_bytes(storage.join(uri, name), data, options)
    num_tokens = sum(spec.num_tokens(row) for row in rows)
    return ShardInfo(name, len(rows), num_tokens, sha256_hex(data))


def _shard_bytes(spec: TaskSpec, rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    # Row groups of ROW_GROUP rows let a rank read only the part of a shard it needs
    # (evaluation slices: data.manifest.read_shard_slice), and page checksums check such a
    # partial read, which the whole-object sha256 cannot.
    pq.write_table(pa.Table.from_pylist(rows, schema=spec.row_schema()), buffer,
                   row_group_size=ROW_GROUP, write_page_checksum=True)  # fmt: skip
    return buffer.getvalue()


@dataclass
class _Dataset:
    """One prepared dataset (or, with `previous`, its next version): cleared before pass 2,
    given its shards by it, its manifest written last."""

    uri: str
    spec: TaskSpec
    sizes: list[int]
    labels: list[str]
    sources: list[str]
    notes: dict
    options: storage.StorageOptions | None
    previous: Manifest | None = None
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def version(self) -> int:
        return self.previous.version + 1 if self.previous else 1

    def clear_previous(self) -> None:
        if self.previous is not None:
            return  # appending: the old shards and manifest stay as they are
        # Manifest first: if this is interrupted the directory reads as unfinished, never as
        # an old manifest vouching for shards that are being replaced.
        storage.remove(storage.join(self.uri, MANIFEST), self.options)
        for name in storage.list_names(self.uri, self.options):
            if name.startswith("manifest.") or (
                name.startswith("shard-") and name.endswith(".parquet")
            ):
                storage.remove(storage.join(self.uri, name), self.options)

    def finish(self) -> Manifest:
        assert len(self.shards) == len(self.sizes), "shard plan not met"
        old = self.previous
        manifest = Manifest(
            task=self.spec.name,
            labels=old.labels if old else self.labels,
            num_examples=sum(self.sizes) + (old.num_examples if old else 0),
            num_tokens=sum(s.num_tokens for s in self.shards) + (old.num_tokens if old else 0),
            shards=(list(old.shards) if old else []) + self.shards,
            sources=list(dict.fromkeys((old.sources if old else []) + self.sources)),
            notes={**(old.notes if old else {}), **self.notes},
            version=self.version,
        )
        write_manifest(self.uri, manifest, self.options)
        shape = (manifest.num_examples, len(manifest.shards), self.version, len(self.shards))
        log.info(
            "prepared %s: %d examples, %d shards (version %d, %d new shards)", self.uri, *shape
        )
        return manifest
