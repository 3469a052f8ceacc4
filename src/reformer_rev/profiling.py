"""Honest activation-memory measurement on CPU (and GPU) with the torch profiler (docs/design.md §7).

`ru_maxrss` is noisy because glibc keeps freed blocks; the profiler sees every allocator call, so the peak of the
running sum of allocated bytes over one training step is reproducible to ~0.1 MB.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(step: Callable[[], object], device: str = "cpu") -> int:
    """Peak of the running sum of allocator bytes while `step()` runs, relative to the start of the step.

    Memory that exists before the step (weights, gradient buffers, optimizer state) is not counted: allocate those
    and take a warm-up step first, so the figure is the step's own activations and temporaries.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        step()
    events = []
    for evt in prof.events():
        # `self_*` excludes child ops, so an allocation is counted once, at the innermost op that made it; frees
        # outside any op arrive as "[memory]" events.
        nbytes = evt.self_device_memory_usage if device.startswith("cuda") else evt.self_cpu_memory_usage
        if nbytes:
            events.append((evt.time_range.start, nbytes))
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


__all__ = ["peak_allocated_bytes"]
