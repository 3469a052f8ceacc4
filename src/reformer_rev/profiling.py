"""Honest activation-memory measurement on CPU (and GPU) with the torch profiler (docs/design.md §7).

`ru_maxrss` is noisy because glibc keeps freed blocks; the profiler sees every allocator call, so the peak of the
running sum of allocated bytes over one training step is reproducible to ~0.1 MB.

The running sum is taken over the allocator's own `[memory]` events, one per allocation or free, each at the moment
it happened. An earlier version summed the operators' *self* memory instead: a free that happens inside an operator's
Python body (a custom `autograd.Function` backward, such as a recomputing reversible backward) is then booked as the
operator's negative self memory at the operator's *start*, before the allocations of its children, and the whole
working set of that backward vanished from the peak (a 200 MB tensor allocated and freed inside a backward read as
0 MB; tests/test_profiling.py).
"""

from __future__ import annotations

from collections.abc import Callable

from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(step: Callable[[], object], device: str = "cpu") -> int:
    """Peak of the running sum of allocator bytes while `step()` runs, relative to the start of the step.

    Memory that exists before the step (weights, gradient buffers, optimizer state) is not counted: allocate those
    and take a warm-up step first, so the figure is the step's own activations and temporaries.
    """
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        step()
    events = []
    for evt in prof.profiler.kineto_results.events():
        if evt.name() != "[memory]":
            continue
        # Only the device asked for (a CUDA step also allocates on the host).
        if (evt.device_type() == DeviceType.CUDA) != cuda:
            continue
        events.append((evt.start_ns(), evt.nbytes()))
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


__all__ = ["peak_allocated_bytes"]
