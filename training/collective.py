"""The worker's collectives outside DeepSpeed: small float vectors summed or maxed over ranks.
Every rank must call them at the same point, or the others hang."""

from __future__ import annotations

import torch


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()
