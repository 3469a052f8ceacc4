"""`transformers.Trainer` on the reversible LM under 2-process DDP (gloo, CPU) with `ddp_find_unused_parameters=False`.

`find_unused_parameters=True` breaks on the recomputing backward (docs/design.md §2); with False it must train
normally. (The Trainer's own default is now False for the recomputing stack, `tests/test_distributed.py::
test_trainer_ddp_defaults_match_one_process`; passing it explicitly, as recipes do, must keep working.) Records the loss curve, whether the model really was
wrapped in DDP across 2 processes, and the largest parameter difference between ranks.
Run: `torchrun --nproc_per_node 2 trainer_ddp.py OUT.json`.
"""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist
from _common import finish, tiny_config, write_result
from transformers import Trainer, TrainerCallback, TrainingArguments

from reformer_rev import RevFormerForCausalLM


class Blocks(torch.utils.data.Dataset):
    """A few fixed token blocks with a learnable pattern (each row repeats a short motif)."""

    def __init__(self, n: int = 32, length: int = 48) -> None:
        g = torch.Generator().manual_seed(3)
        motifs = torch.randint(3, 64, (n, 6), generator=g)
        self.rows = motifs.repeat(1, length // 6)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(chunk_size_feed_forward=0))
    recorder = LossRecorder()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=4, max_steps=12, learning_rate=3e-3, warmup_steps=0,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo",
            ddp_find_unused_parameters=False, gradient_accumulation_steps=2, seed=0, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[recorder])
        trainer.train()
        wrapped = type(trainer.model_wrapped).__name__
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    write_result(
        {
            "world_size": dist.get_world_size(),
            "wrapped": wrapped,
            "losses": recorder.losses,
            "max_abs_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
        }
    )
    finish()


if __name__ == "__main__":
    main()
