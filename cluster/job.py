"""The head side of `train`: connect to Ray, run the TorchTrainer, export the best checkpoint,
evaluate it on the test set, and write report.json.

Deciding (which checkpoint is best, what the report holds) is pure and separate from doing
(Ray, storage): see `select_best` and `build_report`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from typing import Any

from shardtune.cluster.config import JobConfig, to_public_dict
from shardtune.cluster.run_state import Resume
from shardtune.data import storage
from shardtune.data.manifest import Manifest, read_manifest, read_manifest_version
from shardtune.data.run_layout import RunLayout
from shardtune.training.records import EvalRecord, RunFacts, TrainingStats

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """Training gave up (a worker failed more often than cluster.max_failures allows, or Ray
    Train's controller failed); the message is one paragraph for the person at the terminal."""


def run_dir(job: JobConfig) -> str:
    return storage.join(job.run.output, job.run.name)


def run_layout(job: JobConfig) -> RunLayout:
    """The run folder the workers write (WorkerConfig.run_uri is the same path)."""
    return RunLayout(run_dir(job))


def previous_run(job: JobConfig) -> tuple[str, int] | None:
    """(latest checkpoint name, its step) of an earlier run with this run.name and output, from
    the snapshot Ray Train restores itself from; None if there is none."""
    from shardtune.cluster.run_state import snapshot_latest

    options = job.storage_options()
    uri = run_layout(job).snapshot
    if not storage.exists(uri, options):
        return None
    try:  # after a failure, for its message: damage is `resume_point`'s to repair
        return snapshot_latest(storage.read_text(uri, options))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def resume_point(job: JobConfig, say=log.warning) -> Resume | None:
    """Where a rerun of this run starts (cluster/run_state.recover): Ray's snapshot, repaired
    from the checkpoints in storage when it is missing, unreadable or names deleted ones;
    RunStateError (one line) when no checkpoint verifies. None: a new run."""
    from shardtune.cluster.run_state import recover

    return recover(
        run_layout(job),
        job.storage_options(),
        run_name=job.run.name,
        has_eval=job.data.eval is not None,
        say=say,
    )


def data_versions(job: JobConfig, resume: Resume | None) -> dict[str, Manifest | None]:
    """The manifest each phase reads: train and eval at the versions the resumed run is pinned
    to (the latest for a new run, or a checkpoint from before runs were pinned), test at the
    latest (it is read once, at the end). DatasetError if a pinned version is gone."""
    options = job.storage_options()
    pins = {"train": resume.train_version, "eval": resume.eval_version} if resume else {}
    uris = {"train": job.data.train, "eval": job.data.eval, "test": job.data.test}
    return {
        phase: read_manifest_version(uri, pins.get(phase), options, compact=False) if uri else None
        for phase, uri in uris.items()
    }


def start_over(job: JobConfig, say=log.info) -> list[str]:
    """Delete {output}/{name} (checkpoints, snapshot, report, model) after saying what goes."""
    options = job.storage_options()
    names = storage.list_names(run_dir(job), options)
    if not names:
        return []
    say(f"--fresh: deleting {run_dir(job)}/ ({', '.join(names)})")
    return storage.remove_tree(run_dir(job), options)


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # a RayTaskError wraps the worker's own exception
    if isinstance(cause, BaseException):
        exc = cause
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else 'no message'}"


def failure_message(job: JobConfig, exc: BaseException, latest: tuple[str, int] | None) -> str:
    """One paragraph: what failed, how often Ray retried, what is kept, how to go on."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        what = "; ".join(f"rank {rank}: {_one_line(e)}" for rank, e in sorted(failures.items()))
    else:
        what = _one_line(getattr(exc, "controller_failure", None) or exc)
    limit = job.cluster.max_failures
    retries = "unlimited restarts" if limit < 0 else f"cluster.max_failures={limit} restart(s)"
    kept = (
        f"The latest complete checkpoint, {latest[0]} (step {latest[1]}), is kept in {run_dir(job)}/: "
        "rerun the same command to resume from it, or add --fresh to start over."
        if latest
        else "No checkpoint was completed."
    )
    return f"training run {job.run.name!r} failed after {retries}: {what}. {kept}"


def compare_labels(job: JobConfig, labels: list[str], say=log.info) -> None:
    """Retraining a fine-tuned model: say which of its head's labels carry over to the dataset's,
    which are new and which are dropped. ModelError (naming the model) when it cannot serve the
    task. A local path under cluster.address names the workers' disk: not checked here."""
    from shardtune.training.model import check_model_for_task

    uri = job.model.name_or_path
    if job.cluster.address and storage.is_local(uri) and not uri.startswith("package:"):
        return
    plan = check_model_for_task(uri, job.task, labels, job.storage_options())
    if plan is not None:
        say(f"retraining {uri}: its head's labels against the dataset's: {plan.describe()}")


def read_evaluations(job: JobConfig) -> list[EvalRecord]:
    """Every evaluation of the run, in step order, from the records rank 0 writes at each one
    ({run}/evals/): all of them, also those whose checkpoints retention deleted, across restarts
    (a repeated step after a restart overwrote its record)."""
    options = job.storage_options()
    root = run_layout(job).evals
    names = sorted(n for n in storage.list_names(root, options) if n.endswith(".json"))
    return [
        EvalRecord.from_dict(json.loads(storage.read_text(storage.join(root, n), options)))
        for n in names
    ]


def rank_checkpoints(candidates: list[tuple[str, dict]], has_eval: bool) -> list[tuple[str, dict]]:
    """(name, metrics) pairs, best first: highest eval micro-F1 (ties: the later step), or the
    latest when there is no eval set. A retake of a step after a fallback past a corrupt
    checkpoint ('checkpoint-00000022-1') ranks above the directory it replaced."""
    from shardtune.training.checkpoint import checkpoint_key

    def key(c: tuple[str, dict]) -> tuple:
        order = (c[1].get("step", 0), checkpoint_key(c[0]) or (0, 0))
        f1 = c[1].get("eval_f1", -1.0)
        # A checkpoint_every checkpoint reports eval_f1 -1 (NaN before): below every evaluated one.
        f1 = f1 if isinstance(f1, float | int) and math.isfinite(f1) else -1.0
        return (f1, *order) if has_eval else order

    return sorted(candidates, key=key, reverse=True)


def select_best(candidates: list[tuple[str, dict]], has_eval: bool) -> tuple[str, dict]:
    """The checkpoint to export: the first of `rank_checkpoints`."""
    if not candidates:
        raise RuntimeError("training reported no checkpoint; nothing to export")
    return rank_checkpoints(candidates, has_eval)[0]


def connect_ray(job: JobConfig) -> None:
    """Ray for this job (cluster/ray_runtime.py): cluster.address, else the job's cluster inside
    a Ray job, else a fresh local Ray with room for max_workers."""
    from shardtune.cluster import ray_runtime

    need = job.cluster.max_workers * job.cluster.cpus_per_worker
    ray_runtime.connect(
        job.cluster.address, num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        configure_logging=True,
    )  # fmt: skip


def _train(job: JobConfig, versions: dict[str, Manifest | None]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from shardtune.training.loop import train_worker

    options = job.storage_options()
    fs, path = storage.pyarrow_filesystem(job.run.output, options)
    has_eval = job.data.eval is not None
    trainer = TorchTrainer(
        train_worker,
        # Workers get their own typed config, not this head-side tree. The fault spec travels
        # in it: workers inherit the raylet's environment, fixed when Ray started, not ours.
        train_loop_config={
            "worker": replace(
                job.worker_config(
                    fault=os.environ.get("SHARDTUNE_FAULT"),
                    log_level=logging.getLevelName(
                        logging.getLogger("shardtune").getEffectiveLevel()
                    ),
                ),
                # pinned: an attempt after `prepare --append` reads what the run started on
                train_version=_version(versions["train"]),
                eval_version=_version(versions["eval"]),
            )
        },
        torch_config=TorchConfig(backend="nccl" if job.cluster.use_gpu else "gloo"),
        # [min, max] is Ray Train's elastic group: after a lost node it restarts with as many
        # workers as fit, and grows back (checked every resize_check_s) when nodes return.
        scaling_config=ScalingConfig(
            num_workers=job.cluster.num_workers,
            use_gpu=job.cluster.use_gpu,
            resources_per_worker={"CPU": job.cluster.cpus_per_worker},
            elastic_resize_monitor_interval_s=job.cluster.resize_check_s,
        ),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.cluster.max_failures),
            # Ray keeps the num_to_keep best by score plus, always, the latest (its
            # CheckpointManager never deletes the latest): one more than keep_checkpoints keeps a
            # fallback beside the latest even when the latest is also the best.
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.run.keep_checkpoints + 1,
                checkpoint_score_attribute="eval_f1" if has_eval else "step",
                checkpoint_score_order="max",
            ),
        ),
    )
    return trainer.fit()


def export_best(job: JobConfig, checkpoint_name: str) -> str:
    """Build the plain Hugging Face model of a checkpoint in {output}/{name}/model/ and return
    its URI. Checkpoints carry no consolidated model (it would make rank 0 write GBs at every
    checkpoint while all ranks wait), so the head fetches every rank's part once, checks each
    file against the checksum its rank recorded (raising before anything is exported), and
    merges the ZeRO partitions (training/export.consolidate)."""
    from shardtune.training.checkpoint import verify
    from shardtune.training.export import consolidate

    options = job.storage_options()
    layout = run_layout(job)
    src, dst = layout.checkpoint(checkpoint_name), layout.model
    with tempfile.TemporaryDirectory(prefix="shardtune-export-") as tmp:
        local, model_dir = os.path.join(tmp, "checkpoint"), os.path.join(tmp, "export")
        storage.download_dir(src, local, options)
        verify(local, where=src)
        consolidate(local, model_dir)
        storage.upload_dir(model_dir, dst, options)
    return dst


def _remote_evaluate(job: JobConfig, model_uri: str) -> dict:
    """Test evaluation as a Ray task, so it runs where the workers run (a GPU node on a
    cluster), with the same code as `launch.py evaluate`."""
    import ray
    from shardtune.training.evaluation import evaluate_exported

    task = ray.remote(num_cpus=1, num_gpus=1 if job.cluster.use_gpu else 0)(evaluate_exported)
    return ray.get(
        task.remote(
            model_uri,
            job.data.test,
            options=job.storage_options(),
            batch_size=job.train.batch_size,
            max_length=job.data.max_length,
        )  # fmt: skip
    )


def build_report(
    job: JobConfig,
    *,
    best: tuple[str, EvalRecord],
    history: list[EvalRecord],
    test: dict | None,
    model_uri: str,
    wall_s: float,
    versions: dict[str, Manifest | None],
) -> dict:
    """report.json from the workers' records (pure): the best checkpoint's scores, the last
    record's throughput and setup, and every evaluation."""
    last = history[-1] if history else None
    stats, facts = (last.stats, last.facts) if last else (None, None)
    stopped = last.stopped_early if last else None
    return {
        "run": job.run.name,
        "task": job.task,
        "model": model_uri,
        "best_checkpoint": best[0],
        "best_eval": best[1].eval_summary(),
        "test": test,
        "throughput": _throughput(stats),
        "timing": {"wall_seconds": wall_s, **_timing(stats, facts)},
        "data": {
            "train_examples": versions["train"].num_examples if versions["train"] else None,
            # `prepare --append` adds versions: which one each phase read (train and eval are
            # pinned for the whole run; what its test scores are comparable with)
            "manifest_version": _version(versions["train"]),
            "manifest_versions": {phase: _version(m) for phase, m in versions.items()},
            "padding_examples_per_epoch": facts.padding_examples_per_epoch if facts else None,
            "words_without_subwords": facts.words_without_subwords if facts else None,
            "sentences_split_into_windows": facts.sentences_split if facts else None,
        },
        "history": [h.to_dict(counts=False) for h in history],
        "early_stopping": {
            "stopped": bool(stopped),
            "step": last.step if last and stopped else None,
            "reason": stopped,
        },
        "parameters": {
            "peft": facts.peft if facts else None,
            "trainable": facts.trainable_params if facts else None,
            "total": facts.total_params if facts else None,
        },
        "config": to_public_dict(job),
    }


def _version(manifest: Manifest | None) -> int | None:
    return manifest.version if manifest is not None else None


THROUGHPUT_KEYS = (
    "train_examples_per_s",
    "train_tokens_per_s",
    "train_examples",
    "train_tokens",
    "train_seconds",
)


def _throughput(stats: TrainingStats | None) -> dict[str, Any]:
    if stats is None:
        return dict.fromkeys(THROUGHPUT_KEYS)
    return {
        "train_examples_per_s": stats.examples_per_s,
        "train_tokens_per_s": stats.tokens_per_s,
        "train_examples": stats.train_examples,
        "train_tokens": stats.train_tokens,
        "train_seconds": stats.train_seconds,
    }


def _timing(stats: TrainingStats | None, facts: RunFacts | None) -> dict[str, Any]:
    # Where a training step's time goes (fractions of step time, all ranks): getting and
    # padding the batch, forward, backward, and DeepSpeed's step (gradient reduction between
    # workers, clipping, optimizer).
    return {
        "step_breakdown": stats.step_breakdown if stats else None,
        "padding_fraction": stats.padding_fraction if stats else None,
        "precision": facts.precision if facts else None,
        "zero_stage": facts.zero_stage if facts else None,
        "workers": facts.workers if facts else None,
        "threads_per_worker": facts.threads_per_worker if facts else None,
        "peak_memory_mb_per_worker": facts.peak_memory_mb if facts else None,
    }


def run_training(job: JobConfig, *, fresh: bool = False, say=log.info) -> dict:
    """The `train` verb: returns the report (also written to {output}/{name}/report.json).
    An earlier run of the same run.name resumes from its latest complete checkpoint (Ray Train
    restores its snapshot); `fresh` deletes it first. Raises TrainingFailed past max_failures."""
    from ray.train import TrainingFailedError

    t0 = time.perf_counter()
    options = job.storage_options()
    # Never step 0 silently over an existing run: a lost or damaged snapshot is repaired from
    # the checkpoints in storage, or the run stops here with one line (RunStateError).
    resume = None if fresh else resume_point(job)
    versions = data_versions(job, resume)  # fail before Ray if data is missing
    train_manifest = versions["train"]
    assert train_manifest is not None
    compare_labels(job, train_manifest.labels, say)  # a head that cannot serve: before Ray
    if fresh:
        start_over(job, say)
    elif resume:
        say(
            f"resuming run {job.run.name} from {resume.name} (step {resume.step}) in {run_dir(job)}/; add --fresh to start over"
        )
        latest = read_manifest(job.data.train, options).version
        if latest != train_manifest.version:
            say(
                f"run {job.run.name} stays on version {train_manifest.version} of "
                f"{job.data.train} (now at {latest}); --fresh or a new run.name trains on it"
            )
    connect_ray(job)
    try:
        result = _train(job, versions)
    except TrainingFailedError as exc:
        raise TrainingFailed(failure_message(job, exc, previous_run(job))) from exc
    if result.error:  # fit() raises in Ray 2.60; older v2 versions returned the error instead
        raise TrainingFailed(
            failure_message(job, result.error, previous_run(job))
        ) from result.error
    candidates = [
        (os.path.basename(ckpt.path.rstrip("/")), metrics)
        for ckpt, metrics in (result.best_checkpoints or [])
    ]
    from shardtune.training.checkpoint import CheckpointError

    select_best(candidates, has_eval=job.data.eval is not None)  # raises if there is none
    for best in rank_checkpoints(candidates, has_eval=job.data.eval is not None):
        try:
            model_uri = export_best(job, best[0])
            break
        except (CheckpointError, FileNotFoundError) as exc:  # damaged after it was reported
            log.warning("not exporting %s: %s; trying the next best checkpoint", best[0], exc)
    else:
        raise TrainingFailed(
            f"no reported checkpoint of run {job.run.name!r} could be exported (see above)"
        )
    test = _remote_evaluate(job, model_uri) if job.data.test else None
    # Ray's copy of the last report stands in when no record reached {run}/evals/.
    last = [EvalRecord.from_dict(result.metrics)] if result.metrics else []
    history = read_evaluations(job) or last
    report = build_report(
        job,
        best=(best[0], EvalRecord.from_dict(best[1])),
        history=history,
        test=test,
        model_uri=model_uri,
        wall_s=time.perf_counter() - t0,
        versions=versions,
    )
    from shardtune.cluster.plots import write_plots

    layout = run_layout(job)
    report["tensorboard"] = layout.tensorboard if job.tracking.tensorboard else None
    report["plots"] = write_plots(report, layout.root, options)
    storage.write_text(layout.report, json.dumps(report, indent=2), options)
    return report
