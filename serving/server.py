"""The `serve` lifecycle: start a fresh local Ray (or join --address), deploy the application,
wait for readiness, run until Ctrl-C or SIGTERM, then shut down exactly what was started."""

from __future__ import annotations

import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict

from shardtune.serving.app import APP_NAME, ServeSettings, build

log = logging.getLogger(__name__)


def wait_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
    """Poll GET {url}/readyz until it answers 200; False on timeout or stop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # the proxy starts before the replicas are routed
        stop.wait(0.5)
    return False


def run_server(
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ready_timeout_s: float = 600.0,
    say: Callable[[str], None] = print,
) -> int:
    """Serve until a signal arrives. Returns the process exit status."""
    import ray
    from ray import serve

    stop = threading.Event()
    # Installed first, so a Ctrl-C during the (slow) start still leads to a clean shutdown.
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    joined = address is not None
    try:
        if joined:
            ray.init(address=address, logging_level="WARNING")
        else:
            # address="local": a Ray of our own, never one another process on this machine runs.
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(asdict(settings)), name=APP_NAME, route_prefix="/", blocking=False)
        # ray.init replaced our SIGTERM handler with one that calls sys.exit wherever the main
        # thread happens to be; ours again, so a SIGTERM means the same orderly stop as Ctrl-C.
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{host}:{port}"
        if not wait_ready(url, ready_timeout_s, stop):
            if stop.is_set():
                return 130
            say(f"error: {settings.model} was not ready at {url}/readyz in {ready_timeout_s:.0f}s")
            return 1
        say(f"serving {settings.model} at {url}  (POST /v1/predict, /docs, /metrics); Ctrl-C stops")
        while not stop.wait(1.0):
            pass
        say("stopping")
        return 0
    finally:
        _shut_down(joined)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _shut_down(joined: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if joined:
            serve.delete(APP_NAME)  # the cluster's Serve and its other applications stay up
        else:
            serve.shutdown()
    except Exception as exc:  # shutting down must reach ray.shutdown() whatever happened
        log.warning("serve shutdown: %s: %s", type(exc).__name__, exc)
    ray.shutdown()  # a local Ray started here goes with its processes
