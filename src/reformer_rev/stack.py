"""How a stack of reversible blocks is applied: as a plain stack, weight-tied at a run-time depth, or as a deep
equilibrium. The causal LM, the sequence classifier and both stacks of the encoder-decoder apply their blocks through
`RevFormerStack`, so every depth option of the config means the same in every model class:

* plain stack: each distinct block once, in order (`num_unique_layers=None`);
* weight tying in depth (`num_unique_layers=k`): the `k` distinct blocks cycled through for a depth chosen per call
  (docs/infinite_depth.md); with a key/value cache every *application* gets its own cache slot;
* deep equilibrium (`depth_mode="deq"`): the fixed point of the weight-tied block group, differentiated implicitly
  (`deq.py`).

The blocks run through the engine of `reversible.py`, or, with `config.reversible=False`, as the very same modules
under plain autograd (the twin). A block only has to expose `f(x, **kwargs)`, `g(x, **kwargs)`, `g_chunk_size` and
`training`. This module imports only torch, transformers and its flat siblings (remote-code export).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.utils import logging

from .couplings import Coupling, DriftReport, make_coupling
from .deq import DEQStats, deq_fixed_point
from .reversible import DeferredGradients, run_reversible_stack

if TYPE_CHECKING:
    from .configuration_reformer_rev import RevFormerConfig

logger = logging.get_logger(__name__)

SUPPORTED_DEPTH_MODES = ("stack", "deq")


@dataclass(frozen=True)
class StackOptions:
    """Everything the stack reads from the config, built once per forward by `from_config`.

    Built per call rather than at construction so that changing `model.config` (e.g. `reversible`, `deq_max_iter`,
    `num_hidden_layers`) takes effect at the next call, as for `use_cache`; the number of distinct blocks is fixed
    when the model is built.
    """

    reversible: bool
    coupling: Coupling
    fixed_point_bits: int | str | None
    checkpoint_every: int
    per_block_drift: bool
    depth_mode: str
    deq_solver: str
    deq_max_iter: int
    deq_tol: float
    deq_damping: float
    deq_backward: str
    deq_phantom_steps: int
    deq_jacobian_reg: float
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config: RevFormerConfig) -> StackOptions:
        return cls(
            reversible=config.reversible,
            coupling=make_coupling(config.coupling, step_size=config.coupling_step_size, gamma=config.momentum_gamma),
            # "auto": the engine picks exact streams under half precision (docs/precision.md)
            fixed_point_bits={True: config.fixed_point_scale_bits, False: None}.get(config.exact_reversal, "auto"),
            checkpoint_every=config.stream_checkpoint_every,
            per_block_drift=config.debug_reversal_drift,
            depth_mode=config.depth_mode,
            deq_solver=config.deq_solver,
            deq_max_iter=config.deq_max_iter,
            deq_tol=config.deq_tol,
            deq_damping=config.deq_damping,
            deq_backward=config.deq_backward,
            deq_phantom_steps=config.deq_phantom_steps,
            deq_jacobian_reg=config.deq_jacobian_reg,
            rms_norm_eps=config.rms_norm_eps,
        )

    def engine_kwargs(self, drift_report: DriftReport | None) -> dict[str, Any]:
        """Keyword arguments of `run_reversible_stack` (the twin/reversible switch and the coupling options)."""
        return dict(
            reversible=self.reversible,
            coupling=self.coupling,
            fixed_point_bits=self.fixed_point_bits,
            checkpoint_every=self.checkpoint_every,
            drift_report=drift_report,
        )

    def new_drift_report(self) -> DriftReport | None:
        """A report for one forward, filled by its recomputing backward, when one is asked for (docs/depth.md)."""
        if self.per_block_drift or self.checkpoint_every:
            return DriftReport(per_block=self.per_block_drift)
        return None


@dataclass
class StackOutput:
    """What one application of a stack returns to its model."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: dict[str, tuple[torch.Tensor, ...]] | None = None
    deq_stats: DEQStats | None = None
    jacobian_loss: torch.Tensor | None = None


class CacheSlot:
    """The key/value cache seen by one *application* of a block: layer `index` of a shared `Cache`.

    With weight tying a block is applied several times, so its `layer_idx` cannot address the cache: every
    application gets the slot of its depth. With `commit=False` (DEQ solver iterations) new keys/values are joined to
    the stored ones but not stored.
    """

    def __init__(self, cache: Cache, index: int, commit: bool = True) -> None:
        self.cache, self.index, self.commit = cache, index, commit
        if any(isinstance(layer, StaticLayer) for layer in cache.layers):
            # A static cache is sized for the config's depth and is written in place: it cannot grow, nor hold the
            # solver's uncommitted trial keys.
            if index >= len(cache.layers):
                raise ValueError(
                    f"The static cache has {len(cache.layers)} layers, but this forward applies more blocks (a "
                    "run-time `num_hidden_layers` deeper than the config's?): use the default dynamic cache."
                )
            if not commit:
                raise ValueError("The deep-equilibrium mode (`depth_mode='deq'`) needs a dynamic cache, not a static one.")
        while len(cache.layers) <= index:
            cache.layers.append(DynamicLayer())

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length(self.index)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values (cross-attention reuses them once the encoder output has been projected)."""
        layer = self.cache.layers[self.index]
        return layer.keys, layer.values

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of everything cached plus the new ones; stores the new ones when committing."""
        if self.commit:
            return self.cache.update(key, value, self.index)
        if self.get_seq_length() == 0:
            return key, value
        keys, values = self.stored()
        return torch.cat([keys, key], dim=-2), torch.cat([values, value], dim=-2)


class BlockApplication:
    """A block applied at one depth: the same module (same parameters), reading its own cache slots.

    The engine sees it as the block itself (every other attribute is the block's), so a whole stack of applications
    still runs in one engine call.
    """

    def __init__(self, block: nn.Module, slots: dict[str, CacheSlot]) -> None:
        self.block, self.slots = block, slots

    def __getattr__(self, name: str) -> Any:  # training, g_chunk_size, parameters, ...
        return getattr(self.__dict__["block"], name)

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.block.f(x, **kwargs, **self.slots)

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.block.g(x, **kwargs)


class AttentionRecorder:
    """Collects the attention maps of one forward (`output_attentions=True`), by kind (`"self"`, `"cross"`).

    It is closed as soon as the forward is done: the engine's recomputing backward calls the blocks again with the
    same arguments, and those calls must not add maps.
    """

    def __init__(self, is_open: bool = True) -> None:
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.is_open = is_open

    def record(self, kind: str, weights: torch.Tensor | None) -> None:
        if self.is_open and weights is not None:
            self.maps.setdefault(kind, []).append(weights)

    def close(self) -> dict[str, tuple[torch.Tensor, ...]]:
        self.is_open = False
        return {kind: tuple(maps) for kind, maps in self.maps.items()}


@contextmanager
def _seeded_rng(seed: int | None, devices: list[int]):
    """Run with a generator seeded by `seed` (fresh masks per forward, identical masks across its applications),
    leaving the global generators exactly as they were."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class RevFormerStack(nn.ModuleList):
    """The distinct blocks of one reversible stack, and how they are applied (see the module docstring).

    A `ModuleList` so that checkpoints keep their `layers.{i}.*` keys; the owner keeps its final norm (`norm.*`) and
    passes it in. `depth_field` names the config field holding this stack's depth (`num_hidden_layers`,
    `encoder_layers` or `decoder_layers`).
    """

    def __init__(self, config: RevFormerConfig, blocks: Iterable[nn.Module], depth_field: str) -> None:
        super().__init__(blocks)
        self.config = config
        self.depth_field = depth_field
        # Filled by the recomputing backward when a drift report is configured (debug_reversal_drift, checkpoints).
        self.last_drift_report: DriftReport | None = None
        self.deq_nonconverged = 0

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the backward recomputes this stack's blocks: always with the reversible engine, and in DEQ mode
        (the implicit backward rebuilds the block group); not for the plain-autograd twin.

        transformers reads this flag through `PreTrainedModel.is_activation_checkpointing` (`is_gradient_checkpointing`
        in older 5.x, e.g. 5.15), and `Trainer` then gives DDP `find_unused_parameters=False` by default -- the setting a
        recomputing backward needs (docs/distributed.md; `True` makes DDP refuse the engine's gradients). Requests to
        turn activation checkpointing on or off stay logged no-ops (`_set_gradient_checkpointing`).
        """
        return bool(self.config.reversible) or self.config.depth_mode == "deq"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        # Generic code that flips every module's `gradient_checkpointing` flag changes nothing: what the stack
        # recomputes is fixed by the config (`reversible`, `depth_mode`), as `_set_gradient_checkpointing` says.
        pass

    @classmethod
    def build(cls, config: RevFormerConfig, block_class: type[nn.Module], depth_field: str) -> RevFormerStack:
        """`num_unique_layers` distinct blocks (weight tying in depth), else one per layer of `depth_field`."""
        num_blocks = config.num_unique_layers or getattr(config, depth_field)
        return cls(config, (block_class(config, i) for i in range(num_blocks)), depth_field)

    def forward(
        self,
        hidden: torch.Tensor,
        norm: nn.Module,
        static_kwargs: dict[str, Any],
        diff_kwargs: dict[str, torch.Tensor] | None = None,
        caches: dict[str, Cache] | None = None,
        depth: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> StackOutput:
        """Both streams start from `hidden`; returns `norm(merge(streams))` and what was asked for.

        Args:
            static_kwargs: arguments every `f`/`g` receives that need no gradient (masks, rotary tables).
            diff_kwargs: tensor arguments that may need a gradient (the encoder output of a decoder stack).
            caches: key/value caches by the keyword their blocks read them under (`cache`, `cross_cache`); every
                application of a block receives its own `CacheSlot` of each.
            depth: number of block applications for this call (stack mode); defaults to the config's depth field.
        """
        options = StackOptions.from_config(self.config)
        caches = {k: v for k, v in (caches or {}).items() if v is not None}
        recorder = AttentionRecorder(is_open=options.depth_mode == "stack") if output_attentions else None
        static_kwargs = {**static_kwargs, "attentions": recorder}
        self.last_drift_report = options.new_drift_report()
        if options.depth_mode == "deq":
            out = self._deq(hidden, norm, options, static_kwargs, diff_kwargs or {}, caches, output_hidden_states)
        else:
            depth = getattr(self.config, self.depth_field) if depth is None else depth
            out = self._stack(hidden, norm, options, depth, static_kwargs, diff_kwargs or {}, caches,
                              output_hidden_states)
        if recorder is not None:
            out.attentions = recorder.close()
        return out

    # ----------------------------------------------------------------------------------------------------------
    # Stack mode: distinct blocks, or the distinct blocks cycled through for `depth` applications
    # ----------------------------------------------------------------------------------------------------------

    def applied_blocks(self, depth: int) -> list[nn.Module]:
        """The blocks in application order: `depth` applications cycling through the distinct blocks."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
            raise ValueError(f"`num_hidden_layers` must be a positive integer, got {depth!r}.")
        return [self[i % len(self)] for i in range(depth)]

    def _run(
        self,
        blocks: Sequence[nn.Module],
        x1: torch.Tensor,
        x2: torch.Tensor,
        static_kwargs: dict[str, Any],
        diff_kwargs: dict[str, torch.Tensor],
        engine_kwargs: dict[str, Any],
        caches: dict[str, Cache],
        commit: bool = True,
        per_block: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Apply `blocks` to the streams in one engine call (one block's activations in backward; exact streams stay
        in fixed point throughout), or block by block when `per_block` asks for every intermediate state."""
        if caches:
            blocks = [
                BlockApplication(block, {name: CacheSlot(cache, i, commit) for name, cache in caches.items()})
                for i, block in enumerate(blocks)
            ]
        run = [blocks] if not per_block else [[block] for block in blocks]
        states = []
        for part in run:
            x1, x2 = run_reversible_stack(
                part, x1, x2, static_kwargs=static_kwargs, diff_kwargs=diff_kwargs, **engine_kwargs
            )
            states.append((x1, x2))
        return x1, x2, states

    def _stack(self, hidden, norm, options, depth, static_kwargs, diff_kwargs, caches, output_hidden_states):
        coupling = options.coupling
        blocks = self.applied_blocks(depth)
        streams = coupling.init_streams(hidden)
        engine_kwargs = options.engine_kwargs(self.last_drift_report)
        deferred = None
        if output_hidden_states and len(blocks) > 1 and options.reversible and self._needs_grad(hidden):
            # Block by block, a weight-tied block's parameters would receive their gradient once per application (and
            # parameters closed over by f/g once per block): the calls defer them, delivered once after the last.
            deferred = DeferredGradients.for_blocks(blocks)
        if deferred is not None:
            streams = deferred.entry(*streams)
            engine_kwargs["deferred_gradients"] = deferred
        x1, x2, states = self._run(
            blocks, *streams, static_kwargs, diff_kwargs, engine_kwargs, caches, per_block=output_hidden_states
        )
        last = norm(coupling.merge_streams(x1, x2))
        all_hidden = None
        if output_hidden_states:
            # Per-layer states need every block's output: run block by block (memory grows with depth).
            all_hidden = (hidden, *(coupling.merge_streams(*s) for s in states[:-1]), last)
        return StackOutput(last, all_hidden)

    # ----------------------------------------------------------------------------------------------------------
    # Deep-equilibrium mode (docs/infinite_depth.md)
    # ----------------------------------------------------------------------------------------------------------

    def _deq(self, hidden, norm, options, static_kwargs, diff_kwargs, caches, output_hidden_states):
        """Deep-equilibrium forward of the weight-tied block group (all distinct blocks, in order).

        State `h = (h1, h2)` (both streams), input injection `x = init_streams(rms_normalise(hidden))`, and
        `f(h) = x + R(h)` with `R(h) = group(h) - h` the group's residual update: the fixed point `h* = x + R(h*)` is
        the implicit (infinitely deep, weight-tied) version of one explicit step `h = x + R(x)`. Solved by `deq.py`;
        dropout draws the same masks in every application of `f` within one forward, so `f` is one fixed map. The
        differentiable kwargs (an encoder output) are inputs of the fixed point, so their gradient is implicit too.
        """
        coupling = options.coupling
        group = list(self)
        # Unit-RMS input injection: the blocks' pre-norms amplify perturbations of h by 1/rms(h), so with the raw
        # (std 0.02) embedding f starts far from contractive (measured at d=128: Anderson stalls at residual ~0.2).
        h32 = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        injection = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + options.rms_norm_eps)).to(hidden.dtype)
        x1, x2 = coupling.init_streams(injection)
        width = x1.shape[-1]
        names = tuple(diff_kwargs)
        # The global generator advances once per training forward; every application of f then replays one seed.
        seed = int(torch.randint(0, 2**62, (1,))) if any(b.training for b in group) else None
        devices = sorted({hidden.device.index} if hidden.is_cuda and hidden.device.index is not None else set())

        phantom = options.deq_backward == "phantom"
        # The phantom unroll applies the group once per step: through the engine, the steps (and the Jacobian
        # penalty) defer their parameter gradients so that each parameter receives their sum once (deq.py).
        deferred = DeferredGradients.for_blocks(group) if phantom and options.reversible else None

        def f(h, a, b, *diff_values, reversible=False, commit=False):
            engine_kwargs = {**options.engine_kwargs(None), "reversible": reversible}
            if reversible:
                engine_kwargs["deferred_gradients"] = deferred
            with _seeded_rng(seed, devices):
                y1, y2, _ = self._run(
                    group, h[..., :width], h[..., width:], static_kwargs, dict(zip(names, diff_values)),
                    engine_kwargs, caches, commit=commit,
                )
            return torch.cat([a + (y1 - h[..., :width]), b + (y2 - h[..., width:])], dim=-1)

        def f_twice_differentiable(h, *xs):
            # The Jacobian penalty's double backward: the fused SDPA kernels have none, the math kernel does.
            with sdpa_kernel([SDPBackend.MATH]):
                return f(h, *xs)

        def report(stats: DEQStats) -> None:
            if not stats.converged:
                self._warn_deq(stats)

        inputs = (x1, x2, *diff_kwargs.values())
        with_penalty = options.deq_jacobian_reg > 0 and self.training and torch.is_grad_enabled()
        h, stats = deq_fixed_point(
            (lambda h, *xs: f(h, *xs, reversible=options.reversible)) if phantom else f,
            torch.cat([x1, x2], dim=-1),
            inputs,
            solver=options.deq_solver,
            max_iter=options.deq_max_iter,
            tol=options.deq_tol,
            damping=options.deq_damping,
            backward=options.deq_backward,
            phantom_steps=options.deq_phantom_steps,
            on_backward=report,
            jacobian_samples=1 if with_penalty else 0,
            jacobian_f=f_twice_differentiable,
            deferred_gradients=deferred,
        )
        if not stats.forward.converged:
            self._warn_deq(stats)
        # The differentiable penalty travels in the model output; the stats (often kept for logging) keep only its value.
        jacobian_loss, stats.jacobian_penalty = stats.jacobian_penalty, None
        recorder = static_kwargs["attentions"]
        if caches or recorder is not None:
            # One more application at the fixed point stores its keys/values (causal: later tokens do not change
            # them) and records its attention maps.
            if recorder is not None:
                recorder.is_open = True
            with torch.no_grad():
                f(h.detach(), *inputs, commit=True)
        out = norm(coupling.merge_streams(h[..., :width], h[..., width:]))
        all_hidden = (hidden, out) if output_hidden_states else None
        return StackOutput(out, all_hidden, deq_stats=stats, jacobian_loss=jacobian_loss)

    def _needs_grad(self, hidden: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _warn_deq(self, stats: DEQStats) -> None:
        """Log a non-converged DEQ solve (the 1st, 2nd, 4th, 8th ... time, so training logs stay readable)."""
        self.deq_nonconverged += 1
        if self.deq_nonconverged & (self.deq_nonconverged - 1) == 0:
            which = "forward" if not stats.forward.converged else "backward (adjoint)"
            s = stats.forward if which == "forward" else stats.backward
            logger.warning(
                f"DEQ {which} solve did not converge ({self.deq_nonconverged} time(s) so far): relative residual "
                f"{s.residual:.3e} > deq_tol={s.tol:g} after {s.iterations} iterations. Raise `deq_max_iter`, use "
                "`deq_solver='anderson'` or `deq_jacobian_reg`; `outputs.deq_stats` has the details."
            )


__all__ = ["RevFormerStack"]
