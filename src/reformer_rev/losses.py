"""The language-modelling losses, computed chunk by chunk so that `(sequence x vocab)` logits never exist at once.

This module imports only torch and transformers (remote-code export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .model_inputs import IGNORE_INDEX


def chunked_cross_entropy(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of `lm_head(hidden_states[:, t])` against `labels[:, t]` (no shift), chunk by chunk.

    Logits are computed `chunk_size` positions at a time under activation checkpointing, so backward recomputes one
    chunk's logits at a time (0 = one chunk). Parameters are used inside the graph (not passed around), which keeps
    DDP/FSDP hooks intact. The mean is over the non-ignored targets, or over `num_items_in_batch` when given:
    `Trainer` passes the target count of the whole accumulated (and multi-process) batch and then skips its own loss
    scaling, so each batch contributes its share of that global mean. `label_smoothing` mixes the target with the
    uniform distribution over the vocabulary (`F.cross_entropy`'s definition), still one chunk at a time.
    """
    labels = labels.to(hidden_states.device)
    # Cross-entropy in at least float32 (bf16 logits under autocast would lose the loss's precision).
    loss_dtype = torch.promote_types(hidden_states.dtype, torch.float32)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).to(loss_dtype)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
            label_smoothing=label_smoothing,
        )

    length = hidden_states.shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        total = chunk_loss(hidden_states, labels)
    else:
        total = hidden_states.new_zeros((), dtype=loss_dtype)
        for start in range(0, length, chunk_size):
            h, y = hidden_states[:, start : start + chunk_size], labels[:, start : start + chunk_size]
            if torch.is_grad_enabled():
                total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
            else:
                total = total + chunk_loss(h, y)
    if num_items_in_batch is None:
        count = (labels != IGNORE_INDEX).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=total.device)
    # A batch with no target gives 0 (not NaN) so gradient accumulation stays finite.
    return total / count.clamp(min=1)


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: position `t` predicts `labels[:, t + 1]` (labels are shifted here, HF convention)."""
    return chunked_cross_entropy(hidden_states[:, :-1], lm_head, labels[:, 1:], chunk_size, num_items_in_batch)
