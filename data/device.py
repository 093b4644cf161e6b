"""What this machine computes natively, and the precision inference runs at: one rule shared by
training (`train.precision`), `evaluate` and `serve`, so a model is scored as it is served."""

from __future__ import annotations

import contextlib
from typing import Any

INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16(cpu_flags: str) -> bool:
    """Whether a CPU computes bf16 matrix products natively (flags as in /proc/cpuinfo):
    AVX512-BF16 or AMX. Without them bf16 is emulated and slower than fp32."""
    flags = set(cpu_flags.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def read_cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.partition(":")[2]
    except OSError:
        pass
    return ""


def inference_precision(requested: str, *, on_gpu: bool, gpu_bf16: bool, cpu_flags: str) -> str:
    """ "fp32" or "bf16" for `requested` ("auto" | "fp32" | "bf16"): auto is bf16 where the
    device multiplies bf16 natively (a bf16 GPU; a CPU with AVX512-BF16 or AMX, where it runs
    about 2.5x the fp32 rate), fp32 elsewhere. bf16 runs under autocast: weights stay fp32,
    matrix products round to bf16, so a word whose top two tags nearly tie can flip."""
    if requested not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"precision {requested!r}: expected one of {', '.join(INFERENCE_PRECISIONS)}"
        )
    if requested != "auto":
        return requested
    native = gpu_bf16 if on_gpu else cpu_has_bf16(cpu_flags)
    return "bf16" if native else "fp32"


def resolve_inference_precision(requested: str, device: Any) -> str:
    """`inference_precision` for a torch device of this process."""
    import torch

    on_gpu = str(device).startswith("cuda")
    gpu_bf16 = on_gpu and torch.cuda.is_bf16_supported()
    return inference_precision(
        requested, on_gpu=on_gpu, gpu_bf16=gpu_bf16, cpu_flags=read_cpu_flags()
    )


def autocast(precision: str, device: Any) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in for a resolved precision ("fp32" -> none)."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)
