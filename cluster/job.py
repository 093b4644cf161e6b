"""The head side of `train`: connect to Ray, run the TorchTrainer, export the best checkpoint,
evaluate it on the test set, and write report.json.

Deciding (which checkpoint is best, what the report holds) is pure and separate from doing
(Ray, storage): see `select_best` and `build_report`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from cluster.config import JobConfig, to_public_dict
from data import storage
from data.manifest import read_manifest


def run_dir(job: JobConfig) -> str:
    return storage.join(job.run.output, job.run.name)


def select_best(candidates: list[tuple[str, dict]], has_eval: bool) -> tuple[str, dict]:
    """Pick the checkpoint to export from (name, metrics) pairs: highest eval micro-F1 (ties:
    the later step), or the latest one when there is no eval set."""
    if not candidates:
        raise RuntimeError("training reported no checkpoint; nothing to export")
    if has_eval:
        return max(candidates, key=lambda c: (c[1].get("eval_f1", -1.0), c[1].get("step", 0)))
    return max(candidates, key=lambda c: c[1].get("step", 0))


def connect_ray(job: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if job.cluster.address:
        ray.init(address=job.cluster.address, logging_level="WARNING")
        return
    need = job.cluster.num_workers * job.cluster.cpus_per_worker
    # A local Ray sized for the job; workers inherit this process's environment (credentials,
    # endpoint), which is why the demo sets them before this call.
    ray.init(
        num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        # Ray Train's placement-group cleaner polls the State API, which lives in the dashboard.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level="WARNING",
        configure_logging=True,
    )


def _train(job: JobConfig) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import train_worker

    options = job.storage_options()
    fs, path = storage.pyarrow_filesystem(job.run.output, options)
    has_eval = job.data.eval is not None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if job.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.cluster.num_workers,
            use_gpu=job.cluster.use_gpu,
            resources_per_worker={"CPU": job.cluster.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.cluster.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.run.keep_checkpoints,
                checkpoint_score_attribute="eval_f1" if has_eval else "step",
                checkpoint_score_order="max",
            ),
        ),
    )
    return trainer.fit()


def export_best(job: JobConfig, checkpoint_name: str) -> str:
    """Copy the consolidated model of a checkpoint to {output}/{name}/model/, after checking
    every file against the checksums its rank recorded. Returns the model URI."""
    from training.checkpoint import CheckpointError

    options = job.storage_options()
    src = storage.join(run_dir(job), checkpoint_name)
    dst = storage.join(run_dir(job), "model")
    with tempfile.TemporaryDirectory(prefix="shardtune-export-") as tmp:
        storage.download_dir(storage.join(src, "hf_model"), os.path.join(tmp, "hf_model"), options)
        listed = json.loads(storage.read_text(storage.join(src, "rank-00000.complete.json"), options))["files"]
        from data.manifest import sha256_hex

        for rel, digest in listed.items():
            if not rel.startswith("hf_model/"):
                continue
            with open(os.path.join(tmp, *rel.split("/")), "rb") as f:
                if sha256_hex(f.read()) != digest:
                    raise CheckpointError(f"{src}/{rel} does not match its sha256; not exporting it")
        storage.upload_dir(os.path.join(tmp, "hf_model"), dst, options)
    return dst


def _remote_evaluate(job: JobConfig, model_uri: str) -> dict:
    """Test evaluation as a Ray task, so it runs where the workers run (a GPU node on a
    cluster), with the same code as `launch.py evaluate`."""
    import ray

    from training.evaluation import evaluate_exported

    task = ray.remote(num_cpus=1, num_gpus=1 if job.cluster.use_gpu else 0)(evaluate_exported)
    return ray.get(
        task.remote(
            model_uri, job.data.test, options=job.storage_options(),
            batch_size=job.train.batch_size, max_length=job.data.max_length,
        )  # fmt: skip
    )


def build_report(job: JobConfig, *, best: tuple[str, dict], history: list[dict], test: dict | None,
                 model_uri: str, wall_s: float, train_manifest: Any) -> dict:  # fmt: skip
    last = history[-1] if history else {}
    return {
        "run": job.run.name,
        "task": job.task,
        "model": model_uri,
        "best_checkpoint": best[0],
        "best_eval": {k: v for k, v in best[1].items() if k.startswith("eval_") and k != "eval_counts"},
        "test": test,
        "throughput": {
            "train_examples_per_s": last.get("examples_per_s"),
            "train_tokens_per_s": last.get("tokens_per_s"),
            "train_examples": last.get("train_examples"),
            "train_tokens": last.get("train_tokens"),
            "train_seconds": last.get("train_seconds"),
        },
        "timing": {"wall_seconds": wall_s},
        "data": {
            "train_examples": train_manifest.num_examples,
            "padding_examples_per_epoch": last.get("padding_examples_per_epoch"),
            "words_without_subwords": last.get("words_without_subwords"),
            "sentences_split_into_windows": last.get("sentences_split"),
        },
        "history": [{k: v for k, v in h.items() if k != "eval_counts"} for h in history],
        "config": to_public_dict(job),
    }


def run_training(job: JobConfig) -> dict:
    """The `train` verb: returns the report (also written to {output}/{name}/report.json)."""
    t0 = time.perf_counter()
    options = job.storage_options()
    train_manifest = read_manifest(job.data.train, options)  # fail before Ray if data is missing
    for uri in (job.data.eval, job.data.test):
        if uri:
            read_manifest(uri, options)
    connect_ray(job)
    result = _train(job)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    candidates = [
        (os.path.basename(ckpt.path.rstrip("/")), metrics) for ckpt, metrics in (result.best_checkpoints or [])
    ]
    best = select_best(candidates, has_eval=job.data.eval is not None)
    model_uri = export_best(job, best[0])
    test = _remote_evaluate(job, model_uri) if job.data.test else None
    history = sorted((m for _, m in candidates), key=lambda m: m.get("step", 0))
    if result.metrics:
        history = [h for h in history if h.get("step") != result.metrics.get("step")] + [result.metrics]
    report = build_report(
        job, best=best, history=history, test=test, model_uri=model_uri,
        wall_s=time.perf_counter() - t0, train_manifest=train_manifest,
    )  # fmt: skip
    storage.write_text(storage.join(run_dir(job), "report.json"), json.dumps(report, indent=2), options)
    return report
