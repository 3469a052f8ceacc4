"""2-process DDP through Accelerate: a model converted by `make_reversible` trains exactly like its twin.

GPT-2 (dropout on) and Llama, each converted twice from the same weights: reversible and `reversible=False`. Both
are prepared by one Accelerator (DDP with its default `find_unused_parameters=False`, gradient accumulation 2) and
trained on the same batches with the same RNG states, so dropout masks and BDIA signs agree. The twin is plain
autograd under DDP, so equal parameters mean the reversible backward delivered every gradient to DDP's all-reduce.
Run: `torchrun --nproc_per_node 2 ddp_conversion.py OUT.json`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from _common import finish, rel_err, write_result  # puts the repository root on sys.path
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader

from reformer_rev import make_reversible
from tests._tiny_hf import random_ids, tiny_model

ACCUM, PER_DEVICE, STEPS = 2, 2, 3


def run(family: str, accelerator: Accelerator) -> dict:
    world = accelerator.num_processes
    reference = tiny_model(family, dropout=0.1)  # float64: AdamW would magnify fp32 rounding differences
    initial = [p.detach().clone() for p in reference.parameters()]
    rev = make_reversible(copy.deepcopy(reference))
    twin = make_reversible(copy.deepcopy(reference), reversible=False)
    rows = random_ids(PER_DEVICE * world * ACCUM * STEPS, 24, seed=3)
    loader = DataLoader([{"input_ids": r} for r in rows], batch_size=PER_DEVICE, shuffle=True)
    opt_rev = torch.optim.AdamW(rev.parameters(), lr=1e-2)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    rev, twin, opt_rev, opt_twin, loader = accelerator.prepare(rev, twin, opt_rev, opt_twin, loader)
    rev.train(), twin.train()
    losses = []
    for batch in loader:
        ids = batch["input_ids"]
        with accelerator.accumulate(rev, twin):
            state = torch.get_rng_state()
            loss_rev = rev(input_ids=ids, labels=ids).loss
            accelerator.backward(loss_rev)
            torch.set_rng_state(state)  # the twin draws the same dropout masks and BDIA signs
            loss_twin = twin(input_ids=ids, labels=ids).loss
            accelerator.backward(loss_twin)
            for opt in (opt_rev, opt_twin):
                opt.step()
                opt.zero_grad()
        losses.append((loss_rev.item(), loss_twin.item()))
    mine = [p.detach() for p in accelerator.unwrap_model(rev).parameters()]
    theirs = [p.detach() for p in accelerator.unwrap_model(twin).parameters()]
    flat = torch.cat([p.reshape(-1) for p in mine])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    update = sum((p - i).double().pow(2).sum().item() for p, i in zip(mine, initial)) ** 0.5
    norm = sum(i.double().pow(2).sum().item() for i in initial) ** 0.5
    return {
        "family": family,
        "num_processes": world,
        "distributed_type": str(accelerator.distributed_type),
        "ddp_wrapped": type(rev).__name__,
        "micro_batches": len(losses),
        "max_loss_diff": max(abs(a - b) for a, b in losses),
        "param_rel_err": max(rel_err(p, q) for p, q in zip(mine, theirs)),
        "update_rel_err": max(rel_err(p - i, q - i) for p, q, i in zip(mine, theirs, initial)),
        "max_abs_diff_across_ranks": max((g - gathered[0]).abs().max().item() for g in gathered),
        "update_to_param_norm": update / norm,
    }


def main() -> None:
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=ACCUM,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    set_seed(0)
    write_result({"runs": [run(family, accelerator) for family in ("gpt2", "llama")]})
    accelerator.free_memory()
    finish()


if __name__ == "__main__":
    main()
