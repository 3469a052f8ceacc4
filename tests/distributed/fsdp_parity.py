"""FSDP2 `fully_shard` over every `RevFormerBlock` (+ the root), 2 processes on CPU/gloo, vs one process.

Each rank trains on its half of one global batch; after one optimizer step the full (gathered) parameters must equal
those of a single-process step on the whole batch. Also recorded: how often the routing reset FSDP2's private training
state (`reformer_rev.distributed._leave_pre_backward`), and the same SGD step with that reset disabled, which tells
whether the installed torch still needs it. Run: `torchrun --nproc_per_node 2 fsdp_parity.py OUT.json`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from _common import finish, rel_err, tiny_config, write_result
from torch.distributed.fsdp import FSDPModule, fully_shard

from reformer_rev import RevFormerForCausalLM, distributed
from reformer_rev.modeling_reformer_rev import RevFormerBlock
from reformer_rev.distributed import register_fsdp_reversible_methods


def run(optimizer_name: str, rank: int, world: int, private_reset: bool = True) -> dict:
    torch.manual_seed(0)
    reference = RevFormerForCausalLM(tiny_config())
    model = copy.deepcopy(reference)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    blocks = [m for m in model.modules() if isinstance(m, RevFormerBlock)]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    patched = register_fsdp_reversible_methods(model)

    def make_opt(m):
        if optimizer_name == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)

    opt, ref_opt = make_opt(model), make_opt(reference)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(3, 64, (4 * world, 48), generator=g)
    local = batch.chunk(world)[rank]

    leave_pre_backward, resets = distributed._leave_pre_backward, []

    def counting(module):
        resets.append(module._get_fsdp_state()._training_state.name)
        if private_reset:
            leave_pre_backward(module)

    distributed._leave_pre_backward = counting
    try:
        loss = model(local, labels=local).loss
        loss.backward()
    finally:
        distributed._leave_pre_backward = leave_pre_backward
    opt.step()
    ref_loss = reference(batch, labels=batch).loss
    ref_loss.backward()
    ref_opt.step()

    worst_param, worst_update, worst_name = 0.0, 0.0, ""
    sharded, update_sq, param_sq = 0, 0.0, 0.0
    for (name, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        sharded += hasattr(p, "full_tensor")
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        e_param = rel_err(full.detach(), ref.detach())
        e_update = rel_err(full.detach() - initial[name], ref.detach() - initial[name])
        if e_update > worst_update:
            worst_update, worst_name = e_update, name
        worst_param = max(worst_param, e_param)
        update_sq += (ref.detach() - initial[name]).double().pow(2).sum().item()
        param_sq += initial[name].double().pow(2).sum().item()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {
        "optimizer": optimizer_name,
        "private_reset": private_reset,
        "calls_in_pre_backward": resets.count("PRE_BACKWARD"),
        "calls": len(resets),
        "param_rel_err": worst_param,
        "update_rel_err": worst_update,
        "worst_update_param": worst_name,
        "loss_rel_err": abs(mean_loss.item() / world - ref_loss.item()) / abs(ref_loss.item()),
        "update_to_param_norm": (update_sq / param_sq) ** 0.5,
        "sharded_params": sharded,
        "num_params": len(list(model.parameters())),
        "fsdp_blocks": sum(isinstance(b, FSDPModule) for b in blocks),
        "patched_blocks": patched,
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {
        "world_size": world,
        "runs": [run(name, rank, world) for name in ("sgd", "adamw")],
        "without_private_reset": run("sgd", rank, world, private_reset=False),
    }
    write_result(result)
    finish()


if __name__ == "__main__":
    main()
