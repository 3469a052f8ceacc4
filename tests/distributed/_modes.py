"""The model modes every multi-process worker checks, and the single-process reference they are compared with.

A mode is a tiny float64 model (float64 so that a wrong reduction stands out from rounding: a correct one agrees to
~1e-15) plus a deterministic stream of global batches. Rank `r` of `w` trains on rows `[r*n/w, (r+1)*n/w)` of each
global batch. Modes with dropout seed the global generator with `seed_for(step, r)` before rank r's forward; the
reference seeds the same way before each rank's slice and averages the slices' losses, which is what data parallelism
computes. So does the reference of a DEQ mode, whose solver stops when the worst row of its batch has converged (a
different batch, a different last iterate). Other modes are compared with one forward over the whole global batch. With gradient accumulation each rank's share is split again into micro-batches: slice
`m * world + r` of the global batch is micro-batch m of rank r.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import rel_err, tiny_config

from reformer_rev import RevFormerConfig, RevFormerForCausalLM, RevFormerForConditionalGeneration

DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)
DEQ = dict(depth_mode="deq", num_unique_layers=1, deq_tol=1e-10, deq_max_iter=60)


@dataclass
class Mode:
    name: str
    kind: str  # "lm" or "seq2seq"
    config: dict = field(default_factory=dict)

    @property
    def random(self) -> bool:
        """Whether a forward draws random numbers (dropout)."""
        return any(self.config.get(k, 0) for k in DROPOUT)

    @property
    def per_slice_reference(self) -> bool:
        """Whether the exact reference replays each rank's slice separately (dropout streams, DEQ stopping rule)."""
        return self.random or self.config.get("depth_mode") == "deq"

    def deterministic(self) -> Mode:
        """The same mode without dropout (for clients whose per-rank random streams cannot be replayed)."""
        config = {k: v for k, v in self.config.items() if k not in DROPOUT}
        return Mode(self.name if config == self.config else f"{self.name}_no_dropout", self.kind, config)

    def build(self, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
        torch.manual_seed(0)
        overrides = dict(self.config)
        if dtype != torch.float64 and "deq_tol" in overrides:
            overrides["deq_tol"] = max(overrides["deq_tol"], 1e-6)  # float32's residual floor is ~3e-8
        if self.kind == "seq2seq":
            config = RevFormerConfig(
                vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                encoder_layers=2, decoder_layers=3, max_position_embeddings=128, is_encoder_decoder=True,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides,
            )
            return RevFormerForConditionalGeneration(config).to(dtype).train()
        return RevFormerForCausalLM(tiny_config(**overrides)).to(dtype).train()

    def global_batch(self, step: int, rows: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        if self.kind == "seq2seq":
            return {
                "input_ids": torch.randint(3, 64, (rows, 14), generator=g),
                "labels": torch.randint(3, 64, (rows, 9), generator=g),
            }
        ids = torch.randint(3, 64, (rows, 24), generator=g)
        return {"input_ids": ids, "labels": ids}


MODES = {
    m.name: m
    for m in (
        # The same modules under ordinary autograd: what any DDP setting must accept (a baseline, not the engine).
        Mode("plain_autograd_twin", "lm", dict(chunk_size_feed_forward=4, reversible=False)),
        Mode("stack_chunked_ffn", "lm", dict(chunk_size_feed_forward=4)),
        Mode("chunked_ffn_dropout", "lm", dict(chunk_size_feed_forward=4, **DROPOUT)),
        # Parameters owned by the block itself (not by a sub-module), used inside f/g: ZeRO-3 hooks sub-modules only.
        Mode("branch_gates", "lm", dict(branch_scale="learnable_gate", chunk_size_feed_forward=4)),
        Mode("weight_tied", "lm", dict(num_hidden_layers=5, num_unique_layers=2, chunk_size_feed_forward=4, **DROPOUT)),
        Mode("deq_implicit", "lm", dict(**DEQ, chunk_size_feed_forward=4)),
        Mode("deq_phantom", "lm", dict(**DEQ, deq_backward="phantom", deq_phantom_steps=3, chunk_size_feed_forward=4)),
        Mode("deq_jacobian_reg", "lm", dict(**DEQ, deq_jacobian_reg=0.1)),
        Mode("deq_phantom_jacobian_reg", "lm", dict(**DEQ, deq_backward="phantom", deq_phantom_steps=3, deq_jacobian_reg=0.1)),
        # Every hidden state asked for: the stack runs block by block (one engine call per application).
        Mode("weight_tied_hidden_states", "lm", dict(num_hidden_layers=5, num_unique_layers=2, chunk_size_feed_forward=4,
                                                     output_hidden_states=True, **DROPOUT)),
        Mode("seq2seq", "seq2seq", dict(chunk_size_feed_forward=4, tie_word_embeddings=True, **DROPOUT)),
    )
}


def seed_for(step: int, rank: int) -> int:
    return 100 * step + rank


def local_slice(batch: dict[str, torch.Tensor], index: int, count: int) -> dict[str, torch.Tensor]:
    """Slice `index` of `count` equal slices of the global batch (rank r of w, or micro-batch m of rank r)."""
    return {k: v.chunk(count)[index] for k, v in batch.items()}


def reference_loss(mode: Mode, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int, slices: int):
    """The single-process loss whose gradient data parallelism over `slices` (ranks x micro-batches) must reproduce."""
    if not mode.per_slice_reference:
        return model(**batch).loss
    total = 0.0
    for i in range(slices):
        torch.manual_seed(seed_for(step, i))
        total = total + model(**local_slice(batch, i, slices)).loss / slices
    return total


def train_reference(mode: Mode, steps: int, rows: int, slices: int, lr: float, on_grads: Callable | None = None):
    """Plain single-process SGD over the same global batches; `on_grads(step, model)` sees each step's gradients."""
    model = mode.build()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        reference_loss(mode, model, mode.global_batch(step, rows), step, slices).backward()
        if on_grads is not None:
            on_grads(step, model)
        opt.step()
    return model


def max_rel_err(params, ref_params) -> tuple[float, str]:
    worst, worst_name = 0.0, ""
    for (name, p), q in zip(params, ref_params):
        e = rel_err(p.detach(), q.detach())
        if e > worst:
            worst, worst_name = e, name
    return worst, worst_name
