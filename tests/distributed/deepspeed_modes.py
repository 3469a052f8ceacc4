"""Model modes under DeepSpeed ZeRO through Accelerate, 2 processes, vs one process over the same global batches.

Launched with `accelerate launch --config_file training/accelerate_configs/deepspeed_zero{2,3}.yaml` (on a machine
without GPUs DeepSpeed takes its CPU accelerator and gloo). `accelerator.backward` runs DeepSpeed's backward and
optimizer step, so the check is on parameters: after every step, the (gathered, for ZeRO-3) parameters' change
since initialisation is compared with that of single-process SGD with the same gradient clipping, in float32.
Run: `accelerate launch --config_file CONFIG deepspeed_modes.py [MODE ...] OUT.json`.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _common import describe, finish, write_result
from _modes import MODES, local_slice, reference_loss, seed_for
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from reformer_rev.distributed import register_deepspeed_zero3_scopes

STEPS, ROWS, LR = 2, 4, 0.1
DEFAULT_MODES = ("stack_chunked_ffn", "chunked_ffn_dropout", "weight_tied", "branch_gates", "deq_implicit", "seq2seq")


def full_params(model: torch.nn.Module, stage: int) -> list[torch.Tensor]:
    params = list(model.parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def update_rel_err(now: list[torch.Tensor], ref: list[torch.Tensor], initial: list[torch.Tensor]) -> float:
    num = sum((a.double() - b.double()).pow(2).sum().item() for a, b in zip(now, ref))
    den = sum((b.double() - i.double()).pow(2).sum().item() for b, i in zip(ref, initial))
    return (num / den) ** 0.5


def run_mode(accelerator: Accelerator, mode_name: str, stage: int, clip: float, scopes: bool = True) -> dict:
    mode = MODES[mode_name]
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = mode.build(torch.float32)
    initial = [p.detach().clone() for p in reference.parameters()]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    ref_params = []
    for step in range(STEPS):
        ref_opt.zero_grad()
        reference_loss(mode, reference, mode.global_batch(step, ROWS), step, world).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        ref_opt.step()
        ref_params.append([p.detach().clone() for p in reference.parameters()])

    model = mode.build(torch.float32)
    if scopes:
        register_deepspeed_zero3_scopes(model)
    result: dict = {"zero_stage": stage, "release_scopes": scopes}
    errors = []
    try:
        engine, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))

        result["wrapped"] = type(engine).__name__
        for step in range(STEPS):
            torch.manual_seed(seed_for(step, rank))
            loss = engine(**local_slice(mode.global_batch(step, ROWS), rank, world)).loss
            accelerator.backward(loss)  # DeepSpeed: backward, gradient reduction and optimizer step
            optimizer.step()
            optimizer.zero_grad()
            errors.append(update_rel_err(full_params(model, stage), ref_params[step], initial))
        result.update(ok=True, update_rel_err=max(errors), per_step=errors)
        result["ranks_max_abs_diff"] = ranks_max_abs_diff(model, stage)
    except Exception as err:  # noqa: BLE001 - record DeepSpeed's failure, whatever its type
        result.update(ok=False, error=describe(err))
    return close_case(accelerator, result)


def ranks_max_abs_diff(model: torch.nn.Module, stage: int) -> float:
    """How far the ranks' (gathered) parameters differ: 0.0 when every rank applied the same update."""
    flat = torch.cat([p.reshape(-1) for p in full_params(model, stage)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def close_case(accelerator: Accelerator, result: dict) -> dict:
    """A case is ok only if it is ok on every rank; free DeepSpeed's engine for the next case."""
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, result["ok"])
    result["ok"] = all(verdicts)
    accelerator.free_memory()
    return result


def deepspeed_accelerator(rows: int) -> tuple[Accelerator, int, float]:
    """The Accelerator of a worker started by `accelerate launch` with a DeepSpeed config; its ZeRO stage and clipping."""
    # Without a GPU, Accelerate finds no backend and records ONE process (both ranks "main", unsharded data) while
    # DeepSpeed itself initialises gloo over all ranks: name the backend so that both agree.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        raise SystemExit("Launch with `accelerate launch --config_file training/accelerate_configs/deepspeed_zero*.yaml`.")
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = rows // accelerator.num_processes
    return accelerator, int(plugin.zero_stage), float(plugin.deepspeed_config.get("gradient_clipping", 0.0) or 0.0)


def main() -> None:
    accelerator, stage, clip = deepspeed_accelerator(ROWS)
    modes = sys.argv[1:-1] or list(DEFAULT_MODES)
    results = {}
    cases = [(mode, True) for mode in modes]
    if stage == 3:
        cases.append((modes[0], False))  # what register_deepspeed_zero3_scopes is for
    for mode, scopes in cases:
        key = mode if scopes else f"{mode}/without_release_scopes"
        results[key] = run_mode(accelerator, mode, stage, clip, scopes)
        if accelerator.is_main_process:
            print(f"zero{stage}", key, results[key], flush=True)
    write_result(
        {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
         "zero_stage": stage, "gradient_clipping": clip, "steps": STEPS, "cases": results}
    )
    finish()


if __name__ == "__main__":
    main()
