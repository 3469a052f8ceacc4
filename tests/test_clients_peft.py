"""Fine-tuning the way users freeze and adapt models: PEFT LoRA, frozen embeddings, extra dropout inside a block.

In each case the reversible model must give every trainable tensor exactly the gradient its ordinary-autograd twin
(`reversible=False`, same modules, same weights, same seed) gives, in float64: whatever requires grad or not, and
whatever draws random numbers inside a block, known to the config or not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from client_models import (
    assert_same_trainable_grads,
    compare_trainable_grads,
    lm_batch,
    make_lm_pair,
    make_seq2seq_pair,
    seq2seq_batch,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model, dropout: float):
    # init_lora_weights=False: random A *and* B, so that every LoRA tensor gets a non-zero gradient at step 0.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config)


def lora_pair(rev, twin, dropout: float):
    torch.manual_seed(1)
    p_rev = lora(rev, dropout)
    p_twin = lora(twin, dropout)
    p_twin.load_state_dict(p_rev.state_dict())
    return p_rev, p_twin


def backward_same_seed(models, seed: int = 3, seq2seq: bool = False):
    """One training forward + backward per model, each from the same RNG state; returns the losses."""
    if seq2seq:
        src, mask, labels = seq2seq_batch()
        kwargs = dict(input_ids=src, attention_mask=mask, labels=labels)
    else:
        ids, mask, labels = lm_batch()
        kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    losses = []
    for m in models:
        m.train()
        torch.manual_seed(seed)
        loss = m(**kwargs).loss
        loss.backward()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_gradients_equal_the_twin(dropout):
    """`get_peft_model` freezes the embedding; `lora_dropout` lives inside f/g while the config says dropout 0."""
    rev, twin = make_lm_pair()  # hidden_dropout = attention_dropout = 0
    p_rev, p_twin = lora_pair(rev, twin, dropout)
    l_rev, l_twin = backward_same_seed([p_rev, p_twin])
    assert abs(l_rev.item() - l_twin.item()) <= 1e-12 * abs(l_twin.item())
    report = assert_same_trainable_grads(p_rev, p_twin)
    assert report["trainable"] == 2 * len(TARGETS) * rev.config.num_hidden_layers  # lora_A and lora_B everywhere
    if dropout:  # the adapter's dropout really drew random masks: another seed gives another loss
        p_rev.zero_grad()
        assert abs(backward_same_seed([p_rev], seed=4)[0].item() - l_rev.item()) > 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_seq2seq_lora_gradients_equal_the_twin(dropout):
    rev, twin = make_seq2seq_pair()
    p_rev, p_twin = lora_pair(rev, twin, dropout)
    l_rev, l_twin = backward_same_seed([p_rev, p_twin], seq2seq=True)
    assert abs(l_rev.item() - l_twin.item()) <= 1e-12 * abs(l_twin.item())
    assert_same_trainable_grads(p_rev, p_twin)


FREEZE = {
    "input_embedding": lambda m: m.get_input_embeddings().requires_grad_(False),
    "embedding_and_head": lambda m: (m.get_input_embeddings().requires_grad_(False),
                                     m.get_output_embeddings().requires_grad_(False)),
    "first_block": lambda m: m.model.layers[0].requires_grad_(False),
    "all_but_last_block": lambda m: (m.requires_grad_(False), m.model.layers[-1].requires_grad_(True)),
}


@pytest.mark.parametrize("frozen", list(FREEZE))
def test_partially_frozen_full_fine_tuning_equals_the_twin(frozen):
    """Freeze part of the model (no `enable_input_require_grads()`): every trainable tensor gets the twin's gradient."""
    rev, twin = make_lm_pair(num_hidden_layers=4, hidden_dropout=0.1, attention_dropout=0.1)
    FREEZE[frozen](rev), FREEZE[frozen](twin)
    backward_same_seed([rev, twin])
    assert_same_trainable_grads(rev, twin)


def test_seq2seq_frozen_embedding_equals_the_twin():
    rev, twin = make_seq2seq_pair(hidden_dropout=0.1)
    for m in (rev, twin):
        m.get_input_embeddings().requires_grad_(False)
        m.get_output_embeddings().requires_grad_(False)
    backward_same_seed([rev, twin], seq2seq=True)
    assert_same_trainable_grads(rev, twin)


def _inject_module_dropout(model):
    """A user's `nn.Dropout` after the attention output projection of every block (the config knows nothing)."""
    for block in model.model.layers:
        block.self_attn.o_proj = torch.nn.Sequential(block.self_attn.o_proj, torch.nn.Dropout(0.2))


def _inject_functional_dropout(model):
    """`F.dropout` on the feed-forward output through a forward hook (stochastic op outside any nn.Dropout)."""
    for block in model.model.layers:
        block.mlp.register_forward_hook(lambda mod, args, out: F.dropout(out, 0.2, training=mod.training))


@pytest.mark.parametrize("inject", [_inject_module_dropout, _inject_functional_dropout], ids=["module", "functional"])
def test_dropout_the_config_does_not_know_is_replayed(inject):
    rev, twin = make_lm_pair()  # config dropout 0
    inject(rev), inject(twin)
    twin.load_state_dict(rev.state_dict())
    l_rev, l_twin = backward_same_seed([rev, twin])
    assert abs(l_rev.item() - l_twin.item()) <= 1e-12 * abs(l_twin.item())
    report = compare_trainable_grads(rev, twin)
    assert not report["missing_rev"] and not report["missing_twin"]
    assert report["max_rel_err"] <= 1e-6, (report["max_rel_err"], report["worst"])
    rev.zero_grad()
    assert abs(backward_same_seed([rev], seed=4)[0].item() - l_rev.item()) > 1e-6  # the dropout is live


def test_lora_recipe_with_gradient_checkpointing_and_input_require_grads():
    """The usual PEFT recipe: `gradient_checkpointing_enable()` and `enable_input_require_grads()` before LoRA.

    (`prepare_model_for_kbit_training` makes the same two calls for a quantized model.)
    """
    rev, twin = make_lm_pair()
    for m in (rev, twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    p_rev, p_twin = lora_pair(rev, twin, dropout=0.1)
    backward_same_seed([p_rev, p_twin])
    assert_same_trainable_grads(p_rev, p_twin)
