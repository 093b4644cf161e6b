"""`prepare` on Hugging Face datasets: save_to_disk directories (Dataset, DatasetDict) and Parquet /
JSON / CSV files read through `datasets`, with ClassLabel names, IOB2 conversion, every bad row
reported as URI:row N, and progress lines while reading."""

from __future__ import annotations

import logging

import datasets
import pytest
from shardtune.data import corpus
from shardtune.data import prepare as prep
from shardtune.data.corpus import CorpusError
from shardtune.data.manifest import MANIFEST, read_all_rows

NER_NAMES = ["O", "I-PER", "I-LOC", "B-LOC", "E-PER", "S-LOC"]  # IOB1 and BIOES, as CoNLL-2003
NER_FEATURES = datasets.Features(
    {
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NER_NAMES)),
    }
)
STRING_NER_FEATURES = datasets.Features(
    {
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.Value("string")),
    }
)
CLASS_FEATURES = datasets.Features(
    {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
)


def ner_dataset(n: int = 4) -> datasets.Dataset:
    # "Anna Smith in Paris": I-PER I-PER (IOB1) / S-LOC (BIOES); ids into NER_NAMES.
    tokens = [[f"w{i}", "Anna", "Smith", "in", "Paris"] for i in range(n)]
    tags = [[0, 1, 1, 0, 5] for _ in range(n)]
    return datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": tags}, features=NER_FEATURES)


def problems(fn, *args, **kwargs) -> list[str]:
    with pytest.raises(CorpusError) as info:
        fn(*args, **kwargs)
    return info.value.problems


# ---------------------------------------------------------------------------- ner


def test_saved_dataset_with_classlabel_tags_becomes_iob2_rows(tmp_path):
    ner_dataset(3).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"

    manifests = prep.prepare("ner", [str(tmp_path / "ds")], str(out))

    manifest, rows = read_all_rows(str(out))
    assert manifests == {"": manifest}
    assert rows[0] == {
        "id": 0,
        "tokens": ["w0", "Anna", "Smith", "in", "Paris"],
        "tags": ["O", "B-PER", "I-PER", "O", "B-LOC"],
    }
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert manifest.labels == ["B-LOC", "B-PER", "I-PER", "O"]
    assert manifest.notes == {"bioes_to_iob2": 3, "iob1_to_iob2": 3}
    assert manifest.num_tokens == 15


def test_parquet_is_detected_by_extension_and_keeps_classlabel_names(tmp_path):
    path = str(tmp_path / "train.parquet")
    ner_dataset(2).to_parquet(path)
    prep.prepare("ner", [path], str(tmp_path / "out"))
    manifest, rows = read_all_rows(str(tmp_path / "out"))
    assert manifest.sources == [path]
    assert rows[1]["tags"] == ["O", "B-PER", "I-PER", "O", "B-LOC"]


def test_string_tags_from_parquet_and_json_lines(tmp_path):
    data = {"tokens": [["EU", "rejects"], ["Paris"]], "ner_tags": [["B-ORG", "O"], ["I-LOC"]]}
    ds = datasets.Dataset.from_dict(data, features=STRING_NER_FEATURES)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_json(str(tmp_path / "b.jsonl"))

    prep.prepare("ner", [str(tmp_path / "a.parquet")], str(tmp_path / "p"))
    prep.prepare("ner", [str(tmp_path / "b.jsonl")], str(tmp_path / "j"), fmt="hf-json")

    for out in ("p", "j"):
        _, rows = read_all_rows(str(tmp_path / out))
        assert [r["tags"] for r in rows] == [["B-ORG", "O"], ["B-LOC"]]


def test_every_bad_row_is_reported_with_its_row_number_and_nothing_is_written(tmp_path):
    data = {
        "tokens": [["ok"], ["a", "b"], [], ["x"], ["fine"], ["", "y"]],
        "ner_tags": [["O"], ["O"], [], ["PER"], ["O"], ["O", "O"]],
    }
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_dict(data, features=STRING_NER_FEATURES).to_parquet(path)
    out = tmp_path / "out"

    found = problems(prep.prepare, "ner", [path], str(out))

    assert found == [
        f"{path}:row 1: 2 tokens but 1 tags",
        f"{path}:row 2: empty sentence (no tokens)",
        f"{path}:row 3: token #1: invalid tag 'PER'; expected 'O' or PREFIX-TYPE with PREFIX one "
        "of B I E S L U",
        f"{path}:row 5: token #1 is empty",
    ]
    assert not out.exists()


def test_integer_tags_without_classlabel_names_are_reported_with_a_hint(tmp_path):
    path = str(tmp_path / "a.jsonl")
    ner_dataset(1).to_json(path)  # JSON keeps the ids and loses the ClassLabel names
    [problem] = problems(corpus.read_ner, [path], fmt="hf-json")
    assert problem.startswith(f"{path}:row 0: 'ner_tags' must be a list of strings")
    assert "ClassLabel" in problem


def test_missing_column_and_missing_file_are_one_problem_each(tmp_path):
    path = str(tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"tokens": [["a"]], "tags": [["O"]]}).to_parquet(path)
    missing = str(tmp_path / "nope.parquet")
    found = problems(corpus.read_ner, [path, missing])
    assert found == [
        f"{path}: no column ['ner_tags'] (columns: ['tags', 'tokens'])",
        f"{missing}: file not found",
    ]


# ---------------------------------------------------------------------------- DatasetDict


def test_dataset_dict_splits_become_train_dev_test_with_one_label_set(tmp_path):
    only_in_test = datasets.Dataset.from_dict(
        {"tokens": [["Acme"]], "ner_tags": [[3]]}, features=NER_FEATURES
    )
    dd = datasets.DatasetDict(train=ner_dataset(5), validation=ner_dataset(2), test=only_in_test)
    dd.save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"

    manifests = prep.prepare("ner", [str(tmp_path / "dd")], str(out), shard_size=2)

    assert list(manifests) == ["train", "dev", "test"]
    assert [m.num_examples for m in manifests.values()] == [5, 2, 1]
    assert [len(m.shards) for m in manifests.values()] == [3, 1, 1]
    assert {tuple(m.labels) for m in manifests.values()} == {("B-LOC", "B-PER", "I-PER", "O")}
    assert manifests["dev"].notes["source_split"] == "validation"
    for name, manifest in manifests.items():
        assert read_all_rows(str(out / name))[0] == manifest
        assert [r["id"] for r in read_all_rows(str(out / name))[1]] == list(
            range(manifest.num_examples)
        )
    assert not (out / MANIFEST).exists()


def test_dataset_dict_refuses_split_fractions_other_inputs_and_unknown_splits(tmp_path):
    datasets.DatasetDict(train=ner_dataset(2), test=ner_dataset(2)).save_to_disk(
        str(tmp_path / "dd")
    )
    dd = str(tmp_path / "dd")
    [problem] = problems(
        prep.prepare, "ner", [dd], str(tmp_path / "out"), split={"train": 0.5, "test": 0.5}
    )
    assert problem.startswith(f"{dd} is a DatasetDict with its own splits ['train', 'test']")
    assert problem.endswith("drop the split fractions (--split)")
    other = str(tmp_path / "x.parquet")
    ner_dataset(1).to_parquet(other)
    [problem] = problems(prep.prepare, "ner", [dd, other], str(tmp_path / "out"))
    assert "prepare it as the only input (got 2 inputs)" in problem

    datasets.DatasetDict(train=ner_dataset(2), unsupervised=ner_dataset(1)).save_to_disk(
        str(tmp_path / "odd")
    )
    [problem] = problems(prep.prepare, "ner", [str(tmp_path / "odd")], str(tmp_path / "out"))
    assert "['unsupervised']" in problem
    assert not (tmp_path / "out").exists()


def test_bad_rows_of_every_split_are_reported_before_anything_is_written(tmp_path):
    bad = datasets.Dataset.from_dict(
        {"tokens": [["ok"], ["a"], []], "ner_tags": [[0], [0, 0], []]}, features=NER_FEATURES
    )
    datasets.DatasetDict(train=ner_dataset(3), validation=bad, test=bad).save_to_disk(
        str(tmp_path / "dd")
    )
    dd, out = str(tmp_path / "dd"), tmp_path / "out"
    assert problems(prep.prepare, "ner", [dd], str(out)) == [
        f"{dd}[validation]:row 1: 1 tokens but 2 tags",
        f"{dd}[validation]:row 2: empty sentence (no tokens)",
        f"{dd}[test]:row 1: 1 tokens but 2 tags",
        f"{dd}[test]:row 2: empty sentence (no tokens)",
    ]
    assert not out.exists()


# ---------------------------------------------------------------------------- classify


def test_classify_from_classlabel_parquet_json_and_csv(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"text": ["awful film", "great film"], "label": [0, 1]}, features=CLASS_FEATURES
    )
    ds.to_parquet(str(tmp_path / "a.parquet"))
    strings = ds.cast_column("label", datasets.Value("string")).map(
        lambda row: {"label": CLASS_FEATURES["label"].int2str(int(row["label"]))}
    )
    strings.to_json(str(tmp_path / "b.jsonl"))
    strings.to_csv(str(tmp_path / "c.csv"), index=False)

    prep.prepare("classify", [str(tmp_path / "a.parquet")], str(tmp_path / "p"))
    prep.prepare("classify", [str(tmp_path / "b.jsonl")], str(tmp_path / "j"), fmt="hf-json")
    prep.prepare("classify", [str(tmp_path / "c.csv")], str(tmp_path / "c"), fmt="hf-csv")

    for out in ("p", "j", "c"):
        manifest, rows = read_all_rows(str(tmp_path / out))
        assert manifest.labels == ["neg", "pos"]
        assert [(r["text"], r["label"]) for r in rows] == [
            ("awful film", "neg"),
            ("great film", "pos"),
        ]


def test_classify_null_and_unlabelled_rows_are_reported(tmp_path):
    strings = datasets.Dataset.from_dict({"text": ["ok", "fine", None, " "],
                                          "label": ["pos", None, "neg", "neg"]})  # fmt: skip
    strings.to_parquet(str(tmp_path / "s.parquet"))
    unlabelled = datasets.Dataset.from_dict(  # -1: datasets' "no label" (e.g. GLUE test sets)
        {"text": ["ok", "hidden"], "label": [1, -1]}, features=CLASS_FEATURES
    )
    unlabelled.save_to_disk(str(tmp_path / "u"))
    s, u = str(tmp_path / "s.parquet"), str(tmp_path / "u")

    assert problems(corpus.read_classify, [s, u]) == [
        f"{s}:row 1: missing 'label'",
        f"{s}:row 2: missing 'text'",
        f"{s}:row 3: empty 'text'",
        f"{u}:row 1: missing 'label'",
    ]


# ---------------------------------------------------------------------------- progress


def test_prepare_logs_progress_lines_while_reading(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "a.parquet")
    ner_dataset(3).to_parquet(path)
    monkeypatch.setattr(prep, "PROGRESS_SECONDS", 0.0)  # a line per example

    with caplog.at_level(logging.INFO, logger="shardtune.data.prepare"):
        prep.prepare("ner", [path], str(tmp_path / "out"))

    lines = [r.getMessage() for r in caplog.records if r.name == "shardtune.data.prepare"]
    for phase in ("validating", "writing"):
        ours = [line for line in lines if line.startswith(f"{phase}: ")]
        assert [line.split(" (")[0] for line in ours[:3]] == [
            f"{phase}: {n} examples read" for n in (1, 2, 3)
        ]
        assert ours[3].startswith(f"{phase}: done, 3 examples in ")
        assert all("\n" not in line and line.endswith("/s)") for line in ours)


def test_progress_lines_are_rate_limited(caplog):
    ticks = iter(range(1000))  # a clock advancing 1 s per reading
    progress = prep._Progress("validating", clock=lambda: float(next(ticks)))
    with caplog.at_level(logging.INFO, logger="shardtune.data.prepare"):
        for _ in range(20):
            progress.tick()
    # 20 examples over 20 s with a line per PROGRESS_SECONDS (5 s): 4 lines, not 20.
    assert [r.getMessage() for r in caplog.records] == [
        f"validating: {n} examples read (1/s)" for n in (5, 10, 15, 20)
    ]
