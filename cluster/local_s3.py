"""The embedded S3-compatible store for laptops, the demo and the tests: moto's server in its
own process on loopback, so the demo exercises the same s3:// code path as a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from shardtune.data.ports import free_port

# moto accepts any credentials; these keep boto/s3fs from looking for real ones.
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "shardtune-local",
    "AWS_SECRET_ACCESS_KEY": "shardtune-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class LocalS3:
    """`with LocalS3() as s3:` starts moto_server on 127.0.0.1 and stops it on exit."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> LocalS3:
        env = {**os.environ, **DUMMY_CREDENTIALS}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self._proc.returncode} (port {self.port} taken?)"
                )
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"moto server did not answer on {self.endpoint_url} within {timeout_s:.0f}s"
        )

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def create_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint_url, key=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               secret=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
        if not fs.exists(name):
            fs.mkdir(name)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def use_dummy_credentials() -> None:
    """Set moto's dummy credentials in this process (and so in a local Ray started after it),
    unless real ones are already configured."""
    for key, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(key, value)
