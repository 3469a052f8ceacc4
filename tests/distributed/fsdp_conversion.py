"""FSDP2 over a model converted by `make_reversible`, 2 processes on CPU/gloo, vs one process on the same batches.

For each family (Llama, Qwen2 with sliding-window layers, and Qwen3 when `make_reversible` supports it) a tiny float64
model is converted and sharded the way Accelerate's FSDP2 plugin does it (`fully_shard` on every decoder layer, the
model's `_no_split_modules`, then on the root), and trained for `STEPS` AdamW steps with attention dropout on. Each
rank takes its slice of every global batch; the one-process reference runs the same slices one after the other with
each rank's seed (same dropout masks and heavy-ball signs) and steps on the mean of their losses, which is what
FSDP's averaging reduce-scatter computes. Recorded: per-step global losses, the final gathered weights, and the
per-process bytes of parameters + gradients + optimizer state against a DDP run of the same model.

Modes (command-line words before the output path; default all): `fully_shard` (the calls Accelerate makes, by hand),
`collectives` (counts FSDP2's all-gathers and reduce-scatters of one step), `bf16` (gradients under a bf16
`MixedPrecisionPolicy`, converted vs unconverted, against float32 one process) and `accelerate` (Accelerate's own FSDP2 preparation, `fsdp2_prepare_model` through `accelerator.prepare`, which
Accelerate skips on CPU: `reformer_rev.training.cli.adopt_fsdp_on_cpu` turns it on, as `train_lm.py` does).
Run: `torchrun --nproc_per_node 2 fsdp_conversion.py [modes...] OUT.json`.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from _common import describe, finish, reference_steps, rel_err, write_result  # puts the repository root on sys.path
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from eval.bench_sharded_conversion import held_bytes
from reformer_rev import make_reversible
from reformer_rev.conversion import SUPPORTED_MODEL_CLASSES
from tests._tiny_hf import family_model, random_ids, tiny_model

STEPS, PER_RANK, LENGTH, DROPOUT = 3, 2, 24, 0.1
FAMILIES = ["llama", "qwen2"] + (["qwen3"] if "Qwen3ForCausalLM" in SUPPORTED_MODEL_CLASSES else [])


def shard_like_accelerate(model: torch.nn.Module) -> None:
    layer_classes = tuple(model._no_split_modules)
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)


_ACCELERATOR = []


def prepare_with_accelerate(model, optimizer):
    """`accelerator.prepare` with Accelerate's FSDP2 plugin as `accelerate launch` builds it from a config with
    `fsdp_version: 2`, `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` (no class named: `_no_split_modules`)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from reformer_rev.training.cli import adopt_fsdp_on_cpu

    # A plugin remembers the layer class of the first model it wraps: a new one per model, in one shared state.
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    if not _ACCELERATOR:
        accelerator = Accelerator(cpu=True)
        assert adopt_fsdp_on_cpu(accelerator, plugin)
        _ACCELERATOR.append(accelerator)
    accelerator = _ACCELERATOR[0]
    accelerator.state.fsdp_plugin = plugin
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, str(accelerator.distributed_type)


def train(model, optimizer, batches, rank, world, sharded: bool):
    """STEPS steps; each rank its slice with its seed. Returns the global (mean over ranks) loss of every step."""
    losses = []
    for step, batch in enumerate(batches):
        local = batch.chunk(world)[rank]
        torch.manual_seed(1000 * step + rank)
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def run(family: str, mode: str, rank: int, world: int) -> dict:
    base = family_model(family, depth=3, dropout=DROPOUT)
    reference = make_reversible(copy.deepcopy(base), chunk_size_feed_forward=8)
    model = make_reversible(copy.deepcopy(base), chunk_size_feed_forward=8)
    rows = random_ids(PER_RANK * world * STEPS, LENGTH, seed=5)
    batches = list(rows.chunk(STEPS))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    ref_losses = reference_steps(reference, ref_opt, batches, world)
    distributed_type = "none"
    if mode == "fully_shard":
        shard_like_accelerate(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model, optimizer, distributed_type = prepare_with_accelerate(model, optimizer)
    model.train()
    losses = train(model, optimizer, batches, rank, world, sharded=True)
    fsdp_bytes = held_bytes(model, optimizer)
    layers = model._reversible_conversion.layers
    weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    expected = dict(reference.named_parameters())
    # Inference is the original model's, layer by layer, under FSDP's own per-layer hooks: eval logits and greedy
    # generation against the one-process reference (trained to the same weights).
    model.eval(), reference.eval()
    prompt = rows[:2, :8]
    with torch.no_grad():
        eval_logit_diff = (model(input_ids=rows[:2]).logits - reference(input_ids=rows[:2]).logits).abs().max().item()
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref_generated = reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    initial = dict(base.named_parameters())

    # DDP of the same model and batches, for the per-process bytes.
    ddp_model = DistributedDataParallel(make_reversible(copy.deepcopy(base), chunk_size_feed_forward=8))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-2, weight_decay=0.1)
    ddp_losses = train(ddp_model, ddp_opt, batches, rank, world, sharded=False)
    ddp_bytes = held_bytes(ddp_model, ddp_opt)
    ddp_weights = dict(ddp_model.module.named_parameters())
    all_bytes = torch.tensor([fsdp_bytes, ddp_bytes], dtype=torch.float64)
    gathered = [torch.empty_like(all_bytes) for _ in range(world)]
    dist.all_gather(gathered, all_bytes)
    return {
        "family": family,
        "mode": mode,
        "distributed_type": distributed_type,
        "layers_sharded": sum(isinstance(layer, FSDPModule) for layer in layers),
        "layers": len(layers),
        "blocks_routed": sum(bool(getattr(b, "_reformer_rev_fsdp_routed", False)) for b in model._reversible_conversion.blocks),
        "losses": losses,
        "reference_losses": ref_losses,
        "ddp_losses": ddp_losses,
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "eval_logit_max_abs_diff": eval_logit_diff,
        "generate_identical": torch.equal(generated, ref_generated),
        "max_weight_abs_diff": max((weights[n] - expected[n].detach()).abs().max().item() for n in weights),
        "max_weight_rel_err": max(rel_err(weights[n], expected[n].detach()) for n in weights),
        "ddp_max_loss_diff": max(abs(a - b) for a, b in zip(ddp_losses, ref_losses)),
        "ddp_max_weight_abs_diff": max((ddp_weights[n] - expected[n]).detach().abs().max().item() for n in weights),
        "max_update_rel_err": max(
            rel_err(weights[n] - initial[n].detach(), expected[n].detach() - initial[n].detach()) for n in weights
        ),
        "update_to_weight_norm": rel_err(
            torch.cat([expected[n].detach().reshape(-1) for n in weights]),
            torch.cat([initial[n].detach().reshape(-1) for n in weights]),
        ),
        "state_bytes_per_rank": {"fsdp2": [g[0].item() for g in gathered], "ddp": [g[1].item() for g in gathered]},
    }


def count_collectives() -> dict:
    """All-gathers and reduce-scatters of one forward+backward of a converted 3-layer Llama under FSDP2 (counted at the
    two `torch.distributed` functions FSDP2 calls), by feed-forward chunking and `reshard_after_forward`."""
    counts = {"all_gathers": 0, "reduce_scatters": 0}
    originals = dist.all_gather_single, dist.reduce_scatter_single

    def counting(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    dist.all_gather_single = counting(originals[0], "all_gathers")
    dist.reduce_scatter_single = counting(originals[1], "reduce_scatters")
    results = {}
    try:
        for chunk in (0, 8):
            for reshard in (True, False):
                model = make_reversible(tiny_model("llama", depth=3), chunk_size_feed_forward=chunk)
                for layer in model.model.layers:
                    fully_shard(layer, reshard_after_forward=reshard)
                fully_shard(model, reshard_after_forward=reshard)
                ids = random_ids(1, LENGTH)
                model(input_ids=ids, labels=ids).loss.backward()  # first call: lazy init, routing
                counts.update(all_gathers=0, reduce_scatters=0)
                model(input_ids=ids, labels=ids).loss.backward()
                results[f"chunk_size_feed_forward={chunk},reshard_after_forward={reshard}"] = dict(counts)
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = originals
    return results


def bf16_mixed_precision(rank: int, world: int) -> dict:
    """One backward under `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`, converted Llama and the
    unconverted one sharded the same way: gathered gradients vs float32 one-process gradients on the same batch."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    base = tiny_model("llama", dtype=torch.float32)
    ids = random_ids(2 * world, LENGTH, seed=3)
    out = {}
    for name, convert in (("converted", True), ("original", False)):
        reference = make_reversible(copy.deepcopy(base)) if convert else copy.deepcopy(base)
        model = make_reversible(copy.deepcopy(base)) if convert else copy.deepcopy(base)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        local = ids.chunk(world)[rank]
        torch.manual_seed(rank)
        model(input_ids=local, labels=local).loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        for r, part in enumerate(ids.chunk(world)):
            torch.manual_seed(r)
            (reference(input_ids=part, labels=part).loss / world).backward()
        out[f"{name}_grad_rel_err"] = max(rel_err(grads[n], p.grad) for n, p in reference.named_parameters())
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    modes = sys.argv[1:-1] or ["fully_shard", "accelerate", "collectives", "bf16"]
    cases = {}
    if "bf16" in modes:
        modes.remove("bf16")
        cases["bf16_mixed_precision"] = bf16_mixed_precision(rank, world)
    if "collectives" in modes:
        modes.remove("collectives")
        cases["collectives"] = count_collectives()
    for mode in modes:
        for family in FAMILIES:
            try:
                cases[f"{family}/{mode}"] = {"ok": True, **run(family, mode, rank, world)}
            except Exception as err:  # recorded, the test names it
                if rank == 0:
                    import traceback

                    traceback.print_exc()
                cases[f"{family}/{mode}"] = {"ok": False, "error": describe(err)}
    write_result({"world_size": world, "torch": torch.__version__, "families": FAMILIES, "cases": cases})
    finish()


if __name__ == "__main__":
    main()
