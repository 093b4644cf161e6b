"""A run's report.json as the table a person reads at the end of `train` (and of the demo); the
caller prints it, since it is the command's result rather than a progress line."""

from __future__ import annotations

from shardtune.training.metrics import format_report


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def run_summary(report: dict) -> str:
    best = report.get("best_eval") or {}
    tp = report.get("throughput") or {}
    lines = [
        "",
        f"== shardtune run {report['run']} ({report['task']}) ==",
        f"model:           {report['model']}",
        f"best checkpoint: {report['best_checkpoint']}  eval micro-F1 {_num(best.get('eval_f1'), '.4f')}",
        f"throughput:      {_num(tp.get('train_examples_per_s'), '.1f')} examples/s, "
        f"{_num(tp.get('train_tokens_per_s'), '.0f')} non-pad tokens/s (all workers)",
        f"wall time:       {report['timing']['wall_seconds']:.0f} s",
    ]
    params = report.get("parameters") or {}
    if params.get("total"):
        lines.append(
            f"parameters:      {params['trainable']:,} trainable of {params['total']:,} "
            f"({100 * params['trainable'] / params['total']:.2f}%, peft: {params.get('peft')})"
        )
    stopped = report.get("early_stopping") or {}
    if stopped.get("stopped"):
        lines.append(f"stopped early:   at step {stopped['step']}: {stopped['reason']}")
    test = report.get("test")
    if test:
        lines += [
            "",
            f"test set {test['data']} ({test['examples']} examples):",
            format_report(test),
        ]
    else:
        lines += ["", "(no test set configured)"]
    if report.get("tensorboard"):
        lines += ["", f"tensorboard:     {report['tensorboard']}"]
    for uri in report.get("plots") or []:
        lines.append(f"plot:            {uri}")
    return "\n".join(lines)
