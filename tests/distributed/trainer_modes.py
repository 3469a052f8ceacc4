"""Model modes under `transformers.Trainer` with 2-process DDP (gloo, CPU), vs one process on the batches it used.

For each mode and each `ddp_find_unused_parameters` setting (`None`: the Trainer's default, `not
model.is_activation_checkpointing`, i.e. `False` for a recomputing stack and `True` for the plain-autograd twin;
`False`), a Trainer trains `STEPS` SGD steps with gradient accumulation. A forward pre-hook
records every micro-batch each rank saw; rank 0 then replays the global batches (all ranks' micro-batches of each
step) in one process and compares the parameters. The weight-tied and seq2seq modes run without dropout here, as
the Trainer's per-rank random streams are not replayed; `chunked_ffn_dropout` is checked for identical ranks only.
Run: `torchrun --nproc_per_node 2 trainer_modes.py [MODE ...] OUT.json`.
"""

from __future__ import annotations

import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from _common import describe, finish, write_result
from _modes import MODES, max_rel_err
from transformers import Trainer, TrainingArguments

STEPS, ACCUM, PER_DEVICE, LR = 2, 2, 2, 0.1
DEFAULT_MODES = ("plain_autograd_twin", "stack_chunked_ffn", "chunked_ffn_dropout", "weight_tied", "deq_implicit", "seq2seq")
DETERMINISTIC = ("weight_tied", "seq2seq")


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def run_case(mode_name: str, find_unused: bool | None) -> dict:
    mode = MODES[mode_name].deterministic() if mode_name in DETERMINISTIC else MODES[mode_name]
    world = dist.get_world_size()
    data = Rows(mode.global_batch(0, STEPS * ACCUM * PER_DEVICE * world))
    model = mode.build()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[dict[str, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append({k: kwargs[k].clone() for k in ("input_ids", "labels")}), with_kwargs=True
    )
    result: dict = {"mode": mode.name}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
            learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", seed=0, disable_tqdm=True,
            dataloader_num_workers=0, ddp_find_unused_parameters=find_unused,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data,
            optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
        )
        result["find_unused_parameters"] = trainer.accelerator.ddp_handler.find_unused_parameters
        try:
            trainer.train()
        except RuntimeError as err:
            result.update(ok=False, error=describe(err))
        else:
            result.update(ok=True, wrapped=type(trainer.model_wrapped).__name__)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    all_seen = [None] * world
    dist.all_gather_object(all_seen, seen)
    verdicts = [None] * world
    dist.all_gather_object(verdicts, result["ok"])
    result["ok"] = all(verdicts)
    if not result["ok"]:
        return result
    result["ranks_max_abs_diff"] = max((g - gathered[0]).abs().max().item() for g in gathered)
    if not mode.random:
        # One process, SGD on each step's global batch: every rank's ACCUM micro-batches of that step.
        reference = mode.build()
        reference.load_state_dict(initial)
        opt = torch.optim.SGD(reference.parameters(), lr=LR)
        for step in range(STEPS):
            micro = [b for rank_seen in all_seen for b in rank_seen[step * ACCUM : (step + 1) * ACCUM]]
            batch = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
            opt.zero_grad()
            reference(**batch).loss.backward()
            opt.step()
        result["param_rel_err"], result["worst_param"] = max_rel_err(model.named_parameters(), reference.parameters())
        result["distinct_rows_seen"] = len({tuple(r.tolist()) for s in all_seen for b in s for r in b["input_ids"]})
    return result


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    modes = sys.argv[1:-1] or list(DEFAULT_MODES)
    results = {}
    # The Trainer's default last: were it to fail, a failed backward would leave its DDP instance unusable.
    for find_unused in (False, None):
        for mode in modes:
            key = f"{mode}/{'default' if find_unused is None else 'find_unused_false'}"
            results[key] = run_case(mode, find_unused)
            if dist.get_rank() == 0:
                print(key, results[key], flush=True)
    write_result({"world_size": dist.get_world_size(), "steps": STEPS, "accum": ACCUM, "cases": results})
    finish()


if __name__ == "__main__":
    main()
