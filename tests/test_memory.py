"""Activation memory of a training step does not grow with depth for the reversible model (profiler method)."""

from __future__ import annotations

import pytest
import torch

from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.profiling import peak_allocated_bytes


def step_peak_mb(depth: int, reversible: bool, dropout: float, seq: int = 1024) -> float:
    torch.manual_seed(0)
    config = RevFormerConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=256,
        reversible=reversible, chunk_size_feed_forward=256, loss_chunk_size=256,
        hidden_dropout=dropout, attention_dropout=dropout, max_position_embeddings=seq,
    )
    model = RevFormerForCausalLM(config).train()
    # foreach=False and set_to_none=False: optimizer temporaries would otherwise add a false slope in depth.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
    ids = torch.randint(0, 256, (1, seq))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(ids, labels=ids).loss.backward()
        opt.step()

    step()  # warm-up: gradient buffers exist before the measured step
    return peak_allocated_bytes(step) / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_activation_memory_flat_in_depth(dropout):
    shallow, deep = step_peak_mb(2, True, dropout), step_peak_mb(16, True, dropout)
    assert deep <= 1.10 * shallow, (shallow, deep)


@pytest.mark.slow
def test_twin_activation_memory_grows_with_depth():
    shallow, deep = step_peak_mb(2, False, 0.0), step_peak_mb(16, False, 0.0)
    rev_deep = step_peak_mb(16, True, 0.0)
    assert deep >= 4 * shallow, (shallow, deep)
    assert rev_deep * 5 < deep, (rev_deep, deep)
