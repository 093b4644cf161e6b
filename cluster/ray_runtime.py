"""Which Ray a shardtune process talks to, decided and started in one place for every verb
(`train`, `prepare --ray`, `serve`): an explicit address, else the job's own cluster inside a
Ray job (RAY_ADDRESS), else a fresh local Ray of this process's own, never whatever Ray another
process on the machine advertises.

Token auth is Ray's (2.60): a local Ray starts with it on (Ray writes ~/.ray/auth_token), and a
client joins a token cluster with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in its environment (a
Ray job's driver inherits both from the cluster). Ray reads them when `ray` is imported, so they
cannot be turned on here; a refusal becomes one line naming them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class RayUnavailable(Exception):
    """The cluster to join cannot be reached or refuses this client; one line for the user."""


def cluster_address(explicit: str | None = None) -> str | None:
    """The cluster to join: `explicit` (cluster.address, --address), else RAY_ADDRESS (Ray sets
    it for a Ray job's driver); None means a fresh local Ray."""
    return explicit or os.environ.get("RAY_ADDRESS") or None


def connect(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True, **init: Any
) -> bool:
    """Join cluster_address(address), or start a fresh local Ray (`num_cpus`, default all; with
    `dashboard`, its State API guarded as start_local says). False when Ray was already up in
    this process (a test's, a caller's): used as is, and not this caller's to shut down."""
    import ray

    if ray.is_initialized():
        return False
    init.setdefault("logging_level", "WARNING")
    target = cluster_address(address)
    if target:
        _join(target, **init)
    else:
        start_local(num_cpus, dashboard=dashboard, **init)
    gcs = ray.get_runtime_context().gcs_address
    log.info("%s at %s", "joined Ray" if target else "started a local Ray", gcs)
    return True


@contextlib.contextmanager
def session(address: str | None = None, **kwargs: Any) -> Iterator[None]:
    """`connect` for the block; a Ray this block connected to is shut down after it (a joined
    cluster stays up; only this process leaves it)."""
    import ray

    connected = connect(address, **kwargs)
    try:
        yield
    finally:
        if connected:
            ray.shutdown()


def _join(address: str, **init: Any) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    if os.environ.get("RAY_AUTH_TOKEN") and os.environ.get("RAY_AUTH_MODE") != "token":
        log.warning("RAY_AUTH_TOKEN is set but RAY_AUTH_MODE is not 'token': Ray ignores the token")
    try:
        ray.init(address=address, **init)
    except AuthenticationError as exc:
        raise RayUnavailable(
            f"Ray at {address} refused this client ({_first_line(exc)}); a token "
            "cluster needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on its "
            "head)"
        ) from None
    except ConnectionError as exc:
        raise RayUnavailable(f"no Ray at {address}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return next(iter(str(exc).splitlines()), type(exc).__name__)


def start_local(num_cpus: int | None = None, *, dashboard: bool = True, **init: Any) -> Any:
    """A fresh local Ray whose processes can only find this Ray's State API.

    address="local": a bare ray.init() would join whatever Ray the machine last advertised
    (Ray's ray_current_cluster file), even a dead or foreign one. The same discovery runs
    inside the cluster: Ray Train's placement-group cleaner asks the State API whether the
    controller lives, and with no address it resolves the API from that file, so a
    `ray start --head` elsewhere on the machine made it ask the other cluster, hear "no such
    actor" and remove our placement group (killing the workers). RAY_API_SERVER_ADDRESS
    overrides that lookup; it is set before ray.init because the raylet, and every worker it
    starts, copy this process's environment then (as they copy the S3 credentials). The State
    API lives in the dashboard: without one (`serve`, which runs no Ray Train) there is nothing
    to point at.
    """
    import ray
    from shardtune.data.ports import free_port

    init.setdefault("logging_level", "WARNING")
    if num_cpus is not None:
        init["num_cpus"] = num_cpus
    if not dashboard:
        return ray.init(address="local", include_dashboard=False, **init)
    port = init.pop("dashboard_port", None) or free_port()
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        return ray.init(
            address="local", include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=port, **init,
        )  # fmt: skip
    finally:
        # Only Ray's processes need it, and they copied it. Left in this process it would
        # override the address of every Jobs/State API client made here later (Ray reads it
        # before the address it is given), e.g. a JobSubmissionClient for another cluster.
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous
