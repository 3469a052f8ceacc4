"""Reversible encoder-decoder: gradients equal the twin's, caches equal full decoding, generate() and remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, EncoderDecoderCache

from conftest import make_pair, max_grad_rel_err, rel_err
from reformer_rev import RevFormerConfig, RevFormerForConditionalGeneration
from reformer_rev.modeling_reformer_rev_seq2seq import shift_tokens_right

VOCAB = 48


def seq2seq_config(**overrides) -> RevFormerConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        encoder_layers=3,
        decoder_layers=4,
        max_position_embeddings=128,
        is_encoder_decoder=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return RevFormerConfig(**kwargs)


def make_seq2seq_pair(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    return make_pair(dtype, seed, RevFormerForConditionalGeneration, seq2seq_config, **overrides)


@pytest.fixture
def padded_pairs():
    """Source with left and right padding, targets of different lengths (right padded, -100 in the labels)."""
    g = torch.Generator().manual_seed(7)
    src = torch.randint(3, VOCAB, (3, 17), generator=g)
    src_mask = torch.ones_like(src)
    src_mask[1, :4] = 0
    src_mask[2, -6:] = 0
    src = src.masked_fill(src_mask == 0, 0)
    labels = torch.randint(3, VOCAB, (3, 13), generator=g)
    labels[0, -3:] = -100
    labels[2, -7:] = -100
    return src, src_mask, labels


DEEP = dict(encoder_layers=6, decoder_layers=8, hidden_dropout=0.1, attention_dropout=0.1, chunk_size_feed_forward=5,
            loss_chunk_size=4)


def _loss(model, src, mask, labels, seed):
    torch.manual_seed(seed)
    return model(input_ids=src, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("tie", [False, True])
def test_float64_gradient_parity_with_twin(padded_pairs, tie):
    src, mask, labels = padded_pairs
    rev, twin = make_seq2seq_pair(tie_word_embeddings=tie, **DEEP)
    rev.train(), twin.train()
    l_rev, l_twin = _loss(rev, src, mask, labels, 3), _loss(twin, src, mask, labels, 3)
    assert torch.isfinite(l_rev)
    assert abs(l_rev.item() - l_twin.item()) <= 1e-12 * abs(l_twin.item())
    l_rev.backward(), l_twin.backward()
    err, name = max_grad_rel_err(rev, twin)  # asserts every parameter (encoder and decoder) has a gradient
    assert err <= 1e-6, (err, name)
    names = [n for n, _ in rev.named_parameters()]
    assert any(n.startswith("model.encoder.layers.5.") for n in names)
    assert any("decoder.layers.7.cross_attn" in n for n in names)
    # the encoder is trained only through the cross-attention: its gradient really flows
    assert rev.model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # dropout was active: eval mode gives another loss
    rev.eval()
    with torch.no_grad():
        assert abs(rev(input_ids=src, attention_mask=mask, labels=labels).loss.item() - l_rev.item()) > 1e-6


def test_encoder_output_gradient_accumulates_over_decoder_blocks(padded_pairs):
    """Gradient w.r.t. a given encoder output (the engine's differentiable kwarg) equals plain autograd's."""
    src, mask, labels = padded_pairs
    rev, twin = make_seq2seq_pair(**DEEP)
    rev.train(), twin.train()
    with torch.no_grad():
        enc = rev.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
    grads = []
    for model in (rev, twin):
        e = enc.clone().requires_grad_(True)
        torch.manual_seed(9)
        model(encoder_outputs=(e,), attention_mask=mask, labels=labels).loss.backward()
        grads.append(e.grad)
    assert grads[1].abs().sum() > 0
    assert rel_err(grads[0], grads[1]) <= 1e-6
    assert max_grad_rel_err(rev, twin, skip=tuple(n for n, _ in rev.named_parameters() if ".encoder." in n))[0] <= 1e-6


def test_labels_are_shifted_into_decoder_inputs():
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    assert shift_tokens_right(labels, 0, 1).tolist() == [[1, 5, 6, 7], [1, 8, 9, 0]]
    rev, _ = make_seq2seq_pair()
    rev.eval()
    src = torch.randint(3, VOCAB, (2, 5))
    labels = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        a = rev(input_ids=src, labels=labels, return_logits=True)
        b = rev(input_ids=src, decoder_input_ids=shift_tokens_right(labels, 0, 1))
        ce = torch.nn.functional.cross_entropy(b.logits.reshape(-1, VOCAB), labels.reshape(-1))
    assert torch.allclose(a.logits, b.logits)
    assert a.loss.item() == pytest.approx(ce.item(), rel=1e-12)


def test_label_smoothing_in_the_chunked_loss(padded_pairs):
    """The chunked loss's label smoothing equals `F.cross_entropy(label_smoothing=...)` on full logits, and the
    reversible gradients still equal the twin's (float64, dropout on, loss chunks of 4 positions)."""
    src, mask, labels = padded_pairs
    rev, twin = make_seq2seq_pair(**DEEP)
    rev.eval()
    with torch.no_grad():
        out = rev(input_ids=src, attention_mask=mask, labels=labels, label_smoothing=0.2, return_logits=True)
        full = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1),
                                                 label_smoothing=0.2)
        plain = rev(input_ids=src, attention_mask=mask, labels=labels).loss
    assert out.loss.item() == pytest.approx(full.item(), rel=1e-12) and abs(out.loss.item() - plain.item()) > 1e-3
    rev.train(), twin.train()
    losses = []
    for model in (rev, twin):
        torch.manual_seed(3)
        loss = model(input_ids=src, attention_mask=mask, labels=labels, label_smoothing=0.2).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert max_grad_rel_err(rev, twin)[0] <= 1e-6


def test_cached_incremental_decoding_equals_full_decoding(padded_pairs):
    src, mask, _ = padded_pairs
    rev, _ = make_seq2seq_pair()
    rev.eval()
    dec = torch.randint(3, VOCAB, (3, 9))
    dec[:, 0] = 1
    with torch.no_grad():
        full = rev(input_ids=src, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        enc = rev.get_encoder()(input_ids=src, attention_mask=mask)
        cache, steps = None, []
        for t in range(dec.shape[1]):
            out = rev(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t : t + 1],
                      past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        # prefill of several tokens, then one more, also matches
        pre = rev(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :5], use_cache=True)
        nxt = rev(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, 5:6],
                  past_key_values=pre.past_key_values, use_cache=True)
    assert isinstance(cache, EncoderDecoderCache)
    assert cache.get_seq_length() == dec.shape[1]
    # cross-attention keys/values were projected once and reused: their length is the source length
    assert cache.cross_attention_cache.get_seq_length(0) == src.shape[1]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-12
    assert (pre.logits - full[:, :5]).abs().max().item() <= 1e-12
    assert (nxt.logits - full[:, 5:6]).abs().max().item() <= 1e-12


def test_generate_greedy_and_beam(padded_pairs):
    src, mask, _ = padded_pairs
    rev, twin = make_seq2seq_pair(seed=1)
    rev.eval(), twin.eval()
    kw = dict(input_ids=src, attention_mask=mask, max_new_tokens=8, min_new_tokens=8)
    greedy = rev.generate(**kw, do_sample=False)
    greedy_nocache = rev.generate(**kw, do_sample=False, use_cache=False)
    assert greedy.shape == (3, 9) and (greedy[:, 0] == 1).all()
    assert torch.equal(greedy, greedy_nocache)
    # greedy output is the argmax of a full teacher-forced forward on its own prefix
    with torch.no_grad():
        logits = rev(input_ids=src, attention_mask=mask, decoder_input_ids=greedy[:, :-1]).logits
    assert torch.equal(logits.argmax(-1), greedy[:, 1:])

    beam = rev.generate(**kw, num_beams=4, num_return_sequences=2)
    assert beam.shape[0] == 6
    assert torch.equal(beam, twin.generate(**kw, num_beams=4, num_return_sequences=2))
    assert torch.equal(beam, rev.generate(**kw, num_beams=4, num_return_sequences=2, use_cache=False))
    # beam search scores its best hypothesis at least as high as greedy's
    out_b = rev.generate(**kw, num_beams=4, output_scores=True, return_dict_in_generate=True, length_penalty=0.0)
    with torch.no_grad():
        def logprob(seqs):
            lp = rev(input_ids=src, attention_mask=mask, decoder_input_ids=seqs[:, :-1]).logits.log_softmax(-1)
            return lp.gather(-1, seqs[:, 1:, None]).squeeze(-1).sum(-1)
        assert (logprob(out_b.sequences) >= logprob(greedy) - 1e-9).all()


def test_training_with_cache_request_is_safe(padded_pairs):
    """use_cache=True under grad with a reversible model is ignored (the recompute would append twice)."""
    src, mask, labels = padded_pairs
    rev, _ = make_seq2seq_pair()
    out = rev(input_ids=src, attention_mask=mask, labels=labels, use_cache=True)
    assert out.past_key_values is None
    out.loss.backward()


def test_config_fields_and_validation():
    lm = RevFormerConfig()
    assert (lm.is_encoder_decoder, lm.decoder_start_token_id) == (False, None)
    assert lm.encoder_layers == lm.decoder_layers == lm.num_hidden_layers
    cfg = seq2seq_config(encoder_layers=2, decoder_layers=5)
    assert cfg.decoder_start_token_id == cfg.bos_token_id
    # generate() builds its caches from the decoder view of the config: one layer per decoder block
    assert cfg.get_text_config(decoder=True).num_hidden_layers == 5
    for field, value in (("encoder_layers", 0), ("decoder_layers", -1), ("decoder_start_token_id", VOCAB)):
        with pytest.raises(ValueError, match=field):
            seq2seq_config(**{field: value})
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        RevFormerForConditionalGeneration(seq2seq_config(bos_token_id=None))
    m = RevFormerForConditionalGeneration(cfg)
    assert len(m.model.encoder.layers) == 2 and len(m.model.decoder.layers) == 5
    with pytest.raises(ValueError, match="decoder_input_ids"):
        m(input_ids=torch.ones(1, 3, dtype=torch.long), decoder_input_ids=torch.full((1, 2), VOCAB))


@pytest.mark.slow  # a fresh interpreter importing transformers: ~20 s on a loaded 2-core machine
def test_auto_class_save_load_and_remote_code(tmp_path, padded_pairs):
    src, mask, _ = padded_pairs
    rev, _ = make_seq2seq_pair(dtype=torch.float32, seed=2, tie_word_embeddings=True)
    rev.eval()
    expected = rev.generate(input_ids=src, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, num_beams=3)
    rev.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"modeling_reformer_rev_seq2seq.py", "modeling_reformer_rev.py", "reversible.py"} <= files
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSeq2SeqLM"].endswith("RevFormerForConditionalGeneration")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(loaded) is RevFormerForConditionalGeneration
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(loaded.generate(input_ids=src, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                       num_beams=3), expected)

    # A fresh interpreter where the package cannot be imported: only the copied remote code can build the model.
    (tmp_path / "io.json").write_text(json.dumps({"src": src.tolist(), "mask": mask.tolist()}))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["reformer_rev"] = None
        import torch
        from transformers import AutoModelForSeq2SeqLM
        path = {str(tmp_path)!r}
        io = json.load(open(path + "/io.json"))
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("reformer_rev"), type(model).__module__
        out = model.generate(input_ids=torch.tensor(io["src"]), attention_mask=torch.tensor(io["mask"]),
                             max_new_tokens=6, min_new_tokens=6, num_beams=3)
        print(json.dumps({{"module": type(model).__module__, "out": out.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "transformers_modules" in result["module"]
    assert result["out"] == expected.tolist()
