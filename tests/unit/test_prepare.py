"""raw corpus -> Parquet shards + manifest: round trips, shard plans, splits, failure modes."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shardtune.data import prepare as prep
from shardtune.data.corpus import CorpusError
from shardtune.data.manifest import MANIFEST, read_all_rows, read_manifest, sha256_hex


def ner_sentences(n: int) -> list[tuple[list[str], list[str]]]:
    sentences = []
    for i in range(n):
        tokens = [f"w{i}", "in", "Paris"] + ["x"] * (i % 3)
        tags = ["O", "O", "B-LOC"] + ["O"] * (i % 3)
        sentences.append((tokens, tags))
    return sentences


def write_conll(path: Path, sentences) -> str:
    blocks = ["\n".join(f"{t}\t{g}" for t, g in zip(*s, strict=True)) for s in sentences]
    path.write_text("\n\n".join(blocks) + "\n")
    return str(path)


def write_ner_jsonl(path: Path, sentences) -> str:
    path.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in sentences))
    return str(path)


def files_in(path: Path) -> list[str]:
    """Shards and manifest.json; the versioned copy and the index beside every manifest.json
    are checked by test_versions_and_index_accompany_the_manifest."""
    if not path.exists():
        return []
    extra = re.compile(r"^manifest\.(v\d{5}\.json|index)$")
    return sorted(p.name for p in path.rglob("*") if p.is_file() and not extra.match(p.name))


# ---------------------------------------------------------------------------- round trips


def test_ner_round_trip_across_inputs(tmp_path):
    first, second = ner_sentences(7), ner_sentences(5)
    second[0] = (["Acme", "Corp", "rocks"], ["B-ORG", "I-ORG", "O"])
    a = write_conll(tmp_path / "a.conll", first)
    b = write_ner_jsonl(tmp_path / "b.jsonl", second)
    out = tmp_path / "out"

    manifests = prep.prepare("ner", [a, b], str(out))

    manifest, rows = read_all_rows(str(out))
    assert manifests == {"": manifest}
    assert rows == [
        {"id": i, "tokens": tokens, "tags": tags} for i, (tokens, tags) in enumerate(first + second)
    ]
    assert manifest.task == "ner"
    assert manifest.labels == ["B-LOC", "B-ORG", "I-ORG", "O"]
    assert manifest.num_examples == 12
    assert manifest.num_tokens == sum(len(t) for t, _ in first + second)
    assert manifest.sources == [a, b]
    assert manifest.notes == {"bioes_to_iob2": 0, "iob1_to_iob2": 0}
    assert files_in(out) == [MANIFEST, "shard-00000.parquet"]


def test_tag_conversions_are_written_as_iob2_and_noted(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("Peter I-PER\nBlackburn I-PER\nin O\nParis S-LOC\n")
    prep.prepare("ner", [str(path)], str(tmp_path / "out"))
    manifest, [row] = read_all_rows(str(tmp_path / "out"))
    assert row["tags"] == ["B-PER", "I-PER", "O", "B-LOC"]
    assert manifest.labels == ["B-LOC", "B-PER", "I-PER", "O"]
    assert manifest.notes == {"bioes_to_iob2": 1, "iob1_to_iob2": 1}


def test_classify_round_trip_jsonl_and_csv(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(
        json.dumps({"text": "a really good film", "label": "pos"})
        + "\n"
        + json.dumps({"text": "bad", "label": "neg"})
        + "\n"
    )
    b = tmp_path / "b.csv"
    b.write_text('label,text\nneutral,"fine, I guess"\n')
    out = tmp_path / "out"

    prep.prepare("classify", [str(a), str(b)], str(out))

    manifest, rows = read_all_rows(str(out))
    assert rows == [
        {"id": 0, "text": "a really good film", "label": "pos"},
        {"id": 1, "text": "bad", "label": "neg"},
        {"id": 2, "text": "fine, I guess", "label": "neutral"},
    ]
    assert manifest.labels == ["neg", "neutral", "pos"]
    assert manifest.num_tokens == 4 + 1 + 3
    assert manifest.notes == {}


# ---------------------------------------------------------------------------- shards


@pytest.mark.parametrize(
    ("kwargs", "sizes"),
    [
        ({}, [10]),
        ({"shards": 3}, [4, 3, 3]),
        ({"shards": 10}, [1] * 10),
        ({"shards": 25}, [1] * 10),  # clamped: never an empty shard
        ({"shard_size": 4}, [4, 4, 2]),
        ({"shard_size": 5}, [5, 5]),
        ({"shard_size": 50}, [10]),
    ],
)
def test_shards_are_contiguous_id_ranges_of_the_planned_sizes(tmp_path, kwargs, sizes):
    path = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(10))
    out = tmp_path / "out"
    prep.prepare("ner", [path], str(out), **kwargs)

    manifest = read_manifest(str(out))
    assert [s.num_examples for s in manifest.shards] == sizes
    assert [s.name for s in manifest.shards] == [
        f"shard-{i:05d}.parquet" for i in range(len(sizes))
    ]
    assert files_in(out) == sorted([MANIFEST] + [s.name for s in manifest.shards])
    start = 0
    for shard, size in zip(manifest.shards, sizes, strict=True):
        ids = pq.read_table(out / shard.name).column("id").to_pylist()
        assert ids == list(range(start, start + size))
        start += size


def test_shard_sizes_default_and_argument_errors():
    assert prep.shard_sizes(25_000) == [8334, 8333, 8333]
    assert prep.shard_sizes(1) == [1]
    assert prep.shard_sizes(0, shards=3) == []
    with pytest.raises(ValueError, match="not both"):
        prep.shard_sizes(10, shards=2, shard_size=3)
    with pytest.raises(ValueError, match="shards must be >= 1"):
        prep.shard_sizes(10, shards=0)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        prep.shard_sizes(10, shard_size=-1)


def test_manifest_sha256_and_counts_match_the_shard_files(tmp_path):
    path = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(9))
    out = tmp_path / "out"
    manifest = prep.prepare("ner", [path], str(out), shards=2)[""]
    assert read_manifest(str(out)) == manifest
    for shard in manifest.shards:
        assert sha256_hex((out / shard.name).read_bytes()) == shard.sha256
    assert sum(s.num_tokens for s in manifest.shards) == manifest.num_tokens


def test_rerun_into_the_same_output_replaces_the_old_dataset(tmp_path):
    path = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(6))
    out = tmp_path / "out"
    prep.prepare("ner", [path], str(out), shards=6)
    write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(4))
    prep.prepare("ner", [path], str(out), shards=2)
    manifest, rows = read_all_rows(str(out))
    assert len(rows) == 4
    assert files_in(out) == [MANIFEST, "shard-00000.parquet", "shard-00001.parquet"]


# ---------------------------------------------------------------------------- splits

SPLIT = {"train": 0.8, "dev": 0.1, "test": 0.1}


def test_splits_are_disjoint_cover_every_id_and_keep_corpus_order(tmp_path):
    sentences = ner_sentences(50)
    path = write_ner_jsonl(tmp_path / "a.jsonl", sentences)
    out = tmp_path / "out"

    manifests = prep.prepare("ner", [path], str(out), split=SPLIT, seed=3, shards=2)

    assert list(manifests) == ["train", "dev", "test"]
    ids = {}
    for name in SPLIT:
        manifest, rows = read_all_rows(str(out / name))
        assert manifest == manifests[name]
        ids[name] = [r["id"] for r in rows]
        assert ids[name] == sorted(ids[name])
        for row in rows:  # every row is the sentence with that id
            assert (row["tokens"], row["tags"]) == sentences[row["id"]]
        assert manifest.notes["split"] == name
        assert manifest.notes["seed"] == 3
    assert sum(len(ids[n]) for n in SPLIT) == 50 and all(ids.values())  # hashed: near 40/5/5
    assert sorted(ids["train"] + ids["dev"] + ids["test"]) == list(range(50))
    assert not (out / MANIFEST).exists()


def test_split_is_deterministic_for_a_seed(tmp_path):
    path = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(40))

    def dev_ids(out: str, seed: int) -> list[int]:
        prep.prepare("ner", [path], out, split=SPLIT, seed=seed)
        return [r["id"] for r in read_all_rows(str(Path(out) / "dev"))[1]]

    first = dev_ids(str(tmp_path / "one"), seed=7)
    assert dev_ids(str(tmp_path / "two"), seed=7) == first
    assert dev_ids(str(tmp_path / "three"), seed=8) != first
    keys = [str(i).encode() for i in range(40)]
    assert list(prep.assign_splits(keys, SPLIT, 7)) == list(prep.assign_splits(keys, SPLIT, 7))


def test_every_split_gets_the_whole_corpus_label_list(tmp_path):
    sentences = ner_sentences(30)
    sentences[17] = (["Acme"], ["B-ORG"])  # this label lands in one split only
    path = write_ner_jsonl(tmp_path / "a.jsonl", sentences)
    manifests = prep.prepare("ner", [path], str(tmp_path / "out"), split=SPLIT)
    expected = ["B-LOC", "B-ORG", "O"]
    assert [m.labels for m in manifests.values()] == [expected] * 3


def test_a_split_that_would_be_empty_is_an_error_before_writing(tmp_path):
    path = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(3))
    out = tmp_path / "out"
    with pytest.raises(prep.corpus.CorpusError, match="no examples"):
        prep.prepare("ner", [path], str(out), split={"train": 0.9, "test": 0.1})
    assert files_in(out) == []


def test_parse_split():
    assert prep.parse_split("train=0.8, dev=0.1,test=0.1") == SPLIT
    assert prep.parse_split("a=0.5,b=0.5") == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "split is empty"),
        ("train=0.8,dev", "'dev' is not NAME=FRACTION"),
        ("=0.5,b=0.5", "'=0.5' is not NAME=FRACTION"),
        ("train=abc", "'abc' is not a number"),
        ("a=0.5,a=0.5", "'a' appears twice"),
        ("train=0.8,dev=0.1", "sum to 0.9, not 1"),
        ("train=1.1,dev=-0.1", "'dev': fraction -0.1 must be > 0"),
        ("train=1,dev=0", "'dev': fraction 0.0 must be > 0"),
        ("train=nan,dev=1", "'train': fraction nan must be > 0"),
        ("tr/ain=1", "split name 'tr/ain'"),
    ],
)
def test_parse_split_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as info:
        prep.parse_split(text)
    assert message in str(info.value)


# ---------------------------------------------------------------------------- inputs and errors


def test_bad_input_writes_nothing_and_reports_every_file(tmp_path):
    good = write_ner_jsonl(tmp_path / "good.jsonl", ner_sentences(5))
    bad = tmp_path / "bad.conll"
    bad.write_text("ok O\nlonely\n\nfine B-X\n")
    worse = tmp_path / "worse.jsonl"
    worse.write_text('{"tokens": ["a"], "tags": ["O", "O"]}\n')
    out = tmp_path / "out"

    with pytest.raises(CorpusError) as info:
        prep.prepare("ner", [good, str(bad), str(worse)], str(out), split=SPLIT)

    assert [p.split(": ")[0] for p in info.value.problems] == [f"{bad}:2", f"{worse}:1"]
    assert not out.exists()


def test_bad_input_leaves_an_existing_dataset_alone(tmp_path):
    path = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(5))
    out = tmp_path / "out"
    prep.prepare("ner", [path], str(out))
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    Path(path).write_text('{"tokens": ["a"]}\n')
    with pytest.raises(CorpusError):
        prep.prepare("ner", [path], str(out))
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before


def test_globs_expand_in_sorted_order(tmp_path):
    (tmp_path / "in").mkdir()
    write_ner_jsonl(tmp_path / "in" / "b.jsonl", [(["second"], ["O"])])
    write_ner_jsonl(tmp_path / "in" / "a.jsonl", [(["first"], ["O"])])
    write_conll(tmp_path / "in" / "c.conll", [(["third"], ["O"])])
    out = tmp_path / "out"

    manifest = prep.prepare(
        "ner", [str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "in" / "c.*")], str(out)
    )[""]

    assert [r["tokens"] for r in read_all_rows(str(out))[1]] == [["first"], ["second"], ["third"]]
    assert manifest.sources == [str(tmp_path / "in" / n) for n in ("a.jsonl", "b.jsonl", "c.conll")]


def test_glob_without_match_is_an_error_naming_the_pattern(tmp_path):
    good = write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(2))
    pattern = str(tmp_path / "nothing" / "*.conll")
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        prep.prepare("ner", [good, pattern], str(out))
    assert info.value.problems == [f"{pattern}: no file matches this pattern"]
    assert not out.exists()


def test_empty_corpus_and_bad_arguments_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CorpusError, match="no examples"):
        prep.prepare("ner", [str(empty)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="task must be one of"):
        prep.prepare("tagging", [str(empty)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="not both"):
        prep.prepare("ner", [str(empty)], str(tmp_path / "out"), shards=1, shard_size=1)
    with pytest.raises(ValueError, match="no inputs"):
        prep.prepare("ner", [], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- growing corpora (issue 13)


def _split_of_sentences(out: Path) -> dict[tuple, str]:
    found = {}
    for name in SPLIT:
        for row in read_all_rows(str(out / name))[1]:
            found[(tuple(row["tokens"]), tuple(row["tags"]))] = name
    return found


def test_growing_the_corpus_moves_no_sentence_between_splits(tmp_path):
    old = ner_sentences(300)
    grown = old + [([f"new{i}", "Paris"], ["O", "B-LOC"]) for i in range(120)]
    prep.prepare("ner", [write_ner_jsonl(tmp_path / "old.jsonl", old)], str(tmp_path / "a"),
                 split=SPLIT, seed=5)  # fmt: skip
    prep.prepare("ner", [write_ner_jsonl(tmp_path / "grown.jsonl", grown)], str(tmp_path / "b"),
                 split=SPLIT, seed=5)  # fmt: skip
    before, after = _split_of_sentences(tmp_path / "a"), _split_of_sentences(tmp_path / "b")
    assert len(before) > 250
    assert {s: after[s] for s in before} == before


def test_append_adds_a_version_without_rewriting_old_shards(tmp_path):
    old = ner_sentences(200)
    new = [([f"new{i}", "Oslo"], ["O", "B-LOC"]) for i in range(90)]
    out = tmp_path / "ds"
    prep.prepare("ner", [write_ner_jsonl(tmp_path / "old.jsonl", old)], str(out), split=SPLIT,
                 seed=2, shards=2)  # fmt: skip
    shards_before = {p: p.read_bytes() for p in out.rglob("shard-*.parquet")}
    split_before = _split_of_sentences(out)
    manifests = prep.prepare("ner", [write_ner_jsonl(tmp_path / "new.jsonl", new)], str(out),
                             split=SPLIT, seed=2, shards=1, append=True)  # fmt: skip
    assert {p: p.read_bytes() for p in shards_before} == shards_before  # untouched
    after = _split_of_sentences(out)
    assert {s: after[s] for s in split_before} == split_before
    assert len(after) == 290
    for name, m in manifests.items():
        assert m.version == 2 and read_manifest(str(out / name)) == m
        assert (out / name / "manifest.v00001.json").exists()
        assert any(s.name.startswith("shard-v002-") for s in m.shards) or m.num_examples == len(
            [s for s in split_before.values() if s == name])  # fmt: skip
    ids = sorted(r["id"] for name in SPLIT for r in read_all_rows(str(out / name))[1])
    assert ids == list(range(290))  # new ids continue after the old corpus
    with pytest.raises(CorpusError, match="seed"):
        prep.prepare("ner", [str(tmp_path / "new.jsonl")], str(out), split=SPLIT, seed=3,
                     append=True)  # fmt: skip


def test_versions_and_index_accompany_the_manifest(tmp_path):
    from shardtune.data.manifest import INDEX, from_index, read_manifest_compact

    out = tmp_path / "ds"
    m = prep.prepare("ner", [write_ner_jsonl(tmp_path / "a.jsonl", ner_sentences(30))], str(out),
                     shards=3)[""]  # fmt: skip
    assert (out / "manifest.v00001.json").read_text() == (out / MANIFEST).read_text()
    compact = from_index((out / INDEX).read_bytes())
    assert list(compact.shards) == m.shards and compact.shard_sizes() == m.shard_sizes()
    assert read_manifest_compact(str(out)).to_json() == m.to_json()


# ---------------------------------------------------------------------------- one path, any pool
# `prepare --ray` is the same two passes run on a pool of Ray tasks (cluster/cli.py's ray_pool);
# an executor's map stands in for it here, so no Ray is needed to show the outputs agree.


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _classify_jsonl(path: Path, n: int, salt: str) -> str:
    rows = [{"text": f"{salt} text {i} " + "x " * (i % 4), "label": "abc"[i % 3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _inputs(root: Path, task: str, sizes: list[int], salt: str = "p") -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    if task == "classify":
        return [
            _classify_jsonl(root / f"{salt}{i}.jsonl", n, salt + str(i))
            for i, n in enumerate(sizes)
        ]
    sentences = ner_sentences(sum(sizes))
    out, start = [], 0
    for i, n in enumerate(sizes):  # CoNLL and JSONL alternating, each file its own sentences
        chunk = [([f"{salt}{i}", *t], ["O", *g]) for t, g in sentences[start : start + n]]
        write = write_conll if i % 2 else write_ner_jsonl
        out.append(write(root / f"{salt}{i}.{'conll' if i % 2 else 'jsonl'}", chunk))
        start += n
    return out


@pytest.fixture(params=["threads", "processes"])
def pool(request):
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    executor = ThreadPoolExecutor(3) if request.param == "threads" else ProcessPoolExecutor(2)
    with executor:
        yield executor.map


@pytest.mark.parametrize("task", ["ner", "classify"])
@pytest.mark.parametrize(
    "layout",
    [
        {"split": SPLIT, "shard_size": 7, "seed": 3},  # shards straddle files
        {"shards": 4},  # no split: one dataset
        {"shard_size": 50},  # one shard spans every file
    ],
)
def test_a_pool_writes_what_one_process_writes(tmp_path, pool, task, layout):
    files = _inputs(tmp_path / "in", task, [23, 5, 1, 31])
    one, many = tmp_path / "one", tmp_path / "many"

    serial = prep.prepare(task, files, str(one), **layout)
    parallel = prep.prepare(task, files, str(many), pool=pool, **layout)

    assert parallel == serial
    assert _tree(many) == _tree(one)
    assert sum(m.num_examples for m in serial.values()) == 60
    # an append through the pool continues ids and versions as one process does
    more = _inputs(tmp_path / "more", task, [9, 12], salt="m")
    prep.prepare(task, more, str(one), append=True, **layout)
    prep.prepare(task, more, str(many), append=True, pool=pool, **layout)
    assert _tree(many) == _tree(one)
    assert read_manifest(str(many / "train" if "split" in layout else many)).version == 2


@pytest.mark.parametrize("task", ["ner", "classify"])
def test_a_bad_line_is_the_same_error_through_a_pool_and_nothing_is_written(tmp_path, pool, task):
    files = _inputs(tmp_path / "in", task, [10, 10, 10])
    bad = Path(files[1])
    lines = bad.read_text().splitlines(keepends=True)
    if task == "classify":
        lines[3] = '{"text": "no label"}\n'
    else:  # a CoNLL file: a token line without a tag
        lines[2] = "lonely\n"
    bad.write_text("".join(lines))
    out = tmp_path / "out"

    with pytest.raises(CorpusError) as one:
        prep.prepare(task, files, str(out), split=SPLIT)
    with pytest.raises(CorpusError) as many:
        prep.prepare(task, files, str(out), split=SPLIT, pool=pool)

    assert many.value.problems == one.value.problems
    assert [p.split(": ")[0] for p in one.value.problems] == [f"{bad}:{3 if task == 'ner' else 4}"]
    assert not out.exists()


def test_an_input_that_changes_between_the_passes_is_an_error(tmp_path):
    files = _inputs(tmp_path / "in", "ner", [4, 4])
    calls = []

    def pool(fn, items):  # grows the second file after pass 1 has counted it
        calls.append(fn)
        if len(calls) == 2:
            write_conll(Path(files[1]), ner_sentences(6))
        return map(fn, items)

    changed = f"inputs changed while preparing: {files[1]} first read 4 examples, then more"
    with pytest.raises(CorpusError, match=changed):
        prep.prepare("ner", files, str(tmp_path / "out"), pool=pool)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_a_dataset_dict_runs_one_item_per_split_on_a_pool(tmp_path, pool):
    import datasets

    def part(n: int, word: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"tokens": [[f"{word}{i}", "Oslo"] for i in range(n)], "ner_tags": [["O", "B-LOC"]] * n}
        )

    dd = tmp_path / "dd"
    datasets.DatasetDict(
        train=part(9, "t"), validation=part(4, "v"), test=part(3, "s")
    ).save_to_disk(str(dd))
    one, many = tmp_path / "one", tmp_path / "many"

    serial = prep.prepare("ner", [str(dd)], str(one), shard_size=2)
    assert prep.prepare("ner", [str(dd)], str(many), shard_size=2, pool=pool) == serial
    assert list(serial) == ["train", "dev", "test"]
    assert _tree(many) == _tree(one)
