"""The HTTP surface of `shardtune serve`: request parsing and limits, the FastAPI routes, the
Prometheus metrics, and the Ray Serve deployment that batches requests into forward passes."""

import asyncio
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from shardtune.data import storage
from shardtune.serving.predictor import Predictor, fetch_model, run_summary
from shardtune.serving.settings import MAX_BATCHES_AT_ONCE, ServeSettings

APP_NAME = "shardtune"
ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


# ----------------------------------------------------------------------------- request parsing
class ApiError(Exception):
    """A client error: answered as {"error": {"status", "field", "message"}}."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class PredictRequest(BaseModel):
    """The body of POST /v1/predict (documents the schema; parsing is `parse_predict_body`)."""

    texts: list[str] = Field(description="raw texts; words are maximal runs of non-whitespace")


class Entity(BaseModel):
    type: str
    start: int = Field(description="character offset of the first character (code points)")
    end: int = Field(description="one past the last character: text[start:end] is the entity")
    text: str
    score: float = Field(description="mean probability of the predicted tag over its words")


class Classification(BaseModel):
    label: str
    scores: dict[str, float]
    truncated: bool = Field(description="the text had more tokens than max_length (as training)")


class PredictResponse(BaseModel):
    task: str
    results: list[list[Entity]] | list[Classification]


def parse_predict_body(body: bytes, *, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a /v1/predict body, or ApiError naming the offending field: 400 for bytes
    that are not JSON, 422 for a wrong shape or unusable text, 413 past the limits."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "body", f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "body", f"expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"texts"})
    if unknown:
        raise ApiError(422, unknown[0], 'unknown field; the body is {"texts": [...]}')
    if "texts" not in doc:
        raise ApiError(422, "texts", 'missing; the body is {"texts": [...]}')
    texts = doc["texts"]
    if not isinstance(texts, list):
        raise ApiError(422, "texts", f"expected a list of strings, got {type(texts).__name__}")
    if len(texts) > max_texts:
        raise ApiError(413, "texts", f"{len(texts)} texts; at most {max_texts} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(422, f"texts[{i}]", f"expected a string, got {type(text).__name__}")
        if len(text) > max_chars:
            raise ApiError(413, f"texts[{i}]", f"{len(text)} characters; at most {max_chars}")
        if "\x00" in text:
            raise ApiError(422, f"texts[{i}]", "contains a null character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to unencodable surrogates
            raise ApiError(422, f"texts[{i}]", "contains a lone surrogate") from None
    return texts


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) more than max_bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "content-length", "not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, "body", f"{declared} bytes; at most {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads declare no length
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, "body", f"more than {max_bytes} bytes")
    return bytes(body)


# ------------------------------------------------------------------------------------- metrics
class ServeMetrics:
    """The replica's Prometheus metrics, in a registry of its own (a second app in the same
    process, as in tests, must not collide on the global one)."""

    def __init__(self, settings: ServeSettings, predictor: Predictor, run: dict | None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shardtune_serve_requests", "HTTP requests answered by the app, by route and status",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "shardtune_serve_request_seconds", "Time from request to response inside the app",
            ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch_requests = Histogram(
            "shardtune_serve_batch_requests", "Requests merged into one batch", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        self.batch_texts = Histogram(
            "shardtune_serve_batch_texts", "Texts in one batch", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )  # fmt: skip
        self.inference = Histogram(
            "shardtune_serve_batch_seconds", "Tokenize + forward + decode time of one batch",
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip
        self.padding = Histogram(
            "shardtune_serve_padding_fraction", "Pad tokens / all tokens of a batch's passes",
            registry=r, buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
        )  # fmt: skip
        self.texts = Counter("shardtune_serve_texts", "Texts answered", registry=r)
        self.entities = Counter("shardtune_serve_entities", "Entities returned", registry=r)
        self.queue = Gauge(
            "shardtune_serve_queue_length",
            "Requests inside this replica waiting for a batch to start (the proxy's own queue, "
            "bounded by max_queued_requests, is ray_serve_* on Ray's metrics port)",
            registry=r,
        )
        self.inflight = Gauge(
            "shardtune_serve_inflight_requests", "Requests in the app", registry=r
        )
        info = Gauge(
            "shardtune_serve_model_info", "The model this replica serves (value 1)",
            ["model_uri", "run", "task", "labels", "max_length"], registry=r,
        )  # fmt: skip
        info.labels(
            model_uri=settings.model, run=(run or {}).get("run") or "", task=predictor.task,
            labels=",".join(predictor.labels), max_length=str(predictor.max_length),
        ).set(1)  # fmt: skip

    def scrape(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------ the application
app = FastAPI(
    title="shardtune model server",
    description="NER entities with character offsets, or text classification, from a model "
    "exported by `shardtune train`.",
)


@app.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": exc.status, "field": exc.field, "message": exc.message}},
        status_code=exc.status,
    )


class _Record:
    """Requests by route and status, latency and in-flight count: a plain ASGI middleware (a
    `@app.middleware("http")` one runs each request through an extra task and stream copy,
    which at a few ms of CPU per request is what a 2-core replica cannot spare)."""

    def __init__(self, asgi: Any):
        self.asgi = asgi

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # The app Serve runs (scope["app"]) need not be this module's object: Serve rebuilds it.
        state = getattr(scope.get("app"), "state", None)
        metrics: ServeMetrics | None = getattr(state, "metrics", None)
        if scope["type"] != "http" or metrics is None:
            await self.asgi(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
        status = 500  # what the client sees if the app fails before starting a response

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        metrics.inflight.inc()
        try:
            await self.asgi(scope, receive, record_status)
        finally:
            metrics.inflight.dec()
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.latency.labels(route=route).observe(time.perf_counter() - t0)


app.add_middleware(_Record)


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


@serve.deployment(name="ShardtuneModel")
@serve.ingress(app)
class ModelServer:
    """One replica: the model in memory, the routes, and the batcher in front of the model."""

    def __init__(self, settings: dict):
        import torch

        self.settings = ServeSettings(**settings)
        s = self.settings
        torch.set_num_threads(s.torch_threads)  # Ray's CPU share, not the node's cores
        options = storage.StorageOptions(endpoint_url=s.endpoint_url, profile=s.profile)
        self._tmp = tempfile.TemporaryDirectory(prefix="shardtune-serve-")
        model_dir = fetch_model(s.model, os.path.join(self._tmp.name, "model"), options)
        device = "cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_dir(
            model_dir, forward_batch_size=s.forward_batch_size, device=device,
            precision=s.precision,
        )  # fmt: skip
        self.run = run_summary(s.model, options)
        self.predictor.predict_batch([["warm up"]])  # first-call allocations before readiness
        self.metrics = ServeMetrics(s, self.predictor, self.run)
        app.state.metrics = self.metrics
        # The batches that compute at once: serve.batch forms up to MAX_BATCHES_AT_ONCE, this
        # pool runs s.batches_at_once of them (a formed batch waits here for a thread).
        self._compute = ThreadPoolExecutor(s.batches_at_once, thread_name_prefix="shardtune-batch")
        self.predict_batched.set_max_batch_size(s.max_batch_size)
        self.predict_batched.set_batch_wait_timeout_s(s.batch_wait_ms / 1000)
        self.ready = True

    def check_health(self) -> None:
        """Serve's periodic replica check: a replica without its model is restarted."""
        if not getattr(self, "ready", False):
            raise RuntimeError("model not loaded")

    @app.post(
        "/v1/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY,
        responses={400: {}, 413: {}, 422: {}, 503: {"description": "queue full"}},
    )  # fmt: skip
    async def predict(self, request: Request) -> Response:
        """Entities (NER) or label and scores (classification) for each text, in order."""
        s = self.settings
        body = await read_body(request, s.max_body_bytes)
        texts = parse_predict_body(body, max_texts=s.max_texts, max_chars=s.max_chars)
        results: list = []
        if texts:
            self.metrics.queue.inc()
            results = await self.predict_batched(texts)
        # Built here, not validated against PredictResponse again (the schema documents what
        # predictor.py builds; a test checks served bodies against it).
        return JSONResponse({"task": self.predictor.task, "results": results})

    # Batch size and wait come from the settings (set in __init__, Serve's setters for them);
    # only the bound on batches at once must be known here, at import.
    @serve.batch(max_concurrent_batches=MAX_BATCHES_AT_ONCE)
    async def predict_batched(self, requests: list[list[str]]) -> list[list]:
        # In a thread of the batch pool: the event loop keeps answering /healthz, /metrics and
        # admitting the next batch while torch computes (it releases the GIL).
        loop = asyncio.get_running_loop()
        answers, stats, seconds = await loop.run_in_executor(self._compute, self._run, requests)
        m = self.metrics
        m.inference.observe(seconds)
        m.batch_requests.observe(stats.requests)
        m.batch_texts.observe(stats.texts)
        m.padding.observe(stats.padding_fraction)
        m.texts.inc(stats.texts)
        m.entities.inc(stats.entities)
        return answers

    def _run(self, requests: list[list[str]]) -> tuple[list[list], Any, float]:
        """One batch in a pool thread; its requests stop counting as queued when it starts."""
        self.metrics.queue.dec(len(requests))
        t0 = time.perf_counter()
        answers, stats = self.predictor.predict_batch(requests)
        return answers, stats, time.perf_counter() - t0

    def __del__(self) -> None:
        """Serve stopping the replica: the batch threads and the model's temporary copy go."""
        if hasattr(self, "_compute"):
            self._compute.shutdown(wait=False, cancel_futures=True)
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {}})
    async def readyz(self) -> Response:
        """Ready: the model is loaded and has answered a warm-up request."""
        if not getattr(self, "ready", False):
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "model": self.settings.model})

    @app.get("/v1/model")
    async def model_info(self) -> dict:
        """What is served: task, labels, max_length, limits, and the training run's metrics."""
        p = self.predictor
        entity_types = sorted({label[2:] for label in p.labels if label[:2] in ("B-", "I-")})
        s = self.settings
        return {
            "model": s.model,
            "task": p.task,
            "labels": p.labels,
            "entity_types": entity_types if p.task == "ner" else None,
            "max_length": p.max_length,
            "precision": p.precision,
            "word_rule": "maximal runs of non-whitespace characters (str.split()); offsets are "
            "code-point indices into the text",
            "limits": {
                "max_texts": s.max_texts,
                "max_chars": s.max_chars,
                "max_body_bytes": s.max_body_bytes,
            },  # fmt: skip
            "training_run": self.run,
        }

    @app.get("/metrics", response_class=Response)
    async def metrics(self) -> Response:
        """Prometheus text format: this replica's counters, histograms and gauges."""
        body, content_type = self.metrics.scrape()
        return Response(body, media_type=content_type)


def build(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `settings`: `shardtune serve` calls it, and a RayService names
    it as `import_path: shardtune.serving.app:build` with the settings as `args`."""
    settings = ServeSettings(**args)
    return ModelServer.options(**settings.deployment_options()).bind(asdict(settings))
