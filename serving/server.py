"""The `serve` lifecycle: with the Ray the caller hands over (the CLI's one Ray bootstrap,
cluster/ray_runtime.py), deploy the application, wait for readiness, run until Ctrl-C or
SIGTERM, then shut down exactly what was started.

Ingress. Through Serve's HTTP proxy every request costs a hop through a second Python process
(the proxy actor: HTTP parsing, routing, a Ray call to the replica and back), a few ms of CPU
each: on a small machine that is as much CPU as the model's forward pass. With one replica on a
Ray of our own there is nothing to route, so `direct` (the default there) has the replica answer
on --port itself, through Ray Serve's direct ingress (its port range pinned to that one port);
the proxy, which Serve still starts, listens on a spare port nobody is told about. `proxy` is
the way for several replicas or a cluster joined with --address (where the cluster's own Serve
settings apply; Ray's HAProxy ingress, RAY_SERVE_ENABLE_HA_PROXY, is the high-throughput option
there)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict

from shardtune.data.ports import bind_port
from shardtune.serving import INGRESS_MODES
from shardtune.serving.app import APP_NAME, build
from shardtune.serving.settings import ServerOptions, ServeSettings

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, flush=True)  # a log file or pipe sees it now, not when the server stops


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


def resolve_ingress(ingress: str, *, replicas: int, joined: bool) -> str:
    """ "direct" or "proxy" for `--ingress` (see the module docstring); ValueError when direct
    cannot work."""
    if ingress == "auto":
        return "direct" if replicas == 1 and not joined else "proxy"
    if ingress == "direct" and (joined or replicas != 1):
        raise ValueError(
            "--ingress direct: needs one replica on a Ray of its own (got "
            + ("--address or RAY_ADDRESS" if joined else f"--replicas {replicas}")
            + "); use --ingress proxy"
        )
    if ingress not in INGRESS_MODES:
        raise ValueError(f"--ingress {ingress!r}: expected one of {', '.join(INGRESS_MODES)}")
    return ingress


def check_port(host: str, port: int) -> None:
    """ValueError naming --port when host:port cannot be listened on (taken, or no such
    address), before minutes of starting Ray end in a server that never answers."""
    try:
        bind_port(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({reason})") from None


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve settings (read by its controller and replicas at start, so set before ray.init
    starts them) that make the one replica serve HTTP on `port` itself. No quarantine and no
    minimum draining period (Ray's default holds a stopping direct-ingress replica open 30 s for
    a load balancer to deregister it; there is none in front of this one): a stop takes as long
    as the requests in flight, and a restarted replica gets the port back at once."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


RaySession = Callable[[], AbstractContextManager[object]]
"""Starts or joins Ray for the block and leaves it after (the CLI passes ray_runtime.session)."""


def run_server(
    settings: ServeSettings,
    server: ServerOptions,
    *,
    ray_session: RaySession,
    joined: bool,
    ready_timeout_s: float = 600.0,
    say: Callable[[str], None] = _say,
) -> int:
    """Serve until a signal arrives. Returns the process exit status. `joined`: ray_session
    joins a cluster (its Serve stays up; only this application goes at the end)."""
    mode = resolve_ingress(server.ingress, replicas=settings.replicas, joined=joined)
    with _environment(direct_ingress_env(server.port) if mode == "direct" else {}):
        return _run(settings, server, mode, ray_session, joined, ready_timeout_s, say)


def _run(
    settings: ServeSettings,
    server: ServerOptions,
    mode: str,
    ray_session: RaySession,
    joined: bool,
    ready_timeout_s: float,
    say: Callable[[str], None],
) -> int:
    stop = threading.Event()
    # Installed first, so a Ctrl-C during the (slow) start still leads to a clean shutdown.
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }

    def ours_again() -> None:
        # ray.init installs a SIGTERM handler that calls sys.exit wherever the main thread
        # happens to be (mid-deploy, that aborts the process); ours again, so a SIGTERM means
        # the same orderly stop as Ctrl-C.
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())

    try:
        with ray_session():
            ours_again()
            try:
                return _serve(settings, server, mode, stop, ours_again, ready_timeout_s, say)
            finally:
                _shut_down(joined)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(
    settings: ServeSettings,
    server: ServerOptions,
    mode: str,
    stop: threading.Event,
    ours_again: Callable[[], None],
    ready_timeout_s: float,
    say: Callable[[str], None],
) -> int:
    from ray import serve

    host, port = server.host, server.port
    proxy_port = bind_port(host, 0) if mode == "direct" else port
    serve.start(http_options={"host": host, "port": proxy_port})
    serve.run(build(asdict(settings)), name=APP_NAME, route_prefix="/", blocking=False)
    ours_again()  # in case Serve's start installed its own
    url = f"http://{host}:{port}"
    if not wait_ready(url, ready_timeout_s, stop):
        if stop.is_set():
            return 130
        say(f"error: {settings.model} was not ready at {url}/readyz in {ready_timeout_s:.0f}s")
        return 1
    say(
        f"serving {settings.model} at {url}  (POST /v1/predict, /docs, /metrics; "
        f"{mode} ingress); Ctrl-C stops"
    )
    while not stop.wait(1.0):
        pass
    say("stopping")
    return 0


def _shut_down(joined: bool) -> None:
    """Serve's part of the stop; Ray itself goes (or, joined, is left) with ray_session."""
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
