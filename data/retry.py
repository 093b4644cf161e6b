"""The one retry policy for storage calls: which errors are transient (decided on exception
types, S3 error codes and errnos, never on message text), how long to wait, and the log line
each retry writes. data/storage.py applies it to its own calls and to the pyarrow filesystem
Ray Train uploads checkpoints and writes its snapshot through."""

from __future__ import annotations

import errno
import functools
import logging
import random
from collections.abc import Callable
from typing import TypeVar

import tenacity

log = logging.getLogger("shardtune.data.storage")  # the logger these lines always came from
T = TypeVar("T")

# S3 error codes that mean "try again": throttling and server-side trouble.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EAGAIN,
    }
)
# Answers that no retry changes (s3fs translates NoSuchKey, AccessDenied, ... into these).
PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


@functools.cache
def _connection_errors() -> tuple[type[BaseException], ...]:
    """Transport failures of the S3 client stack (botocore, aiobotocore over aiohttp)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]  # builtins: reset, refused
    try:
        import botocore.exceptions as b

        # EndpointConnectionError / ConnectTimeoutError / ProxyConnectionError are
        # ConnectionError; ConnectionClosedError / ReadTimeoutError / ResponseStreamingError
        # are HTTPClientError.
        found += [b.ConnectionError, b.HTTPClientError, b.IncompleteReadError]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(found)


def _client_error_verdict(exc: BaseException) -> bool | None:
    """A botocore ClientError: transient by its error code or HTTP status; None if not one."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in TRANSIENT_CODES or status in TRANSIENT_STATUS


def _verdict(exc: BaseException) -> bool | None:
    """True/False when this exception alone decides; None to look at what it wraps."""
    client = _client_error_verdict(exc)
    if client is not None:
        return client
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, _connection_errors()):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised `exc` can succeed. s3fs wraps a ClientError in an
    OSError (EIO, EREMOTEIO, ...) with the ClientError as its cause, and botocore wraps aiohttp's
    errors, so the chain is walked until one link decides; an undecided chain is permanent."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
        link = link.__cause__ or link.__context__
    return False


def backoff(retry_state: tenacity.RetryCallState) -> float:
    """0.25 s doubling to at most 8 s, times a jitter in [0.5, 1.5) so that ranks hitting the
    same outage do not come back in step. 8 attempts wait ~24 s in all, beyond the client's own
    ~5 s per attempt: a store that is away for half a minute costs time, not the run."""
    base = min(8.0, 0.25 * 2 ** (retry_state.attempt_number - 1))
    return base * (0.5 + random.random())


def call(what: str, fn: Callable[[], T], attempts: int) -> T:
    """`fn()`, retried on transient errors up to `attempts` calls in all; each retry logs one
    line naming `what`; the last error (or a permanent one at once) is raised as is."""
    attempts = max(1, attempts)

    def say(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "storage: %s failed (%s: %s); retry %d/%d in %.1fs",
            what,
            type(exc).__name__,
            exc,
            state.attempt_number,
            attempts - 1,
            delay,
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=backoff,
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=say,
        reraise=True,
    )
    return retrying(fn)
