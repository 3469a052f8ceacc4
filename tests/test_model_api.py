"""HF output and training conventions of every model class, checked with the real clients (Trainer, PEFT): logits
with the loss in eval mode, tuple order, Trainer label smoothing on shifted targets, gradient checkpointing requests,
attention maps, the sequence classifier, and clear errors for bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import make_pair, max_grad_rel_err, rel_err, tiny_config
from test_seq2seq import seq2seq_config
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.cache_utils import Cache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from reformer_rev import RevFormerForCausalLM, RevFormerForConditionalGeneration, RevFormerForSequenceClassification

VOCAB = 48


def _ids(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# Logits with the loss, tuple order
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [RevFormerForCausalLM, RevFormerForConditionalGeneration])
def test_logits_come_with_the_loss_in_eval_mode_and_are_skipped_in_training(model_class):
    config = tiny_config() if model_class is RevFormerForCausalLM else seq2seq_config()
    torch.manual_seed(0)
    model = model_class(config).double()
    ids = _ids()
    kwargs = dict(input_ids=ids, labels=ids)
    model.eval()
    with torch.no_grad():
        out = model(**kwargs)
        full = model(**{k: v for k, v in kwargs.items() if k != "labels"}) if model_class is RevFormerForCausalLM \
            else model(input_ids=ids, decoder_input_ids=model.prepare_decoder_input_ids_from_labels(ids))
    assert out.logits is not None and out.logits.shape == (2, 10, VOCAB)
    torch.testing.assert_close(out.logits, full.logits, rtol=0, atol=0)
    model.train()
    assert model(**kwargs).logits is None  # the chunked loss never forms them (memory), like Liger's fused loss
    assert model(**kwargs, return_logits=True).logits.shape == (2, 10, VOCAB)
    model.eval()
    assert model(**kwargs, return_logits=False).logits is None


def test_return_dict_false_follows_transformers_order():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config()).eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, labels=ids, output_hidden_states=True)
        loss, logits, cache, hidden = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert loss.dim() == 0 and loss.item() == ref.loss.item()
    assert torch.equal(logits, ref.logits) and isinstance(cache, Cache)
    assert len(hidden) == model.config.num_hidden_layers + 1
    with torch.no_grad():
        seq = RevFormerForConditionalGeneration(seq2seq_config()).eval()
        loss, logits, cache, encoder_last = seq(input_ids=ids, labels=ids, return_dict=False)[:4]
    assert loss.dim() == 0 and logits.shape == (2, 10, VOCAB) and isinstance(cache, Cache)
    assert encoder_last.shape == (2, 10, 32)


def _tiny_lm_dataset(n: int = 8, length: int = 12):
    rows = _ids(n, length, seed=3)
    rows[1, -4:] = 0
    return [{"input_ids": r, "attention_mask": (r != 0).long(), "labels": r.masked_fill(r == 0, -100)} for r in rows]


def test_trainer_metrics_receive_logits(tmp_path):
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config())
    seen = {}

    def preprocess(logits, labels):
        seen["logits_shape"] = tuple(logits.shape)
        return logits.argmax(-1)

    def metrics(pred):
        predictions, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
        valid = labels != -100
        return {"accuracy": float((predictions == labels)[valid].mean())}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, eval_dataset=_tiny_lm_dataset(), compute_metrics=metrics,
                      preprocess_logits_for_metrics=preprocess)
    result = trainer.evaluate()
    assert seen["logits_shape"] == (4, 12, VOCAB)  # only the logits: the cache is not mistaken for a prediction
    assert 0.0 <= result["eval_accuracy"] <= 1.0
    assert result["eval_loss"] == pytest.approx(math.log(VOCAB), rel=0.15)


# --------------------------------------------------------------------------------------------------------------
# Trainer label smoothing (docs/design.md §8)
# --------------------------------------------------------------------------------------------------------------


def _smoothed(logits: torch.Tensor, labels: torch.Tensor, epsilon: float, shift: bool) -> float:
    """transformers' `LabelSmoother`, written out: (1 - eps) * NLL + eps * mean uniform cross-entropy."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    log_probs = logits.double().log_softmax(-1)
    valid = labels != -100
    nll = -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0][valid].mean()
    uniform = -log_probs.sum(-1)[valid].mean() / logits.shape[-1]
    return ((1 - epsilon) * nll + epsilon * uniform).item()


def _trainer_loss(model, tmp_path, batch) -> float:
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    with torch.no_grad():
        return trainer.compute_loss(model, dict(batch)).item()


def test_trainer_label_smoothing_uses_shifted_targets_like_llama(tmp_path):
    batch = _tiny_lm_dataset(4)
    batch = {k: torch.stack([row[k] for row in batch]) for k in batch[0]}
    torch.manual_seed(0)
    ours = RevFormerForCausalLM(tiny_config()).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    for model in (ours, llama):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = _smoothed(logits, batch["labels"], 0.1, shift=True)
        assert abs(shifted - _smoothed(logits, batch["labels"], 0.1, shift=False)) > 1e-3  # the test can tell
        assert _trainer_loss(model, tmp_path, batch) == pytest.approx(shifted, rel=1e-5), type(model).__name__


def test_trainer_label_smoothing_shifts_for_a_peft_wrapped_model(tmp_path):
    peft = pytest.importorskip("peft")
    batch = _tiny_lm_dataset(4)
    batch = {k: torch.stack([row[k] for row in batch]) for k in batch[0]}
    torch.manual_seed(0)
    model = peft.get_peft_model(RevFormerForCausalLM(tiny_config()),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _smoothed(logits, batch["labels"], 0.1, shift=True)
    assert _trainer_loss(model, tmp_path, batch) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing requests
# --------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_request_is_accepted_logged_once_and_changes_nothing(padded_batch):
    ids, mask, labels = padded_batch
    rev, ref = make_pair(hidden_dropout=0.1)
    logger = logging.get_logger("reformer_rev")
    logging.warning_once.cache_clear()  # once per process: another test may have triggered it
    with CaptureLogger(logger) as cl, pytest.warns(FutureWarning):
        rev.gradient_checkpointing_enable()
        rev.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rev.activation_checkpointing_enable()
    assert cl.out.count("changes nothing") == 1
    rev.train(), ref.train()
    for model in (rev, ref):
        torch.manual_seed(4)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert max_grad_rel_err(rev, ref)[0] <= 1e-10
    rev.gradient_checkpointing_disable()


@pytest.mark.parametrize("overrides", [{}, dict(depth_mode="deq", num_unique_layers=1, reversible=False),
                                       dict(reversible=False)], ids=["reversible", "deq_twin", "plain_twin"])
def test_trainer_ddp_default_follows_whether_the_backward_recomputes(tmp_path, overrides):
    """transformers' Trainer gives DDP `find_unused_parameters = not model.is_activation_checkpointing` by default;
    a recomputing stack (reversible engine, DEQ's implicit backward) reports that it checkpoints, so the default is the
    `False` it needs, before and after `gradient_checkpointing_enable/disable()`; the plain twin keeps `True`."""
    model = RevFormerForCausalLM(tiny_config(**overrides))
    recomputes = overrides.get("reversible", True) or overrides.get("depth_mode") == "deq"
    # `is_gradient_checkpointing` until transformers renamed it (5.15 has only that name; 5.24 warns on it).
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(model, name) is recomputes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated `gradient_checkpointing_*` names on 5.24
        model.gradient_checkpointing_enable()
        model.gradient_checkpointing_disable()
    assert getattr(model, name) is recomputes
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args, train_dataset=_tiny_lm_dataset())
    assert trainer.accelerator.ddp_handler.find_unused_parameters is (not recomputes)


def test_trainer_with_gradient_checkpointing_trains(tmp_path):
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, per_device_train_batch_size=4,
                             max_steps=3, learning_rate=3e-3, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=_tiny_lm_dataset())
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 3


def test_peft_prepare_model_for_kbit_training_runs():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.prepare_model_for_kbit_training(RevFormerForCausalLM(tiny_config()))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = _ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


# --------------------------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------------------------


def test_output_attentions_returns_eager_maps_or_a_clear_error():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    ids = _ids(length=7)
    with pytest.raises(ValueError, match=r"output_attentions=True.*set_attn_implementation\('eager'\)"):
        model(ids, output_attentions=True)
    model.set_attn_implementation("eager")
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        tied = model(ids, output_attentions=True, num_hidden_layers=5)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 7, 7)
    maps = torch.stack(out.attentions)
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)))
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert maps[:, 0][..., future].abs().max() == 0  # causal
    future[:2] = False  # the two padding queries of row 1 are un-masked on purpose (no NaN rows)
    assert maps[:, 1][..., future].abs().max() == 0
    assert maps[:, 1, :, 2:, :2].abs().max() == 0  # real tokens do not attend to padding
    assert len(tied.attentions) == 5  # one map per application of a weight-tied block
    # training: the recomputing backward adds no maps to those of the forward
    model.train()
    out = model(ids, labels=ids, output_attentions=True)
    out.loss.backward()
    assert len(out.attentions) == 3


def test_seq2seq_output_attentions():
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config(attn_implementation="eager")).eval()
    src, tgt = _ids(length=6), _ids(length=4, seed=1)
    with torch.no_grad():
        out = model(input_ids=src, decoder_input_ids=tgt, output_attentions=True)
    assert len(out.encoder_attentions) == 3 and out.encoder_attentions[0].shape == (2, 4, 6, 6)
    assert len(out.decoder_attentions) == 4 and out.decoder_attentions[0].shape == (2, 4, 4, 4)
    assert len(out.cross_attentions) == 4 and out.cross_attentions[0].shape == (2, 4, 4, 6)


def test_deq_output_attentions_are_those_of_the_fixed_point():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(depth_mode="deq", num_unique_layers=2, attn_implementation="eager"))
    with torch.no_grad():
        out = model.eval()(_ids(), output_attentions=True)
    assert len(out.attentions) == 2  # one application of the group, at the fixed point


# --------------------------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------------------------


def test_sequence_classifier_auto_class_and_last_token_pooling():
    config = tiny_config(num_labels=3)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    assert type(model) is RevFormerForSequenceClassification
    row = _ids(1, 6)
    right = torch.cat([row, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    with torch.no_grad():
        alone = model(row).logits
        batch = model(torch.cat([right, left]), attention_mask=torch.cat([right, left]).ne(0).long()).logits
    assert alone.shape == (1, 3)
    torch.testing.assert_close(batch, alone.expand(2, 3), rtol=1e-5, atol=1e-6)
    labels = torch.tensor([2, 0])
    out = model(torch.cat([right, left]), labels=labels)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item(), rel=1e-6)


def test_sequence_classifier_gradients_equal_the_twin_with_dropout(padded_batch):
    ids, mask, _ = padded_batch
    rev, twin = make_pair(model_class=RevFormerForSequenceClassification, num_labels=4, num_hidden_layers=6,
                          hidden_dropout=0.1, attention_dropout=0.1, chunk_size_feed_forward=7)
    rev.train(), twin.train()
    labels = torch.tensor([3, 0, 1])
    losses = []
    for model in (rev, twin):
        torch.manual_seed(2)
        losses.append(model(ids, attention_mask=mask, labels=labels).loss)
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12)
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-6, (err, name)
    rev.eval()
    with torch.no_grad():  # dropout was active
        assert abs(rev(ids, attention_mask=mask, labels=labels).loss.item() - losses[0].item()) > 1e-6


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear TypeError/ValueError naming the argument, or (harmless integer dtypes) accepted
# --------------------------------------------------------------------------------------------------------------

IDS = _ids(2, 5)
BAD_FORWARD = [
    (dict(input_ids=IDS.tolist()), TypeError, r"`input_ids` must be a torch.Tensor.*torch.tensor"),
    (dict(input_ids=IDS.float()), TypeError, r"`input_ids` must be an integer tensor"),
    (dict(input_ids=IDS.bool()), TypeError, r"`input_ids` must be an integer tensor"),
    (dict(input_ids=IDS[0]), ValueError, r"`input_ids` must have shape \(batch, sequence\)"),
    (dict(input_ids=IDS[None]), ValueError, r"`input_ids` must have shape \(batch, sequence\)"),
    (dict(input_ids=IDS, labels=torch.full_like(IDS, VOCAB)), ValueError, r"`labels` contains 48.*\[0, 48\) or -100"),
    (dict(input_ids=IDS, labels=torch.full_like(IDS, -5)), ValueError, r"`labels` contains -5"),
    (dict(input_ids=IDS, labels=IDS.float()), TypeError, r"`labels` must be an integer tensor"),
    (dict(input_ids=IDS, labels=IDS.tolist()), TypeError, r"`labels` must be a torch.Tensor"),
    (dict(input_ids=IDS, labels=IDS[:, :3]), ValueError, r"`labels` must have shape \(2, 5\)"),
    (dict(input_ids=IDS, attention_mask=torch.full_like(IDS, 2)), ValueError, r"`attention_mask` .* found 2"),
    (dict(input_ids=IDS, attention_mask=-torch.ones_like(IDS)), ValueError, r"`attention_mask` .* found -1"),
    (dict(input_ids=IDS, attention_mask=torch.full(IDS.shape, float("nan"))), ValueError, r"`attention_mask`.*nan"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 4)), ValueError, r"`attention_mask` must have shape"),
    (dict(input_ids=IDS, attention_mask=IDS.tolist()), TypeError, r"`attention_mask` must be a torch.Tensor"),
    (dict(inputs_embeds=torch.ones(2, 5, 32, dtype=torch.float64)), TypeError, r"`inputs_embeds` has dtype .*float64"),
    (dict(inputs_embeds=torch.ones(2, 5, 32, dtype=torch.long)), TypeError, r"`inputs_embeds` must be a floating"),
    (dict(inputs_embeds=torch.ones(2, 5, 31)), ValueError, r"`inputs_embeds` must have shape.*hidden_size=32"),
    (dict(input_ids=IDS, position_ids=torch.arange(5.0)[None]), TypeError, r"`position_ids` must be an integer"),
    (dict(input_ids=IDS, position_ids=torch.arange(4)[None]), ValueError, r"`position_ids` must have shape"),
    (dict(input_ids=IDS, past_key_values=[(IDS, IDS)]), TypeError, r"cache must be a transformers `Cache`"),
    (dict(input_ids=IDS, attention_masks=torch.ones_like(IDS)), TypeError, r"unexpected keyword.*attention_masks"),
    (dict(input_ids=IDS, label=IDS), TypeError, r"unexpected keyword argument\(s\) \['label'\]"),
    (dict(input_ids=IDS, token_type_ids=torch.ones_like(IDS)), ValueError, r"`token_type_ids` must be all zeros"),
    (dict(input_ids=IDS, logits_to_keep=-1), ValueError, r"`logits_to_keep` must be a non-negative integer"),
    (dict(input_ids=IDS, logits_to_keep=1.5), ValueError, r"`logits_to_keep` must be"),
    (dict(input_ids=IDS, position_ids=torch.arange(-1, 4)[None]), ValueError, r"`position_ids` must lie in \[0, "),
    (dict(input_ids=IDS, position_ids=torch.arange(300, 305)[None]), ValueError, r"max_position_embeddings=256"),
]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return RevFormerForCausalLM(tiny_config(num_hidden_layers=2)).eval()


@pytest.mark.parametrize("kwargs, error, match", BAD_FORWARD)
def test_bad_forward_input_gets_a_clear_error(lm, kwargs, error, match):
    with pytest.raises(error, match=match):
        lm(**kwargs)


def test_harmless_extras_are_accepted(lm):
    with torch.no_grad():
        ref = lm(IDS).logits
        torch.testing.assert_close(lm(IDS, token_type_ids=torch.zeros_like(IDS)).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(lm(IDS, position_ids=torch.arange(5)).logits, ref, rtol=0, atol=0)  # 1-D
        torch.testing.assert_close(lm(IDS, logits_to_keep=torch.tensor([1, 3])).logits, ref[:, [1, 3]])
        torch.testing.assert_close(lm(IDS, logits_to_keep=2).logits, ref[:, -2:])


def test_small_integer_dtypes_are_accepted_and_converted(lm):
    with torch.no_grad():
        ref = lm(IDS, labels=IDS, attention_mask=torch.ones_like(IDS))
        for dtype in (torch.uint8, torch.int16, torch.int32):
            out = lm(IDS.to(dtype), labels=IDS.to(dtype), attention_mask=torch.ones_like(IDS, dtype=dtype))
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
            assert out.loss.item() == ref.loss.item()
        float_mask = lm(IDS, attention_mask=torch.ones(IDS.shape)).logits  # 0./1. floats and bools are masks too
        bool_mask = lm(IDS, attention_mask=torch.ones(IDS.shape, dtype=torch.bool)).logits
    torch.testing.assert_close(float_mask, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(bool_mask, ref.logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(inputs=IDS.tolist()), TypeError, r"`input_ids` must be a torch.Tensor"),
        (dict(input_ids=IDS.tolist()), TypeError, r"`input_ids` must be a torch.Tensor"),
        (dict(inputs=IDS[0]), ValueError, r"`input_ids` must have shape \(batch, sequence\)"),
        (dict(inputs=IDS + VOCAB), ValueError, r"`input_ids` contains token id"),
        (dict(inputs=IDS, attention_mask=torch.full_like(IDS, 2)), ValueError, r"`attention_mask` .* found 2"),
        (dict(inputs=IDS, attention_mask=torch.ones(2, 3)), ValueError, r"`attention_mask` must have shape"),
        (dict(inputs_embeds=torch.ones(2, 5, 32, dtype=torch.long)), TypeError, r"`inputs_embeds` must be a float"),
        (dict(inputs=IDS, num_beams=0), ValueError, r"`num_beams` must be an integer >= 1, got 0"),
        (dict(inputs=IDS, top_p=1.5), ValueError, r"`top_p` must be a number in \(0, 1\]"),
        (dict(inputs=IDS, pad_token_id=48), ValueError, r"`pad_token_id` must be a token id .* \[0, 48\)"),
        (dict(inputs=IDS, eos_token_id=[2, -3]), ValueError, r"`eos_token_id` must be a token id"),
        (dict(inputs=IDS, generation_config="greedy"), TypeError, r"`generation_config` must be a GenerationConfig"),
        (dict(inputs=IDS, stopping_criteria=5), TypeError, r"`stopping_criteria` must be a list"),
    ],
)
@pytest.mark.parametrize("kind", ["causal_lm", "seq2seq"])
def test_bad_generate_input_gets_a_clear_error(lm, kind, kwargs, error, match):
    model = lm if kind == "causal_lm" else RevFormerForConditionalGeneration(seq2seq_config()).eval()
    with pytest.raises(error, match=match):
        model.generate(**kwargs, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("kind", ["causal_lm", "seq2seq"])
def test_generate_accepts_small_integer_ids(lm, kind):
    model = lm if kind == "causal_lm" else RevFormerForConditionalGeneration(seq2seq_config()).eval()
    ref = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = model.generate(IDS.to(torch.uint8), attention_mask=torch.ones_like(IDS, dtype=torch.bool),
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(decoder_input_ids=IDS + VOCAB), ValueError, r"`decoder_input_ids` contains token id"),
        (dict(decoder_input_ids=IDS.float()), TypeError, r"`decoder_input_ids` must be an integer"),
        (dict(decoder_input_ids=IDS, decoder_attention_mask=torch.full_like(IDS, 3)), ValueError,
         r"`decoder_attention_mask` .* found 3"),
        (dict(decoder_input_ids=IDS, attention_mask=torch.full_like(IDS, -1)), ValueError, r"`attention_mask`"),
        (dict(labels=torch.full_like(IDS, VOCAB)), ValueError, r"`labels` contains 48"),
        (dict(labels=IDS.float()), TypeError, r"`labels` must be an integer tensor"),
        (dict(labels=IDS[0]), ValueError, r"`labels` must have shape \(batch, length\)"),
        (dict(decoder_input_ids=IDS, labels=IDS[:, :3]), ValueError, r"`labels` must have shape \(2, 5\)"),
        (dict(decoder_inputs_embeds=torch.ones(2, 5, 32, dtype=torch.float64)), TypeError,
         r"`decoder_inputs_embeds` has dtype"),
        (dict(decoder_input_ids=IDS, encoder_outputs="x"), TypeError, r"`encoder_outputs` must be"),
        (dict(decoder_input_ids=_ids(3, 5)), ValueError, r"`decoder_input_ids`.* batch 3 but the encoder inputs"),
        (dict(labels=_ids(3, 5)), ValueError, r"`labels` shifted into them\) have batch 3"),
        (dict(decoder_input_ids=IDS, encoder_outputs=(torch.ones(2, 5, 7),)), ValueError,
         r"`encoder_hidden_states`.*hidden_size=32"),
    ],
)
def test_bad_seq2seq_input_gets_a_clear_error(kwargs, error, match):
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config()).eval()
    inputs = {"input_ids": IDS} if "encoder_outputs" not in kwargs else {}
    with pytest.raises(error, match=match):
        model(**inputs, **kwargs)


def test_bad_classifier_labels_get_a_clear_error():
    model = RevFormerForSequenceClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match=r"`labels` contains class 3, outside \[0, num_labels=3\)"):
        model(IDS, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"`labels` must have one row per sequence"):
        model(IDS, labels=torch.tensor([0, 1, 2]))


def test_seq2seq_loss_honours_the_trainer_item_count():
    """`Trainer` passes the target count of the whole accumulated batch (and then skips its own scaling)."""
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(seq2seq_config()).double().eval()
    labels = _ids(seed=2)
    labels[0, -3:] = -100
    with torch.no_grad():
        mean = model(input_ids=IDS, labels=labels).loss
        share = model(input_ids=IDS, labels=labels, num_items_in_batch=torch.tensor(2 * 17)).loss
    assert share.item() == pytest.approx(mean.item() / 2, rel=1e-12)
    assert rel_err(share, mean / 2) <= 1e-12


# --------------------------------------------------------------------------------------------------------------
# Non-finite inputs: an error in training mode, passed through in eval mode (as transformers' models do)
# --------------------------------------------------------------------------------------------------------------


def _with_nan(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(*shape) * 0.02
    x[0, 1, 3] = float("nan")
    return x


@pytest.mark.parametrize("argument", ["inputs_embeds", "decoder_inputs_embeds", "encoder_outputs"])
def test_non_finite_inputs_are_an_error_in_training_and_pass_through_in_eval(argument):
    from transformers.modeling_outputs import BaseModelOutput

    torch.manual_seed(0)
    if argument == "inputs_embeds":
        model = RevFormerForCausalLM(tiny_config())
        kwargs = dict(inputs_embeds=_with_nan((2, 5, 32)), labels=torch.randint(3, 48, (2, 5)))
    else:
        model = RevFormerForConditionalGeneration(seq2seq_config())
        kwargs = dict(labels=torch.randint(3, 48, (2, 4)))
        if argument == "decoder_inputs_embeds":
            kwargs.update(input_ids=torch.randint(3, 48, (2, 6)), decoder_inputs_embeds=_with_nan((2, 4, 32)))
        else:
            kwargs.update(encoder_outputs=BaseModelOutput(last_hidden_state=_with_nan((2, 6, 32))))
    model.train()
    with pytest.raises(ValueError, match=rf"`{argument}` contains non-finite values \(e.g. nan\) in training mode"):
        model(**kwargs)
    model.eval()
    with torch.no_grad():
        out = model(**kwargs)
    assert not torch.isfinite(out.logits).all() and not torch.isfinite(out.loss)
    assert torch.isfinite(out.logits[1]).all()  # rows the NaN does not reach stay finite, as in Llama
