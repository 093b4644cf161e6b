"""Integration tier: one S3 endpoint (moto's server on 127.0.0.1) and one local Ray per session,
both from tests.testkit; shardtune's log lines set up as the CLI sets them up."""

from __future__ import annotations

import pytest
from shardtune.data.logs import setup_logging

from tests.testkit import LocalS3, use_dummy_credentials
from tests.testkit import local_ray as start_local_ray

BUCKET = "shardtune-it"


@pytest.fixture(scope="session", autouse=True)
def shardtune_logging():
    """The lines a user sees on stderr (pytest's capture included, so capsys reads them)."""
    setup_logging("INFO")


@pytest.fixture(scope="session")
def s3():
    use_dummy_credentials()
    with LocalS3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def local_ray(s3):
    """Started after the S3 credentials are in the environment, so workers inherit them."""
    with start_local_ray(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="session")
def prepared(s3, synthetic_conll):
    """The synthetic corpus prepared into s3:// as train/dev/test (train in 3 shards)."""
    from shardtune.data.prepare import prepare
    from shardtune.data.storage import StorageOptions

    options = StorageOptions(endpoint_url=s3.endpoint_url)
    root = f"s3://{BUCKET}/data/synthetic"
    prepare("ner", [str(synthetic_conll)], root, split={"train": 0.7, "dev": 0.15, "test": 0.15},
            shards=3, seed=0, options=options)  # fmt: skip
    return {
        "train": f"{root}/train",
        "dev": f"{root}/dev",
        "test": f"{root}/test",
        "options": options,
    }
