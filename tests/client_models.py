"""Tiny models, a real tokenizer and gradient comparisons shared by the client test suites (`test_clients_*.py`).

The client tests drive the models through the code `transformers` users run (Trainer, PEFT, pipeline, generate,
lm_eval). Gradients are compared with the ordinary-autograd twin (`reversible=False`, same modules, same weights) in
float64; discrete outputs (tokens) are compared in float64 as well, so that a rounding difference cannot flip an argmax.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from conftest import make_pair, rel_err, tiny_config
from reformer_rev import RevFormerConfig, RevFormerForCausalLM, RevFormerForConditionalGeneration
from reformer_rev.training.tokenization import build_byte_tokenizer

# The byte tokenizer of training/: ids 0-255 are bytes, then <pad>=256, <s>=257, </s>=258, <unk>=259.
BYTE_VOCAB, PAD, BOS, EOS = 260, 256, 257, 258


def byte_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    tok = build_byte_tokenizer(model_max_length=128)
    tok.padding_side = padding_side
    return tok


def byte_lm_config(**overrides) -> RevFormerConfig:
    """A causal LM config matching the byte tokenizer."""
    kw = dict(vocab_size=BYTE_VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=128)
    return tiny_config(**{**kw, **overrides})


def seq2seq_config(**overrides) -> RevFormerConfig:
    kw = dict(
        vocab_size=48, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        encoder_layers=2, decoder_layers=3, max_position_embeddings=128, is_encoder_decoder=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    return RevFormerConfig(**{**kw, **overrides})


def make_lm_pair(**overrides) -> tuple[RevFormerForCausalLM, RevFormerForCausalLM]:
    """Reversible causal LM and its twin, float64, same weights (config dropout 0 unless overridden)."""
    return make_pair(torch.float64, 0, RevFormerForCausalLM, tiny_config, **overrides)


def make_seq2seq_pair(**overrides) -> tuple[RevFormerForConditionalGeneration, RevFormerForConditionalGeneration]:
    return make_pair(torch.float64, 0, RevFormerForConditionalGeneration, seq2seq_config, **overrides)


def lm_batch(vocab: int = 48, batch: int = 3, length: int = 24, seed: int = 5):
    """Ids, mask and labels with left padding in row 1 and right padding in row 2 (-100 on padded labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, -7:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def seq2seq_batch(vocab: int = 48, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (3, 15), generator=g)
    mask = torch.ones_like(src)
    mask[1, :4] = 0
    mask[2, -5:] = 0
    src = src.masked_fill(mask == 0, 0)
    labels = torch.randint(3, vocab, (3, 11), generator=g)
    labels[0, -3:] = -100
    labels[2, -6:] = -100
    return src, mask, labels


def compare_trainable_grads(rev: torch.nn.Module, twin: torch.nn.Module) -> dict:
    """Per trainable parameter: does each model have a gradient, and how far apart are they.

    Returns `{"trainable": n, "missing_rev": [...], "missing_twin": [...], "max_rel_err": e, "worst": name}`; a
    parameter that is trainable in one model must be trainable in the other.
    """
    report = {"trainable": 0, "missing_rev": [], "missing_twin": [], "max_rel_err": 0.0, "worst": ""}
    named_twin = dict(twin.named_parameters())
    for name, p in rev.named_parameters():
        q = named_twin[name]
        assert p.requires_grad == q.requires_grad, name
        if not p.requires_grad:
            assert p.grad is None and q.grad is None, f"frozen {name} got a gradient"
            continue
        report["trainable"] += 1
        if q.grad is None:
            report["missing_twin"].append(name)
        if p.grad is None:
            report["missing_rev"].append(name)
        if p.grad is not None and q.grad is not None:
            e = rel_err(p.grad, q.grad)
            if e > report["max_rel_err"]:
                report["max_rel_err"], report["worst"] = e, name
    return report


def assert_same_trainable_grads(rev: torch.nn.Module, twin: torch.nn.Module, tol: float = 1e-6) -> dict:
    report = compare_trainable_grads(rev, twin)
    assert report["trainable"] > 0
    assert not report["missing_twin"], f"the twin left {report['missing_twin']} without gradient"
    assert not report["missing_rev"], (
        f"{len(report['missing_rev'])} of {report['trainable']} trainable tensors got no gradient from the reversible "
        f"model (the twin gives all of them one), e.g. {report['missing_rev'][:3]}"
    )
    assert report["max_rel_err"] <= tol, (report["max_rel_err"], report["worst"])
    return report
