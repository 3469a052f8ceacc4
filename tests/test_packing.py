"""Packed (padding-free) batches: documents packed into one row attend only within themselves.

What padding-free collators pass (`DataCollatorWithFlattening`, TRL's `padding_free`/`packing`): `position_ids` that
restart at every document, and optionally the flash-attention varlen arguments (`cu_seq_lens_q/k`, `max_length_q/k`,
`seq_idx`). The reference is always each document run alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from client_models import seq2seq_config
from conftest import make_pair, max_grad_rel_err, rel_err, tiny_config
from reformer_rev import RevFormerForCausalLM, RevFormerForConditionalGeneration, RevFormerForSequenceClassification

LENGTHS = [(7, 5, 4), (3, 9, 4)]  # two rows of 16 tokens, three documents each


def _documents(seed: int = 0, lengths=LENGTHS, vocab: int = 48) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (n,), generator=g) for n in row] for row in lengths]


def _pack(docs: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, position_ids)` of the rows, each the concatenation of its documents."""
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    return ids, positions


def _boundaries(docs) -> torch.Tensor:
    lengths = torch.tensor([len(d) for row in docs for d in row])
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


def _packed_labels(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # As the collators do: the first token of a document is no target (it would be predicted from the previous one).
    return ids.masked_fill(positions == 0, -100)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("reversible", [True, False])
def test_packed_logits_equal_each_document_alone(implementation, reversible):
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(reversible=reversible)).eval()
    model.set_attn_implementation(implementation)
    docs = _documents()
    ids, positions = _pack(docs)
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        unpacked = model(ids).logits
    start = 0
    for row, row_docs in enumerate(docs):
        start = 0
        for doc in row_docs:
            with torch.no_grad():
                alone = model(doc[None]).logits[0]
            got = packed[row, start : start + len(doc)]
            assert (got - alone).abs().max().item() <= 1e-5
            if start:  # without the positions the documents attend to each other: this test can tell
                assert (unpacked[row, start : start + len(doc)] - alone).abs().max().item() > 1e-3
            start += len(doc)


def test_packed_gradients_equal_the_sum_over_documents_run_separately():
    """float64, through the reversible recompute: the packed batch's gradients are the sum of each document's (losses
    normalised by the batch's target count, as Trainer's `num_items_in_batch` does)."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=4, chunk_size_feed_forward=5)).double().train()
    docs = _documents(1)
    ids, positions = _pack(docs)
    labels = _packed_labels(ids, positions)
    count = int((labels[:, 1:] != -100).sum())
    model(ids, position_ids=positions, labels=labels, num_items_in_batch=count).loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for doc in (d for row in docs for d in row):
        model(doc[None], labels=doc[None], num_items_in_batch=count).loss.backward()
    for name, param in model.named_parameters():
        assert rel_err(packed[name], param.grad) <= 1e-10, name


def test_packed_reversible_gradients_equal_the_twin_with_dropout():
    rev, twin = make_pair(num_hidden_layers=6, hidden_dropout=0.1, attention_dropout=0.1, chunk_size_feed_forward=7)
    rev.train(), twin.train()
    ids, positions = _pack(_documents(2))
    labels = _packed_labels(ids, positions)
    for model in (rev, twin):
        torch.manual_seed(4)
        model(ids, position_ids=positions, labels=labels).loss.backward()
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-6, (err, name)


def test_varlen_kwargs_give_the_documents_and_are_checked():
    """TRL's padding-free batches carry `cu_seq_lens_q/k`, `max_length_q/k` and `seq_idx` next to `position_ids`: the
    boundaries alone pack the batch as well, and arguments that disagree are refused by name."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config()).eval()
    docs = _documents(3, lengths=[(7, 5, 4)])
    ids, positions = _pack(docs)
    cu = _boundaries(docs)
    seq_idx = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), cu.diff())[None]
    varlen = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7, seq_idx=seq_idx)
    with torch.no_grad():
        reference = model(ids, position_ids=positions).logits
        torch.testing.assert_close(model(ids, position_ids=positions, **varlen).logits, reference, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, **varlen).logits, reference, rtol=0, atol=0)  # positions derived
    bad = [
        (dict(varlen, cu_seq_lens_q=torch.tensor([0, 6, 16], dtype=torch.int32)), r"`cu_seq_lens_q` and `position_ids`"),
        (dict(varlen, cu_seq_lens_k=torch.tensor([0, 7, 20], dtype=torch.int32)), r"`cu_seq_lens_k` must increase.*16"),
        (dict(varlen, max_length_q=5), r"`max_length_q` must be an integer >= the longest packed document \(7\)"),
        (dict(varlen, seq_idx=torch.zeros(1, 16, dtype=torch.int32)), r"`seq_idx` disagrees"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            model(ids, position_ids=positions, **kwargs)
    with torch.no_grad(), pytest.raises(ValueError, match=r"cannot be combined with a generation cache"):
        cache = DynamicCache(config=model.config)
        model(ids[:, :4], cache=cache)
        step = torch.tensor([0, 1], dtype=torch.int32)
        model(ids[:, 4:5], cache=cache, cu_seq_lens_q=step, cu_seq_lens_k=step)


def test_generation_positions_of_a_padded_prompt_are_not_documents():
    """generate() passes `position_ids` of a left-padded prompt that jump over the padding (`[1, 1, 0, 1, 2]`): with a
    padding mask the positions are compared over real tokens only, so the prompt stays one document."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config()).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = ids.ne(0).long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=positions).logits[0, 2:],
            model(ids[:1, 2:]).logits[0], rtol=1e-5, atol=1e-6,
        )


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=None,
                                cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """What a flash-attention varlen kernel computes, in plain torch: the batch flattened to one stream of tokens,
    attention within each `[cu[i], cu[i+1])` only. Registered below as an attention implementation whose mask builder
    is flash attention's, so the model takes its flash path."""
    assert attention_mask is None and cu_seq_lens_q is not None and cu_seq_lens_k is not None
    assert max_length_q == int(cu_seq_lens_q.diff().max()) and max_length_k == int(cu_seq_lens_k.diff().max())
    _reference_varlen_attention.calls += 1
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], dim) for t in (query, key, value)]
    out = torch.empty_like(flat[0])
    for i in range(len(cu_seq_lens_q) - 1):
        qs, ks = slice(cu_seq_lens_q[i], cu_seq_lens_q[i + 1]), slice(cu_seq_lens_k[i], cu_seq_lens_k[i + 1])
        q, k, v = flat[0][qs].transpose(0, 1), flat[1][ks].transpose(0, 1), flat[2][ks].transpose(0, 1)
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        out[qs] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=bool(is_causal), scale=scaling
        ).transpose(0, 1)
    return out.view(batch, q_len, heads, dim), None


_reference_varlen_attention.calls = 0


@pytest.fixture
def varlen_implementation():
    AttentionInterface.register("varlen_reference", _reference_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen_reference", flash_attention_mask)
    yield "varlen_reference"


def test_flash_attention_path_gets_the_varlen_boundaries(varlen_implementation):
    """Under flash attention a packed batch reaches the kernel as `cu_seq_lens_q/k` and `max_length_q/k` (no mask):
    checked with a plain-torch varlen kernel registered under flash attention's mask builder (no GPU here)."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config()).eval()
    docs = _documents(5)
    ids, positions = _pack(docs)
    with torch.no_grad():
        reference = model(ids, position_ids=positions).logits
        model.set_attn_implementation(varlen_implementation)
        calls = _reference_varlen_attention.calls
        got = model(ids, position_ids=positions).logits
    assert _reference_varlen_attention.calls - calls == model.config.num_hidden_layers
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"packed batch with padding cannot run with 'varlen_reference'"):
        model(ids, position_ids=positions, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([15]), 0))


@pytest.mark.slow
def test_flex_attention_keeps_packed_documents_apart():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    docs = _documents(6, lengths=[(7, 5, 4)])
    ids, positions = _pack(docs)
    with torch.no_grad():
        reference = model(ids, position_ids=positions).logits
        model.set_attn_implementation("flex_attention")
        torch.testing.assert_close(model(ids, position_ids=positions).logits, reference, rtol=1e-5, atol=1e-5)


def test_sequence_classifier_accepts_a_packed_batch():
    torch.manual_seed(0)
    model = RevFormerForSequenceClassification(tiny_config(num_labels=3)).eval()
    docs = _documents(7, lengths=[(7, 9)])
    ids, positions = _pack(docs)
    cu = _boundaries(docs)
    with torch.no_grad():
        hidden = model.model(ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu).last_hidden_state
        alone = model.model(docs[0][1][None]).last_hidden_state
    assert (hidden[0, 7:] - alone[0]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# Encoder-decoder
# --------------------------------------------------------------------------------------------------------------


def _seq2seq_pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randint(3, 48, (n,), generator=g) for n in (6, 4, 7)]
    targets = [torch.randint(3, 48, (n,), generator=g) for n in (5, 6, 3)]
    return sources, targets


def _packed_pair_inputs(sources, targets):
    src, src_pos = _pack([sources])
    tgt, tgt_pos = _pack([targets])
    return dict(input_ids=src, position_ids=src_pos, labels=tgt, decoder_position_ids=tgt_pos)


@pytest.mark.parametrize("reversible", [True, False])
def test_packed_seq2seq_pairs_equal_each_pair_alone(reversible):
    """Each packed source attends within itself, each target to itself and its own source only; `labels` are shifted
    per document (every target starts with the decoder start token)."""
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config(reversible=reversible)).eval()
    sources, targets = _seq2seq_pairs()
    with torch.no_grad():
        packed = model(**_packed_pair_inputs(sources, targets))
    s0 = t0 = 0
    for src, tgt in zip(sources, targets):
        with torch.no_grad():
            alone = model(input_ids=src[None], labels=tgt[None])
        got_enc = packed.encoder_last_hidden_state[0, s0 : s0 + len(src)]
        assert (got_enc - alone.encoder_last_hidden_state[0]).abs().max().item() <= 1e-5
        assert (packed.logits[0, t0 : t0 + len(tgt)] - alone.logits[0]).abs().max().item() <= 1e-5
        s0, t0 = s0 + len(src), t0 + len(tgt)


def test_packed_seq2seq_gradients_equal_the_sum_over_pairs():
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config()).double().train()
    sources, targets = _seq2seq_pairs(1)
    count = sum(len(t) for t in targets)
    model(**_packed_pair_inputs(sources, targets), num_items_in_batch=count).loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for src, tgt in zip(sources, targets):
        model(input_ids=src[None], labels=tgt[None], num_items_in_batch=count).loss.backward()
    for name, param in model.named_parameters():
        assert rel_err(packed[name], param.grad) <= 1e-10, name


def test_seq2seq_packing_must_pack_both_sides_alike():
    model = RevFormerForConditionalGeneration(seq2seq_config()).eval()
    sources, targets = _seq2seq_pairs()
    inputs = _packed_pair_inputs(sources, targets)
    with pytest.raises(ValueError, match=r"`position_ids` mark a packed batch .* but `decoder_position_ids` do not"):
        model(**{**inputs, "decoder_position_ids": None})
    with pytest.raises(ValueError, match=r"`decoder_position_ids` mark a packed batch .* but `position_ids` do not"):
        model(**{**inputs, "position_ids": None})
    two_targets = _packed_pair_inputs(sources, [torch.cat(targets[:2]), targets[2]])
    with pytest.raises(ValueError, match=r"as many source as target documents, got \[3\] source and \[2\] target"):
        model(**{**inputs, "labels": two_targets["labels"], "decoder_position_ids": two_targets["decoder_position_ids"]})


def test_flash_attention_path_packs_seq2seq_pairs(varlen_implementation):
    """Encoder (bidirectional), decoder self-attention (causal) and cross-attention (target document k to source
    document k: different boundaries for queries and keys) all reach the varlen kernel as boundaries."""
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config()).eval()
    inputs = _packed_pair_inputs(*_seq2seq_pairs(2))
    with torch.no_grad():
        reference = model(**inputs).logits
        model.set_attn_implementation(varlen_implementation)
        calls = _reference_varlen_attention.calls
        got = model(**inputs).logits
    config = model.config
    assert _reference_varlen_attention.calls - calls == config.encoder_layers + 2 * config.decoder_layers
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
