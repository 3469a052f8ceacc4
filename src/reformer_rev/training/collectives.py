"""The decisions every process must take together, each one collective with the reduction it needs.

`accelerate.Accelerator.reduce` knows "sum", "mean" and (in recent releases only) "max", and treats any other name as
"sum": a check written `reduce(ok, "min")` sums, so one process that is fine makes all of them "fine" (a 2-process run
trained on a folder locked by another run that way). These helpers call `torch.distributed.all_reduce` with the
operation itself, and are the identity in a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _distributed(accelerator: Any) -> bool:
    return getattr(accelerator, "num_processes", 1) > 1 and dist.is_available() and dist.is_initialized()


def all_reduce(accelerator: Any, tensor: torch.Tensor, op: str) -> torch.Tensor:
    """`tensor` reduced over every process with `op` in {"sum", "min", "max"} (a copy; same dtype and shape).

    The reduction runs on the accelerator's device (gloo on CPU, NCCL on GPU) and the result comes back on the
    tensor's own device."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"`op` must be one of {sorted(ops)}, got {op!r}.")
    if not _distributed(accelerator):
        return tensor.clone()
    work = tensor.detach().to(accelerator.device).clone()
    dist.all_reduce(work, ops[op])
    return work.to(tensor.device)


def all_processes(accelerator: Any, ok: bool) -> bool:
    """True on every process iff `ok` is true on every process."""
    return bool(all_reduce(accelerator, torch.tensor([1.0 if ok else 0.0]), "min").item() > 0)


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process iff `flag` is true on at least one process."""
    return bool(all_reduce(accelerator, torch.tensor([1.0 if flag else 0.0]), "max").item() > 0)


def agreed_min(accelerator: Any, value: float) -> float:
    """The smallest `value` of all processes, on every process."""
    return float(all_reduce(accelerator, torch.tensor([float(value)], dtype=torch.float64), "min").item())


def same_on_all_processes(accelerator: Any, value: float) -> tuple[float, float]:
    """(min, max) of `value` over the processes: equal iff every process holds the same value."""
    t = torch.tensor([float(value), -float(value)], dtype=torch.float64)
    reduced = all_reduce(accelerator, t, "min")
    return float(reduced[0].item()), float(-reduced[1].item())


__all__ = ["agreed_min", "all_processes", "all_reduce", "any_process", "same_on_all_processes"]
