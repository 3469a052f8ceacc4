"""Every model mode sharded with `reformer_rev.distributed.shard_reversible_model` (FSDP2, gloo, CPU) vs one process.

Each rank trains `STEPS` SGD steps on its slice of each global batch. Recorded per mode: the largest relative
difference of the (gathered) reduce-scattered gradients from the single-process gradients at every step, of the
gathered parameters after the last step, how many parameters are sharded DTensors, or the error raised. Then, with
bf16 mixed precision (`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`, float32 model), the first
step's gradients of the reversible model and of its plain-autograd twin, both sharded the same way, against float32
single-process gradients: the engine must be as accurate as ordinary autograd under the same policy.
Run: `torchrun --nproc_per_node 2 fsdp_modes.py [MODE ...] OUT.json`.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from _common import describe, finish, write_result
from _modes import MODES, Mode, local_slice, max_rel_err, reference_loss, seed_for, train_reference
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from reformer_rev.distributed import reversible_blocks, shard_reversible_model

STEPS, ROWS, LR = 2, 4, 0.1


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_mode(mode_name: str) -> dict:
    mode = MODES[mode_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_grads = {}
    reference = train_reference(
        mode, STEPS, ROWS, world, LR,
        on_grads=lambda step, m: ref_grads.__setitem__(step, [p.grad.clone() for p in m.parameters()]),
    )
    model = mode.build()
    names = [n for n, _ in model.named_parameters()]
    result: dict = {}
    try:
        shard_reversible_model(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        grad_err, grad_name = 0.0, ""
        for step in range(STEPS):
            optimizer.zero_grad()
            torch.manual_seed(seed_for(step, rank))
            model(**local_slice(mode.global_batch(step, ROWS), rank, world)).loss.backward()
            missing = [n for n, p in zip(names, model.parameters()) if p.grad is None]
            if missing:
                raise RuntimeError(f"no gradient for {missing[:3]}")
            e, n = max_rel_err(zip(names, (full(p.grad) for p in model.parameters())), ref_grads[step])
            if e > grad_err:
                grad_err, grad_name = e, n
            optimizer.step()
        param_err, param_name = max_rel_err(zip(names, (full(p) for p in model.parameters())), reference.parameters())
        result.update(
            ok=True, grad_rel_err=grad_err, worst_grad=grad_name, param_rel_err=param_err, worst_param=param_name,
            sharded_params=sum(hasattr(p, "full_tensor") for p in model.parameters()), num_params=len(names),
            fsdp_blocks=sum(isinstance(b, FSDPModule) for b in reversible_blocks(model)),
        )
    except (RuntimeError, AssertionError, ValueError) as err:
        result.update(ok=False, error=describe(err))
    verdicts = [None] * world
    dist.all_gather_object(verdicts, result)
    result["ok"] = all(v["ok"] for v in verdicts)
    return result


def run_mixed_precision(mode_name: str) -> dict:
    """bf16 FSDP2 gradients of the reversible model and of its twin vs float32 one-process gradients (step 0)."""
    base = MODES[mode_name].deterministic()
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = base.global_batch(0, ROWS)
    reference = base.build(torch.float32)
    reference_loss(base, reference, batch, 0, world).backward()
    ref_grads = [p.grad for p in reference.parameters()]
    result = {}
    for reversible in (True, False):
        mode = Mode(base.name, base.kind, {**base.config, "reversible": reversible})
        model = mode.build(torch.float32)
        names = [n for n, _ in model.named_parameters()]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_reversible_model(model, mp_policy=policy)
        model(**local_slice(batch, rank, world)).loss.backward()
        err, _ = max_rel_err(zip(names, (full(p.grad) for p in model.parameters())), ref_grads)
        result["reversible_grad_rel_err" if reversible else "twin_grad_rel_err"] = err
    return {"ok": True, **result}


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    modes = sys.argv[1:-1] or [m for m in MODES if m != "plain_autograd_twin"]
    results = {}
    for mode in modes:
        results[mode] = run_mode(mode)
        if dist.get_rank() == 0:
            print(mode, results[mode], flush=True)
    for mode in ("stack_chunked_ffn", "seq2seq"):
        results[f"{mode}/bf16_mixed_precision"] = run_mixed_precision(mode)
        if dist.get_rank() == 0:
            print(mode, "bf16", results[f"{mode}/bf16_mixed_precision"], flush=True)
    write_result({"world_size": dist.get_world_size(), "steps": STEPS, "rows": ROWS, "cases": results})
    finish()


if __name__ == "__main__":
    main()
