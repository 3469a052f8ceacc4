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

Correctness rules this module follows (docs/design.md §2, §8):

* randomness is replayed exactly, wherever it comes from (config dropout, adapter dropout inside a LoRA layer, a
  user's `nn.Dropout`, stochastic depth): the RNG state of every device in use is captured before each `f`/`g` call
  of each forward *call* (stored on the autograd context, never on a module) and restored around the recompute with
  `torch.random.fork_rng`. Nothing is inferred from config fields: a state is dropped only when the generators are
  provably untouched by the call (their state compares equal afterwards), so blocks without random ops cost nothing.
  Two forwards before one backward, or gradient accumulation, stay exact and the global generator is never reseeded;
* autocast is replayed: the autocast state of the forward is recorded and re-entered around the recompute of `f`/`g`
  -- and only there: the gradients are then computed outside autocast, as plain autograd computes them (backward
  ops under autocast differ, e.g. 5e-3 in the gradients of SDPA with dropout under bf16);
* gradients do not depend on what requires grad: the stack is on the autograd graph whenever any block parameter
  (or input) needs a gradient, even if the inputs are frozen (a frozen embedding, PEFT adapters);
* every parameter's gradient is delivered once per backward, at its last use (the lowest block that applies it),
  however many times the recompute uses it (chunked feed-forward, weight-tied blocks). The recompute computes
  gradients with `torch.autograd.grad` into local accumulators and hands each parameter its total with one
  `torch.autograd.backward` on the parameter itself, so its accumulation hook fires once: what DDP's default mode,
  `static_graph` and ZeRO expect. Several engine calls of one forward that apply the same parameters (a stack run
  block by block, a DEQ phantom unroll) share a `DeferredGradients`, which delivers once for all of them.
  FSDP2-sharded blocks keep in-place accumulation (`distributed.py`).

The coupling rule is pluggable (`couplings.py`: additive, momentum, leapfrog), and so is the stream arithmetic:
floating point, or int64 fixed point for bit-exact reversal at any depth (`fixed_point_bits`). A drift guard keeps
exact stream checkpoints every k blocks, and a debug report measures the reconstruction error of every block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .couplings import (
    AdditiveCoupling,
    Coupling,
    DriftMonitor,
    DriftReport,
    DualArith,
    ExactArith,
    FloatArith,
    make_coupling,
    measure_drift,
)


class ReversibleBlockProtocol(Protocol):
    """What the engine needs from a block: two residual functions of the *other* stream."""

    training: bool
    g_chunk_size: int

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...

    # Optional: `branch_parameters() -> (params of f, params of g)`. A block that tells which parameters each branch
    # uses gets each branch's parameter gradients delivered (and freed) as soon as that branch is back-propagated,
    # instead of holding the `g` gradients until `f` is done too (`_GradientSink`).


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

    def unchanged(self) -> bool:
        """Whether the generators are still in this state (nothing drew random numbers since the capture)."""
        if not torch.equal(torch.get_rng_state(), self.cpu):
            return False
        return all(torch.equal(torch.cuda.get_rng_state(d), s) for d, s in zip(self.cuda_devices, self.cuda_states))

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


def _branches(block: ReversibleBlockProtocol) -> tuple[tuple[Callable[..., torch.Tensor], int], ...]:
    """The block's two sub-steps: `f` (never chunked) then `g` (chunked over positions by `g_chunk_size`)."""
    return ((block.f, 0), (block.g, block.g_chunk_size))


def _branch_out(fn: Callable[..., torch.Tensor], x: torch.Tensor, chunk: int, coef: float, kwargs) -> torch.Tensor:
    out = apply_chunked(fn, x, chunk, **kwargs)
    return out if coef == 1.0 else out * coef


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _GradSums:
    """Gradient sums per leaf tensor (keyed by `id`), in at least float32 when `upcast`.

    The first contribution is kept as it comes: a gradient straight from autograd may alias a tensor still in use (an
    `AddBackward` passes its incoming gradient through), so it is never written to. The second allocates the sum and
    every later one is added into it in place, so a leaf summed over many chunks holds two gradient-sized tensors at a
    time, not three."""

    def __init__(self, upcast: bool = False) -> None:
        self.upcast = upcast
        self.leaves: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self._owned: set[int] = set()

    def __contains__(self, leaf: torch.Tensor) -> bool:
        return id(leaf) in self.leaves

    def track(self, leaf: torch.Tensor) -> None:
        self.leaves[id(leaf)] = leaf

    def add(self, leaf: torch.Tensor, grad: torch.Tensor) -> None:
        if self.upcast:
            grad = grad.to(_accumulation_dtype(grad.dtype))
        key = id(leaf)
        self.leaves[key] = leaf
        acc = self.sums.get(key)
        if acc is None:
            self.sums[key] = grad
        elif key in self._owned:
            acc.add_(grad)
        else:
            self.sums[key] = acc + grad
            self._owned.add(key)

    def get(self, leaf: torch.Tensor) -> torch.Tensor | None:
        return self.sums.get(id(leaf))

    def pop(self, key: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        self._owned.discard(key)
        grad = self.sums.pop(key, None)
        return None if grad is None else (self.leaves[key], grad)

    def keys(self) -> list[int]:
        return list(self.sums)


def _graph_leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that `out` was computed from: parameters (the block's own, or any other one
    `f`/`g` closes over, e.g. a shared adapter), differentiable kwargs and the recompute's input leaf."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            leaves.append(variable)
        else:
            stack.extend(child for child, _ in node.next_functions)
    return leaves


class _PendingGradients:
    """Parameter gradients summed per leaf tensor, handed to the leaves with one `torch.autograd.backward`: each
    leaf's `AccumulateGrad` node (and so its accumulation hooks) runs once per delivery, whatever the number of
    contributions."""

    def __init__(self) -> None:
        self.pending = _GradSums()

    def add(self, leaf: torch.Tensor, grad: torch.Tensor | None) -> None:
        if grad is not None:
            self.pending.add(leaf, grad)

    def deliver(self, keys: Sequence[int] | None = None) -> None:
        """Hand over the pending gradients of `keys` (leaf ids; all pending ones if None)."""
        keys = self.pending.keys() if keys is None else keys
        items = [item for item in map(self.pending.pop, keys) if item is not None]
        if items:
            leaves, grads = zip(*items)
            torch.autograd.backward(list(leaves), list(grads))


class DeferredGradients(_PendingGradients):
    """Parameter gradients of *several* engine calls of one forward, delivered to each parameter once.

    Each engine call hands every parameter its gradient once (`_GradientSink`), but a computation that calls the
    engine several times with the same blocks -- a weight-tied stack run block by block to return every hidden state,
    the unrolled steps of a DEQ phantom gradient -- would deliver a shared parameter once per call, which DDP's
    default mode rejects ("mark a variable ready only once") and which makes DDP and ZeRO reduce partial gradients.
    Engine calls given `deferred_gradients=` put their parameter gradients here instead, and the total is delivered
    when the backward reaches the tensors passed through `entry()`: pass the chain's first inputs through it (every
    later call's input is computed from an earlier call's output), so autograd differentiates every call before it.

    FSDP2-sharded blocks keep their in-place accumulation (`distributed.py`); their gradients never come here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[int, Any] = {}

    @classmethod
    def for_blocks(cls, blocks: Sequence[Any]) -> DeferredGradients | None:
        """A new store for engine calls over `blocks`, or None when they are FSDP2-sharded: FSDP2 accumulates in place
        from its own hooks around every call, and a deferred delivery would reach its parameters after they reshard."""
        return None if any(_is_fsdp_sharded(b) for b in blocks) else cls()

    def register(self, blocks: Sequence[Any]) -> None:
        """Remember which block owns each parameter, to deliver it inside the block's release scope (ZeRO-3)."""
        for block in blocks:
            for p in block.parameters():
                self.owners.setdefault(id(p), block)

    def entry(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The chain's inputs, unchanged in value; their backward delivers the gradients collected by then."""
        if not torch.is_grad_enabled():
            return tensors
        # A leaf that requires grad keeps the gate on the graph when the inputs do not (a detached fixed point).
        anchor = torch.empty(0, device=tensors[0].device, requires_grad=True)
        return _DeliverDeferred.apply(self, anchor, *tensors)

    def deliver(self, keys: Sequence[int] | None = None) -> None:
        by_owner: dict[int, list[int]] = {}
        for key in self.pending.keys() if keys is None else keys:
            by_owner.setdefault(id(self.owners.get(key)), []).append(key)
        for group in by_owner.values():
            owner = self.owners.get(group[0])
            with _release_scope(owner) if owner is not None else nullcontext():
                super().deliver(group)


class _DeliverDeferred(torch.autograd.Function):
    """Identity on the chain's inputs; its backward, which autograd runs after every node that consumes them, hands
    each parameter its deferred total."""

    @staticmethod
    def forward(ctx, deferred, anchor, *tensors):  # type: ignore[override]
        ctx.deferred = deferred
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.deferred.deliver()
        ctx.deferred = None
        return (None, None, *grads)


class _GradientSink:
    """Parameter gradients of one recomputing backward, handed to each parameter once.

    The recompute may use a parameter many times: once per chunk of `g`, once per application of a weight-tied
    block. Accumulating each use into `.grad` would fire the parameter's accumulation hook each time, which DDP's
    default mode rejects ("mark a variable ready only once") and which makes DDP/ZeRO reduce a partial gradient.
    Instead gradients are summed here and each parameter receives its total with one `torch.autograd.backward` on
    the parameter itself (its `AccumulateGrad` node runs once, hooks included) as soon as no lower block uses it, so
    at most one block's worth of gradients is held at a time and DDP can overlap communication with the backward.
    With `deferred` (several engine calls sharing parameters) the sums go there and are delivered after the last call.

    `in_place=True` keeps accumulation into `.grad` on every use: FSDP2 reduce-scatters from its own backward hooks
    around each recompute call (`distributed.py`) and owns the unsharded gradient buffers.
    """

    def __init__(
        self, blocks: Sequence[ReversibleBlockProtocol], in_place: bool, deferred: DeferredGradients | None = None
    ) -> None:
        self.in_place = in_place
        self.deferred = deferred is not None and not in_place
        self.store = deferred if self.deferred else _PendingGradients()
        self.release_at: dict[tuple[int, int], list[int]] = {}
        if in_place:
            return
        if self.deferred:
            deferred.register(blocks)
            return
        # Forward order is (block 0, f), (block 0, g), (block 1, f), ...: the first use is the lowest. A block that
        # names each branch's parameters (`branch_parameters`) lets a parameter of `g` go as soon as `g` is done.
        lowest: dict[int, tuple[int, int]] = {}
        for i, block in enumerate(blocks):
            split = getattr(block, "branch_parameters", None)
            for j, params in enumerate(split() if split is not None else ()):
                for p in params:
                    lowest.setdefault(id(p), (i, j))
            for p in block.parameters():  # type: ignore[attr-defined]
                lowest.setdefault(id(p), (i, 0))
        for key, at in lowest.items():
            self.release_at.setdefault(at, []).append(key)

    def add(self, leaf: torch.Tensor, grad: torch.Tensor | None) -> None:
        self.store.add(leaf, grad)

    def release(self, at: tuple[int, int] | None = None) -> None:
        """Deliver the gradients of the parameters whose lowest use is `at` = (block index, branch index), all pending
        ones if None; deferred gradients wait for `DeferredGradients.entry`'s backward."""
        if self.deferred:
            return
        self.store.deliver(None if at is None else self.release_at.get(at, ()))


def _branch_backward(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    grad_out: torch.Tensor,
    chunk: int,
    coef: float,
    kwargs: dict[str, Any],
    sink: _GradientSink,
    local_grads: _GradSums,
    autocast: AutocastState,
    direct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute `out = coef * fn(x)` (under the forward's autocast state) and back-propagate `grad_out` through it
    (without autocast, like plain autograd); returns `(out, dL/dx)`, detached.

    Chunk-wise with a leaf per chunk (the same chunks as the forward, so the values are bit-identical), so only one
    chunk's graph is alive at a time. Gradients of the differentiable kwargs (the backward's own leaves, keyed by id in
    `local_grads`) are summed there; parameter gradients go to `sink`. With `direct`, the parameter gradients of every
    chunk are added straight into `.grad` instead (`_add_to_grad`), and the sink gets a broadcast zero (no memory)
    that only runs the parameter's accumulation hooks once, on the total: a chunk's gradients never meet a running
    sum and none waits in the sink, so one parameter-sized gradient exists at a time instead of two or three (on
    SmolLM2, seq 1024, the last chunk's MLP gradients waiting for delivery were 10.6 MB of a 63 MB peak).
    """
    parts = _chunks(x.shape[1], chunk)
    out_full = grad_full = None  # written chunk by chunk (no list of chunks plus their concatenation)
    others: list[torch.Tensor] | None = None
    added_directly: set[int] = set()
    for n, s in enumerate(parts):
        x_c = x[:, s].detach().requires_grad_(True)
        with autocast.context():
            o = fn(x_c, **kwargs)
            if coef != 1.0:
                o = o * coef
        if sink.in_place:
            torch.autograd.backward(o, grad_out[:, s].to(o.dtype))
            g_x = x_c.grad
            for leaf in kwargs.values():
                if isinstance(leaf, torch.Tensor) and leaf in local_grads and leaf.grad is not None:
                    local_grads.add(leaf, leaf.grad)
                    leaf.grad = None
        else:
            if others is None:  # every chunk's graph has the same leaves but its input
                others = [leaf for leaf in _graph_leaves(o) if leaf is not x_c]
            g_out = grad_out[:, s].to(o.dtype)
            with _added_as_computed(others if direct else (), local_grads) as added:
                g_x, *g_others = torch.autograd.grad(o, [x_c, *others], g_out, allow_unused=True)
            for leaf, g in zip(others, g_others):
                if leaf in local_grads:
                    if g is not None:
                        local_grads.add(leaf, g)
                elif direct:
                    if id(leaf) not in added:
                        _add_to_grad(leaf, g)
                    if g is not None or id(leaf) in added:
                        added_directly.add(id(leaf))
                elif g is not None:
                    sink.add(leaf, g)
            del g_others  # the sums hold what is needed; the next chunk's gradients must not meet these
        if g_x is None:
            g_x = torch.zeros_like(x_c)
        if n == len(parts) - 1:
            for leaf in others or ():
                if id(leaf) in added_directly:
                    # The total is in `.grad`: delivering a zero runs the accumulation hooks (DDP's) once, on it.
                    sink.add(leaf, torch.zeros((), dtype=leaf.dtype, device=leaf.device).expand(leaf.shape))
        if len(parts) == 1:
            return o.detach(), g_x
        if out_full is None:
            out_full = o.new_empty((o.shape[0], x.shape[1], *o.shape[2:]))
            grad_full = g_x.new_empty(x.shape)
        out_full[:, s] = o.detach()
        grad_full[:, s] = g_x
        del o, g_x
    return out_full, grad_full


@contextlib.contextmanager
def _added_as_computed(leaves: Sequence[torch.Tensor], local_grads: _GradSums) -> Iterator[set[int]]:
    """While `torch.autograd.grad` runs, add each parameter's gradient into its `.grad` the moment autograd computes
    it, and let autograd capture a broadcast zero instead: `autograd.grad` would otherwise hold every parameter
    gradient of the chunk until it returns (an MLP's three weight gradients at once: 10 MB of SmolLM2's 63 MB peak).
    Yields the ids of the leaves whose hook ran; a leaf whose hook did not run is added by the caller, so the
    gradient is counted once whichever way a torch release applies tensor hooks to captured gradients."""
    added: set[int] = set()
    handles = []

    def hook_for(leaf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            _add_to_grad(leaf, grad)
            added.add(id(leaf))
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

        return hook

    try:
        for leaf in leaves:
            if leaf not in local_grads and leaf.requires_grad:
                handles.append(leaf.register_hook(hook_for(leaf)))
        yield added
    finally:
        for handle in handles:
            handle.remove()


def _add_to_grad(leaf: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Add a partial gradient straight into `leaf.grad`, without running the leaf's accumulation hooks: they run once,
    when a broadcast zero is delivered through autograd after the last part (a post-accumulate hook -- DDP's -- sees
    the whole gradient in `.grad`; a `Tensor.register_hook` on a parameter sees that zero, not the gradient: read
    `.grad` in a post-accumulate hook instead)."""
    if grad is not None:
        if leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        leaf.grad.add_(grad)


def block_forward(
    block: ReversibleBlockProtocol,
    x1: Any,
    x2: Any,
    kwargs: dict[str, Any],
    cuda_devices: tuple[int, ...] | None = None,
    coupling: Coupling | None = None,
    arith: Any = None,
) -> tuple[Any, Any, _BlockRecord | None]:
    """One block's forward (additive coupling in float arithmetic by default).

    With `cuda_devices` given, also records the RNG state before each residual function for the recompute.
    """
    coupling = coupling or _ADDITIVE
    ar = arith or _FLOAT
    record = cuda_devices is not None
    rngs = []
    for fn, chunk in _branches(block):
        # Any op in f/g may draw random numbers (adapter dropout, a user's nn.Dropout): capture before every call,
        # keep the state only if the call provably drew (a CPU state is ~5 kB, a CUDA one 16 bytes).
        rng = RngState.capture(cuda_devices) if record else None
        out = _branch_out(fn, ar.view(coupling.forward_input(x1, x2)), chunk, coupling.coef, kwargs)
        rngs.append(None if rng is None or rng.unchanged() else rng)
        x1, x2 = coupling.forward_combine(ar, x1, x2, ar.quant(out))
    return x1, x2, (_BlockRecord(*rngs) if record else None)


def _maybe_fork(state: RngState | None):
    return state.fork() if state is not None else nullcontext()


@dataclass
class StreamState:
    """The two streams and their gradients between sub-steps of the backward. `block_backward` replaces the fields as
    it goes, so nothing keeps an older pair alive (a caller's local variables would hold a whole block's inputs)."""

    y1: Any
    y2: Any
    dy1: torch.Tensor
    dy2: torch.Tensor


def block_backward(
    block: ReversibleBlockProtocol,
    state: StreamState,
    kwargs: dict[str, Any],
    record: _BlockRecord,
    coupling: Coupling,
    arith: Any,
    sink: _GradientSink,
    local_grads: _GradSums,
    autocast: AutocastState,
    on_branch_done: Callable[[int], None] | None = None,
) -> None:
    """Reconstruct `(x1, x2)` from `(y1, y2)` and turn `(dL/dy1, dL/dy2)` into `(dL/dx1, dL/dx2)`, in `state`.

    Each residual function is evaluated exactly once (with grad), its output used both to invert the coupling and
    to back-propagate: one extra forward per block, the minimum for a recomputing backward. Parameter gradients go
    to `sink`; gradients of differentiable `kwargs` (e.g. an encoder output) accumulate into their `.grad` fields.
    """
    coupling = coupling or _ADDITIVE
    ar = arith or _FLOAT
    branches = list(zip(_branches(block), (record.rng_f, record.rng_g)))
    # Partial parameter gradients may go straight into `.grad` unless the parameters exist only inside a scope (ZeRO-3).
    direct = getattr(block, "gradient_release_scope", None) is None
    for j in reversed(range(len(branches))):
        (fn, chunk), rng = branches[j]
        xin = coupling.inverse_input(ar, state.y1, state.y2)
        with _maybe_fork(rng):
            out, g_in = _branch_backward(
                fn, ar.view(xin), coupling.grad_out(state.dy1, state.dy2), chunk, coupling.coef, kwargs, sink,
                local_grads, autocast, direct,
            )
        if on_branch_done is not None:
            on_branch_done(j)  # hand over (and free) the parameter gradients this branch was the last to need
        with torch.no_grad():
            state.y1, state.y2 = coupling.inverse_combine(ar, state.y1, state.y2, xin, ar.quant(out))
            del xin
            state.dy1, state.dy2 = coupling.grad_inputs(state.dy1, state.dy2, g_in)
        del out, g_in


_ADDITIVE = AdditiveCoupling()
_FLOAT = FloatArith()


def _stream_arith(fixed_point_bits: int | None, dtype: torch.dtype, twin: bool = False):
    if fixed_point_bits is None:
        return FloatArith()
    return (DualArith if twin else ExactArith)(fixed_point_bits, dtype)


HALF_DTYPES = (torch.float16, torch.bfloat16)
# Fixed-point streams for `fixed_point_bits="auto"`: at most 32 fractional bits (a 2.3e-10 grid, finer than an fp32
# ulp for any |x| > 0.004), and at least 2^24 of headroom above the largest input value for the growth of the
# streams through the stack (measured on trained models: docs/precision.md).
AUTO_MAX_BITS = 32
AUTO_GROWTH_BITS = 24
AUTO_MIN_BITS = 8


def resolve_fixed_point_bits(fixed_point_bits: int | str | None, *streams: torch.Tensor) -> int | None:
    """The stream arithmetic of one stack call: `None` (float), an int (exact, that many fractional bits), or
    `"auto"`: exact when the stack computes in half precision -- the streams are bf16/fp16, or autocast to a half
    dtype is on -- where float reversal drifts (docs/precision.md: 46% gradient error at depth 48 under bf16
    autocast), float otherwise (fp32/fp64 reversal is measured to be accurate). The scale keeps 2^24 of headroom
    above the largest input value, capped at 32 fractional bits."""
    if fixed_point_bits != "auto":
        return fixed_point_bits
    x = streams[0]
    autocast_half = torch.is_autocast_enabled(x.device.type) and (
        torch.get_autocast_dtype(x.device.type) in HALF_DTYPES
    )
    if not (autocast_half or x.dtype in HALF_DTYPES):
        return None
    peak = max(float(s.detach().abs().amax()) if s.numel() else 0.0 for s in streams)
    if not math.isfinite(peak):
        raise ValueError(f"The reversible stack's input is not finite (max |x| = {peak}).")
    magnitude_bits = math.ceil(math.log2(peak)) if peak > 0 else 0
    return max(AUTO_MIN_BITS, min(AUTO_MAX_BITS, 62 - AUTO_GROWTH_BITS - magnitude_bits))


class _StackRun:
    """Forward of a whole stack in one arithmetic, keeping what the drift guard and debug mode ask for."""

    def __init__(self, checkpoint_every: int, report: DriftReport | None) -> None:
        self.checkpoint_every = checkpoint_every
        self.report = report
        self.checkpoints: dict[int, tuple[Any, Any]] = {}
        self.inputs: dict[int, tuple[Any, Any]] = {}

    def forward(self, blocks, coupling, ar, s1, s2, kwargs, devices):
        records = []
        guard = self.checkpoint_every > 0 and not ar.exact
        for i, block in enumerate(blocks):
            if guard and i % self.checkpoint_every == 0:
                self.checkpoints[i] = (s1, s2)
            if self.report is not None and self.report.per_block:
                self.inputs[i] = (s1, s2)
            s1, s2, record = block_forward(block, s1, s2, kwargs, devices, coupling, ar)
            records.append(record)
        return s1, s2, records


# --------------------------------------------------------------------------------------------------------------
# The stack as one autograd Function
# --------------------------------------------------------------------------------------------------------------


def _is_fsdp_sharded(block: Any) -> bool:
    """Whether `block` is an FSDP2 module (`torch.distributed.fsdp.fully_shard`), which accumulates in place."""
    return callable(getattr(block, "_get_fsdp_state", None))


def _release_scope(block: Any):
    """The context in which the parameters whose lowest use is `block` receive their gradients.

    A block whose parameters are materialised only inside its sub-modules' forward and backward hooks (DeepSpeed
    ZeRO-3 partitions them to empty tensors outside) sets `gradient_release_scope` to a factory of a context that
    gathers them: the sink hands over full-size gradients after the recompute, when the hooks have partitioned the
    parameters again (`distributed.register_deepspeed_zero3_scopes`).
    """
    scope = getattr(block, "gradient_release_scope", None)
    return scope() if scope is not None else nullcontext()


class _ReversibleStackFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, x1, x2, blocks, static_kwargs, options, diff_names, *diff_values):  # type: ignore[override]
        coupling, bits, checkpoint_every, report, monitor, deferred = options
        kwargs = {**static_kwargs, **dict(zip(diff_names, diff_values))}
        devices = _cuda_devices((x1, x2))
        ar = _stream_arith(bits, x1.dtype)
        run = _StackRun(checkpoint_every, report)
        s1, s2, records = run.forward(blocks, coupling, ar, ar.enter(x1), ar.enter(x2), kwargs, devices)
        ar.check()
        # Drift probe: references to the inputs (no copy), compared with their reconstruction in backward.
        ctx.probe = (monitor, x1, x2) if monitor is not None and monitor.should_probe() else None
        ctx.blocks = blocks
        ctx.records = records
        ctx.static_kwargs = static_kwargs
        ctx.diff_names = diff_names
        ctx.coupling, ctx.arith, ctx.run, ctx.deferred = coupling, ar, run, deferred
        ctx.autocast = AutocastState.capture(x1.device.type)
        ctx.input_dtypes = (x1.dtype, x2.dtype)
        # The output streams are kept on the context rather than saved for backward, so the backward can drop them as
        # soon as their inputs are reconstructed (saved tensors stay alive, two streams' worth, until it returns).
        # Detached (in float arithmetic they are the outputs themselves: no reference cycle through the graph); the
        # version check stands in for save_for_backward's.
        ctx.streams = [s1.detach(), s2.detach()]
        ctx.stream_versions = (s1._version, s2._version)
        ctx.save_for_backward(*diff_values)
        # An output nobody uses (the first stream of a two-step coupling) gets None instead of a zero gradient.
        ctx.set_materialize_grads(False)
        return ar.out(s1), ar.out(s2)

    @staticmethod
    def backward(ctx, dy1, dy2):  # type: ignore[override]
        diff_values = ctx.saved_tensors
        (y1, y2), ctx.streams = ctx.streams, None
        if (y1._version, y2._version) != ctx.stream_versions:
            raise RuntimeError(
                "An output of the reversible stack was modified in place before the backward; the recomputing "
                "backward reconstructs from these values (clone the output before modifying it)."
            )
        leaves = [v.detach().requires_grad_(v.requires_grad) for v in diff_values]
        # Gradients of the differentiable kwargs (e.g. an encoder output), summed over all blocks in >= float32.
        local_grads = _GradSums(upcast=True)
        for leaf in leaves:
            if leaf.requires_grad:
                local_grads.track(leaf)
        kwargs = {**ctx.static_kwargs, **dict(zip(ctx.diff_names, leaves))}
        # The stream gradients are summed over every block: in at least float32, or a bf16 model's gradients
        # would lose precision with depth (each sub-step adds a rounding error of the half-precision sum).
        grads = (_stream_grad(g, y, t) for g, y, t in zip((dy1, dy2), (y1, y2), ctx.input_dtypes))
        state = StreamState(y1, y2, *grads)
        del y1, y2, dy1, dy2  # only `state` refers to the streams now: each is freed as soon as it is replaced
        if ctx.blocks is None:
            raise RuntimeError("A reversible stack's backward can run once per forward (its state is consumed).")
        # Take the arithmetic (and the momentum information buffer) from the context rather than copying it: the
        # buffer shrinks as the backward pops it, and a copy would keep the full-size one alive until the end.
        coupling, ar, run = ctx.coupling, ctx.arith, ctx.run
        ctx.arith = None
        report = run.report
        sink = _GradientSink(ctx.blocks, any(_is_fsdp_sharded(b) for b in ctx.blocks), ctx.deferred)
        # Autocast is off here (and re-entered only around each recompute): backward may even be called inside an
        # unrelated autocast region.
        with torch.enable_grad(), torch.autocast(ctx.autocast.device_type, enabled=False):
            for i in reversed(range(len(ctx.blocks))):
                block, record = ctx.blocks[i], ctx.records[i]

                def release(j: int, i: int = i, block: Any = block) -> None:
                    with _release_scope(block):
                        sink.release((i, j))

                block_backward(block, state, kwargs, record, coupling, ar, sink, local_grads, ctx.autocast, release)
                if i == 0 and ctx.probe is not None:
                    # Before a stream checkpoint replaces it: the error the gradients below have inherited.
                    _probe_drift(ar, (state.y1, state.y2), *ctx.probe)
                if i in run.inputs:
                    report.blocks.append(measure_drift(ar, i, (state.y1, state.y2), run.inputs.pop(i)))
                if i in run.checkpoints:
                    exact = run.checkpoints.pop(i)
                    if report is not None:
                        report.checkpoints.append(measure_drift(ar, i, (state.y1, state.y2), exact))
                    state.y1, state.y2 = exact
            sink.release()  # leaves outside every block's parameters (closed over by f/g), after their last use
        ar.check()
        if report is not None:
            report.blocks.sort(key=lambda b: b.index)
            report.checkpoints.sort(key=lambda b: b.index)
        # Free the references held by the context early (the graph may outlive this call).
        ctx.blocks = ctx.records = ctx.static_kwargs = ctx.run = ctx.arith = ctx.probe = ctx.deferred = None
        diff_grads = tuple(
            None if local_grads.get(leaf) is None else local_grads.get(leaf).to(leaf.dtype) for leaf in leaves
        )
        dx1 = state.dy1.to(ctx.input_dtypes[0]) if ctx.needs_input_grad[1] else None
        dx2 = state.dy2.to(ctx.input_dtypes[1]) if ctx.needs_input_grad[2] else None
        return (None, dx1, dx2, None, None, None, None, *diff_grads)


def _stream_grad(grad: torch.Tensor | None, stream: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An incoming stream gradient in at least float32; an unused output's (None) is a broadcast zero, no memory."""
    acc = _accumulation_dtype(dtype)
    if grad is None:
        return torch.zeros((), dtype=acc, device=stream.device).expand(stream.shape)
    return grad.contiguous().to(acc)


def _probe_drift(ar: Any, reconstructed: tuple[Any, Any], monitor: DriftMonitor, x1, x2) -> None:
    with torch.no_grad():
        drift = measure_drift(ar, 0, reconstructed, (ar.enter(x1), ar.enter(x2)))
    monitor.record(drift.rel_err, exact=ar.exact)


#: The monitor of every stack call that is not given its own (`drift_monitor=None`); `drift_monitor=False` disables.
default_drift_monitor = DriftMonitor()


def run_reversible_stack(
    blocks: Sequence[ReversibleBlockProtocol],
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    reversible: bool = True,
    static_kwargs: dict[str, Any] | None = None,
    diff_kwargs: dict[str, torch.Tensor] | None = None,
    coupling: Coupling | str | None = None,
    fixed_point_bits: int | None = None,
    checkpoint_every: int = 0,
    drift_report: DriftReport | None = None,
    drift_monitor: DriftMonitor | None | bool = None,
    deferred_gradients: DeferredGradients | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `blocks` to the streams `(x1, x2)`.

    Args:
        reversible: use the recomputing backward. `False` runs the same blocks under ordinary autograd (the twin).
            Without grad (inference) both paths are identical and nothing is recorded.
        static_kwargs: arguments passed to every `f`/`g` that need no gradient (masks, rotary tables, caches).
        diff_kwargs: tensor arguments that may need a gradient (e.g. an encoder output for cross-attention); in the
            reversible path their gradients are accumulated across all blocks during the recomputing backward.
        coupling: the coupling rule, a `Coupling` or one of `SUPPORTED_COUPLINGS` (default `"additive"`). Use its
            `init_streams` / `merge_streams` to go from one hidden state to two streams and back.
        fixed_point_bits: if set, the streams are held as int64 fixed point with this many fractional bits and every
            `f`/`g` output is rounded onto that grid: reversal is bit-exact in any compute dtype. Gradients are those
            of the float coupling (the rounding is straight-through), in the twin as well. `"auto"`: exact only when
            the stack computes in half precision (see `resolve_fixed_point_bits`).
        checkpoint_every: drift guard for the float arithmetic: keep an exact copy of the streams entering every
            `checkpoint_every`-th block (0 = off; memory `2 * depth / k` streams) and restore it in backward.
        drift_report: a `DriftReport` filled in backward with the reconstruction error at the checkpoints and, if
            `drift_report.per_block`, at every block (debug: the forward then keeps every block's inputs).
        drift_monitor: the cheap always-on reconstruction check (`DriftMonitor`); `None` uses
            `default_drift_monitor`, `False` disables it.
        deferred_gradients: a `DeferredGradients` shared by several calls of one forward that apply the same
            parameters: the parameter gradients of this call's backward are added to it, and delivered once for all
            calls by its `entry()` gate, instead of at this call's end.
    """
    static_kwargs = dict(static_kwargs or {})
    diff_kwargs = dict(diff_kwargs or {})
    coupling = make_coupling(coupling)
    if fixed_point_bits not in (None, "auto") and (
        isinstance(fixed_point_bits, bool) or not isinstance(fixed_point_bits, int) or not 1 <= fixed_point_bits <= 62
    ):
        raise ValueError(f"`fixed_point_bits` must be None, 'auto' or an integer in [1, 62], got {fixed_point_bits!r}.")
    fixed_point_bits = resolve_fixed_point_bits(fixed_point_bits, x1, x2)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"`checkpoint_every` must be a non-negative integer, got {checkpoint_every!r}.")
    needs_grad = torch.is_grad_enabled() and (
        x1.requires_grad
        or x2.requires_grad
        or any(v.requires_grad for v in diff_kwargs.values())
        or any(p.requires_grad for b in blocks for p in b.parameters())  # type: ignore[attr-defined]
    )
    if not (reversible and needs_grad):
        kwargs = {**static_kwargs, **diff_kwargs}
        ar = _stream_arith(fixed_point_bits, x1.dtype, twin=needs_grad)
        s1, s2 = ar.enter(x1), ar.enter(x2)
        for block in blocks:
            s1, s2, _ = block_forward(block, s1, s2, kwargs, coupling=coupling, arith=ar)
        ar.check()
        return ar.out(s1), ar.out(s2)
    if len(blocks) == 0:
        return x1, x2
    names = tuple(diff_kwargs)
    monitor = default_drift_monitor if drift_monitor is None or drift_monitor is True else (drift_monitor or None)
    options = (coupling, fixed_point_bits, checkpoint_every, drift_report, monitor, deferred_gradients)
    # A leaf that requires grad keeps the stack on the graph when only block parameters need gradients (frozen
    # embedding, PEFT adapters): a Function whose inputs all lack requires_grad returns outputs without a grad_fn.
    anchor = torch.empty(0, device=x1.device, requires_grad=True)
    return _ReversibleStackFunction.apply(
        anchor, x1, x2, list(blocks), static_kwargs, options, names, *diff_kwargs.values()
    )


__all__ = [
    "ReversibleBlockProtocol",
    "RngState",
    "AutocastState",
    "apply_chunked",
    "run_reversible_stack",
    "Coupling",
    "DriftReport",
    "DriftMonitor",
    "DeferredGradients",
    "default_drift_monitor",
    "resolve_fixed_point_bits",
    "make_coupling",
]
