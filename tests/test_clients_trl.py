"""TRL's `SFTTrainer` with packed batches: `packing=True` (best-fit-decreasing packing, padding-free rows) and
`padding_free=True` train exactly as the padded run on the same documents.

All three runs see every document in one batch per step (the padded run: a batch of all documents; padding-free:
the documents flattened into one row; packing: one packed row), so they compute the same loss over the same target
tokens, and after a few AdamW steps the weights must agree. Before packing was understood the documents attended to
each other and the runs drifted apart at the first step.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from conftest import rel_err, tiny_config  # noqa: E402
from reformer_rev import RevFormerForCausalLM  # noqa: E402
from reformer_rev.training.tokenization import build_byte_tokenizer  # noqa: E402

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good.",
    "And the evening and the morning were the first day.",
    "Let the waters under the heaven be gathered together unto one place.",
]


def _train(tmp_path, name: str, **sft_options) -> tuple[RevFormerForCausalLM, list[float]]:
    from trl import SFTConfig, SFTTrainer

    tokenizer = build_byte_tokenizer(model_max_length=512)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = RevFormerForCausalLM(config).double()
    args = SFTConfig(
        output_dir=str(tmp_path / name), num_train_epochs=3, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
        **sft_options,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses


@pytest.mark.slow
def test_sft_trainer_packing_and_padding_free_equal_the_padded_run(tmp_path):
    padded, padded_losses = _train(tmp_path, "padded", per_device_train_batch_size=len(TEXTS))
    runs = {
        "padding_free": _train(tmp_path, "padding_free", per_device_train_batch_size=len(TEXTS), padding_free=True,
                               max_length=None),
        "packing": _train(tmp_path, "packing", per_device_train_batch_size=1, packing=True, max_length=512),
    }
    assert len(padded_losses) == 3 and padded_losses[-1] < padded_losses[0]
    reference = dict(padded.named_parameters())
    for name, (model, losses) in runs.items():
        assert losses == pytest.approx(padded_losses, rel=1e-6), name  # logged in float32
        worst = max(rel_err(p.detach(), reference[n].detach()) for n, p in model.named_parameters())
        # float64; AdamW's normalisation turns summation-order differences (1e-16) into ~1e-8 after three steps.
        # Documents attending to each other change the logits by ~0.1 (tests/test_packing.py).
        assert worst <= 1e-7, (name, worst)
