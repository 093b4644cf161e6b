"""Raw corpora in: CoNLL / JSONL (ner) and JSONL / CSV (classify) read line by line, and
Hugging Face datasets (via data.hf_corpus) read row by row, with every bad line reported as
FILE:LINE (or row as URI:row N) and NER tags normalised to IOB2."""

from __future__ import annotations

import csv
import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from shardtune.data import hf_corpus, storage

NER_FORMATS = {".conll": "conll", ".txt": "conll", ".iob": "conll", ".bio": "conll",
               ".tsv": "conll", ".jsonl": "jsonl", ".json": "jsonl", **hf_corpus.EXTENSIONS}  # fmt: skip
CLASSIFY_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", **hf_corpus.EXTENSIONS}
# Column names of Hugging Face datasets, as the datasets library's own NER corpora name them.
NER_COLUMNS = ("tokens", "ner_tags")
CLASSIFY_COLUMNS = ("text", "label")
MAX_LISTED_PROBLEMS = 50
DOCSTART = "-DOCSTART-"

# B/I/O plus the BIOES (E, S) and BILOU (L, U) prefixes, which are converted to IOB2.
_TAG = re.compile(r"^(?:O|[BIESLU]-\S+)$")
_BOM = b"\xef\xbb\xbf"


class CorpusError(Exception):
    """A corpus has problems; `.problems` holds every one as 'FILE:LINE: message'."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        n = len(self.problems)
        if n == 1:  # one problem, one line: it names its file:line
            return f"corpus: {self.problems[0]}"
        lines = [f"{n} problems in the corpus:"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
        return "\n".join(lines)


@dataclass
class ReadReport:
    """What reading found besides the examples: problems and tag-scheme conversions."""

    problems: list[str] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)  # "iob1_to_iob2" / "bioes_to_iob2"

    def raise_if_problems(self) -> None:
        if self.problems:
            raise CorpusError(self.problems)


@dataclass(frozen=True)
class Sentence:
    tokens: list[str]
    tags: list[str]  # IOB2
    source: str  # URI of the file
    line: int  # 1-based line of the first token


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str
    source: str
    line: int


# ---------------------------------------------------------------------------- tag schemes


def is_valid_tag(tag: str) -> bool:
    return bool(_TAG.match(tag))


def to_iob2(tags: list[str]) -> tuple[list[str], Counter]:
    """Rewrite valid tags (IOB1, IOB2, BIOES or BILOU, even mixed) as IOB2.

    Chunk boundaries follow seqeval's default (lenient) mode exactly, so
    `get_entities(tags) == get_entities(to_iob2(tags)[0])` (with L/U read as E/S). On IOB2 input
    nothing changes. Returns the new tags and how many tags each conversion changed.
    """
    out: list[str] = []
    counts: Counter = Counter()
    prev_prefix, prev_type = "O", ""
    for tag in tags:
        if tag == "O":
            out.append(tag)
            prev_prefix, prev_type = "O", ""
            continue
        prefix, type_ = {"L": "E", "U": "S"}.get(tag[0], tag[0]), tag[2:]
        # seqeval starts a chunk on B/S, after O/E/S, or when the type changes.
        starts = prefix in "BS" or prev_prefix in "OES" or prev_type != type_
        new = f"{'B' if starts else 'I'}-{type_}"
        if new != tag:
            counts["bioes_to_iob2" if tag[0] in "ESLU" else "iob1_to_iob2"] += 1
        out.append(new)
        prev_prefix, prev_type = prefix, type_
    return out, counts


# ---------------------------------------------------------------------------- reading lines


def detect_format(
    uri: str,
    formats: dict[str, str],
    fmt: str | None = None,
    options: storage.StorageOptions | None = None,
) -> str:
    """Format name from `fmt`, the file extension, or (for a directory) `save_to_disk`'s marker
    files; ValueError if none says. The hf_corpus.KINDS are valid `fmt` values too."""
    allowed = sorted(set(formats.values()) | set(hf_corpus.KINDS))
    if fmt is not None:
        if fmt not in allowed:
            raise ValueError(f"unknown format {fmt!r}; expected one of {allowed}")
        return fmt
    ext = posixpath.splitext(uri.lower())[1]
    if ext in formats:
        return formats[ext]
    if hf_corpus.saved_kind(uri, options) is not None:
        return "hf-disk"
    raise ValueError(
        f"{uri}: cannot tell the format from extension {ext or '(none)'!r} "
        f"(known: {sorted(formats)}) and it is no `save_to_disk` directory; pass fmt= one of "
        f"{allowed}"
    )


def _lines(uri: str, options: storage.StorageOptions | None, report: ReadReport):
    """Yield (1-based line number, text or None) without line endings.

    Decoding is per line so one bad byte costs one line (None, already reported), not the file.
    """
    fs, path = storage.filesystem(uri, options)
    try:
        f = storage.with_retries(f"open {uri}", lambda: fs.open(path, "rb"), options)
    except FileNotFoundError:
        report.problems.append(f"{uri}: file not found")
        return
    except IsADirectoryError:
        report.problems.append(f"{uri}: is a directory, not a file")
        return
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            raw = raw.rstrip(b"\r\n")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.problems.append(
                    f"{uri}:{lineno}: not valid UTF-8 (byte {exc.object[exc.start]:#04x} "
                    f"at column {exc.start + 1})"
                )
                yield lineno, None


def _owned_report(report: ReadReport | None) -> tuple[ReadReport, bool]:
    return (report, False) if report is not None else (ReadReport(), True)


# ---------------------------------------------------------------------------- ner


def iter_ner(
    uri: str,
    options: storage.StorageOptions | None = None,
    fmt: str | None = None,
    report: ReadReport | None = None,
    split: str | None = None,
) -> Iterator[Sentence]:
    """Stream the valid sentences of one NER input, tags converted to IOB2: a CoNLL or JSONL
    file (`tags`), or a Hugging Face dataset (`ner_tags`: ClassLabel or strings) as a Parquet /
    JSON / CSV file or a `save_to_disk` directory (`split`: one split of a DatasetDict).

    Problems and conversion counts go to `report`; a sentence with any problem is not yielded.
    Without a report, a CorpusError listing every problem is raised once the input is read.
    """
    report, owned = _owned_report(report)
    try:
        kind = detect_format(uri, NER_FORMATS, fmt, options)
    except ValueError as exc:
        report.problems.append(str(exc))
    else:
        if kind in hf_corpus.KINDS:
            records = hf_corpus.iter_records(
                uri, kind, NER_COLUMNS, options, report.problems, split
            )
            sentences = _ner_records(uri, records, "ner_tags", report)
        elif kind == "conll":
            sentences = _conll(uri, _lines(uri, options, report), report)
        else:
            sentences = _ner_jsonl(uri, _lines(uri, options, report), report)
        for sentence in sentences:
            tags, counts = to_iob2(sentence.tags)
            report.conversions.update(counts)
            yield Sentence(sentence.tokens, tags, sentence.source, sentence.line)
    if owned:
        report.raise_if_problems()


def read_ner(
    uris: Iterable[str], options: storage.StorageOptions | None = None, fmt: str | None = None
) -> tuple[list[Sentence], Counter]:
    """All sentences of several files in memory (small corpora, tests), plus conversion counts.
    Raises one CorpusError with the problems of every file."""
    report = ReadReport()
    sentences = [s for uri in uris for s in iter_ner(uri, options, fmt, report)]
    report.raise_if_problems()
    return sentences, report.conversions


def _conll(uri: str, lines, report: ReadReport) -> Iterator[Sentence]:
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 0
    bad = False  # the sentence being built had a problem: drop it (it is reported)
    for lineno, text in lines:
        if text is None:
            bad = True
            continue
        columns = text.split()
        # Blank, whitespace-only (ner.txt uses a lone TAB) and -DOCSTART- lines end a sentence;
        # an empty buffer yields nothing, so the blank after -DOCSTART- adds no empty sentence.
        if not columns or columns[0] == DOCSTART:
            if tokens and not bad:
                yield Sentence(tokens, tags, uri, first_line)
            tokens, tags, bad = [], [], False
            continue
        if not tokens and not bad:
            first_line = lineno
        if len(columns) < 2:
            report.problems.append(
                f"{uri}:{lineno}: one column {columns[0]!r}; expected 'TOKEN [...] TAG'"
            )
            bad = True
            continue
        tag = columns[-1]
        if not is_valid_tag(tag):
            report.problems.append(f"{uri}:{lineno}: {_bad_tag(tag)}")
            bad = True
        tokens.append(columns[0])
        tags.append(tag)
    if tokens and not bad:  # the last sentence need not end with a blank line
        yield Sentence(tokens, tags, uri, first_line)


def _bad_tag(tag: str) -> str:
    return f"invalid tag {tag!r}; expected 'O' or PREFIX-TYPE with PREFIX one of B I E S L U"


def _ner_jsonl(uri: str, lines, report: ReadReport) -> Iterator[Sentence]:
    def records():
        for lineno, text in lines:
            if text is None or not text.strip():
                continue
            where = f"{uri}:{lineno}"
            obj = _json_object(where, text, ("tokens", "tags"), report)
            if obj is not None:
                yield where, {"tokens": obj["tokens"], "tags": obj["tags"]}, lineno

    yield from _ner_records(uri, records(), "tags", report)


def _ner_records(uri: str, records, tags_key: str, report: ReadReport) -> Iterator[Sentence]:
    """Validate (where, {"tokens", tags_key}[, line]) records; the one check for JSONL lines and
    dataset rows alike. A dataset row has no line: its Sentence.line is 0."""
    for where, record, *line in records:
        tokens, tags = record["tokens"], record[tags_key]
        problems = []
        if not _is_str_list(tokens):
            problems.append("'tokens' must be a list of strings")
        if not _is_str_list(tags):
            problems.append(f"{tags_key!r} must be a list of strings{_int_tags_hint(tags)}")
        if not problems:
            if not tokens:
                problems.append("empty sentence (no tokens)")
            elif len(tokens) != len(tags):
                problems.append(f"{len(tokens)} tokens but {len(tags)} tags")
            problems += [f"token #{i} is empty" for i, t in enumerate(tokens, 1) if not t.strip()]
            problems += [
                f"token #{i}: {_bad_tag(t)}" for i, t in enumerate(tags, 1) if not is_valid_tag(t)
            ]
        if problems:
            report.problems.extend(f"{where}: {p}" for p in problems)
            continue
        yield Sentence(tokens, tags, uri, line[0] if line else 0)


def _int_tags_hint(tags) -> str:
    if isinstance(tags, list) and any(isinstance(t, int) for t in tags):
        return (
            " (integer tags need a ClassLabel feature naming them, as a `save_to_disk` "
            "directory or a Parquet file written by datasets carries)"
        )
    return ""


def _json_object(where: str, text: str, keys: tuple[str, ...], report: ReadReport) -> dict | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        report.problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
        return None
    if not isinstance(obj, dict):
        report.problems.append(f"{where}: expected a JSON object with keys {list(keys)}")
        return None
    missing = [k for k in keys if k not in obj]
    if missing:
        report.problems.append(f"{where}: missing key{'s' if len(missing) > 1 else ''} {missing}")
        return None
    return obj


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# ---------------------------------------------------------------------------- classify


def iter_classify(
    uri: str,
    options: storage.StorageOptions | None = None,
    fmt: str | None = None,
    report: ReadReport | None = None,
    split: str | None = None,
) -> Iterator[TextExample]:
    """Stream the valid examples of one classification input: JSONL or CSV with a header naming
    `text` and `label`, or a Hugging Face dataset with those columns (`label` a ClassLabel or
    strings) as in `iter_ner`. Problems as in `iter_ner`."""
    report, owned = _owned_report(report)
    try:
        kind = detect_format(uri, CLASSIFY_FORMATS, fmt, options)
    except ValueError as exc:
        report.problems.append(str(exc))
    else:
        if kind in hf_corpus.KINDS:
            records = hf_corpus.iter_records(
                uri, kind, CLASSIFY_COLUMNS, options, report.problems, split
            )
            for where, record in records:
                if _text_and_label(where, record["text"], record["label"], report):
                    yield TextExample(record["text"], record["label"], uri, 0)
        elif kind == "csv":
            yield from _classify_csv(uri, _lines(uri, options, report), report)
        else:
            yield from _classify_jsonl(uri, _lines(uri, options, report), report)
    if owned:
        report.raise_if_problems()


def read_classify(
    uris: Iterable[str], options: storage.StorageOptions | None = None, fmt: str | None = None
) -> list[TextExample]:
    """All examples of several files in memory; one CorpusError for every problem."""
    report = ReadReport()
    examples = [e for uri in uris for e in iter_classify(uri, options, fmt, report)]
    report.raise_if_problems()
    return examples


def _text_and_label(where: str, text, label, report: ReadReport) -> bool:
    ok = True
    for name, value in (("text", text), ("label", label)):
        if value is None:
            report.problems.append(f"{where}: missing {name!r}")
            ok = False
        elif not isinstance(value, str):
            report.problems.append(f"{where}: {name!r} must be a string, got {value!r}")
            ok = False
        elif not value.strip():
            report.problems.append(f"{where}: empty {name!r}")
            ok = False
    return ok


def _classify_jsonl(uri: str, lines, report: ReadReport) -> Iterator[TextExample]:
    for lineno, text in lines:
        if text is None or not text.strip():
            continue
        where = f"{uri}:{lineno}"
        obj = _json_object(where, text, (), report)
        if obj is None:
            continue
        if _text_and_label(where, obj.get("text"), obj.get("label"), report):
            yield TextExample(obj["text"], obj["label"], uri, lineno)


def _classify_csv(uri: str, lines, report: ReadReport) -> Iterator[TextExample]:
    bad_lines: set[int] = set()

    def text_lines():
        # csv needs the newline back to parse quoted fields spanning lines; an undecodable
        # line is replaced by an empty one and remembered so its record is dropped.
        for lineno, text in lines:
            if text is None:
                bad_lines.add(lineno)
                text = ""
            yield text + "\n"

    reader = csv.reader(text_lines())
    header: list[str] | None = None
    end = 0  # physical line where the previous record ended
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            report.problems.append(f"{uri}:{reader.line_num}: malformed CSV ({exc})")
            end = reader.line_num
            continue
        start, end = end + 1, reader.line_num
        if not row:
            continue
        where = f"{uri}:{start}"
        if any(n in bad_lines for n in range(start, end + 1)):
            if header is None:
                return
            continue
        if header is None:
            header = [h.strip() for h in row]
            missing = [c for c in ("text", "label") if c not in header]
            if missing:
                report.problems.append(
                    f"{where}: CSV header {header} lacks column{'s' if len(missing) > 1 else ''} "
                    f"{missing}"
                )
                return
            i_text, i_label = header.index("text"), header.index("label")
            continue
        if len(row) != len(header):
            report.problems.append(f"{where}: {len(row)} fields, the header has {len(header)}")
            continue
        if _text_and_label(where, row[i_text], row[i_label], report):
            yield TextExample(row[i_text], row[i_label], uri, start)
