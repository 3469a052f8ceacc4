"""`transformers.Trainer` features users turn on: metrics on logits, label smoothing, accumulation, checkpointing.

Llama (a built-in causal LM) runs the same protocol as the reference: where the Trainer treats Llama right, the same
assertions must hold for the reversible LM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)

from client_models import lm_batch, seq2seq_batch, seq2seq_config
from conftest import tiny_config
from reformer_rev import RevFormerForCausalLM, RevFormerForConditionalGeneration

VOCAB = 48


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(
            LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
        )
    return RevFormerForCausalLM(tiny_config())


def rows(ids, mask, labels) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]


def args(tmp_path, cls=TrainingArguments, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
        logging_steps=1, max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    )
    return cls(**{**base, **kw})


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def shifted_smoothed_loss(model, ids, mask, labels, eps):
    """What a causal LM's label-smoothed loss must be: the next token predicted, `-100` ignored, torch's smoothing."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
        label_smoothing=eps,
    )


@pytest.mark.parametrize("kind", ["llama", "reformer_rev"])
def test_metrics_receive_logits(tmp_path, kind):
    """`compute_metrics` and `preprocess_logits_for_metrics` get the model's logits (eval mode, with labels)."""
    model = build(kind)
    ids, mask, labels = lm_batch(VOCAB, batch=4)
    seen = {}

    def preprocess(logits, labels):
        # Without logits in the model's output the Trainer passes whatever else it returned (e.g. the cache).
        assert isinstance(logits, torch.Tensor), f"preprocess_logits_for_metrics got a {type(logits).__name__}"
        seen["logits_shape"] = tuple(logits.shape)
        return logits.argmax(-1)

    def metrics(pred):
        preds, refs = pred.predictions[:, :-1], pred.label_ids[:, 1:]
        keep = refs != -100
        return {"accuracy": float((preds[keep] == refs[keep]).mean())}

    trainer = Trainer(model=model, args=args(tmp_path), eval_dataset=rows(ids, mask, labels),
                      compute_metrics=metrics, preprocess_logits_for_metrics=preprocess)
    result = trainer.evaluate()
    assert seen["logits_shape"] == (4, ids.shape[1], VOCAB)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        expected_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    preds, refs = logits.argmax(-1)[:, :-1], labels[:, 1:]
    keep = refs != -100
    assert result["eval_accuracy"] == pytest.approx((preds[keep] == refs[keep]).double().mean().item())
    assert result["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)

    # Without the preprocessing hook the full logits come back as predictions.
    trainer = Trainer(model=model, args=args(tmp_path), eval_dataset=rows(ids, mask, labels))
    out = trainer.predict(rows(ids, mask, labels))
    assert out.predictions.shape == tuple(logits.shape)
    np.testing.assert_allclose(out.predictions, logits.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "reformer_rev"])
def test_label_smoothing_is_applied_to_shifted_targets(tmp_path, kind):
    """`label_smoothing_factor`: the Trainer's loss and update equal those of the shifted smoothed loss."""
    eps = 0.1
    model = build(kind)
    ids, mask, labels = lm_batch(VOCAB, batch=4)
    before = params(model)
    reference = shifted_smoothed_loss(model, ids, mask, labels, eps)
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # The loss a model that learns to copy its input would be trained on: it must differ clearly from the right one.
    logits = model(input_ids=ids, attention_mask=mask).logits.detach()
    unshifted = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, label_smoothing=eps)
    assert abs(unshifted.item() - reference.item()) > 1e-3

    trainer = Trainer(model=model, args=args(tmp_path, label_smoothing_factor=eps), train_dataset=rows(ids, mask, labels),
                      eval_dataset=rows(ids, mask, labels))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(reference.item(), rel=1e-5)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [pytest.approx(reference.item(), rel=1e-4)]  # logged losses are rounded
    lr = trainer.args.learning_rate
    for name, p in model.named_parameters():  # one SGD step: the update is -lr * the reference gradient
        torch.testing.assert_close((before[name] - p.detach()) / lr, ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def assert_accumulation_equals_full_batch(tmp_path, build, batch, trainer_cls=Trainer, args_cls=TrainingArguments):
    """One step over 4 rows: 2 micro-batches x 2 rows must log the full-batch loss and make the full-batch update."""
    runs = {}
    for accumulate in (1, 2):
        model = build()
        trainer = trainer_cls(model=model, train_dataset=rows(*batch),
                              args=args(tmp_path, args_cls, per_device_train_batch_size=4 // accumulate,
                                        gradient_accumulation_steps=accumulate))
        trainer.train()
        runs[accumulate] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], params(model))
    inputs, mask, labels = batch
    with torch.no_grad():
        full_loss = build()(input_ids=inputs, attention_mask=mask, labels=labels).loss.item()
    assert runs[1][0] == [pytest.approx(full_loss, rel=1e-4)]
    assert runs[2][0] == [pytest.approx(full_loss, rel=1e-4)]
    for name, p in runs[1][1].items():
        torch.testing.assert_close(runs[2][1][name], p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama", "reformer_rev"])
def test_gradient_accumulation_with_padding_equals_full_batch(tmp_path, kind):
    """2 micro-batches x 2 rows with uneven padding: the same logged loss and update as one batch of 4."""
    ids, mask, labels = lm_batch(VOCAB, batch=4, length=20)
    mask[3, :11] = 0  # rows with 20, 15, 13 and 9 targets: a mean of micro-batch means would be biased
    batch = ids.masked_fill(mask == 0, 0), mask, labels.masked_fill(mask == 0, -100)
    assert_accumulation_equals_full_batch(tmp_path, lambda: build(kind), batch)


def test_gradient_checkpointing_is_accepted_and_changes_nothing(tmp_path):
    """`TrainingArguments(gradient_checkpointing=True)`: the reversible stack recomputes anyway; same update."""
    ids, mask, labels = lm_batch(VOCAB, batch=4)
    updated = {}
    for checkpointing in (False, True):
        model = build("reformer_rev")
        trainer = Trainer(model=model, train_dataset=rows(ids, mask, labels),
                          args=args(tmp_path, gradient_checkpointing=checkpointing))
        trainer.train()
        updated[checkpointing] = params(model)
    for name, p in updated[False].items():
        torch.testing.assert_close(updated[True][name], p, rtol=1e-6, atol=1e-8)
    model = build("reformer_rev")
    model.gradient_checkpointing_enable()  # what recipes call directly
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_seq2seq_gradient_accumulation_with_padding_equals_full_batch(tmp_path):
    """The encoder-decoder under `Seq2SeqTrainer`: targets of uneven length, 2 x 2 rows = one batch of 4.

    No built-in reference here: T5 and BART accept `**kwargs` but ignore `num_items_in_batch` (transformers 5.24),
    so the Trainer neither rescales their loss nor divides it by the accumulation steps (the logged loss doubles).
    The ground truth is the model's own loss on the whole batch.
    """
    def build_seq2seq():
        torch.manual_seed(0)
        return RevFormerForConditionalGeneration(seq2seq_config())

    src, mask, labels = seq2seq_batch(VOCAB)
    src, mask = torch.cat([src, src.flip(0)[:1]]), torch.cat([mask, mask.flip(0)[:1]])
    labels = torch.cat([labels, labels[:1].masked_fill(torch.arange(labels.shape[1]) >= 2, -100)])  # 2 targets
    assert_accumulation_equals_full_batch(tmp_path, build_seq2seq, (src, mask, labels), Seq2SeqTrainer,
                                          Seq2SeqTrainingArguments)
