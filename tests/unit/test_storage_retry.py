"""The storage retry policy (issue 18.2): transient is decided by exception type, S3 error code,
HTTP status and errno (an error naming shard-00500 is not a 5xx), real client errors are
classified as s3fs raises them, and the pyarrow filesystem Ray Train writes checkpoints through
rides out an S3 outage (moto's server on loopback behind a proxy that goes down)."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import threading
import time

import pyarrow.fs
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from s3fs.errors import translate_boto_error
from shardtune.data import storage
from shardtune.data.retry import is_transient
from shardtune.data.retrying_fs import RetryingFSSpecHandler

from tests.integration.flaky_proxy import FlakyProxy
from tests.testkit import LocalS3, free_port, use_dummy_credentials

BUCKET = "retry-unit"


def client_error(code: str, status: int, op: str = "GetObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} from the store"},
         "ResponseMetadata": {"HTTPStatusCode": status}}, op,
    )  # fmt: skip


TRANSIENT = {
    "ClientError SlowDown 503": client_error("SlowDown", 503, "PutObject"),
    "ClientError InternalError 500": client_error("InternalError", 500),
    "ClientError of a HEAD (no body: code '503')": client_error("503", 503, "HeadObject"),
    "ClientError unknown code, HTTP 503": client_error("Whatever", 503),
    "ClientError throttled, HTTP 400": client_error("ThrottlingException", 400),
    "s3fs-wrapped InternalError": translate_boto_error(client_error("InternalError", 500)),
    "s3fs-wrapped SlowDown": translate_boto_error(client_error("SlowDown", 503)),
    "connection refused": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "OSError ECONNRESET": OSError(errno.ECONNRESET, "Connection reset by peer"),
    "botocore EndpointConnectionError": EndpointConnectionError(endpoint_url="http://x"),
    "botocore ConnectionClosedError": ConnectionClosedError(endpoint_url="http://x"),
    "botocore ReadTimeoutError": ReadTimeoutError(endpoint_url="http://x"),
    "TimeoutError": TimeoutError("timed out"),
}
PERMANENT = {
    "FileNotFoundError naming shard-00500": FileNotFoundError("shard-00500"),
    "s3fs-wrapped NoSuchKey": translate_boto_error(client_error("NoSuchKey", 404)),
    "s3fs-wrapped AccessDenied": translate_boto_error(client_error("AccessDenied", 403)),
    "ClientError InvalidArgument 400": client_error("InvalidArgument", 400),
    "OSError EIO naming 503 and timeout": OSError(errno.EIO, "shard-00503: read timeout 500"),
    "ValueError naming a 5xx": ValueError("connection 503 reset"),
    "PermissionError": PermissionError(errno.EACCES, "denied"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient_errors(name):
    assert is_transient(TRANSIENT[name])


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_permanent_errors(name):
    assert not is_transient(PERMANENT[name])


def test_wrapped_cause_decides():
    """A generic wrapper (RuntimeError around a reset) is judged by what it wraps."""
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_attempts_and_one_log_line_per_retry(caplog):
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with (
        caplog.at_level(logging.WARNING, "shardtune.data.storage"),
        pytest.raises(ConnectionResetError),
    ):
        storage.with_retries("read s3://b/k", flaky, storage.StorageOptions(retries=3))
    assert len(calls) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("storage: read s3://b/k failed (ConnectionRes")
    assert "; retry 1/2 in " in lines[0] and "; retry 2/2 in " in lines[1]


def test_permanent_error_is_raised_at_once(caplog):
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/data/shard-00500.parquet")

    with (
        caplog.at_level(logging.WARNING, "shardtune.data.storage"),
        pytest.raises(FileNotFoundError),
    ):
        storage.with_retries("read shard", missing, storage.StorageOptions(retries=8))
    assert len(calls) == 1 and not caplog.records


# ----------------------------------------------------------------- against moto's server


@pytest.fixture(scope="module")
def s3():
    use_dummy_credentials()
    with LocalS3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def proxy(s3):
    p = FlakyProxy(s3.port).start()
    yield p
    p.stop()


def test_what_s3fs_raises_is_classified(s3, proxy):
    """Real errors from the client stack: a stopped endpoint, a 5xx from the store, a missing
    object whose name contains '500'."""
    fs, _ = storage.filesystem(
        f"s3://{BUCKET}", storage.StorageOptions(endpoint_url=s3.endpoint_url)
    )
    fs.pipe_file(f"{BUCKET}/k", b"v")
    with pytest.raises(FileNotFoundError) as missing:
        fs.cat_file(f"{BUCKET}/shard-00500.parquet")
    assert not is_transient(missing.value)

    stopped = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down, _ = storage.filesystem(f"s3://{BUCKET}", storage.StorageOptions(endpoint_url=stopped))
    with pytest.raises(Exception) as refused:
        down.cat_file(f"{BUCKET}/k")
    assert isinstance(refused.value, EndpointConnectionError) and is_transient(refused.value)

    via, _ = storage.filesystem(
        f"s3://{BUCKET}", storage.StorageOptions(endpoint_url=proxy.endpoint_url)
    )
    proxy.answer_errors(100, 500, "InternalError")
    with pytest.raises(OSError) as five_hundred:
        via.cat_file(f"{BUCKET}/k")
    assert isinstance(five_hundred.value.__cause__, ClientError)  # s3fs wraps, cause kept
    assert is_transient(five_hundred.value)
    proxy.answer_errors(0)


def test_5xx_past_the_clients_own_retries_is_retried_and_logged(s3, proxy, caplog):
    options = storage.StorageOptions(endpoint_url=proxy.endpoint_url)
    storage.write_bytes(f"s3://{BUCKET}/five", b"payload", options)
    proxy.answer_errors(4, 500, "InternalError")  # botocore's 3 attempts, then 1 more
    with caplog.at_level(logging.WARNING, "shardtune.data.storage"):
        assert storage.read_bytes(f"s3://{BUCKET}/five", options) == b"payload"
    (line,) = [r.getMessage() for r in caplog.records]
    assert (
        line.startswith(f"storage: read s3://{BUCKET}/five failed (OSError") and "retry 1/7" in line
    )


def test_handler_pickles_with_its_options(s3):
    options = storage.StorageOptions(endpoint_url=s3.endpoint_url, retries=5)
    fs, _ = storage.pyarrow_filesystem(f"s3://{BUCKET}/run", options)
    back = pickle.loads(pickle.dumps(fs))  # Ray ships storage_filesystem to every worker
    assert isinstance(back.handler, RetryingFSSpecHandler) and back.handler.options == options


def test_checkpoint_upload_snapshot_and_download_ride_out_an_outage(s3, proxy, tmp_path, caplog):
    """What Ray Train does with storage_filesystem, while the endpoint is away for 8 s (longer
    than botocore's own quiet retries): copy_files up, the snapshot written and read, copy_files
    down, delete_dir. Everything arrives whole, and the retries were logged."""
    src = tmp_path / "checkpoint"
    (src / "rank-0").mkdir(parents=True)
    big = os.urandom(20 * 2**20)  # above SPILL_BYTES: kept in a temp file until uploaded
    (src / "rank-0" / "zero.bin").write_bytes(big)
    (src / "manifest.json").write_text('{"ok": true}')
    fs, root = storage.pyarrow_filesystem(
        f"s3://{BUCKET}/run", storage.StorageOptions(endpoint_url=proxy.endpoint_url)
    )
    with caplog.at_level(logging.WARNING, "shardtune.data.storage"):
        proxy.down_for(8)
        started = time.monotonic()
        fs.create_dir(f"{root}/checkpoint-1")
        pyarrow.fs.copy_files(
            str(src), f"{root}/checkpoint-1", destination_filesystem=fs, chunk_size=64 * 2**20
        )  # fmt: skip  (Ray's chunk size)
        assert time.monotonic() - started >= 7  # nothing could have gone through before
        with fs.open_output_stream(f"{root}/snapshot.json") as f:
            f.write(b'{"checkpoints": 1}')
        threading.Timer(0.2, proxy.down_for, args=(6,)).start()
        time.sleep(0.3)
        with fs.open_input_stream(f"{root}/snapshot.json") as f:
            assert f.read() == b'{"checkpoints": 1}'
        pyarrow.fs.copy_files(f"{root}/checkpoint-1", str(tmp_path / "back"), source_filesystem=fs)
    assert (tmp_path / "back" / "rank-0" / "zero.bin").read_bytes() == big
    assert (tmp_path / "back" / "manifest.json").read_text() == '{"ok": true}'
    assert any("; retry 1/7" in r.getMessage() for r in caplog.records)
    fs.delete_dir(f"{root}/checkpoint-1")
    assert fs.get_file_info(f"{root}/checkpoint-1").type == pyarrow.fs.FileType.NotFound


def test_an_upload_cut_mid_put_is_sent_again_whole(s3, proxy, tmp_path):
    """The outage starts on the upload's own PUT (the request is cut): the object is sent
    again from its first byte, and what lands is the whole object."""
    payload = os.urandom(3 * 2**20)
    fs, root = storage.pyarrow_filesystem(
        f"s3://{BUCKET}/cut", storage.StorageOptions(endpoint_url=proxy.endpoint_url)
    )
    proxy.go_down_on(f"/{BUCKET}/cut/", nth=1, seconds=7, methods=("PUT", "POST"))
    with fs.open_output_stream(f"{root}/weights.bin") as f:
        f.write(payload)
    assert len(proxy.outages) == 1
    direct, _ = storage.filesystem(
        f"s3://{BUCKET}", storage.StorageOptions(endpoint_url=s3.endpoint_url)
    )
    assert direct.cat_file(f"{BUCKET}/cut/weights.bin") == payload
