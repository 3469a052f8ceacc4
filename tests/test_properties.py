"""Property-based: over random small configs and random (good or bad) arguments, every call gives a clear error or a
valid output.

A clear error is a `ValueError`/`TypeError` that names one of the arguments that were actually wrong. A valid output
is finite and of the right shape; an argument in a harmless variant (int32/uint8 ids, a bool or 0/1 float mask, int32
labels) may be refused clearly or accepted, and if accepted must give exactly what the canonical form gives. A valid
call that raises fails the test too. (eval/fuzz_inputs.py measures the same rule over a fixed list of ~670 cases.)
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reformer_rev import RevFormerConfig, RevFormerForCausalLM

CLEAR_ERRORS = (ValueError, TypeError)
# Extra words an error may use for an argument (a too-long input is reported against the position limit).
ALIASES = {"input_ids": ("input_ids", "max_position_embeddings"), "max_new_tokens": ("max_new_tokens", "max_position_embeddings")}


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    return dict(
        vocab_size=draw(st.integers(3, 40)),
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


def assert_clear(err: Exception, bad: set[str], harmless: set[str] = frozenset()) -> None:
    """`err` must be a clear error naming an invalid argument (or a harmless variant the model chose to refuse)."""
    suspects = bad | harmless
    assert suspects, f"a valid call was refused: {type(err).__name__}: {err}"
    names = {n for arg in suspects for n in ALIASES.get(arg, (arg,))}
    assert isinstance(err, CLEAR_ERRORS) and any(n in str(err) for n in names), (
        f"not a clear error for {sorted(suspects)}: {type(err).__name__}: {err}"
    )


ID_DTYPES = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "int16": torch.int16,
             "float32": torch.float32}
MASKS = ["none", "ones", "left_pad", "bool", "float_binary", "wrong_length", "value_2", "value_-1", "value_0.5"]
LABELS = ["none", "same", "ignore_some", "int32", "float", "vocab", "negative"]


def build_mask(kind: str, batch: int, seq: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(batch, seq + (1 if kind == "wrong_length" else 0), dtype=torch.long)
    if kind in ("left_pad", "bool", "float_binary") and seq > 1:
        mask[:, : seq // 2] = 0
    if kind.startswith("value_") and mask.numel():
        mask = mask.float() if kind == "value_0.5" else mask
        mask[0, -1] = float(kind.removeprefix("value_"))
    return {"bool": mask.bool(), "float_binary": mask.float()}.get(kind, mask)


def canonical_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.long()


def build_labels(kind: str, ids: torch.Tensor, vocab: int) -> torch.Tensor | None:
    labels = ids.long().clamp(0, vocab - 1)
    if kind == "none":
        return None
    if kind == "ignore_some" and labels.numel():
        labels[:, :1] = -100
    if kind in ("vocab", "negative") and labels.numel():
        labels[0, -1] = vocab if kind == "vocab" else -5
    return {"int32": labels.int(), "float": labels.float()}.get(kind, labels)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], report_multiple_bugs=False)
@given(
    cfg=configs(),
    batch=st.integers(0, 3),
    seq=st.integers(0, 30),
    out_of_vocab=st.sampled_from([None, -1, "vocab"]),
    id_dtype=st.sampled_from(list(ID_DTYPES)),
    mask_kind=st.sampled_from(MASKS),
    label_kind=st.sampled_from(LABELS),
    train=st.booleans(),
)
def test_forward_backward_is_valid_or_raises_clearly(cfg, batch, seq, out_of_vocab, id_dtype, mask_kind, label_kind,
                                                     train):
    model = RevFormerForCausalLM(RevFormerConfig(**cfg)).train(train)
    vocab = cfg["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq))
    if out_of_vocab is not None and ids.numel():
        ids[-1, -1] = vocab if out_of_vocab == "vocab" else out_of_vocab
    mask = build_mask(mask_kind, batch, seq)
    labels = build_labels(label_kind, ids, vocab)
    kwargs = {"input_ids": ids.to(ID_DTYPES[id_dtype]), "attention_mask": mask, "labels": labels}

    bad = set()
    if batch == 0 or seq == 0 or seq > cfg["max_position_embeddings"] or out_of_vocab is not None:
        bad.add("input_ids")
    if id_dtype == "float32" or (id_dtype == "uint8" and out_of_vocab == -1):  # -1 does not survive uint8
        bad.add("input_ids")
    if mask_kind in ("wrong_length", "value_2", "value_-1", "value_0.5"):
        bad.add("attention_mask")
    if label_kind in ("float", "vocab", "negative"):
        bad.add("labels")
    harmless = {name for name, variant in (("input_ids", id_dtype in ("int32", "uint8", "int16")),
                                           ("attention_mask", mask_kind in ("bool", "float_binary")),
                                           ("labels", label_kind == "int32")) if variant}

    def run(**kw):
        torch.manual_seed(0)  # the same dropout masks for the canonical call
        out = model(**kw)
        if kw["labels"] is not None:
            out.loss.backward()
        return out

    try:
        out = run(**kwargs)
    except Exception as err:  # noqa: BLE001
        assert_clear(err, bad, harmless)
        return
    assert not bad, f"invalid {sorted(bad)} accepted"
    if labels is not None:
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        result = out.loss
    else:
        assert out.logits.shape == (batch, seq, vocab)
        assert torch.isfinite(out.logits).all()
        result = out.logits
    if harmless:  # accepted: it must be exactly the canonical call
        model.zero_grad(set_to_none=True)
        canonical = {"input_ids": ids, "attention_mask": canonical_mask(mask),
                     "labels": None if labels is None else labels.long()}
        expected = run(**canonical)
        torch.testing.assert_close(result, expected.loss if labels is not None else expected.logits, rtol=0, atol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], report_multiple_bugs=False)
@given(
    cfg=configs(),
    batch=st.integers(1, 2),
    prompt=st.integers(1, 6),
    new=st.integers(-1, 8),
    num_beams=st.integers(1, 3),
    pad_left=st.booleans(),
    out_of_vocab=st.booleans(),
)
def test_generate_is_valid_or_raises_clearly(cfg, batch, prompt, new, num_beams, pad_left, out_of_vocab):
    model = RevFormerForCausalLM(RevFormerConfig(**cfg)).double().eval()
    vocab, limit = cfg["vocab_size"], cfg["max_position_embeddings"]
    ids = torch.randint(1, vocab, (batch, prompt))
    mask = torch.ones_like(ids)
    if pad_left and batch > 1 and prompt > 1:
        mask[0, : prompt // 2] = 0
        ids = ids.masked_fill(mask == 0, 0)
    if out_of_vocab:
        ids[-1, -1] = vocab
    bad = set()
    if new <= 0 or prompt + new > limit:
        bad.add("max_new_tokens")
    if out_of_vocab:
        bad.add("input_ids")
    kw = dict(attention_mask=mask, max_new_tokens=new, num_beams=num_beams, do_sample=False, pad_token_id=0)
    try:
        out = model.generate(ids, **kw)
    except Exception as err:  # noqa: BLE001
        assert_clear(err, bad)
        return
    assert not bad, f"invalid {sorted(bad)} accepted"
    assert out.shape[0] == batch and prompt < out.shape[1] <= prompt + new
    assert int(out.min()) >= 0 and int(out.max()) < vocab
    # The cache changes nothing but speed: the uncached search picks the very same tokens.
    assert torch.equal(out, model.generate(ids, use_cache=False, **kw))
