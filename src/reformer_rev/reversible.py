"""A small, model-agnostic engine for reversible residual stacks.

A reversible block owns two residual functions, `f` and `g`, and maps two streams `(x1, x2)` to

    y1 = x1 + f(x2)
    y2 = x2 + g(y1)

whose inverse is `x2 = y2 - g(y1)`, `x1 = y1 - f(x2)`. The engine runs a stack of such blocks inside one
`torch.autograd.Function` that keeps only the last block's outputs. Its backward walks the stack downwards,
reconstructs every block's inputs from its outputs and rebuilds that block's graph to back-propagate through it,
so activation memory is one block's worth whatever the depth.

Nothing here knows about attention or feed-forward layers: blocks only have to expose `f(x, **kwargs)` and
`g(x, **kwargs)` and, if `g` acts on every position independently, a `g_chunk_size` to bound its activations.

Correctness rules this module follows (see DESIGN.md §2):

* dropout is replayed exactly: the RNG state of every device in use is captured before each `f`/`g` call of each
  forward *call* (stored on the autograd context, never on a module) and restored around the recompute with
  `torch.random.fork_rng`, so two forwards before one backward, or gradient accumulation, stay exact and the
  global generator is never reseeded;
* autocast is replayed: the autocast state of the forward is recorded and re-entered in backward;
* parameter gradients are accumulated by `torch.autograd.backward` on each rebuilt block graph (not returned from
  the Function), which is what DDP's default mode and FSDP2 expect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class ReversibleBlockProtocol(Protocol):
    """What the engine needs from a block: two residual functions of the *other* stream."""

    training: bool
    g_chunk_size: int
    # Optional: False when f and g draw no random numbers (no active dropout), so no RNG state is recorded.
    uses_rng: bool

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------------------
# RNG and autocast capture
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RngState:
    """CPU and CUDA generator states at one point of the forward, to replay dropout in the recompute."""

    cpu: torch.Tensor
    cuda_devices: tuple[int, ...]
    cuda_states: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls, cuda_devices: tuple[int, ...]) -> RngState:
        states = tuple(torch.cuda.get_rng_state(d) for d in cuda_devices)
        return cls(torch.get_rng_state(), cuda_devices, states)

    def fork(self):
        """Context manager: run with this RNG state, leave the global generators as they were afterwards."""
        return _ForkedRng(self)


class _ForkedRng:
    def __init__(self, state: RngState) -> None:
        self.state = state
        self.fork = torch.random.fork_rng(devices=list(state.cuda_devices), enabled=True)

    def __enter__(self) -> None:
        self.fork.__enter__()
        torch.set_rng_state(self.state.cpu)
        for device, s in zip(self.state.cuda_devices, self.state.cuda_states):
            torch.cuda.set_rng_state(s, device)

    def __exit__(self, *exc: Any) -> None:
        self.fork.__exit__(*exc)


@dataclass
class AutocastState:
    device_type: str
    enabled: bool
    dtype: torch.dtype | None

    @classmethod
    def capture(cls, device_type: str) -> AutocastState:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if enabled else None
        return cls(device_type, enabled, dtype)

    def context(self):
        if not self.enabled:
            # Explicitly disable: backward may be called inside an unrelated autocast region.
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)


def _cuda_devices(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(sorted({t.device.index for t in tensors if t.is_cuda and t.device.index is not None}))


# --------------------------------------------------------------------------------------------------------------
# Chunked application of a position-wise function
# --------------------------------------------------------------------------------------------------------------


def _chunks(length: int, chunk_size: int) -> list[slice]:
    if chunk_size <= 0 or chunk_size >= length:
        return [slice(0, length)]
    return [slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


def apply_chunked(fn: Callable[..., torch.Tensor], x: torch.Tensor, chunk_size: int, **kwargs: Any) -> torch.Tensor:
    """`fn(x)` for a function acting on each position (dim 1) independently, `chunk_size` positions at a time."""
    parts = _chunks(x.shape[1], chunk_size)
    if len(parts) == 1:
        return fn(x, **kwargs)
    return torch.cat([fn(x[:, s], **kwargs) for s in parts], dim=1)


# --------------------------------------------------------------------------------------------------------------
# One block: forward, and inverse + gradient in a single downward step
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _BlockRecord:
    """What one forward call of one block leaves behind for its backward: the RNG states before `f` and `g`."""

    rng_f: RngState | None
    rng_g: RngState | None


def block_forward(
    block: ReversibleBlockProtocol,
    x1: torch.Tensor,
    x2: torch.Tensor,
    kwargs: dict[str, Any],
    cuda_devices: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, _BlockRecord | None]:
    """Additive coupling forward. With `cuda_devices` given, also records the RNG states for the recompute."""
    record_rng = cuda_devices is not None and getattr(block, "uses_rng", block.training)
    rng_f = RngState.capture(cuda_devices) if record_rng else None
    y1 = x1 + block.f(x2, **kwargs)
    rng_g = RngState.capture(cuda_devices) if record_rng else None
    y2 = x2 + apply_chunked(block.g, y1, block.g_chunk_size, **kwargs)
    return y1, y2, (_BlockRecord(rng_f, rng_g) if cuda_devices is not None else None)


def _maybe_fork(state: RngState | None):
    return state.fork() if state is not None else nullcontext()


def block_backward(
    block: ReversibleBlockProtocol,
    y1: torch.Tensor,
    y2: torch.Tensor,
    dy1: torch.Tensor,
    dy2: torch.Tensor,
    kwargs: dict[str, Any],
    record: _BlockRecord,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruct `(x1, x2)` from `(y1, y2)` and turn `(dL/dy1, dL/dy2)` into `(dL/dx1, dL/dx2)`.

    Each residual function is evaluated exactly once (with grad), its output used both to invert the coupling and
    to back-propagate: one extra forward per block, the minimum for a recomputing backward. Parameter gradients and
    gradients of differentiable `kwargs` (e.g. an encoder output) accumulate into their `.grad` fields.
    """
    # g: x2 = y2 - g(y1); dL/dy1 += (dg/dy1)^T dL/dy2. Chunk-wise with a leaf per chunk, so only one chunk's graph
    # is alive at a time and no full-size gradient buffer is re-added per chunk.
    x2_parts, dy1_parts = [], []
    with _maybe_fork(record.rng_g):
        for s in _chunks(y1.shape[1], block.g_chunk_size):
            y1_c = y1[:, s].detach().requires_grad_(True)
            g_c = block.g(y1_c, **kwargs)
            torch.autograd.backward(g_c, dy2[:, s])
            with torch.no_grad():
                x2_parts.append(y2[:, s] - g_c)
                dy1_parts.append(dy1[:, s] + y1_c.grad)
            del g_c
    with torch.no_grad():
        x2 = x2_parts[0] if len(x2_parts) == 1 else torch.cat(x2_parts, dim=1)
        dy1_total = dy1_parts[0] if len(dy1_parts) == 1 else torch.cat(dy1_parts, dim=1)
    del x2_parts, dy1_parts

    # f: x1 = y1 - f(x2); dL/dx2 = dL/dy2 + (df/dx2)^T dL/dy1.
    x2_leaf = x2.requires_grad_(True)
    with _maybe_fork(record.rng_f):
        f_out = block.f(x2_leaf, **kwargs)
        torch.autograd.backward(f_out, dy1_total)
    with torch.no_grad():
        x1 = y1 - f_out
        dx2 = dy2 + x2_leaf.grad
    return x1, x2.detach(), dy1_total, dx2


# --------------------------------------------------------------------------------------------------------------
# The stack as one autograd Function
# --------------------------------------------------------------------------------------------------------------


class _ReversibleStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, blocks, static_kwargs, diff_names, *diff_values):  # type: ignore[override]
        kwargs = {**static_kwargs, **dict(zip(diff_names, diff_values))}
        devices = _cuda_devices((x1, x2))
        records = []
        for block in blocks:
            x1, x2, record = block_forward(block, x1, x2, kwargs, cuda_devices=devices)
            records.append(record)
        ctx.blocks = blocks
        ctx.records = records
        ctx.static_kwargs = static_kwargs
        ctx.diff_names = diff_names
        ctx.autocast = AutocastState.capture(x1.device.type)
        ctx.save_for_backward(x1, x2, *diff_values)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):  # type: ignore[override]
        y1, y2, *diff_values = ctx.saved_tensors
        leaves = [v.detach().requires_grad_(v.requires_grad) for v in diff_values]
        kwargs = {**ctx.static_kwargs, **dict(zip(ctx.diff_names, leaves))}
        dy1 = dy1.contiguous()
        dy2 = dy2.contiguous()
        with torch.enable_grad(), ctx.autocast.context():
            for block, record in zip(reversed(ctx.blocks), reversed(ctx.records)):
                y1, y2, dy1, dy2 = block_backward(block, y1, y2, dy1, dy2, kwargs, record)
        # Free the references held by the context early (the graph may outlive this call).
        ctx.blocks = ctx.records = ctx.static_kwargs = None
        diff_grads = tuple(leaf.grad if leaf.requires_grad else None for leaf in leaves)
        return (dy1, dy2, None, None, None, *diff_grads)


def run_reversible_stack(
    blocks: Sequence[ReversibleBlockProtocol],
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    reversible: bool = True,
    static_kwargs: dict[str, Any] | None = None,
    diff_kwargs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `blocks` to the streams `(x1, x2)`.

    Args:
        reversible: use the recomputing backward. `False` runs the same blocks under ordinary autograd (the twin).
            Without grad (inference) both paths are identical and nothing is recorded.
        static_kwargs: arguments passed to every `f`/`g` that need no gradient (masks, rotary tables, caches).
        diff_kwargs: tensor arguments that may need a gradient (e.g. an encoder output for cross-attention); in the
            reversible path their gradients are accumulated across all blocks during the recomputing backward.
    """
    static_kwargs = dict(static_kwargs or {})
    diff_kwargs = dict(diff_kwargs or {})
    needs_grad = torch.is_grad_enabled() and (
        x1.requires_grad
        or x2.requires_grad
        or any(v.requires_grad for v in diff_kwargs.values())
        or any(p.requires_grad for b in blocks for p in b.parameters())  # type: ignore[attr-defined]
    )
    if not (reversible and needs_grad):
        kwargs = {**static_kwargs, **diff_kwargs}
        for block in blocks:
            x1, x2, _ = block_forward(block, x1, x2, kwargs)
        return x1, x2
    if len(blocks) == 0:
        return x1, x2
    names = tuple(diff_kwargs)
    return _ReversibleStackFunction.apply(x1, x2, list(blocks), static_kwargs, names, *diff_kwargs.values())


__all__ = ["ReversibleBlockProtocol", "RngState", "AutocastState", "apply_chunked", "run_reversible_stack"]
