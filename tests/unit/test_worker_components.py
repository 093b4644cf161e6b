"""The worker's components without Ray: a real DeepSpeed engine on a one-process gloo group, the
tiny random BERT and a prepared NER set. `Trainer.train_step` accumulates and steps as DeepSpeed
should; `Evaluator.evaluate` returns the record seqeval gives over the same rows; and what the
worker writes (EvalRecord, RunLayout) is exactly what the head reads (read_evaluations,
build_report, the plots), checked by value and by the names the head's code uses."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import typing
from pathlib import Path

import pytest
import torch
from shardtune.cluster import job as head
from shardtune.cluster import plots
from shardtune.cluster.config import validate_tree
from shardtune.data.collate import collate
from shardtune.data.manifest import read_all_rows, read_manifest
from shardtune.data.ports import free_port
from shardtune.data.prepare import prepare
from shardtune.data.run_layout import RunLayout
from shardtune.data.storage import StorageOptions
from shardtune.data.tasks import get_task
from shardtune.training import meter as meter_module
from shardtune.training import tracking
from shardtune.training.config import DataSection, ModelSection, TrainSection, WorkerConfig
from shardtune.training.evaluation import evaluate_rows
from shardtune.training.evaluator import Evaluator
from shardtune.training.feed import DataFeed
from shardtune.training.meter import Meter, Progress
from shardtune.training.records import EvalRecord, EvalScores, RunFacts, TrainingStats, record_keys
from shardtune.training.step import Trainer, build_engine

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group, as Ray Train would have made for a single worker."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # fmt: skip
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def prepared(synthetic_conll, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prepared")
    prepare("ner", [str(synthetic_conll)], str(root), split={"train": 0.8, "dev": 0.2}, seed=0)
    return {"train": str(root / "train"), "dev": str(root / "dev")}


def worker_config(
    model_dir: str, data: dict[str, str], run_uri: str, grad_accum: int
) -> WorkerConfig:
    return WorkerConfig(
        task="ner", model=ModelSection(name_or_path=model_dir, dropout=0.0),  # deterministic
        data=DataSection(train=data["train"], eval=data["dev"], max_length=64),
        train=TrainSection(batch_size=4, grad_accum=grad_accum, lr=1e-3, warmup=0.02,
                           precision="fp32", seed=0),
        storage=StorageOptions(), run_uri=run_uri,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(gloo, tiny_model_dir, prepared, tmp_path_factory):
    cfg = worker_config(tiny_model_dir, prepared, str(tmp_path_factory.mktemp("run")), 2)
    manifest = read_manifest(prepared["train"])
    model = build_engine(cfg, manifest.labels, world=1, total_steps=50)
    feed = DataFeed(cfg.data, cfg.train, cfg.storage, manifest=manifest, spec=get_task("ner"),
                    tokenizer=model.tokenizer, rank=0, world=1)  # fmt: skip
    return cfg, model, feed


def plain_loss(engine, items, pad_id: int) -> float:
    batch = {k: v for k, v in collate(items, pad_id).items() if k != "num_tokens"}
    with torch.no_grad():
        return float(engine.module(**batch).loss)


def test_train_step_accumulates_then_steps_once(built):
    cfg, model, feed = built
    engine = model.engine
    trainer = Trainer(engine, grad_accum=2, pad_id=feed.pad_id)
    state = trainer.state
    batches = feed.batches(state)
    # Linear warmup starts at lr 0 (DeepSpeed's WarmupDecayLR runs the first two optimizer steps
    # at 0): take steps until the next one moves the weights, then check that one.
    while engine.get_lr()[0] == 0:
        assert trainer.train_step(next(batches)) is False and trainer.train_step(next(batches))
        trainer.on_optimizer_step()
    done = state.micro_step
    trainer.meter = m = Meter()
    first, second = next(batches), next(batches)
    expected = [plain_loss(engine, b.items, feed.pad_id) for b in (first, second)]
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    steps_before = engine.global_steps

    assert trainer.train_step(first) is False  # mid-accumulation
    assert (state.micro_step, state.group_step, state.step) == (done + 1, done + 1, done // 2)
    assert state.group_done[-len(first.offsets) :] == first.offsets
    assert engine.global_steps == steps_before
    for n, p in engine.module.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed before the optimizer step"
    assert float(m.loss_sum) == pytest.approx(expected[0], rel=1e-6)

    assert trainer.train_step(second) is True  # the accumulation's last micro-batch
    assert (state.micro_step, state.group_step) == (done + 2, done + 2)
    assert (
        state.group_done[-len(first.offsets + second.offsets) :] == first.offsets + second.offsets
    )
    assert engine.global_steps == steps_before + 1
    changed = [n for n, p in engine.module.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.weight" in changed and len(changed) > len(before) // 2
    assert float(m.loss_sum) == pytest.approx(sum(expected), rel=1e-6)
    assert m.take_loss() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert m.micro_batches == 2 and m.examples == len(first.rows) + len(second.rows)
    non_pad = sum(len(item.input_ids) for b in (first, second) for item in b.items)
    assert m.tokens == non_pad and m.padded_tokens >= non_pad
    trainer.on_optimizer_step()
    assert state.step == done // 2 + 1
    feed.close()


def _trained_a_little(built, steps: int = 24) -> Trainer:
    """A few optimizer steps, so the model predicts entities and F1 is not trivially 0."""
    _, model, feed = built
    trainer = Trainer(model.engine, grad_accum=2, pad_id=feed.pad_id)
    while trainer.state.step < steps:
        for batch in feed.batches(trainer.state):
            if trainer.train_step(batch):
                trainer.on_optimizer_step()
            if trainer.state.step >= steps:
                break
        feed.end_epoch(trainer.state)
    return trainer


@pytest.fixture(scope="module")
def evaluated(built, prepared):
    cfg, model, feed = built
    trainer = _trained_a_little(built)
    manifest, rows = read_all_rows(prepared["dev"])
    labels = feed.manifest.labels
    evaluator = Evaluator("ner", labels, model.tokenizer, cfg.data.max_length, 4, world=1,
                          enabled=True, rows=rows, total=manifest.num_examples)  # fmt: skip
    facts = RunFacts(precision=model.precision, zero_stage=model.zero_stage, workers=1,
                     threads_per_worker=1, words_without_subwords=0, sentences_split=0,
                     padding_examples_per_epoch=0, trainable_params=model.trainable_params,
                     total_params=model.total_params, peak_memory_mb=1.0, peft="none")  # fmt: skip
    record = evaluator.evaluate(model.engine, trainer.meter, trainer.state, facts=lambda: facts)
    return record, trainer, rows, labels


def test_evaluate_returns_what_seqeval_says_over_the_same_rows(built, evaluated):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    record, trainer, rows, labels = evaluated
    _, model, feed = built
    engine = model.engine
    engine.eval()
    names = get_task("ner").metric_names(labels)
    plain = evaluate_rows(lambda b: engine.module(**b), rows, task="ner", labels=labels,
                          names=names, tokenizer=model.tokenizer, max_length=64, batch_size=4,
                          keep_predictions=True)  # fmt: skip
    engine.train()
    gold = [row["tags"] for row in rows]
    pred = plain.predictions
    s = record.scores
    assert s is not None and sum(c[2] for c in s.eval_counts) > 0
    assert s.eval_f1 == pytest.approx(f1_score(gold, pred))
    assert s.eval_precision == pytest.approx(precision_score(gold, pred))
    assert s.eval_recall == pytest.approx(recall_score(gold, pred))
    per_type = classification_report(gold, pred, output_dict=True)
    for name, f1 in s.eval_f1_per_label.items():
        assert f1 == pytest.approx(per_type[name]["f1-score"] if name in per_type else 0.0), name
    assert s.eval_macro_f1 == pytest.approx(per_type["macro avg"]["f1-score"])
    assert s.eval_loss == pytest.approx(plain.loss_sum / plain.batches, rel=1e-5)
    m = trainer.meter
    assert (record.step, record.epoch) == (trainer.state.step, trainer.state.epoch)
    assert record.stats.train_examples == m.examples and record.stats.train_tokens == m.tokens
    assert record.stats.tokens_per_s == pytest.approx(m.tokens / m.seconds)
    assert record.facts.precision == "fp32" and record.eval_seconds > 0


def test_worker_and_head_agree_on_records_and_paths(evaluated, prepared, tmp_path):
    """The worker writes its record where and how it does in a run; the head reads it back
    through its own functions: the same record, every report field filled from it, and every
    record field the head's code names exists in the record classes."""
    record, *_ = evaluated
    job = validate_tree({"task": "ner", "model": {"name_or_path": "/m"}, "data": {"train": "/d"},
                         "run": {"name": "r", "output": str(tmp_path)}}, "test")  # fmt: skip
    cfg = job.worker_config()
    worker_layout, head_layout = RunLayout(cfg.run_uri), head.run_layout(job)
    assert worker_layout == head_layout
    progress = Progress(rank=0, world=1, layout=worker_layout, options=cfg.storage, epochs=1,
                        log_every=1, grad_accum=1)  # fmt: skip
    progress.loss_points = [[1, 2.5], [2, 2.0]]
    written = progress.record(dataclasses.replace(record, final=True))
    assert Path(worker_layout.eval_record(record.step)).is_file()
    assert Path(head_layout.evals) == Path(worker_layout.eval_record(record.step)).parent

    (read,) = head.read_evaluations(job)
    assert read == written and read.train_loss_points == [[1, 2.5], [2, 2.0]]
    manifest = read_manifest(prepared["train"])
    report = head.build_report(job, best=("checkpoint-00000024", read), history=[read],
                               test=None, model_uri=head_layout.model, wall_s=1.0,
                               versions={"train": manifest, "eval": None, "test": None})  # fmt: skip
    assert set(report["history"][0]) == record_keys() - {"eval_counts", "checkpoint_only"}
    assert report["best_eval"]["eval_f1"] == record.scores.eval_f1
    assert report["throughput"]["train_tokens_per_s"] == record.stats.tokens_per_s
    assert report["timing"]["step_breakdown"] == record.stats.step_breakdown
    assert report["parameters"]["trainable"] == record.facts.trainable_params
    assert report["data"]["sentences_split_into_windows"] == record.facts.sentences_split
    assert None not in [*report["throughput"].values(), *report["timing"].values()]
    assert plots.draw_plots({**report, "run": "r"}, str(tmp_path / "plots")) == [
        plots.TRAINING,
        plots.PER_LABEL,
    ]


# Names the head's code binds to a record (or part of one), and the class each is.
BOUND = {"last": EvalRecord, "h": EvalRecord, "record": EvalRecord, "read": EvalRecord,
         "stats": TrainingStats, "facts": RunFacts, "scores": EvalScores, "s": EvalScores}  # fmt: skip


@pytest.mark.parametrize("module", [head, plots, tracking, meter_module], ids=lambda m: m.__name__)
def test_every_record_field_the_readers_name_exists(module):
    """`name.attr` on a record in the readers' source must be a field (or method) of that
    class: a field renamed on one side only fails here, before any run."""
    used = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            cls = BOUND.get(node.value.id)
            if cls is not None:
                used.append((cls, node.attr))
    assert used, "the readers name no record field: BOUND is out of date"
    for cls, attr in used:
        fields = set(typing.get_type_hints(cls)) | {n for n in dir(cls) if not n.startswith("_")}
        assert attr in fields, (
            f"{module.__name__} reads {cls.__name__}.{attr}, which does not exist"
        )
