"""Property-based: random small configs and input shapes give finite outputs of the right shape, or a clear error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reformer_rev import RevFormerConfig, RevFormerForCausalLM

CLEAR_ERRORS = (ValueError, TypeError)


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    return dict(
        vocab_size=draw(st.integers(2, 40)),
        hidden_size=heads * draw(st.sampled_from([2, 4, 8])),
        num_hidden_layers=draw(st.integers(1, 4)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=draw(st.integers(1, 24)),
        max_position_embeddings=draw(st.integers(1, 24)),
        hidden_dropout=draw(st.sampled_from([0.0, 0.2])),
        attention_dropout=draw(st.sampled_from([0.0, 0.2])),
        chunk_size_feed_forward=draw(st.integers(0, 5)),
        loss_chunk_size=draw(st.integers(0, 5)),
        reversible=draw(st.booleans()),
        hidden_act=draw(st.sampled_from(["silu", "gelu", "relu"])),
        attn_implementation=draw(st.sampled_from(["sdpa", "eager"])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=configs(),
    batch=st.integers(0, 3),
    seq=st.integers(0, 30),
    id_low=st.integers(-2, 0),
    id_high_extra=st.integers(0, 2),
    mask_kind=st.sampled_from(["none", "ok", "left_pad", "wrong_shape"]),
    with_labels=st.booleans(),
    train=st.booleans(),
)
def test_forward_backward_is_finite_or_raises_clearly(
    cfg, batch, seq, id_low, id_high_extra, mask_kind, with_labels, train
):
    model = RevFormerForCausalLM(RevFormerConfig(**cfg)).train(train)
    vocab = cfg["vocab_size"]
    ids = torch.randint(max(id_low, -1) if id_low < 0 else 0, vocab + id_high_extra, (batch, seq))
    kwargs = {"input_ids": ids}
    if mask_kind != "none":
        mask = torch.ones(batch, seq + (1 if mask_kind == "wrong_shape" else 0), dtype=torch.long)
        if mask_kind == "left_pad" and seq > 1:
            mask[:, : seq // 2] = 0
        kwargs["attention_mask"] = mask
    if with_labels:
        kwargs["labels"] = ids.clamp(0, vocab - 1)
    try:
        out = model(**kwargs)
    except CLEAR_ERRORS as err:
        assert str(err)  # a message, not an empty error
        return
    # reached only for valid input: check what would have been wrong otherwise
    assert batch > 0 and seq > 0 and seq <= cfg["max_position_embeddings"]
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab and mask_kind != "wrong_shape"
    if with_labels:
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    else:
        assert out.logits.shape == (batch, seq, vocab)
        assert torch.isfinite(out.logits).all()


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), prompt=st.integers(1, 6), new=st.integers(1, 8))
def test_generate_is_valid_or_raises_clearly(cfg, prompt, new):
    cfg = {**cfg, "vocab_size": max(cfg["vocab_size"], 3)}
    model = RevFormerForCausalLM(RevFormerConfig(**cfg)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, prompt))
    try:
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
    except CLEAR_ERRORS as err:
        assert "max_position_embeddings" in str(err)
        assert prompt + new > cfg["max_position_embeddings"]
        return
    assert prompt + new <= cfg["max_position_embeddings"]
    assert out.shape[1] <= prompt + new and int(out.max()) < cfg["vocab_size"]
