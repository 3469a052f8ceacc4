"""2-process DDP through Accelerate, with gradient accumulation, vs one process over the same global batches.

Uses the training script's own `make_accelerator` (seedable sampler, `find_unused_parameters=False`) and the same
step as `train_lm.py` (accumulate, clip, step). Every rank records the blocks it trained on; rank 0 then replays the
global batches (all ranks x all micro-batches of each optimizer step) in a plain single-process loop and compares.
Run: `torchrun --nproc_per_node 2 ddp_parity.py OUT.json`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import torch.distributed as dist
from _common import finish, rel_err, tiny_config, write_result
from torch.utils.data import DataLoader

from reformer_rev import RevFormerForCausalLM
from training.train_lm import collate_blocks, make_accelerator

ACCUM, PER_DEVICE, STEPS, CLIP = 2, 2, 4, 0.5


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def run(optimizer_name: str, output_dir: str) -> dict:
    args = argparse.Namespace(
        gradient_accumulation_steps=ACCUM, mixed_precision="no", cpu=True, report_to="none", output_dir=output_dir, seed=0
    )
    accelerator = make_accelerator(args)
    world = accelerator.num_processes
    torch.manual_seed(0)
    reference = RevFormerForCausalLM(tiny_config(chunk_size_feed_forward=0))
    model = copy.deepcopy(reference)
    initial = [p.detach().clone() for p in reference.parameters()]
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": row.tolist()} for row in torch.randint(3, 64, (PER_DEVICE * world * ACCUM * STEPS, 40), generator=g)]
    loader = DataLoader(data, shuffle=True, batch_size=PER_DEVICE, collate_fn=collate_blocks)
    optimizer = make_optimizer(optimizer_name, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loader.set_epoch(0)

    seen = []
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
        seen.append(batch["input_ids"])
    assert len(seen) == ACCUM * STEPS, len(seen)

    # Global batch of optimizer step s: every rank's micro-batches s*ACCUM .. s*ACCUM+ACCUM-1.
    local = torch.stack(seen)  # (micro, PER_DEVICE, T)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    params = torch.cat([p.detach().reshape(-1) for p in accelerator.unwrap_model(model).parameters()])
    all_params = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(all_params, params)
    across_ranks = max((p - all_params[0]).abs().max().item() for p in all_params)

    ref_opt = make_optimizer(optimizer_name, reference)
    for step in range(STEPS):
        micro = slice(step * ACCUM, (step + 1) * ACCUM)
        batch = torch.cat([r[micro].reshape(-1, r.shape[-1]) for r in gathered])
        reference(batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        ref_opt.step()
        ref_opt.zero_grad()

    mine = list(accelerator.unwrap_model(model).parameters())
    worst_param = max(rel_err(p.detach(), r.detach()) for p, r in zip(mine, reference.parameters()))
    worst_update = max(
        rel_err(p.detach() - i, r.detach() - i) for p, r, i in zip(mine, reference.parameters(), initial)
    )
    update_norm = sum((r.detach() - i).double().pow(2).sum().item() for r, i in zip(reference.parameters(), initial))
    param_norm = sum(i.double().pow(2).sum().item() for i in initial)
    distinct = len({tuple(b.reshape(-1)[:8].tolist()) for r in gathered for b in r.reshape(-1, r.shape[-1])})
    accelerator.free_memory()
    return {
        "optimizer": optimizer_name,
        "num_processes": world,
        "distributed_type": str(accelerator.distributed_type),
        "ddp_wrapped": type(model).__name__,
        "optimizer_steps": STEPS,
        "gradient_accumulation_steps": ACCUM,
        "max_abs_diff_across_ranks": across_ranks,
        "param_rel_err": worst_param,
        "update_rel_err": worst_update,
        "update_to_param_norm": (update_norm / param_norm) ** 0.5,
        "distinct_blocks_seen": distinct,
        "num_blocks": len(data),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = {"runs": [run(name, tmp) for name in ("sgd", "adamw")]}
    write_result(result)
    finish()


if __name__ == "__main__":
    main()
