"""Job config: every bad field reported by path, overrides, secrets never written back."""

from pathlib import Path

import pytest
from shardtune.cluster.config import ConfigError, apply_overrides, load_job_config, to_public_dict

GOOD = """
task: ner
model: {name_or_path: /models/bert}
data: {train: s3://b/train, eval: s3://b/dev, max_length: 64}
train: {epochs: 2, lr: 3.0e-5, zero_stage: 3, precision: bf16}
cluster: {num_workers: 2}
run: {name: r1, output: s3://b/runs}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_good_file_and_defaults(tmp_path):
    job = load_job_config(write(tmp_path, GOOD))
    assert job.train.zero_stage == 3 and job.train.precision == "bf16"
    assert job.train.eval_every == "epoch" and job.train.batch_size == 16
    assert job.cluster.address is None and job.storage.endpoint_url is None


def test_every_bad_field_is_reported_by_path(tmp_path):
    bad = """
task: nerr
model: {}
data: {train: a, max_length: 2, bogus: 1}
train: {lr: -1, zero_stage: 5, precision: fp8, eval_every: 0, warmup: 1.5}
cluster: {num_workers: 0, cpus_per_worker: 0}
run: {name: "has space", output: o}
extra_section: {}
"""
    with pytest.raises(ConfigError) as info:
        load_job_config(write(tmp_path, bad))
    text = str(info.value)
    for path in [
        "task:", "model.name_or_path: required", "data.max_length:", "data.bogus: unknown field",
        "train.lr:", "train.zero_stage:", "train.precision:", "train.eval_every:", "train.warmup:",
        "cluster.num_workers:", "cluster.cpus_per_worker:", "run.name:", "extra_section: unknown field",
    ]:  # fmt: skip
        assert path in text, (path, text)
    assert len(info.value.problems) == 13
    assert str(tmp_path / "job.yaml") in text


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_job_config(
            write(tmp_path, GOOD),
            ["train.offload=cpu", "train.zero_stage=0", "train.precision=fp16"],
        )
    problems = info.value.problems
    assert any(p.startswith("train.offload:") for p in problems)
    assert any(p.startswith("train.precision: fp16 needs cluster.use_gpu") for p in problems)


def test_overrides_parse_yaml_scalars(tmp_path):
    job = load_job_config(
        write(tmp_path, GOOD),
        [
            "train.lr=1e-4",
            "cluster.use_gpu=true",
            "train.eval_every=50",
            "cluster.address=auto",
            "train.max_steps=null",
        ],
    )
    assert job.train.lr == pytest.approx(1e-4)
    assert (
        job.cluster.use_gpu is True and job.train.eval_every == 50 and job.cluster.address == "auto"
    )


def test_bad_override_syntax_and_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="train.lrr: unknown field"):
        load_job_config(write(tmp_path, GOOD), ["train.lrr=1"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_job_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"job.yaml:\d+: not valid YAML"):
        load_job_config(write(tmp_path, "task: ner\nmodel: [1,\n  x: y: z\n"))


def test_public_dict_hides_endpoint_credentials(tmp_path):
    job = load_job_config(write(tmp_path, GOOD), ["storage.endpoint_url=http://user:pw@minio:9000"])
    public = to_public_dict(job)
    assert "pw" not in str(public) and public["storage"]["endpoint_url"] == "http://***@minio:9000"


def test_a_job_that_says_nothing_about_failures_resumes(tmp_path):
    """Issue 18.3: with no cluster.max_failures a lost worker restarts the group from the latest
    checkpoint (3 restarts) instead of ending the run (Ray's library default, 0)."""
    job = load_job_config(write(tmp_path, GOOD))
    assert job.cluster.max_failures == 3
    assert load_job_config(write(tmp_path, GOOD), ["cluster.max_failures=0"]).cluster.max_failures == 0
