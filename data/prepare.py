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
from dataclasses import dataclass
from typing import Any

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
    hashes again and writes the shards, holding at most one shard's rows per split. Both passes
    log progress every PROGRESS_SECONDS.

    `pool` (cluster/cli.py's Ray map for `prepare --ray`) runs both passes one task per input
    file, in parallel, with the same output byte for byte (see _parallel_survey/_parallel_write).
    """
    spec = get_task(task)
    shard_sizes(1, shards, shard_size)  # argument errors before any reading
    if split is not None:
        check_split(split)
    streams = _streams(expand_inputs(inputs, options), split, fmt, options)
    if append and any(streams):
        raise corpus.CorpusError(["--append takes corpus files, not a DatasetDict with splits"])
    parallel = pool is not None and list(streams) == [""]  # a DatasetDict: one process
    if pool is not None and not parallel:
        log.info("prepare: a DatasetDict input is read in this process")
    if parallel:
        counts, labels, notes, per_file = _parallel_survey(spec, streams[""], options, fmt, split, seed, pool)  # fmt: skip
    else:
        counts, labels, notes = _survey(spec, streams, options, fmt, split, seed)
    previous = _previous(output, split, seed, labels, options) if append else {}
    id_base = sum(m.num_examples for m in previous.values())

    def writer(uri: str, count: int, dataset_notes: dict, sources: list[_Source],
               part: str) -> _DatasetWriter:  # fmt: skip
        sizes = shard_sizes(count, shards, shard_size) if count else []
        source_uris = list(dict.fromkeys(uri for uri, _ in sources))
        return _DatasetWriter(uri, spec, sizes, labels, source_uris, dataset_notes, options,
                              previous=previous.get(part))  # fmt: skip

    plans: list[_Plan] = []
    for name, sources in streams.items():
        n = sum(counts[name])
        if split:
            sizes = counts[name]
            if not append:
                empty = [part for part, size in zip(split, sizes, strict=True) if size == 0]
                if empty:
                    raise corpus.CorpusError([
                        f"split {empty} would get no examples out of {n}; use fewer splits, "
                        "larger fractions or more data"
                    ])  # fmt: skip
            part_notes = {"split_fractions": split, "seed": seed, "split_rule": SPLIT_RULE}
            writers = {
                part: writer(storage.join(output, part), int(size),
                             {**notes, "split": part, **part_notes}, sources, part)
                for part, size in zip(split, sizes, strict=True)
            }  # fmt: skip
            route = _hash_route(spec, split, seed)
        elif name:  # a split the input brought (DatasetDict)
            given_notes = {**notes, "split": name, "source_split": sources[0][1]}
            writers = {name: writer(storage.join(output, name), n, given_notes, sources, name)}
            route = _one_route
        else:
            writers = {"": writer(output, n, notes, sources, "")}
            route = _one_route
        plans.append(_Plan(sources, n, route, writers))
    if parallel:
        _parallel_write(spec, plans[0], per_file, options, fmt, split, seed, id_base, pool)  # type: ignore[arg-type]
    else:
        _write(spec, plans, options, fmt, id_base)
    return {name: w.finish() for plan in plans for name, w in plan.writers.items()}


SPLIT_RULE = "blake2b(content, key=seed)"  # in split manifests' notes: how parts were drawn


def _hash_route(spec: TaskSpec, split: dict[str, float], seed: int) -> Callable[[Any], int]:
    return lambda example: split_of(example_key(spec, example), split, seed)


def _one_route(example: Any) -> int:
    return 0


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


@dataclass
class _Plan:
    """Where pass 2 sends each example of one stream."""

    sources: list[_Source]
    num_examples: int  # what pass 1 counted
    route: Callable[[Any], int]  # example -> index into `writers`
    writers: dict[str, _DatasetWriter]  # by dataset name ("" for `output` itself)


def _survey(
    spec: TaskSpec,
    streams: dict[str, list[_Source]],
    options: storage.StorageOptions | None,
    fmt: str | None,
    split: dict[str, float] | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[int]], list[str], dict]:
    """Pass 1: examples per stream (per split part with `split`), the sorted label set of all
    streams and the manifest notes, or one CorpusError with every problem."""
    report = corpus.ReadReport()
    labels: set[str] = set(spec.implicit_labels)
    counts: dict[str, list[int]] = {}
    route = _hash_route(spec, split, seed) if split else _one_route
    with _Progress("validating") as progress:
        for name, sources in streams.items():
            counts[name] = [0] * (len(split) if split else 1)
            for example in _examples(spec, sources, options, fmt, report, progress):
                counts[name][route(example)] += 1
                labels.update(spec.example_labels(example))
    if not report.problems:
        for name, count in counts.items():
            if sum(count) == 0:
                where = [f"{uri}[{split}]" if split else uri for uri, split in streams[name]]
                report.problems.append(f"no examples in {where}")
    report.raise_if_problems()
    return counts, sorted(labels), spec.notes(report.conversions)


def _write(
    spec: TaskSpec,
    plans: list[_Plan],
    options: storage.StorageOptions | None,
    fmt: str | None,
    id_base: int = 0,
) -> None:
    """Pass 2: read every stream again and hand each example to its writer; no manifest is
    written here, so on any error what is on disk reads as an unfinished prepare (or, when
    appending, as the previous version: its manifest still names only the old shards)."""
    for plan in plans:
        for writer in plan.writers.values():
            writer.clear_previous()
    report = corpus.ReadReport()
    with _Progress("writing") as progress:
        for plan in plans:
            writers = list(plan.writers.values())
            seen = 0
            examples = _examples(spec, plan.sources, options, fmt, report, progress)
            for seen, example in enumerate(examples, start=1):
                if seen > plan.num_examples:
                    break
                writers[plan.route(example)].add(spec.to_row(id_base + seen - 1, example))
            report.raise_if_problems()
            if seen != plan.num_examples:
                found = "more" if seen > plan.num_examples else str(seen)
                changed = f"first read {plan.num_examples} examples, then {found}"
                raise corpus.CorpusError([f"inputs changed while preparing: {changed}"])


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


def _examples(
    spec: TaskSpec,
    sources: list[_Source],
    options: storage.StorageOptions | None,
    fmt: str | None,
    report: corpus.ReadReport,
    progress: _Progress,
) -> Iterator:
    for uri, split in sources:
        for example in spec.read(uri, options, fmt, report, split):
            progress.tick()
            yield example


class _Progress:
    """Logs one line per PROGRESS_SECONDS while examples are read (count and rate), and a
    summary line at the end; a large corpus would otherwise be silent for minutes."""

    def __init__(self, phase: str, clock: Callable[[], float] = time.monotonic):
        self.phase, self.clock, self.count = phase, clock, 0
        self.start = self.last = clock()

    def __enter__(self) -> _Progress:
        return self

    def tick(self) -> None:
        self.count += 1
        now = self.clock()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            log.info("%s: %d examples read (%s/s)", self.phase, self.count, self._rate(now))

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            now = self.clock()
            log.info("%s: done, %d examples in %.1f s (%s/s)", self.phase, self.count,
                     now - self.start, self._rate(now))  # fmt: skip

    def _rate(self, now: float) -> str:
        elapsed = now - self.start
        return f"{self.count / elapsed:,.0f}" if elapsed > 0 else "-"


Pool = Callable[[Callable[[Any], Any], list], list]  # map(fn, items) -> results in order


@dataclass(frozen=True)
class _FileWork:
    """One input file's share of a parallel prepare (what a task needs, nothing else)."""

    task: str
    uri: str
    fmt: str | None
    options: storage.StorageOptions | None
    split: dict[str, float] | None
    seed: int
    # pass 2 only: the file's first id, and per split part its first index within the part,
    # the part's dataset URI, manifest version and shard sizes
    id_start: int = 0
    part_starts: tuple[int, ...] = ()
    parts: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    expected: tuple[int, ...] = ()


def _survey_file(work: _FileWork) -> dict:
    """Pass 1 over one file: examples per part, labels, problems (file:line), conversions."""
    spec = get_task(work.task)
    report = corpus.ReadReport()
    route = _hash_route(spec, work.split, work.seed) if work.split else _one_route
    counts = [0] * (len(work.split) if work.split else 1)
    labels: set[str] = set()
    for example in spec.read(work.uri, work.options, work.fmt, report, None):
        counts[route(example)] += 1
        labels.update(spec.example_labels(example))
    return {"counts": counts, "labels": sorted(labels), "problems": report.problems,
            "conversions": dict(report.conversions)}  # fmt: skip


def _parallel_survey(
    spec: TaskSpec,
    sources: list[_Source],
    options: storage.StorageOptions | None,
    fmt: str | None,
    split: dict[str, float] | None,
    seed: int,
    pool: Pool,
) -> tuple[dict[str, list[int]], list[str], dict, list[list[int]]]:
    """Pass 1 as one task per file, merged in input order: the same counts, labels, notes and
    problems (in the same order) as _survey, plus each file's counts per part for pass 2."""
    t0 = time.monotonic()
    work = [_FileWork(spec.name, uri, fmt, options, split, seed) for uri, _ in sources]
    results = pool(_survey_file, work)
    report = corpus.ReadReport()
    labels = set(spec.implicit_labels)
    for r in results:
        report.problems += r["problems"]
        report.conversions.update(r["conversions"])
        labels.update(r["labels"])
    per_file = [r["counts"] for r in results]
    total = [sum(c) for c in zip(*per_file, strict=True)]
    if not report.problems and sum(total) == 0:
        report.problems.append(f"no examples in {[uri for uri, _ in sources]}")
    report.raise_if_problems()
    log.info("validating: done, %d examples in %d file(s) in %.1f s (parallel)", sum(total),
             len(sources), time.monotonic() - t0)  # fmt: skip
    return {"": total}, sorted(labels), spec.notes(report.conversions), per_file


def _write_file(work: _FileWork) -> dict:
    """Pass 2 over one file: shards that lie wholly inside it are written here; the rows of a
    shard it shares with the neighbouring files come back as a piece (at most two shards' rows
    per part), so a task holds at most one shard per part in memory."""
    spec = get_task(work.task)
    report = corpus.ReadReport()
    route = _hash_route(spec, work.split, work.seed) if work.split else _one_route
    starts = [np.concatenate(([0], np.cumsum(sizes))) for _, _, sizes in work.parts]
    seen = [0] * len(work.parts)
    open_: list[tuple[int, int, list[dict]] | None] = [None] * len(work.parts)  # (k, first, rows)
    shards: list[tuple[int, int, ShardInfo]] = []
    pieces: list[tuple[int, int, int, list[dict]]] = []

    def close(p: int) -> None:
        if open_[p] is None:
            return
        k, first, rows = open_[p]  # type: ignore[misc]
        uri, version, sizes = work.parts[p]
        if first == int(starts[p][k]) and len(rows) == sizes[k]:
            shards.append((p, k, _write_shard(spec, uri, version, k, rows, work.options)))
        else:
            pieces.append((p, k, first, rows))
        open_[p] = None

    n = 0
    for n, example in enumerate(spec.read(work.uri, work.options, work.fmt, report, None), 1):
        p = route(example)
        j = work.part_starts[p] + seen[p]  # index of the example within its part
        seen[p] += 1
        k = int(np.searchsorted(starts[p], j, side="right")) - 1
        if open_[p] is not None and open_[p][0] != k:  # type: ignore[index]
            close(p)
        if open_[p] is None:
            open_[p] = (k, j, [])
        open_[p][2].append(spec.to_row(work.id_start + n - 1, example))  # type: ignore[index]
    for p in range(len(work.parts)):
        close(p)
    return {"shards": shards, "pieces": pieces, "problems": report.problems, "counts": seen}


def _parallel_write(
    spec: TaskSpec,
    plan: _Plan,
    per_file: list[list[int]],
    options: storage.StorageOptions | None,
    fmt: str | None,
    split: dict[str, float] | None,
    seed: int,
    id_base: int,
    pool: Pool,
) -> None:
    """Pass 2 as one task per file: ids and part indices continue across files exactly as one
    process would number them, so shards and manifests are the same bytes; the driver joins
    the pieces of the shards that straddle two files and writes them."""
    t0 = time.monotonic()
    writers = list(plan.writers.values())
    for writer in writers:
        writer.clear_previous()
    parts = tuple((w.uri, w.version, tuple(w.sizes)) for w in writers)
    work, id_start, part_starts = [], id_base, [0] * len(writers)
    for (uri, _), counts in zip(plan.sources, per_file, strict=True):
        work.append(_FileWork(spec.name, uri, fmt, options, split, seed, id_start,
                              tuple(part_starts), parts, tuple(counts)))  # fmt: skip
        id_start += sum(counts)
        part_starts = [a + b for a, b in zip(part_starts, counts, strict=True)]
    results = pool(_write_file, work)
    report = corpus.ReadReport()
    infos: list[dict[int, ShardInfo]] = [{} for _ in writers]
    pieces: dict[tuple[int, int], list[tuple[int, list[dict]]]] = {}
    for w, r in zip(work, results, strict=True):
        report.problems += r["problems"]
        if tuple(r["counts"]) != w.expected:
            raise corpus.CorpusError([f"inputs changed while preparing: {w.uri} first read "
                                      f"{sum(w.expected)} examples, then {sum(r['counts'])}"])  # fmt: skip
        for p, k, info in r["shards"]:
            infos[p][k] = info
        for p, k, first, rows in r["pieces"]:
            pieces.setdefault((p, k), []).append((first, rows))
    report.raise_if_problems()
    for (p, k), got in sorted(pieces.items()):
        rows = [row for _, chunk in sorted(got, key=lambda g: g[0]) for row in chunk]
        uri, version, _ = parts[p]
        infos[p][k] = _write_shard(spec, uri, version, k, rows, options)
    for writer, found in zip(writers, infos, strict=True):
        writer.shards = [found[k] for k in range(len(writer.sizes))]
    log.info("writing: done, %d file(s) in %.1f s (parallel)", len(work), time.monotonic() - t0)


def _write_shard(spec: TaskSpec, uri: str, version: int, k: int, rows: list[dict],
                 options: storage.StorageOptions | None) -> ShardInfo:  # fmt: skip
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


class _DatasetWriter:
    """Writes one prepared dataset (or, with `previous`, its next version): shards as their rows
    arrive in id order, manifest last."""

    def __init__(
        self,
        uri: str,
        spec: TaskSpec,
        sizes: list[int],
        labels: list[str],
        sources: list[str],
        notes: dict,
        options: storage.StorageOptions | None,
        previous: Manifest | None = None,
    ):
        self.uri, self.spec, self.sizes, self.options = uri, spec, sizes, options
        self.labels, self.sources, self.notes = labels, sources, notes
        self.previous = previous
        self.version = previous.version + 1 if previous else 1
        self.rows: list[dict] = []
        self.shards: list[ShardInfo] = []

    def __len__(self) -> int:
        return sum(self.sizes)

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

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) == self.sizes[len(self.shards)]:
            self._flush()

    def _flush(self) -> None:
        k = len(self.shards)
        self.shards.append(
            _write_shard(self.spec, self.uri, self.version, k, self.rows, self.options)
        )
        self.rows = []

    def finish(self) -> Manifest:
        assert not self.rows and len(self.shards) == len(self.sizes), "shard plan not met"
        old = self.previous
        manifest = Manifest(
            task=self.spec.name,
            labels=old.labels if old else self.labels,
            num_examples=len(self) + (old.num_examples if old else 0),
            num_tokens=sum(s.num_tokens for s in self.shards) + (old.num_tokens if old else 0),
            shards=(list(old.shards) if old else []) + self.shards,
            sources=list(dict.fromkeys((old.sources if old else []) + self.sources)),
            notes={**(old.notes if old else {}), **self.notes},
            version=self.version,
        )
        write_manifest(self.uri, manifest, self.options)
        log.info("prepared %s: %d examples, %d shards (version %d, %d new shards)", self.uri,
                 manifest.num_examples, len(manifest.shards), self.version, len(self.shards))  # fmt: skip
        return manifest
