"""`shardtune serve` as users run it: a subprocess with its own local Ray and Ray Serve, the model
loaded from s3:// (S3 on loopback), a real HTTP client on 127.0.0.1. One server for the module."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from seqeval.metrics.sequence_labeling import get_entities

from tests.testkit import free_port

BUCKET = "shardtune-it"  # created by the s3 fixture in conftest.py

LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]
MAX_TEXTS, MAX_CHARS, MAX_BODY = 8, 400, 8192


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory, tiny_model_dir, s3) -> str:
    """A tiny random token classifier exported as `shardtune train` exports (config.json with
    shardtune_task / shardtune_max_length), uploaded to S3. max_length 8 puts most test
    sentences in several windows. Its tags are random; only agreement with `evaluate` counts."""
    import torch
    from shardtune.data import storage
    from transformers import AutoConfig, AutoTokenizer, BertForTokenClassification

    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(
        tiny_model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    config.shardtune_task, config.shardtune_max_length = "ner", 8
    out = tmp_path_factory.mktemp("served-model")
    BertForTokenClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    uri = f"s3://{BUCKET}/runs/serve-it/model"
    storage.upload_dir(str(out), uri, storage.StorageOptions(endpoint_url=s3.endpoint_url))
    return uri


def start_server(model_uri: str, s3, log, *extra: str) -> dict:
    """`shardtune serve` in a subprocess, once /readyz answers: {"url", "proc", "log"}."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "shardtune", "serve", "--model", model_uri,
        "--endpoint-url", s3.endpoint_url, "--port", str(port), *extra,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return {"url": url, "proc": proc, "log": log}
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    pytest.fail(f"server did not become ready:\n{log.read_text()[-4000:]}")


def stop_server(server: dict) -> None:
    """SIGTERM, then (only if it hangs) kill what it started: for a test that failed early."""
    proc = server["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def wait_for_line(server: dict, text: str, timeout_s: float = 30) -> None:
    """Until the server's output holds `text` (it prints once its own readiness poll answers,
    which can be after ours)."""
    deadline = time.monotonic() + timeout_s
    while text not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert text in server["log"].read_text(), server["log"].read_text()[-3000:]


def listener_of(url: str) -> psutil.Process:
    """The one process listening on the url's port."""
    port = int(url.rsplit(":", 1)[1])
    owners = {
        c.pid for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }  # fmt: skip
    assert len(owners) == 1, owners
    return psutil.Process(owners.pop())


@pytest.fixture(scope="module")
def server(model_uri, s3, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    server = start_server(
        model_uri, s3, log, "--max-texts", str(MAX_TEXTS), "--max-chars", str(MAX_CHARS),
        "--max-body-bytes", str(MAX_BODY), "--max-batch-size", "4", "--batch-wait-ms", "20",
        "--max-queued-requests", "2",
    )  # fmt: skip
    yield server
    stop_server(server)  # the last test stops it; this is for a failure before that


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


def predict(client: httpx.Client, texts: list[str]) -> list:
    from shardtune.serving.app import PredictResponse

    r = client.post("/v1/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    PredictResponse.model_validate(r.json())  # the documented schema, not re-checked by the app
    return r.json()["results"]


# ----------------------------------------------------------------------------------- the tests
def test_ready_health_model_and_docs(client, model_uri):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    info = client.get("/v1/model").json()
    assert (info["model"], info["task"], info["labels"], info["max_length"]) == (
        model_uri, "ner", LABELS, 8,
    )  # fmt: skip
    assert info["entity_types"] == ["LOC", "ORG", "PER"]
    from shardtune.data.device import inference_precision, read_cpu_flags

    auto = inference_precision("auto", on_gpu=False, gpu_bf16=False, cpu_flags=read_cpu_flags())
    assert info["precision"] == auto  # bf16 on this machine's CPUs (avx512_bf16)
    assert info["limits"]["max_texts"] == MAX_TEXTS
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_one_local_replica_answers_on_the_port_itself(server):
    """Direct ingress (the default for one replica on a local Ray): the process listening on
    --port is the Serve replica holding the model, not Serve's HTTP proxy."""
    assert "ServeReplica" in " ".join(listener_of(server["url"]).cmdline())
    wait_for_line(server, "direct ingress")


def test_served_entities_equal_what_evaluate_predicts(client, model_uri, prepared):
    from shardtune.data.manifest import read_all_rows
    from shardtune.training.evaluation import evaluate_exported

    # The server runs its default precision (auto: bf16 on a CPU that computes it natively, as
    # this machine's does), so `evaluate --precision auto` is the training-side answer to match.
    report = evaluate_exported(
        model_uri, prepared["test"], options=prepared["options"], keep_predictions=True,
        precision="auto",
    )  # fmt: skip
    _, rows = read_all_rows(prepared["test"], prepared["options"])
    assert len(rows) >= 30
    texts = [" ".join(row["tokens"]) for row in rows]
    served = [r for i in range(0, len(texts), MAX_TEXTS) for r in predict(client, texts[i : i + MAX_TEXTS])]  # fmt: skip
    windows_needed = 0
    for row, text, entities in zip(rows, texts, served, strict=True):
        starts = [sum(len(t) + 1 for t in row["tokens"][:i]) for i in range(len(row["tokens"]))]
        expected = [
            (type_, starts[first], starts[last] + len(row["tokens"][last]))
            for type_, first, last in get_entities(list(report["predictions"][row["id"]]))
        ]
        assert [(e["type"], e["start"], e["end"]) for e in entities] == expected, text
        assert all(text[e["start"] : e["end"]] == e["text"] for e in entities)
        windows_needed += len(row["tokens"]) > 6
    assert windows_needed > 0  # the windowed path was exercised
    assert sum(map(len, served)) > 0


def test_malformed_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(client):
    post = "/v1/predict"
    json_ct = {"content-type": "application/json"}
    cases: list[tuple[dict, int, str | None]] = [
        ({"content": b"{"}, 400, "body"),
        ({"content": b"not json"}, 400, "body"),
        ({"content": b""}, 400, "body"),
        ({"content": b"\xff\xfe\xfd"}, 400, "body"),
        ({"content": b'{"texts": ["a"],}'}, 400, "body"),
        ({"content": b"null"}, 422, "body"),
        ({"content": b"[]"}, 422, "body"),
        ({"content": b"42"}, 422, "body"),
        ({"content": b'"texts"'}, 422, "body"),
        ({"json": {}}, 422, "texts"),
        ({"json": {"text": ["a"]}}, 422, "text"),
        ({"json": {"texts": ["a"], "extra": 1}}, 422, "extra"),
        ({"json": {"texts": None}}, 422, "texts"),
        ({"json": {"texts": "one string"}}, 422, "texts"),
        ({"json": {"texts": {"0": "a"}}}, 422, "texts"),
        ({"json": {"texts": 7}}, 422, "texts"),
        ({"json": {"texts": ["a", 1]}}, 422, "texts[1]"),
        ({"json": {"texts": [None]}}, 422, "texts[0]"),
        ({"json": {"texts": [["nested"]]}}, 422, "texts[0]"),
        ({"json": {"texts": [{"text": "a"}]}}, 422, "texts[0]"),
        ({"json": {"texts": [True]}}, 422, "texts[0]"),
        ({"json": {"texts": [1.5]}}, 422, "texts[0]"),
        ({"json": {"texts": ["ok", "nul\x00byte"]}}, 422, "texts[1]"),
        ({"content": b'{"texts": ["\\u0000"]}'}, 422, "texts[0]"),
        ({"content": b'{"texts": ["lone \\ud800 high"]}'}, 422, "texts[0]"),
        ({"content": b'{"texts": ["ok", "\\udfff"]}'}, 422, "texts[1]"),
        ({"json": {"texts": ["a"] * (MAX_TEXTS + 1)}}, 413, "texts"),
        ({"json": {"texts": ["a", "x" * (MAX_CHARS + 1)]}}, 413, "texts[1]"),
        ({"json": {"texts": ["word " * 2000]}}, 413, "body"),  # over the byte limit first
        ({"content": b" " * (MAX_BODY + 1)}, 413, "body"),
        ({"content": b"{}", "headers": {"content-length": "abc"}}, 400, "content-length"),
    ]
    for kwargs, status, field in cases:
        headers = {**json_ct, **kwargs.pop("headers", {})}
        try:
            r = client.post(post, headers=headers, **kwargs)
        except httpx.HTTPError as exc:  # a bad content-length may be refused by the proxy itself
            assert field == "content-length", exc
            continue
        assert r.status_code == status, (kwargs, r.status_code, r.text)
        if r.status_code != 400 or field != "content-length":
            assert r.json()["error"]["field"] == field, (kwargs, r.text)
    # Not a body problem, still 4xx: wrong method and unknown route.
    assert client.get(post).status_code == 405
    assert client.post("/v2/predict", json={"texts": []}).status_code == 404
    assert len(cases) + 2 >= 30
    # ... and then the server answers as before.
    assert client.post(post, json={"texts": []}).json() == {"task": "ner", "results": []}
    (entities,) = predict(client, ["alice  went\tto 🇫🇷 paris"])
    for e in entities:
        assert "alice  went\tto 🇫🇷 paris"[e["start"] : e["end"]] == e["text"]


def test_full_queue_answers_503_then_recovers(server):
    """max_queued_requests = 2: of a burst of 40 slow requests, the proxy admits what the replica
    and its 2-slot queue hold and answers the rest 503 at once instead of queueing them all."""
    long_texts = [" ".join(["alice went to paris"] * 20)] * MAX_TEXTS

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as c:
            rs = await asyncio.gather(
                *[c.post("/v1/predict", json={"texts": long_texts}) for _ in range(40)]
            )
        return [r.status_code for r in rs]

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) >= 2, statuses
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        assert len(predict(c, ["bob", "carol"])) == 2


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_prometheus_metrics_move(client, model_uri):
    before = scrape(client)
    texts = ["alice met bob in paris", "umbrella labs", "oslo"]
    served = predict(client, texts)
    client.post("/v1/predict", content=b"{")
    after = scrape(client)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("shardtune_serve_requests_total", route="/v1/predict", status="200") == 1
    assert moved("shardtune_serve_requests_total", route="/v1/predict", status="400") == 1
    assert moved("shardtune_serve_texts_total") == 3
    assert moved("shardtune_serve_entities_total") == sum(map(len, served))
    assert moved("shardtune_serve_batch_texts_count") >= 1
    assert moved("shardtune_serve_batch_requests_count") >= 1
    assert moved("shardtune_serve_request_seconds_count", route="/v1/predict") == 2
    assert ("shardtune_serve_queue_length", ()) in after
    info = [k for k in after if k[0] == "shardtune_serve_model_info"]
    assert len(info) == 1 and after[info[0]] == 1
    labels = dict(info[0][1])
    assert labels["model_uri"] == model_uri and labels["labels"] == ",".join(LABELS)


def test_sigterm_stops_the_server_and_every_process_it_started(server):
    proc: subprocess.Popen = server["proc"]
    started = psutil.Process(proc.pid).children(recursive=True)
    assert started  # Ray's processes
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, server["log"].read_text()[-3000:]
    # Nothing holds the replica open: Ray's direct-ingress draining hold is 30 s, so a stop
    # that takes 30 s or more is that hold, not a slow machine (proc.wait(90) is the liveness).
    assert time.monotonic() - t0 < 30, f"stopping took {time.monotonic() - t0:.0f} s"
    gone, alive = psutil.wait_procs(started, timeout=30)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert "stopping" in server["log"].read_text()


def test_proxy_ingress_serves_the_same_answers_and_stops_cleanly(model_uri, s3, tmp_path):
    """--ingress proxy (several replicas, or a joined cluster): Serve's HTTP proxy owns the
    port and routes to the replica; same answers, and SIGTERM still leaves no process behind."""
    texts = ["alice met bob in paris", "umbrella labs", "oslo"]
    server = start_server(model_uri, s3, tmp_path / "serve.log", "--ingress", "proxy")
    try:
        assert "ProxyActor" in " ".join(listener_of(server["url"]).cmdline())
        with httpx.Client(base_url=server["url"], timeout=60) as c:
            via_proxy = predict(c, texts)
        wait_for_line(server, "proxy ingress")  # up, as the user is told; then stopped
        started = psutil.Process(server["proc"].pid).children(recursive=True)
        server["proc"].send_signal(signal.SIGTERM)
        assert server["proc"].wait(90) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        stop_server(server)
    # The same answers as the model run in this process at the server's precision.
    from shardtune.data import storage
    from shardtune.serving.predictor import Predictor, fetch_model

    options = storage.StorageOptions(endpoint_url=s3.endpoint_url)
    local = fetch_model(model_uri, str(tmp_path / "model"), options)
    expected, _ = Predictor.from_dir(local, precision="auto").predict_batch([texts])
    assert via_proxy == expected[0]
