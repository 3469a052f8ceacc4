"""`transformers.Trainer` trains the reversible LM, in one process and under 2-process DDP."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_config
from reformer_rev import RevFormerForCausalLM
from test_distributed import run_worker


class MotifBlocks(torch.utils.data.Dataset):
    """Rows repeating a short random motif: learnable in a few steps."""

    def __init__(self, n: int = 16, length: int = 40, vocab: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.rows = torch.randint(3, vocab, (n, 5), generator=g).repeat(1, length // 5)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_single_process_loss_decreases(tmp_path):
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config())
    data = MotifBlocks()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=10,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10
    # The logged loss is the per-token mean: it starts at ~ln(vocab) (Trainer's num_items_in_batch is honoured).
    assert losses[0] == pytest.approx(math.log(48), rel=0.1)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    ids = data.rows[:4]
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() < losses[0] - 0.3


@pytest.mark.slow
def test_trainer_two_process_ddp_without_unused_parameter_search(tmp_path):
    result = run_worker("trainer_ddp.py", tmp_path)
    assert result["world_size"] == 2 and result["wrapped"] == "DistributedDataParallel"
    losses = result["losses"]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(math.log(64), rel=0.1)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2
    assert result["max_abs_diff_across_ranks"] == 0.0
