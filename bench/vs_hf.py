"""shardtune against the single-process Hugging Face Trainer on the same machine, same data.

One run, one prepared corpus (the demo's tweet NER corpus, split train/dev/test by the same
seed), one model (all-MiniLM-L6-v2) and the same hyperparameters for every row:
  (a) the HF Trainer, transformers' run_ner recipe: AutoModelForTokenClassification,
      DataCollatorForTokenClassification, first sub-word labelled, one process, its defaults
      (fp32, fused AdamW, linear schedule), evaluation each epoch, then the test set;
  (b) `shardtune train` with 1 worker using every core (its defaults: the fast path);
  (c) `shardtune train` with 2 workers on the same cores;
  (d) a bare torch loop over exactly shardtune's batches (no Ray, no DeepSpeed), in the
      precision (b) ran, for what the framework around the step costs.
Each row runs in its own process, one after another, and reports non-pad tokens/s, the padding
fraction, training seconds (steps only: no evaluation, no startup), whole-job wall seconds
(process start to test F1, Ray start/stop, evaluation, export included), test micro-F1 and
the ratio of tokens/s to (a). `--ablations` adds shardtune rows with one lever off each.

    python -m bench.vs_hf [--epochs 3] [--model DIR] [--data CORPUS.conll] [--ablations]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, LR, SEED, MAX_LENGTH, WARMUP, WEIGHT_DECAY = 16, 1e-4, 13, 128, 0.1, 0.01


# ------------------------------------------------------------------------------- (a) HF Trainer


def row_hf(data: str, model: str, epochs: int) -> dict:
    """transformers' run_ner recipe with the Trainer, whole job timed from this function's
    start (the process start is timed by the caller)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from seqeval.metrics import f1_score
    from shardtune.data.manifest import read_all_rows
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    manifest, train_rows = read_all_rows(f"{data}/train")
    _, dev_rows = read_all_rows(f"{data}/dev")
    _, test_rows = read_all_rows(f"{data}/test")
    labels = manifest.labels
    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model)

    def encode(batch):
        enc = tokenizer(
            batch["tokens"], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH
        )
        enc["labels"] = []
        for i, tags in enumerate(batch["tags"]):
            previous, row = None, []
            for word in enc.word_ids(batch_index=i):
                row.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            enc["labels"].append(row)
        return enc

    def dataset(rows):
        ds = Dataset.from_list([{"tokens": r["tokens"], "tags": r["tags"]} for r in rows])
        return ds.map(encode, batched=True, remove_columns=["tokens", "tags"])

    train_ds, dev_ds, test_ds = dataset(train_rows), dataset(dev_rows), dataset(test_rows)
    counted = {"real": 0, "padded": 0, "training": True}
    collator = DataCollatorForTokenClassification(tokenizer)

    def counting_collator(features):
        batch = collator(features)
        if counted["training"]:  # training batches only: evaluate/predict switch it off
            counted["real"] += int(batch["attention_mask"].sum())
            counted["padded"] += batch["attention_mask"].numel()
        return batch

    def word_tags(pred_ids, label_ids):
        return [[labels[p] for p, g in zip(ps, gs, strict=True) if g != -100] for ps, gs in zip(pred_ids, label_ids, strict=True)]  # fmt: skip

    def compute_metrics(p):
        pred = np.argmax(p.predictions, axis=-1)
        gold = [[labels[g] for g in gs if g != -100] for gs in p.label_ids]
        return {"f1": f1_score(gold, word_tags(pred, p.label_ids))}

    class TimedTrainer(Trainer):
        eval_seconds = 0.0

        def evaluate(self, *args, **kwargs):
            t0, counted["training"] = time.perf_counter(), False
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.eval_seconds += time.perf_counter() - t0
                counted["training"] = True

    torch.manual_seed(SEED)
    net = AutoModelForTokenClassification.from_pretrained(
        model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
            learning_rate=LR, num_train_epochs=epochs, weight_decay=WEIGHT_DECAY,
            warmup_steps=WARMUP, eval_strategy="epoch", save_strategy="no", logging_steps=50,
            seed=SEED, report_to="none", use_cpu=True, disable_tqdm=True, max_grad_norm=1.0,
        )  # fmt: skip
        trainer = TimedTrainer(model=net, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                               data_collator=counting_collator, compute_metrics=compute_metrics)  # fmt: skip
        result = trainer.train()
        counted["training"] = False
        predicted = trainer.predict(test_ds)
    pred = np.argmax(predicted.predictions, axis=-1)
    gold = [r["tags"] for r in test_rows]
    test_f1 = f1_score(gold, word_tags(pred, predicted.label_ids))
    train_s = result.metrics["train_runtime"] - trainer.eval_seconds
    return {
        "tokens_per_s": counted["real"] / train_s,
        "padding": 1 - counted["real"] / counted["padded"],
        "train_s": train_s,
        "test_f1": test_f1,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- (b)/(c) shardtune


def job_file(tmp: str, data: str, model: str, epochs: int, name: str, overrides: dict) -> str:
    import yaml

    tree = {
        "task": "ner",
        "model": {"name_or_path": model},
        "data": {
            "train": f"{data}/train",
            "eval": f"{data}/dev",
            "test": f"{data}/test",
            "max_length": MAX_LENGTH,
        },  # fmt: skip
        "train": {
            "epochs": epochs,
            "lr": LR,
            "batch_size": BATCH,
            "weight_decay": WEIGHT_DECAY,
            "warmup": WARMUP,
            "seed": SEED,
            "eval_every": "epoch",
            "log_every": 50,
        },  # fmt: skip
        "cluster": {"num_workers": 1, "cpus_per_worker": os.cpu_count() or 1, "max_failures": 0},
        "run": {"name": name, "output": os.path.join(tmp, "runs"), "keep_checkpoints": 1},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    path = os.path.join(tmp, f"{name}.yaml")
    Path(path).write_text(yaml.safe_dump(tree))
    return path


def row_shardtune(config: str) -> dict:
    """`shardtune train --config ...` in this process (the caller times the process)."""
    from shardtune.cluster.config import load_job_config
    from shardtune.cluster.job import run_training

    report = run_training(load_job_config(config))
    timing = report["timing"]
    return {
        "tokens_per_s": report["throughput"]["train_tokens_per_s"],
        "padding": timing["padding_fraction"],
        "train_s": report["throughput"]["train_seconds"],
        "test_f1": report["test"]["micro"]["f1"],
        "breakdown": timing["step_breakdown"],
        "precision": timing["precision"],
        "threads": timing["threads_per_worker"],
        "zero_stage": timing["zero_stage"],
    }


# ------------------------------------------------------------------------ (d) bare torch loop


def row_bare(data: str, model: str, epochs: int, precision: str) -> dict:
    """A plain torch loop over shardtune's own micro-batches (same plan, grouping, collation)
    in one process: what the step costs without Ray and DeepSpeed around it."""
    import torch
    from shardtune.data.alignment import AlignmentStats
    from shardtune.data.batching import group_batches
    from shardtune.data.collate import collate
    from shardtune.data.manifest import read_manifest
    from shardtune.data.shard_plan import EpochPlan, segment_ranges, train_segment
    from shardtune.data.stream import ShardStream
    from shardtune.data.tasks import get_task
    from shardtune.training.config import TrainSection
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    spec, grouping = get_task("ner"), TrainSection().length_grouping
    manifest = read_manifest(f"{data}/train")
    label2id = {label: i for i, label in enumerate(manifest.labels)}
    tokenizer = AutoTokenizer.from_pretrained(model)
    torch.manual_seed(SEED)
    net = AutoModelForTokenClassification.from_pretrained(model, num_labels=len(label2id))
    no_decay = ("bias", "LayerNorm.weight")
    params = list(net.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": WEIGHT_DECAY},
         {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0}],
        lr=LR, fused=True,
    )  # fmt: skip
    steps = epochs * -(-manifest.num_examples // BATCH)
    schedule = get_linear_schedule_with_warmup(optimizer, round(WARMUP * steps), steps)
    real = padded = 0
    seconds = 0.0
    stats = AlignmentStats()
    net.train()
    for epoch in range(epochs):
        plan = EpochPlan(tuple(s.num_examples for s in manifest.shards), seed=SEED, epoch=epoch)
        stream = ShardStream(f"{data}/train", manifest, plan)
        ranges = segment_ranges(train_segment(manifest.num_examples, 1, 0), manifest.num_examples)
        rows = [row for _, row in stream.iter_ranges(ranges)]
        stream.close()
        size = BATCH * grouping
        for start in range(0, len(rows), size):
            t0 = time.perf_counter()
            group = rows[start : start + size]
            encoded = [spec.encode(r, tokenizer, label2id, MAX_LENGTH, stats) for r in group]
            lengths = [sum(len(x.input_ids) for x in e) for e in encoded]
            batches = group_batches(lengths, BATCH, key=(SEED, epoch, 0, start))
            seconds += time.perf_counter() - t0
            for idx in batches:
                t0 = time.perf_counter()
                batch = collate([x for i in idx for x in encoded[i]], tokenizer.pad_token_id)
                real += batch.pop("num_tokens")
                padded += batch["input_ids"].numel()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                    loss = net(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                seconds += time.perf_counter() - t0
    return {"tokens_per_s": real / seconds, "padding": 1 - real / padded, "train_s": seconds,
            "test_f1": None, "threads": torch.get_num_threads()}  # fmt: skip


# --------------------------------------------------------------------------------------- driver


def run_row(argv: list[str], label: str) -> dict:
    """One row in a fresh process: wall time from process start to its last result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, *argv, "--result", path], capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
            raise SystemExit(f"row {label} failed (exit {out.returncode})")
        result = json.loads(Path(path).read_text())
    result["wall_s"] = wall
    return result


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", help="model directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data", help="CoNLL corpus (default: the demo's tweet NER corpus)")
    parser.add_argument(
        "--ablations", action="store_true", help="add shardtune rows with one lever off each"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.row:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        if args.row == "hf":
            result = row_hf(args.prepared, args.model, args.epochs)
        elif args.row == "bare":
            result = row_bare(args.prepared, args.model, args.epochs, args.precision)
        else:
            result = row_shardtune(args.config)
        Path(args.result).write_text(json.dumps(result))
        return

    from shardtune.cluster.demo import corpus_path
    from shardtune.data.prepare import prepare

    from bench.results import publish
    from tests.testkit import tokenizer_dir

    model = args.model or tokenizer_dir()
    corpus = args.data or corpus_path()
    with tempfile.TemporaryDirectory(prefix="shardtune-vs-hf-") as tmp:
        data = os.path.join(tmp, "data")
        prepare("ner", [corpus], data, split={"train": 0.8, "dev": 0.1, "test": 0.1}, seed=0)
        common = ["--model", model, "--epochs", str(args.epochs), "--prepared", data]
        rows: list[tuple[str, dict]] = []

        def shardtune_row(label: str, name: str, **overrides) -> dict:
            config = job_file(tmp, data, model, args.epochs, name, overrides)
            result = run_row([*common, "--row", "shardtune", "--config", config], label)
            rows.append((label, result))
            print(f"done: {label}", file=sys.stderr, flush=True)
            return result

        rows.append(("(a) HF Trainer, 1 process", run_row([*common, "--row", "hf"], "a")))
        print("done: (a)", file=sys.stderr, flush=True)
        cores = os.cpu_count() or 1
        b = shardtune_row(f"(b) shardtune, 1 worker x {cores} CPUs", "one-worker")
        shardtune_row(f"(c) shardtune, 2 workers x {cores / 2:g} CPUs", "two-workers",
                      **{"cluster.num_workers": 2, "cluster.cpus_per_worker": cores / 2})  # fmt: skip
        rows.append(("(d) bare torch loop, shardtune's batches",
                     run_row([*common, "--row", "bare", "--precision", b["precision"]], "d")))  # fmt: skip
        if args.ablations:
            shardtune_row(
                "(b) without length grouping", "no-grouping", **{"train.length_grouping": 1}
            )
            shardtune_row("(b) in fp32", "fp32", **{"train.precision": "fp32"})

    ref = rows[0][1]
    setup = (
        f"shardtune vs HF Trainer: {Path(corpus).name}, {Path(model).name}, {args.epochs} "
        f"epochs, batch {BATCH}, lr {LR}, {os.cpu_count()} cores"
    )
    header = f"{'run':<44} {'tok/s':>7} {'ratio':>6} {'pad':>5} {'train s':>8} {'job s':>7} {'test F1':>8}  notes"
    lines = [header, "-" * len(header)]
    for label, r in rows:
        notes = []
        if r.get("precision"):
            notes.append(f"{r['precision']}, ZeRO-{r['zero_stage']}, {r['threads']} threads/worker")
        if r.get("breakdown"):
            notes.append(
                "step: " + " ".join(f"{k} {100 * v:.0f}%" for k, v in r["breakdown"].items())
            )
        lines.append(
            f"{label:<44} {r['tokens_per_s']:>7.0f} {r['tokens_per_s'] / ref['tokens_per_s']:>5.2f}x "
            f"{100 * r['padding']:>4.0f}% {r['train_s']:>8.1f} {r['wall_s']:>7.1f} "
            f"{fmt(r['test_f1'], '.4f'):>8}  {'; '.join(notes)}"
        )
    table = "\n".join(lines)
    print(f"\n{setup}\n\n{table}")
    path = publish(
        "vs_hf",
        table,
        notes=f"{setup}. `tok/s`: non-pad tokens per second of training steps; `ratio`: against "
        "row (a); `job s`: the whole command, from process start to the test F1.",
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
