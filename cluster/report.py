"""Printing a run's report.json as the table a person reads at the end of `train`."""

from __future__ import annotations

from shardtune.training.metrics import format_report


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def print_report(report: dict) -> None:
    best = report.get("best_eval") or {}
    tp = report.get("throughput") or {}
    print()
    print(f"== shardtune run {report['run']} ({report['task']}) ==")
    print(f"model:           {report['model']}")
    print(
        f"best checkpoint: {report['best_checkpoint']}  eval micro-F1 {_num(best.get('eval_f1'), '.4f')}"
    )
    print(
        f"throughput:      {_num(tp.get('train_examples_per_s'), '.1f')} examples/s, "
        f"{_num(tp.get('train_tokens_per_s'), '.0f')} non-pad tokens/s (all workers)"
    )
    print(f"wall time:       {report['timing']['wall_seconds']:.0f} s")
    test = report.get("test")
    if test:
        print(f"\ntest set {test['data']} ({test['examples']} examples):")
        print(format_report(test))
    else:
        print("\n(no test set configured)")
