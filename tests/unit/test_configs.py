"""Every shipped job file in configs/ loads and validates; new files are picked up by the glob."""

from __future__ import annotations

from pathlib import Path

import pytest
from shardtune.cluster.config import load_job_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Files in configs/ that are not job files.
NOT_JOB_FILES = {"runtime_env.yaml"}  # a Ray runtime env for `ray job submit --runtime-env`
JOB_FILES = sorted(
    p for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")] if p.name not in NOT_JOB_FILES
)


def test_configs_holds_job_files() -> None:
    assert len(JOB_FILES) >= 2, f"expected job files in {CONFIGS}"


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_loads_and_validates(path: Path) -> None:
    job = load_job_config(path)
    assert job.run.name and job.run.output


@pytest.mark.parametrize(
    "path", [p for p in JOB_FILES if p.name.startswith("cluster-")], ids=lambda p: p.name
)
def test_cluster_job_files_join_ray_and_use_object_storage(path: Path) -> None:
    """A cluster job runs on many nodes: it joins the running Ray, and its data and outputs are
    in object storage, because a local path would exist on one node only."""
    job = load_job_config(path)
    assert job.cluster.address == "auto"
    assert job.cluster.use_gpu
    for uri in (job.data.train, job.data.eval, job.data.test, job.run.output):
        assert uri is None or uri.startswith("s3://"), uri


def test_multinode_zero3_is_two_nodes_of_eight_gpus() -> None:
    job = load_job_config(CONFIGS / "cluster-multinode-zero3.yaml")
    assert job.cluster.num_workers == 16
    assert (job.train.zero_stage, job.train.offload, job.train.precision) == (3, "none", "bf16")


def test_single_node_is_eight_gpus_zero2() -> None:
    job = load_job_config(CONFIGS / "cluster-single-node.yaml")
    assert job.cluster.num_workers == 8
    assert (job.train.zero_stage, job.train.precision) == (2, "bf16")
