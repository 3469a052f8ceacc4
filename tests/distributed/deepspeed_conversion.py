"""DeepSpeed ZeRO over a model converted by `make_reversible`, through Accelerate, 2 processes vs one process.

Launched with `accelerate launch --config_file training/accelerate_configs/deepspeed_zero{2,3}.yaml` (without GPUs
DeepSpeed takes its CPU accelerator and gloo). Tiny Llama and Qwen2 (Qwen3 when `make_reversible` supports it),
float32, attention dropout on, SGD with the config's gradient clipping, `STEPS` steps; each rank its slice of every
global batch with its own seed, the one-process reference the same slices in turn and the mean of their losses.
Compared: per-step global losses, and the (gathered) parameters' change since initialisation after every step.
Under ZeRO-3 the conversion gives each layer's engine block its release scope by itself (`_check_sharding`); the
`without_release_scopes` case removes them again after the first forward to show what they are for.
Run: `accelerate launch --config_file CONFIG deepspeed_conversion.py OUT.json`.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from _common import describe, finish, reference_steps, write_result
from accelerate import Accelerator
from deepspeed_modes import close_case, deepspeed_accelerator, full_params, ranks_max_abs_diff, update_rel_err

from reformer_rev import make_reversible
from reformer_rev.conversion import SUPPORTED_MODEL_CLASSES
from tests._tiny_hf import family_model, random_ids

STEPS, ROWS, LENGTH, LR, DROPOUT = 2, 4, 24, 0.1, 0.1
FAMILIES = ["llama", "qwen2"] + (["qwen3"] if "Qwen3ForCausalLM" in SUPPORTED_MODEL_CLASSES else [])


def run(accelerator: Accelerator, family: str, stage: int, clip: float, scopes: bool = True) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    base = family_model(family, dropout=DROPOUT, dtype=torch.float32)
    batches = list(random_ids(ROWS * STEPS, LENGTH, seed=5).chunk(STEPS))
    reference = make_reversible(copy.deepcopy(base), chunk_size_feed_forward=8)
    initial = [p.detach().clone() for p in reference.parameters()]
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    ref_params = []
    ref_losses = reference_steps(
        reference, ref_opt, batches, world, clip,
        after_step=lambda: ref_params.append([p.detach().clone() for p in reference.parameters()]),
    )

    model = make_reversible(copy.deepcopy(base), chunk_size_feed_forward=8)
    result: dict = {"family": family, "zero_stage": stage, "release_scopes": scopes}
    try:
        engine, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
        result["wrapped"] = type(engine).__name__
        losses, errors = [], []
        for step, batch in enumerate(batches):
            local = batch.chunk(world)[rank]
            torch.manual_seed(1000 * step + rank)
            if not scopes:  # the conversion adds them at the first training forward: take them away again
                for block in model._reversible_conversion.blocks:
                    block.gradient_release_scope = None
                model._reversible_conversion._check_sharding = lambda: None
            loss = engine(input_ids=local, labels=local).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
            errors.append(update_rel_err(full_params(model, stage), ref_params[step], initial))
        result.update(
            ok=True, losses=losses, reference_losses=ref_losses,
            max_loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)), update_rel_err=max(errors),
            scopes_set=sum(getattr(b, "gradient_release_scope", None) is not None
                           for b in model._reversible_conversion.blocks),
        )
        result["ranks_max_abs_diff"] = ranks_max_abs_diff(model, stage)
    except Exception as err:  # noqa: BLE001 - record DeepSpeed's failure, whatever its type
        result.update(ok=False, error=describe(err))
    return close_case(accelerator, result)


def main() -> None:
    accelerator, stage, clip = deepspeed_accelerator(ROWS)
    cases = {}
    for family in FAMILIES:
        cases[family] = run(accelerator, family, stage, clip)
        if accelerator.is_main_process:
            print(f"zero{stage}", family, cases[family], flush=True)
    if stage == 3:
        cases["llama/without_release_scopes"] = run(accelerator, "llama", stage, clip, scopes=False)
    write_result(
        {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
         "zero_stage": stage, "gradient_clipping": clip, "steps": STEPS, "families": FAMILIES, "cases": cases}
    )
    finish()


if __name__ == "__main__":
    main()
