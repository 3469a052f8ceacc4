#!/usr/bin/env python
"""Per-process memory of a converted model (`make_reversible`) under FSDP2 vs DDP, 2 processes on CPU (gloo).

Run under torchrun (every rank measures itself; rank 0 writes the table):

    OMP_NUM_THREADS=1 PYTHONPATH=. torchrun --nproc_per_node 2 -m eval.bench_sharded_conversion
    ... -m eval.bench_sharded_conversion --update_docs      # also docs/benchmarks/sharded_conversion.{json,md}

Candidates, per family (Llama; Qwen2 with sliding-window layers), same weights, batches and AdamW (`foreach=False`):

* `ddp`: `make_reversible(model)` under `DistributedDataParallel`;
* `fsdp2`: `make_reversible(model)` with `fully_shard` on every decoder layer and the root (what Accelerate's FSDP2
  plugin does with `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`);
* `fsdp2_original`: the unconverted model under the same FSDP2 sharding (ordinary autograd keeps every layer's
  activations), for the activation side.

Per process: the bytes it holds between steps (its parameters, gradients and AdamW state: a DTensor counts its own
shard) and the peak of one training step on top of them (`reformer_rev.profiling.peak_allocated_bytes`: the allocator's
running sum over forward, backward, optimizer step, all-gather and reduce-scatter buffers included), after a warm-up
step. Their sum is the process's training peak. Both ranks' figures are kept; the table shows the larger.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from eval._bench_common import MB, SCRATCH_DIR, environment, markdown_table, write_bench_outputs
from reformer_rev import make_reversible
from reformer_rev.profiling import peak_allocated_bytes

CANDIDATES = ("ddp", "fsdp2", "fsdp2_original")


def build(family: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden_size // 64, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, use_cache=False,
    )
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=args.seq_len // 4,
                                        max_window_layers=1))


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(local_bytes(p) + local_bytes(p.grad) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def measure(family: str, candidate: str, args: argparse.Namespace, rank: int, world: int) -> dict:
    base = build(family, args)
    model = copy.deepcopy(base) if candidate == "fsdp2_original" else make_reversible(copy.deepcopy(base))
    if candidate == "ddp":
        model = DistributedDataParallel(model)
    else:
        for layer in (model.model.layers):
            fully_shard(layer)
        fully_shard(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(3, args.vocab_size, (args.batch_size, args.seq_len), generator=g)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()  # warm-up: gradients and optimizer state exist from here on
    held = held_bytes(model, optimizer)
    peak = peak_allocated_bytes(step)
    return {"held_bytes": held, "step_peak_bytes": peak, "total_bytes": held + peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llama,qwen2")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=2, help="per process")
    parser.add_argument("--output_dir", default=str(SCRATCH_DIR / "sharded_conversion"))
    parser.add_argument("--update_docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for family in args.families.split(","):
        for candidate in CANDIDATES:
            mine = measure(family, candidate, args, rank, world)
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            results.append({"family": family, "candidate": candidate, "per_rank": gathered,
                            **{k: max(r[k] for r in gathered) for k in mine}})
    if rank == 0:
        rows = []
        for r in results:
            ddp = next(x for x in results if x["family"] == r["family"] and x["candidate"] == "ddp")
            rows.append([r["family"], r["candidate"], f"{r['held_bytes'] / MB:.1f}", f"{r['step_peak_bytes'] / MB:.1f}",
                         f"{r['total_bytes'] / MB:.1f}", f"{r['total_bytes'] / ddp['total_bytes']:.2f}"])
        shape = (f"{world} processes (gloo, CPU), hidden {args.hidden_size}, {args.layers} layers, FFN "
                 f"{4 * args.hidden_size}, vocab {args.vocab_size}, {args.batch_size} x {args.seq_len} tokens per "
                 "process, float32, AdamW")
        table = (f"Per-process memory, {shape} (max over ranks; MB = 2^20 bytes)\n\n" + markdown_table(
            ["family", "candidate", "held: params + grads + AdamW (MB)", "step peak on top (MB)", "total (MB)",
             "total / DDP"], rows))
        print(table)
        write_bench_outputs("sharded_conversion", {"args": vars(args), "world_size": world, "results": results,
                                                   "environment": environment()},
                            table, args.output_dir, args.update_docs)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
