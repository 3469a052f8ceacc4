"""Shared helpers of the multi-process workers (launched with `torchrun --nproc_per_node 2`, gloo on CPU)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from reformer_rev import RevFormerConfig

torch.set_num_threads(1)


def tiny_config(**overrides) -> RevFormerConfig:
    kwargs = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        loss_chunk_size=16, chunk_size_feed_forward=8,
    )
    kwargs.update(overrides)
    return RevFormerConfig(**kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def describe(err: BaseException) -> str:
    """`Type: first line of the message` (some library assertions have no message: then where it was raised)."""
    lines = str(err).strip().splitlines()
    if lines:
        return f"{type(err).__name__}: {lines[0][:240]}"
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(err).__name__}{where}"


def write_result(result: dict) -> None:
    """Rank 0 writes the measurements to the JSON path given as the last command-line argument."""
    if int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[-1]).write_text(json.dumps(result, indent=2))


def finish() -> None:
    """Leave the process group and end the process at once.

    After FSDP2 work on gloo, the interpreter's teardown sometimes aborts in a C++ destructor ("terminate called without
    an active exception", SIGABRT) although every rank finished and rank 0 wrote its result: seen in about 1 of 10 full
    suite runs on a loaded machine, never when the workers run alone; also seen once after a Trainer DDP run that left
    the process group to the interpreter (CI, lowest releases). `os._exit` skips that teardown, so the exit code says
    whether the work itself succeeded.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def reference_steps(model, optimizer, batches, world: int, clip: float = 0.0, after_step=None) -> list[float]:
    """One process over the same global batches as `world` ranks: each step runs every rank's slice in turn with that
    rank's seed (`1000 * step + rank`: same dropout masks and coupling signs as the rank) and steps on the mean of their
    losses, which is what the ranks' averaging reduction computes. Returns the per-step losses."""
    losses = []
    for step, batch in enumerate(batches):
        parts = []
        for rank, local in enumerate(batch.chunk(world)):
            torch.manual_seed(1000 * step + rank)
            parts.append(model(input_ids=local, labels=local).loss)
        loss = torch.stack(parts).mean()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if after_step is not None:
            after_step()
    return losses
