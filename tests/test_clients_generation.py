"""Generation through the clients users run: `generate()` strategies, `pipeline`, `Seq2SeqTrainer`, output formats.

Every decoding strategy is run with the key/value cache and without it: `generate()` hands the cache to `forward`
under a name that changed between transformers releases (`past_key_values=` up to 5.23, `cache=` from 5.24), and a
model that misses it silently decodes every step from a single token. Without the cache each step is a full forward
over the whole prefix, so the two must agree: the per-step scores to float64 rounding, the tokens exactly.
These tests run against the newest and the lowest transformers release the project admits (`make test-lowest`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    pipeline,
)

from client_models import (
    PAD,
    byte_lm_config,
    byte_tokenizer,
    seq2seq_batch,
    seq2seq_config,
)
from conftest import rel_err, tiny_config
from reformer_rev import RevFormerForCausalLM, RevFormerForConditionalGeneration

NEW = 8


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return RevFormerForCausalLM(tiny_config(eos_token_id=None)).double().eval()


@pytest.fixture(scope="module")
def s2s():
    torch.manual_seed(0)
    return RevFormerForConditionalGeneration(seq2seq_config(eos_token_id=None)).double().eval()


def _lm_inputs():
    ids = torch.randint(3, 48, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # generation pads on the left
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _s2s_inputs():
    src, mask, _ = seq2seq_batch()
    return {"input_ids": src, "attention_mask": mask}


def _generate_both(model, inputs, **kw):
    """`generate()` with and without the cache, returning the two `GenerateOutput`s (with scores)."""
    kw = {"max_new_tokens": NEW, "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True, **kw}
    seed = kw.pop("seed", None)
    outs = []
    for use_cache in (True, False):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model.generate(**inputs, use_cache=use_cache, **kw))
    return outs


STRATEGIES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9, seed=11),
}


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_cached_and_uncached_decoding_agree(lm, s2s, which, strategy):
    model, inputs = (lm, _lm_inputs()) if which == "causal" else (s2s, _s2s_inputs())
    cached, uncached = _generate_both(model, inputs, **STRATEGIES[strategy])
    assert len(cached.scores) == len(uncached.scores) == NEW
    for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
        finite = torch.isfinite(b)  # top-k / beam processors put -inf in the same places
        assert torch.equal(torch.isfinite(a), finite), step
        assert rel_err(a[finite], b[finite]) <= 1e-9, f"step {step}: cached scores differ from a full forward"
    assert torch.equal(cached.sequences, uncached.sequences)


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
def test_assisted_decoding_with_the_model_as_its_own_assistant(lm, s2s, which):
    model, inputs = (lm, _lm_inputs()) if which == "causal" else (s2s, _s2s_inputs())
    # Assisted generation decodes one row at a time.
    inputs = {k: v[1:2] for k, v in inputs.items()}
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assisted = model.generate(**inputs, assistant_model=model, **kw)
        reference = model.generate(**inputs, use_cache=False, **kw)
    assert assisted.shape[1] == reference.shape[1]
    assert torch.equal(assisted, reference)


def test_text_generation_pipeline_batched_left_padding_equals_one_by_one():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(byte_lm_config()).double().eval()
    tok = byte_tokenizer(padding_side="left")
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    prompts = ["In the beginning", "And God said", "Let there be light, and there was"]
    kw = dict(max_new_tokens=NEW, do_sample=False, return_tensors=True, pad_token_id=PAD)
    batched = pipe(prompts, batch_size=3, **kw)
    for prompt, out in zip(prompts, batched):
        single = pipe(prompt, **kw)[0]["generated_token_ids"]
        # The batched row keeps its left padding, and is right-padded after an early end-of-sequence.
        batched_ids = [int(t) for t in out[0]["generated_token_ids"]]
        first = next(i for i, t in enumerate(batched_ids) if t != PAD)
        last = len(batched_ids) - next(i for i, t in enumerate(reversed(batched_ids)) if t != PAD)
        batched_ids = batched_ids[first:last]
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            reference = model.generate(ids, use_cache=False, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
        assert batched_ids == list(single) == reference[0].tolist(), prompt


def test_seq2seq_trainer_predict_with_generate(tmp_path):
    src, mask, labels = seq2seq_batch()
    torch.manual_seed(1)
    model = RevFormerForConditionalGeneration(seq2seq_config(eos_token_id=None))
    rows = [{"input_ids": s, "attention_mask": m, "labels": y} for s, m, y in zip(src, mask, labels)]
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, predict_with_generate=True,
        generation_max_length=NEW + 1, generation_num_beams=2, report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=args)
    pred = trainer.predict(rows)
    model.eval()
    with torch.no_grad():
        expected = model.generate(input_ids=src, attention_mask=mask, max_length=NEW + 1, num_beams=2)
        uncached = model.generate(input_ids=src, attention_mask=mask, max_length=NEW + 1, num_beams=2, use_cache=False)
    assert torch.equal(expected, uncached)
    # The Trainer pads the generated rows to the model's generation_config.max_length with the pad id.
    width = expected.shape[1]
    assert pred.predictions.shape[0] == 3 and pred.predictions.shape[1] >= width
    assert (pred.predictions[:, :width] == expected.numpy()).all()
    assert (pred.predictions[:, width:] == model.config.pad_token_id).all()
    assert pred.metrics["test_loss"] > 0


# --------------------------------------------------------------------------------------------------------------
# Output conventions clients index into
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
def test_return_dict_false_tuple_is_loss_then_logits(lm, s2s, which):
    if which == "causal":
        model, inputs = lm, _lm_inputs()
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    else:
        model, inputs = s2s, _s2s_inputs()
        inputs["labels"] = seq2seq_batch()[2]
    with torch.no_grad():
        ref = model(**inputs)  # ModelOutput
        out = model(**inputs, return_dict=False)
    assert isinstance(out, tuple)
    assert out[0].dim() == 0 and torch.equal(out[0], ref.loss)
    assert ref.logits is not None, "eval mode with labels: the logits must come with the loss (Trainer, lm_eval)"
    assert out[1].shape == (*inputs["labels"].shape, model.config.vocab_size)
    assert torch.equal(out[1], ref.logits)


def test_output_attentions_eager_returns_causal_maps():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(attn_implementation="eager")).double().eval()
    inputs = _lm_inputs()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    cfg, mask = model.config, inputs["attention_mask"]
    assert out.attentions is not None and len(out.attentions) == cfg.num_hidden_layers
    for a in out.attentions:
        assert a.shape == (*mask.shape[:1], cfg.num_attention_heads, mask.shape[1], mask.shape[1])
        real_query = mask.bool()[:, None, :, None].expand_as(a)
        padded_key = (mask == 0)[:, None, None, :].expand_as(a)
        row_sums = a.sum(-1)[real_query[..., 0]]
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
        # (rows of padding queries see no key at all: what they hold is unspecified, as in Llama)
        assert (a.triu(1)[real_query] == 0).all(), "a causal model attends to no future position"
        assert (a[real_query & padded_key] == 0).all(), "a real query attended to padding"


def test_output_attentions_sdpa_returns_maps_or_raises_clearly():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    ids = torch.randint(3, 48, (1, 6))
    try:
        out = model(ids, output_attentions=True)
    except (ValueError, NotImplementedError) as err:
        assert "eager" in str(err) and "output_attentions" in str(err)
        return
    assert out.attentions is not None and len(out.attentions) == model.config.num_hidden_layers


def test_seq2seq_output_attentions_eager():
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config(attn_implementation="eager")).double().eval()
    src, mask, labels = seq2seq_batch()
    with torch.no_grad():
        out = model(input_ids=src, attention_mask=mask, labels=labels, output_attentions=True)
    cfg, (batch, s_len), t_len = model.config, src.shape, labels.shape[1]
    assert out.encoder_attentions is not None and len(out.encoder_attentions) == cfg.encoder_layers
    assert out.decoder_attentions is not None and len(out.decoder_attentions) == cfg.decoder_layers
    assert out.cross_attentions is not None and len(out.cross_attentions) == cfg.decoder_layers
    assert out.encoder_attentions[0].shape == (batch, cfg.num_attention_heads, s_len, s_len)
    assert out.decoder_attentions[0].shape == (batch, cfg.num_attention_heads, t_len, t_len)
    assert out.cross_attentions[0].shape == (batch, cfg.num_attention_heads, t_len, s_len)
    for cross in out.cross_attentions:  # no weight on padded source positions
        assert (cross.masked_select((mask == 0)[:, None, None, :].expand_as(cross)) == 0).all()
        torch.testing.assert_close(cross.sum(-1), torch.ones_like(cross.sum(-1)))


def test_sequence_classification_from_config():
    config = tiny_config(num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).double().eval()
    assert "SequenceClassification" in type(model).__name__
    ids = torch.randint(3, 48, (2, 10))
    padded = ids.clone()
    padded[1, 6:] = config.pad_token_id  # right padding: pooled at the last real token (as Llama)
    mask = (padded != config.pad_token_id).long()
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(padded, attention_mask=mask, labels=labels)
        alone = model(ids[1:, :6]).logits
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits[1:], alone)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
