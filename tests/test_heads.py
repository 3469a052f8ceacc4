"""Token classification and extractive question answering heads: Auto classes, remote code, gradients equal to the
plain-autograd twin, and real `Trainer` runs that learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForTokenClassification,
    Trainer,
    TrainingArguments,
)

from conftest import make_pair, max_grad_rel_err, tiny_config
from reformer_rev import RevFormerForQuestionAnswering, RevFormerForTokenClassification

DROPOUT = dict(num_hidden_layers=6, hidden_dropout=0.1, attention_dropout=0.1, chunk_size_feed_forward=7)


def test_auto_classes_and_saved_auto_map(tmp_path):
    for auto, cls, extra in (
        (AutoModelForTokenClassification, RevFormerForTokenClassification, dict(num_labels=5)),
        (AutoModelForQuestionAnswering, RevFormerForQuestionAnswering, {}),
    ):
        torch.manual_seed(0)
        model = auto.from_config(tiny_config(**extra)).eval()
        assert type(model) is cls
        model.save_pretrained(tmp_path / cls.__name__)
        saved = json.loads((tmp_path / cls.__name__ / "config.json").read_text())
        assert saved["auto_map"][auto.__name__] == f"modeling_reformer_rev.{cls.__name__}"
        assert saved["auto_map"]["AutoModel"] == "modeling_reformer_rev.RevFormerModel"
        ids = torch.randint(3, 48, (2, 9))
        loaded = auto.from_pretrained(tmp_path / cls.__name__).eval()
        with torch.no_grad():
            for key, value in model(ids).items():
                torch.testing.assert_close(loaded(ids)[key], value, rtol=0, atol=0)


def test_token_classifier_gradients_equal_the_twin_with_dropout(padded_batch):
    ids, mask, _ = padded_batch
    rev, twin = make_pair(model_class=RevFormerForTokenClassification, num_labels=4, **DROPOUT)
    rev.train(), twin.train()
    labels = (ids % 4).masked_fill(mask == 0, -100)
    losses = []
    for model in (rev, twin):
        torch.manual_seed(2)
        losses.append(model(ids, attention_mask=mask, labels=labels).loss)
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12)
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-6, (err, name)
    reference = torch.nn.functional.cross_entropy(
        rev.eval()(ids, attention_mask=mask).logits.flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    with torch.no_grad():  # transformers' token-classification loss (eval: no dropout), which it computes in float32
        assert rev(ids, attention_mask=mask, labels=labels).loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_question_answering_gradients_equal_the_twin_with_dropout(padded_batch):
    ids, mask, _ = padded_batch
    rev, twin = make_pair(model_class=RevFormerForQuestionAnswering, **DROPOUT)
    rev.train(), twin.train()
    starts, ends = torch.tensor([3, 10, 0]), torch.tensor([5, 12, 60])  # 60: outside the sequence, ignored
    losses = []
    for model in (rev, twin):
        torch.manual_seed(3)
        losses.append(model(ids, attention_mask=mask, start_positions=starts, end_positions=ends).loss)
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12)
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-6, (err, name)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(labels=torch.full((2, 9), 7)), ValueError, r"`labels` contains 7: targets must be class ids in \[0, 3\)"),
        (dict(labels=torch.zeros(2, 8, dtype=torch.long)), ValueError, r"`labels` must have shape \(2, 9\)"),
    ],
)
def test_token_classifier_bad_labels(kwargs, error, match):
    model = RevFormerForTokenClassification(tiny_config(num_labels=3))
    with pytest.raises(error, match=match):
        model(torch.randint(3, 48, (2, 9)), **kwargs)


def test_question_answering_bad_positions():
    model = RevFormerForQuestionAnswering(tiny_config())
    ids = torch.randint(3, 48, (2, 9))
    with pytest.raises(ValueError, match=r"both `start_positions` and `end_positions`"):
        model(ids, start_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"`end_positions` must have shape \(batch=2,\)"):
        model(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"`start_positions` must be an integer tensor"):
        model(ids, start_positions=torch.tensor([1.0, 2.0]), end_positions=torch.tensor([1, 2]))


# --------------------------------------------------------------------------------------------------------------
# Real Trainer runs on tasks that need attention (a score at a position depends on earlier tokens)
# --------------------------------------------------------------------------------------------------------------


def _train(model, dataset, tmp_path, epochs: int = 4) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=1e-2, num_train_epochs=epochs,
        warmup_steps=5, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_token_classifier_trainer_learns_the_previous_token(tmp_path):
    """Label of a position = whether the *previous* token is even (chance: 50%): only attention can tell."""
    g = np.random.default_rng(0)
    ids = g.integers(3, 48, size=(320, 16))
    labels = np.full_like(ids, -100)
    labels[:, 1:] = ids[:, :-1] % 2
    train = Dataset.from_dict({"input_ids": ids[:256].tolist(), "labels": labels[:256].tolist()})
    torch.manual_seed(0)
    model = RevFormerForTokenClassification(tiny_config(num_labels=2, num_hidden_layers=2))
    _train(model, train, tmp_path / "tokens")
    model.eval()
    with torch.no_grad():
        predicted = model(torch.tensor(ids[256:])).logits.argmax(-1)[:, 1:]
    accuracy = (predicted == torch.tensor(labels[256:, 1:])).double().mean().item()
    assert accuracy >= 0.9, accuracy


@pytest.mark.slow
def test_question_answering_trainer_finds_the_span(tmp_path):
    """The answer is the two tokens after a marker token placed at random (chance of the exact span: ~1/100)."""
    g = np.random.default_rng(1)
    n, length, marker = 384, 12, 3
    ids = g.integers(4, 48, size=(n, length))
    where = g.integers(0, length - 2, size=n)
    ids[np.arange(n), where] = marker
    starts, ends = where + 1, where + 2
    train = Dataset.from_dict(
        {"input_ids": ids[:320].tolist(), "start_positions": starts[:320].tolist(), "end_positions": ends[:320].tolist()}
    )
    torch.manual_seed(0)
    model = RevFormerForQuestionAnswering(tiny_config(num_hidden_layers=2))
    _train(model, train, tmp_path / "qa")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor(ids[320:]))
    exact = ((out.start_logits.argmax(-1) == torch.tensor(starts[320:])) &
             (out.end_logits.argmax(-1) == torch.tensor(ends[320:]))).double().mean().item()
    assert exact >= 0.5, exact


REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["reformer_rev"] = None  # everything must come from the checkpoints
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification
    tokens_path, qa_path, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    tokens = AutoModelForTokenClassification.from_pretrained(tokens_path, trust_remote_code=True).eval()
    qa = AutoModelForQuestionAnswering.from_pretrained(qa_path, trust_remote_code=True).eval()
    assert "transformers_modules" in type(tokens).__module__ and "transformers_modules" in type(qa).__module__
    with torch.no_grad():
        print(json.dumps([tokens(ids).logits.tolist(), qa(ids).start_logits.tolist()]))
    """
)


@pytest.mark.slow
def test_heads_load_as_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    tokens = RevFormerForTokenClassification(tiny_config(num_labels=3)).eval()
    qa = RevFormerForQuestionAnswering(tiny_config()).eval()
    tokens.save_pretrained(tmp_path / "tokens")
    qa.save_pretrained(tmp_path / "qa")
    ids = [[5, 9, 11, 3, 7], [7, 8, 9, 10, 11]]
    with torch.no_grad():
        expected = [tokens(torch.tensor(ids)).logits, qa(torch.tensor(ids)).start_logits]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(tmp_path / "tokens"), str(tmp_path / "qa"), json.dumps(ids)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.tensor(g), e, rtol=1e-5, atol=1e-6)  # another process: thread count differs
