"""What `serve` can be told, each value written once: a field's type, default, bounds, choices
and help live here, the CLI makes one --flag per field from them (cluster/cli.py), and the
same bounds validate a RayService's `args`. No Ray or FastAPI import: every CLI call reads it."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from shardtune.data.device import INFERENCE_PRECISIONS
from shardtune.serving import INGRESS_MODES

MAX_BATCHES_AT_ONCE = 4
"""Upper bound of ServeSettings.concurrent_batches: serve.batch takes its own bound at import,
and a replica admits at least this many batches (max_ongoing_requests), as Serve asks."""


def setting(
    default: Any = MISSING,
    *,
    doc: str,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A settings field (no default: required) with its help text and the values it accepts."""
    return field(
        default=default, metadata={"doc": doc, "low": low, "high": high, "choices": choices}
    )


def problems(settings: Any) -> list[str]:
    """Every value of a settings dataclass outside its field's bounds or choices."""
    found = []
    for f in fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if value is None or not meta:
            continue
        if meta["choices"] is not None and value not in meta["choices"]:
            found.append(f"{f.name}={value!r} must be one of {', '.join(meta['choices'])}")
        if meta["low"] is not None and value < meta["low"]:
            found.append(f"{f.name}={value!r} must be at least {meta['low']}")
        if meta["high"] is not None and value > meta["high"]:
            found.append(f"{f.name}={value!r} must be at most {meta['high']}")
    return found


@dataclass(frozen=True)
class ServeSettings:
    """Everything a replica needs; plain values so Ray can ship it and a RayService's
    serveConfigV2 `args` can spell it."""

    model: str = setting(
        doc="exported model URI: a local directory or any fsspec URI the trainer writes (s3://...)"
    )
    endpoint_url: str | None = setting(
        None, doc="S3-compatible endpoint (credentials from the AWS environment, never from here)"
    )
    profile: str | None = setting(None, doc="named AWS profile")
    replicas: int = setting(1, low=1, doc="copies of the model, each in its own Ray actor")
    max_batch_size: int = setting(
        16, low=1, doc="requests that @serve.batch merges into one call of the model"
    )
    batch_wait_ms: float = setting(
        5.0, low=0, doc="how long the first request of a batch waits for others (latency price)"
    )
    forward_batch_size: int = setting(
        64, low=1, doc="model inputs (NER windows) per forward pass, the batch sorted by length"
    )
    # On CPU, two one-thread batches kept 2 cores busier than one two-thread batch (1.6x
    # texts/s): while one batch runs Python (tokenize, decode, module calls) the other multiplies.
    concurrent_batches: int = setting(
        0, low=0, high=MAX_BATCHES_AT_ONCE,
        doc="batches computed at once, sharing --num-cpus as torch threads (0: one single-threaded "
        "batch per CPU, one on a GPU)",
    )  # fmt: skip
    max_queued_requests: int = setting(
        64, low=1, doc="requests waiting beyond the replica's admitted ones; past it: 503"
    )
    max_texts: int = setting(64, low=1, doc="texts per request (413 beyond)")
    max_chars: int = setting(20_000, low=1, doc="characters per text (413 beyond)")
    max_body_bytes: int = setting(1_000_000, low=64, doc="bytes per request body (413 beyond)")
    num_cpus: float = setting(
        1.0, low=0, doc="CPUs per replica, shared as torch threads by its concurrent batches"
    )
    num_gpus: float = setting(0.0, low=0, doc="GPUs per replica")
    precision: str = setting(
        "auto", choices=INFERENCE_PRECISIONS,
        doc="auto: bf16 where the CPU/GPU computes it natively, else fp32 (data/device.py); fp32 "
        "answers exactly as `evaluate` does by default",
    )  # fmt: skip

    def __post_init__(self) -> None:
        """Every bad value at once, before Ray starts."""
        found = problems(self)
        if not self.model:
            found.append("model: a model URI is required")
        if found:
            raise ValueError("invalid serve settings: " + "; ".join(found))

    @property
    def batches_at_once(self) -> int:
        """concurrent_batches resolved: as set, else one per whole CPU up to the bound (one on a
        GPU)."""
        if self.concurrent_batches:
            return self.concurrent_batches
        return 1 if self.num_gpus > 0 else min(MAX_BATCHES_AT_ONCE, max(1, int(self.num_cpus)))

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per batch: the replica's CPUs shared by the batches at once."""
        return max(1, int(self.num_cpus) // self.batches_at_once)

    @property
    def max_ongoing_requests(self) -> int:
        # A request waiting inside @serve.batch is "ongoing" for Serve. The replica admits the
        # running batches and three more forming: beyond that Serve's proxy holds requests and
        # polls the replica with backoff (up to 0.5 s a try), which at 2x the batch size turned
        # 32 concurrent clients into 1.4 s medians. Waiting inside the replica is cheap.
        return (self.batches_at_once + 3) * self.max_batch_size

    def deployment_options(self) -> dict[str, Any]:
        return {
            "num_replicas": self.replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": 10.0,
            "health_check_timeout_s": 30.0,
            # Serve's own line per request in the replica's log costs CPU the model needs; the
            # app's /metrics counts every request by route and status instead.
            "logging_config": {"enable_access_log": False},
        }


@dataclass(frozen=True)
class ServerOptions:
    """Where this process answers HTTP (`serve` only; a RayService's Serve config says it there).
    Which Ray it runs on is the CLI's --address (cluster/ray_runtime.py)."""

    host: str = setting("127.0.0.1", doc="address to listen on; 0.0.0.0 for every interface")
    port: int = setting(8000, low=1, high=65535, doc="TCP port of the HTTP API")
    ingress: str = setting(
        "auto", choices=INGRESS_MODES,
        doc="direct: the replica itself answers on --port (Ray Serve's direct ingress; one "
        "replica on a Ray of its own); proxy: Serve's HTTP proxy routes to the replicas; auto: "
        "direct when both hold, else proxy",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if found := problems(self):
            raise ValueError("invalid server options: " + "; ".join(found))
