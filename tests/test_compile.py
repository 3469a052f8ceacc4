"""`torch.compile` of a training step: gradients equal eager, and the graph breaks only where the reversible engine is
called (its autograd Function, with Python-side RNG capture and a recomputing backward, is not traceable)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import max_grad_rel_err, tiny_config
from reformer_rev import RevFormerForCausalLM

pytestmark = pytest.mark.slow  # compiling takes tens of seconds on CPU


def _model_and_batch():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=2)).train()
    ids = torch.randint(3, 48, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return model, ids, mask


def test_compiled_training_step_gives_the_eager_gradients():
    eager, ids, mask = _model_and_batch()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    for _ in range(2):  # the second step reuses the compiled graphs
        for model in (eager, compiled):
            model.zero_grad()
            model(ids, attention_mask=mask, labels=ids).loss.backward()
        err, name = max_grad_rel_err(compiled_model, eager)
        assert err <= 1e-5, (err, name)


def test_graph_breaks_only_at_the_reversible_engine():
    model, ids, mask = _model_and_batch()
    explain = torch._dynamo.explain(model)(ids, attention_mask=mask, labels=ids)
    assert explain.graph_break_count >= 1
    for reason in explain.break_reasons:  # input checks, masks, positions and the loss trace; the engine call does not
        assert reason.user_stack and reason.user_stack[-1].filename.endswith("reversible.py"), reason
