"""Activation memory of a training step does not grow with depth for the reversible model (profiler method)."""

from __future__ import annotations

import pytest
import torch

from reformer_rev import RevFormerConfig, RevFormerForCausalLM, reversible
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


def test_automatic_chunk_sizes():
    from reformer_rev.configuration_reformer_rev import resolve_chunk_size

    assert resolve_chunk_size(None, 1536) == 1024  # default FFN width: 2^22 / 1536 > 1024, capped
    assert resolve_chunk_size(None, 8192) == 512
    assert resolve_chunk_size(None, 50_000) == 256  # a large vocabulary: the floor keeps matmuls efficient
    assert resolve_chunk_size(0, 1536) == 0 and resolve_chunk_size(300, 1536) == 300  # explicit values are kept
    config = RevFormerConfig(hidden_size=64, num_attention_heads=4, intermediate_size=8192)
    assert config.chunk_size_feed_forward is None and config.loss_chunk_size is None
    assert RevFormerForCausalLM(config).model.layers[0].g_chunk_size == 512


def _default_step_peak_mb(depth: int, **overrides) -> float:
    """A model that sets nothing about chunking (the library defaults), at a sequence long enough to chunk."""
    torch.manual_seed(0)
    config = RevFormerConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, intermediate_size=4096,
                             num_hidden_layers=depth, **overrides)
    model = RevFormerForCausalLM(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
    ids = torch.randint(0, 256, (1, 2048))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(ids, labels=ids).loss.backward()
        opt.step()

    step()
    return peak_allocated_bytes(step) / 2**20


@pytest.mark.slow
def test_defaults_chunk_the_feed_forward_and_stay_flat_in_depth(monkeypatch):
    """docs/benchmarks/defaults.md: a user who only raises the sequence length gets the flat-memory setup."""
    # The engine's process-wide drift monitor probes the first calls, then one in 16, and a probed step has another
    # peak: without it the figures depend on how many stacks ran before in this process.
    monkeypatch.setattr(reversible, "default_drift_monitor", None)
    default_2, default_6 = _default_step_peak_mb(2), _default_step_peak_mb(6)
    unchunked = _default_step_peak_mb(2, chunk_size_feed_forward=0)
    assert default_6 <= 1.05 * default_2, (default_2, default_6)
    # FFN intermediates (2048 x 4096 values each) dominate unchunked; the automatic 1024-position chunks halve them.
    assert default_2 <= 0.75 * unchunked, (default_2, unchunked)
