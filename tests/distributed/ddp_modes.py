"""Every model mode under 2-process DDP through Accelerate (gloo, CPU), vs one process over the same global batches.

For each mode of `_modes.MODES` and each DDP setting (Accelerate's defaults, i.e. `find_unused_parameters=False`;
`static_graph=True`; `find_unused_parameters=True`, the `Trainer`'s default for a `PreTrainedModel`), every rank
trains `STEPS` SGD steps on its slice of each global batch, in `ACCUM` micro-batches (`accelerator.accumulate`, so
the first micro-batch's backward runs under `no_sync`). Recorded per case: the largest relative difference of
the all-reduced gradients from the single-process gradients (every step, every parameter), of the parameters after
the last step, the largest parameter difference between ranks, or the error DDP raised.
Run: `torchrun --nproc_per_node 2 ddp_modes.py [MODE ...] OUT.json`.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from _common import describe, finish, write_result
from _modes import MODES, local_slice, max_rel_err, seed_for, train_reference
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import GradientAccumulationPlugin

STEPS, ACCUM, ROWS, LR = 2, 2, 8, 0.1
SETTINGS = {
    "default": {},
    "static_graph": {"static_graph": True},
    "find_unused_parameters": {"find_unused_parameters": True},
}
# DDP's static_graph crashes under `no_sync` for any model, ordinary autograd included ("expect_autograd_hooks_
# INTERNAL ASSERT FAILED", pytorch/pytorch#143580, huggingface/accelerate#3679): with static_graph, accumulate by
# synchronising every micro-batch (Accelerate's `sync_each_batch=True`).
SYNC_EACH_BATCH = {"static_graph"}


def ranks_max_abs_diff(model: torch.nn.Module) -> float:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def run_case(mode_name: str, setting: str) -> dict:
    mode = MODES[mode_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_grads = {}
    reference = train_reference(
        mode, STEPS, ROWS, world * ACCUM, LR,
        on_grads=lambda step, m: ref_grads.__setitem__(step, [p.grad.clone() for p in m.parameters()]),
    )
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=ACCUM, sync_each_batch=setting in SYNC_EACH_BATCH
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(**SETTINGS[setting])],
    )
    model = mode.build()
    names = [n for n, _ in model.named_parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    result = {"wrapped": type(ddp).__name__, "distributed_type": str(accelerator.distributed_type)}
    grad_err, grad_name = 0.0, ""
    try:
        for step in range(STEPS):
            optimizer.zero_grad()
            for micro in range(ACCUM):
                index = micro * world + rank
                with accelerator.accumulate(ddp):
                    torch.manual_seed(seed_for(step, index))
                    loss = ddp(**local_slice(mode.global_batch(step, ROWS), index, world * ACCUM)).loss
                    accelerator.backward(loss)
            assert accelerator.sync_gradients
            missing = [n for n, p in zip(names, model.parameters()) if p.grad is None]
            if missing:
                raise RuntimeError(f"no gradient for {missing[:3]}")
            e, n = max_rel_err(zip(names, (p.grad for p in model.parameters())), ref_grads[step])
            if e > grad_err:
                grad_err, grad_name = e, n
            optimizer.step()
    except RuntimeError as err:
        result.update(ok=False, error=describe(err))
    else:
        param_err, param_name = max_rel_err(model.named_parameters(), reference.parameters())
        result.update(
            ok=True, grad_rel_err=grad_err, worst_grad=grad_name, param_rel_err=param_err, worst_param=param_name,
            ranks_max_abs_diff=ranks_max_abs_diff(model),
        )
    # Collect every rank's verdict: a rank-local failure must not pass as a success.
    verdicts = [None] * world
    dist.all_gather_object(verdicts, result)
    result["ok"] = all(v["ok"] for v in verdicts)
    for key in ("grad_rel_err", "param_rel_err"):
        if result["ok"]:
            result[key] = max(v[key] for v in verdicts)
    accelerator.free_memory()
    return result


def main() -> None:
    # Our own process group with a short timeout: a case that desynchronises the ranks fails instead of hanging.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    modes = sys.argv[1:-1] or list(MODES)
    results = {}
    # find_unused_parameters last: a failed backward leaves its DDP instance unusable (not the process group).
    for setting in SETTINGS:
        for mode in modes:
            results[f"{mode}/{setting}"] = run_case(mode, setting)
            if dist.get_rank() == 0:
                print(mode, setting, results[f"{mode}/{setting}"], flush=True)
    write_result({"world_size": dist.get_world_size(), "steps": STEPS, "accum": ACCUM, "rows": ROWS, "cases": results})
    finish()


if __name__ == "__main__":
    main()
