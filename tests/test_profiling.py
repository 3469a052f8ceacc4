"""`peak_allocated_bytes` sees every allocation of a step, including those made inside a custom backward."""

import torch

from reformer_rev.profiling import peak_allocated_bytes

MB = 2**20


class _AllocatesInBackward(torch.autograd.Function):
    """Identity whose backward allocates (and frees) a 64 MB tensor, like a recomputing reversible backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        scratch = torch.ones(16 * MB)  # 64 MB of float32
        return grad + scratch[: grad.numel()].view_as(grad) * 0


def test_peak_counts_what_a_custom_backward_allocates():
    x = torch.randn(1000, requires_grad=True)
    peak = peak_allocated_bytes(lambda: _AllocatesInBackward.apply(x).sum().backward())
    # Summing the operators' self memory put the backward's free (booked at the operator's start) before the
    # allocation of its child and reported ~0 MB here.
    assert 64 * MB <= peak < 66 * MB


def test_peak_of_a_plain_step_is_its_largest_live_set():
    def step():
        a = torch.ones(8 * MB)  # 32 MB
        b = torch.ones(4 * MB)  # 16 MB, alive together with a
        del a, b
        c = torch.ones(2 * MB)  # 8 MB, after both were freed
        del c

    peak = peak_allocated_bytes(step)
    assert 48 * MB <= peak < 49 * MB
