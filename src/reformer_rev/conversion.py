"""Make a pretrained `transformers` causal LM train reversibly, without changing its class, weights or inference.

`make_reversible(model)` takes a loaded decoder-only causal LM of a supported family (Llama, Qwen2, Mistral, GPT-2,
Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 text, Phi-3, OLMo 2, Granite, SmolLM3, Cohere2, Gemma, Mixtral, OLMo 3, Cohere,
Phi, GPT-J; `conversion_families.py` describes each by the structure of its layers) and returns the *same object*.
In eval mode, under `torch.no_grad()` and in `generate()` nothing changes: every decoder layer runs its own forward.
In training with gradients enabled the decoder stack runs through the reversible engine (`reversible.py`) with a
coupling that is the original residual update at `gamma = 0` (`couplings_twostep.py`; docs/design.md §9): every
residual sub-layer `x <- x + b(x)` of every layer is one coupling step (an engine block holds two: `f` and `g`), so
activation memory grows with depth only by the coupling's side bits (`m` bits per element per sub-layer with
gamma = 2^-m).

How the stack is hooked, without copying any `transformers` forward code: the decoder layers' `forward` is replaced
on the instances (the classes are untouched, `state_dict` keys too). In a reversible call every layer but the last
records the arguments the model prepared for it (masks, rotary tables, position ids: they may differ per layer, e.g.
Qwen2's sliding-window layers) and passes the hidden state through unchanged; the last layer then runs the whole
stack through the engine on the first layer's input. Forward hooks on the decoder module (`model.model` /
`model.transformer`) open and close each call, so a loop that skips layers or changes the hidden state between them
raises instead of silently computing something else. `revert_reversible(model)` removes everything.
"""

from __future__ import annotations

import functools
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .couplings_twostep import DEFAULT_GAMMA, BDIACoupling, HeavyBallCoupling, TwoStepCoupling, gamma_shift
from .couplings import Coupling, MomentumCoupling
from .conversion_families import (
    REFUSED_MODEL_TYPES,
    SUPPORTED_FAMILIES,
    BranchSpec,
    FamilySpec,
    branch_output,
    causal_lm_class_name,
    get_attr,
)
from .reversible import run_reversible_stack

logger = logging.get_logger(__name__)

SUPPORTED_CONVERSION_COUPLINGS = ("heavy_ball", "bdia", "momentum")
# Positions of the MLP applied (and recomputed) at a time: its intermediate (2.7-4x the hidden width) is the largest
# activation of a decoder layer, and chunks of 256 keep it below the attention sub-layer's working set
# (docs/pretrained.md, memory).
DEFAULT_FEED_FORWARD_CHUNK = 256

# Argument names a decoder layer has used for its KV cache across transformers releases.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")

# The causal LM class of every supported family, by name -> its model_type (`conversion_families.py` describes them).
SUPPORTED_MODEL_CLASSES: dict[str, str] = {causal_lm_class_name(t): t for t in SUPPORTED_FAMILIES}


def _family_of(model: nn.Module) -> tuple[str, FamilySpec]:
    """The model's `config.model_type` and its structural description; a clear refusal otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = SUPPORTED_FAMILIES.get(model_type)
    if spec is not None:
        expected = causal_lm_class_name(model_type)
        if any(c.__name__ == expected and c.__module__.startswith("transformers.") for c in type(model).__mro__):
            return model_type, spec
    supported = f"supports the transformers classes {', '.join(SUPPORTED_MODEL_CLASSES)} (or a PEFT model wrapping one)"
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(
            f"`make_reversible` cannot convert {type(model).__name__} (model_type {model_type!r}): "
            f"{REFUSED_MODEL_TYPES[model_type]}. It {supported}."
        )
    if spec is not None:
        raise ValueError(
            f"`make_reversible` converts the causal LM class of model_type {model_type!r} "
            f"({causal_lm_class_name(model_type)}), got {type(model).__name__}. It {supported}."
        )
    raise ValueError(
        f"`make_reversible` {supported}, got {type(model).__name__}"
        + (f" (model_type {model_type!r}, not described)" if model_type else "")
        + ". A decoder whose layers are residual sub-layers x + b(x) is added by a `FamilySpec` entry in "
        "`reformer_rev.conversion_families.SUPPORTED_FAMILIES`."
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the layers, not the wrapper, get converted)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__module__.startswith("peft.") else model


# --------------------------------------------------------------------------------------------------------------
# Residual sub-layers as engine blocks
# --------------------------------------------------------------------------------------------------------------


class _SubLayer:
    """One residual sub-layer `x <- x + h(x)` of one decoder layer: `h` is one branch, or the sum of a parallel
    layer's branches. Its layer's call arguments for the current stack call arrive through the engine's kwargs under
    the layer's key."""

    def __init__(
        self, layer: nn.Module, index: int, branches: tuple[BranchSpec, ...], sum_branches_first: bool
    ) -> None:
        self.layer = layer
        self.index = index
        self.key = str(index)
        self.branches = branches
        self.sum_branches_first = sum_branches_first
        self.takes_layer_kwargs = any(b.takes_layer_kwargs for b in branches)
        # Position-wise (MLP, MoE): the engine may apply it a chunk of positions at a time.
        self.position_wise = not self.takes_layer_kwargs
        self.name = "+".join("attention" if b.takes_layer_kwargs else "mlp" for b in branches)

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for b in self.branches:
            for name in b.module_names():
                for p in get_attr(self.layer, name).parameters():
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def __call__(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        layer_kwargs = {}
        if self.takes_layer_kwargs:
            static, diff_names = kwargs[self.key]
            layer_kwargs = {**static, **{n: kwargs[f"{self.key}.{n}"] for n in diff_names}}
        if len(self.branches) == 1:
            return branch_output(self.layer, self.branches[0], x, layer_kwargs)
        # A parallel layer: every branch reads x; their outputs are summed in the precision the layer sums them in
        # (under autocast a bf16 sum differs from a float32 one by 2e-3 relative).
        out = None
        for branch in self.branches:
            y = branch_output(self.layer, branch, x, layer_kwargs)
            if not self.sum_branches_first:
                y = y.to(torch.promote_types(y.dtype, x.dtype))
            out = y if out is None else out + y
        return out


class _LayerBlock:
    """Two consecutive residual sub-layers as one engine block: `f` then `g`. A sequential decoder layer of two
    branches is one block (attention, MLP); parallel layers are paired (layer 2k as `f`, layer 2k+1 as `g`), and an
    odd last one gets a zero `g` (the coupling then only moves the stream by its mean-zero training-time term).

    Sub-modules are looked up at call time, so adapters injected later (PEFT LoRA) are used.
    """

    def __init__(
        self, f_step: _SubLayer, g_step: _SubLayer | None, g_chunk_size: int = DEFAULT_FEED_FORWARD_CHUNK
    ) -> None:
        self.f_step = f_step
        self.g_step = g_step
        self.layers = list({id(s.layer): s.layer for s in (f_step, g_step) if s is not None}.values())
        self.recorder: list[tuple[float, float]] | None = None  # fidelity_report: (rms of input, rms of update)
        self._g_chunk_size = g_chunk_size

    @property
    def g_chunk_size(self) -> int:
        """Positions of `g` applied (and recomputed) at a time; 0 (whole sequence) unless `g` is position-wise."""
        return self._g_chunk_size if self.g_step is not None and self.g_step.position_wise else 0

    @g_chunk_size.setter
    def g_chunk_size(self, value: int) -> None:
        self._g_chunk_size = value

    @property
    def training(self) -> bool:
        return self.f_step.layer.training

    def parameters(self):
        for layer in self.layers:
            yield from layer.parameters()

    def branch_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The parameters of `f` and of `g` (the engine frees each branch's gradients as soon as it is done)."""
        return self.f_step.parameters(), (self.g_step.parameters() if self.g_step is not None else [])

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self._record(x, self.f_step(x, kwargs))

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # `x * 0` rather than a constant: the engine differentiates every branch output with respect to its input.
        return self._record(x, self.g_step(x, kwargs) if self.g_step is not None else x * 0)

    def _record(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.recorder is not None:
            self.recorder.append((_rms(x), _rms(out)))
        return out


# --------------------------------------------------------------------------------------------------------------
# The conversion state and the instance-level hooks
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _StackCall:
    """One forward of the decoder in reversible mode: what the layers recorded so far."""

    hidden: torch.Tensor | None = None
    static: dict[str, Any] = field(default_factory=dict)
    diff: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0
    done: bool = False


class FidelityProbe:
    """How far the training-time coupling moves a converted model's loss, measured on the training batches themselves.

    Every `every`-th training forward that computes a loss (the model was called with `labels`), the same batch runs
    once more through the original layers (no gradient, generators forked so training randomness is untouched) and
    `loss / original_loss - 1` is recorded: `last`, `mean` and the count. One batch's change is noisy (the random signs
    move a single batch's loss by a few tenths of a percent either way at the default gamma), so the warning -- once,
    with the fix -- fires when the mean of at least `min_probes` probes is beyond `threshold`, or one probe beyond
    four times it. The training scripts write the fields into their log, as they do the reversal drift monitor's
    (`reformer_rev.training.loop`). Cost: one forward without gradient per `every` steps; `every=0` switches it off.
    """

    def __init__(self, every: int = 50, threshold: float = 0.005, min_probes: int = 3) -> None:
        self.every = every
        self.threshold = threshold
        self.min_probes = min_probes
        self.calls = 0
        self.probes = 0
        self.total = 0.0
        self.last: float | None = None
        self.warned = False

    @property
    def mean(self) -> float | None:
        return self.total / self.probes if self.probes else None

    def should_probe(self) -> bool:
        self.calls += 1
        return self.every > 0 and (self.calls - 1) % self.every == 0

    def record(self, loss: float, original: float, coupling: Any) -> None:
        change = loss / original - 1 if original else float("nan")
        self.probes += 1
        self.total += change
        self.last = change
        mean = self.mean
        beyond = not abs(change) <= 4 * self.threshold or (
            self.probes >= self.min_probes and not abs(mean) <= self.threshold
        )
        if not self.warned and beyond:
            self.warned = True
            logger.warning(
                f"make_reversible: the training-time coupling {coupling!r} changes the loss by {100 * mean:+.2f}% "
                f"on average over {self.probes} probed batch(es) (last: {loss:.4f} vs {original:.4f} for the original "
                f"model), beyond {100 * self.threshold:.2f}%. Fine-tuning then optimises a noisier function than the "
                "one you deploy. "
                "Fix: a smaller gamma (`make_reversible(model, gamma=2**-6)`, one more side bit per element and "
                "sub-layer), or ordinary fine-tuning with activation checkpointing (`revert_reversible(model)`)."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"fidelity_last_rel_change": self.last, "fidelity_mean_rel_change": self.mean,
                "fidelity_probes": self.probes}


class ReversibleConversion:
    """The state `make_reversible` attaches to a model (as `model._reversible_conversion`); not a `nn.Module`, so
    `state_dict`, `save_pretrained` and the config never see it."""

    def __init__(self, model: nn.Module, model_type: str, family: FamilySpec) -> None:
        self.model_type = model_type
        self.family = family
        self.decoder: nn.Module = getattr(model, family.decoder)
        layer_list = getattr(self.decoder, family.layers)
        # Llama-like decoders loop over `layers[: config.num_hidden_layers]`, GPT-2 over all of `h`.
        count = min(len(layer_list), getattr(model.config, "num_hidden_layers", len(layer_list)))
        self.layers: list[nn.Module] = list(layer_list)[:count]
        for layer in self.layers:
            _check_layer_structure(layer, family)
        # One residual sub-layer per branch (per layer for a parallel layer), two per engine block.
        self.sublayers = [
            _SubLayer(layer, i, branches, family.layer.sum_branches_first)
            for i, layer in enumerate(self.layers)
            for branches in family.layer.sublayers()
        ]
        steps = self.sublayers
        self.blocks = [
            _LayerBlock(steps[k], steps[k + 1] if k + 1 < len(steps) else None) for k in range(0, len(steps), 2)
        ]
        # A layer that still takes `output_attentions` returns a tuple `(hidden, ...)` (older releases).
        self.returns_tuple = ["output_attentions" in _signature(type(layer)).parameters for layer in self.layers]
        self.coupling: TwoStepCoupling | MomentumCoupling = HeavyBallCoupling(DEFAULT_GAMMA)  # the defaults
        self.reversible = True
        self.fixed_point_bits = 40
        self.current: _StackCall | None = None
        self.probe = FidelityProbe()
        self.calibration: FidelityReport | None = None
        self._probing = False
        self._handles: list[Any] = []
        self.verified = False  # the description was checked against the first layer's own forward (`_verify`)
        self.verification_error: float | None = None  # relative difference of the first layer's update found then
        self.model = model

    # ---- options -------------------------------------------------------------------------------------------------

    def configure(
        self,
        coupling: str | Coupling | None = None,
        gamma: float | None = None,
        reversible: bool | None = None,
        fixed_point_bits: int | None = None,
        chunk_size_feed_forward: int | None = None,
    ) -> None:
        """Set the options; None keeps the current value (at conversion: the default). A new coupling name without a
        `gamma` takes that coupling's default gamma. Every argument is checked before anything is built or changed,
        so a bad value leaves the conversion as it was."""
        if coupling is None and gamma is not None:
            coupling = getattr(self.coupling, "name", None)
        if reversible is None:
            reversible = self.reversible
        if fixed_point_bits is None:
            fixed_point_bits = self.fixed_point_bits
        if isinstance(coupling, (TwoStepCoupling, MomentumCoupling)):
            if gamma is not None:
                raise ValueError("Pass `gamma` only with a coupling name, not with a coupling instance.")
        elif coupling is not None and coupling not in SUPPORTED_CONVERSION_COUPLINGS:
            raise ValueError(
                f"`coupling` must be one of {SUPPORTED_CONVERSION_COUPLINGS} (or a TwoStepCoupling / MomentumCoupling): "
                f"the conversion needs a coupling that is the original residual update at inference, got {coupling!r}."
            )
        elif gamma is not None:
            if coupling == "momentum":
                _check_momentum_gamma(gamma)
            else:
                gamma_shift(gamma)
        if not isinstance(reversible, bool):
            raise TypeError(f"`reversible` must be a bool, got {type(reversible).__name__}.")
        if isinstance(fixed_point_bits, bool) or not isinstance(fixed_point_bits, int) or not 8 <= fixed_point_bits <= 52:
            raise ValueError(f"`fixed_point_bits` must be an integer in [8, 52], got {fixed_point_bits!r}.")
        if chunk_size_feed_forward is None:
            chunk_size_feed_forward = self.blocks[0]._g_chunk_size if self.blocks else DEFAULT_FEED_FORWARD_CHUNK
        if (
            isinstance(chunk_size_feed_forward, bool)
            or not isinstance(chunk_size_feed_forward, int)
            or chunk_size_feed_forward < 0
        ):
            raise ValueError(
                "`chunk_size_feed_forward` must be a non-negative integer (positions of the MLP computed at a time; 0: "
                f"all at once), got {chunk_size_feed_forward!r}."
            )
        if coupling is None:
            pass  # keep the current coupling
        elif not isinstance(coupling, str):
            self.coupling = coupling
        elif coupling == "momentum":
            self.coupling = MomentumCoupling(0.5 if gamma is None else gamma)
        else:
            cls = HeavyBallCoupling if coupling == "heavy_ball" else BDIACoupling
            self.coupling = cls(DEFAULT_GAMMA if gamma is None else gamma)
        self.reversible = reversible
        self.fixed_point_bits = fixed_point_bits
        for block in self.blocks:
            block.g_chunk_size = chunk_size_feed_forward

    def describe(self) -> str:
        """What the conversion chose, per sub-layer (the same for all), and what it costs."""
        bits = getattr(self.coupling, "shift", None)
        cost = (
            f"{bits} side bits per hidden element per sub-layer" if bits is not None else "an information buffer"
        )
        kinds = " / ".join(dict.fromkeys(step.name for step in self.sublayers))
        zero = 2 * len(self.blocks) - len(self.sublayers)
        return (
            f"{self.model_type} ({self.family.pattern}): {len(self.layers)} decoder layers -> "
            f"{len(self.sublayers)} reversible residual sub-layers ({kinds})"
            + (f" and {zero} empty one (odd count)" if zero else "")
            + f", each with {self.coupling!r} in training ({cost}), int64 streams with {self.fixed_point_bits} "
            f"fractional bits, MLP chunks of {self.blocks[0]._g_chunk_size if self.blocks else 0} positions; "
            + ("reversible" if self.reversible else "plain autograd (twin)")
            + "; inference unchanged"
        )

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def install(self) -> None:
        self._handles = [
            self.decoder.register_forward_pre_hook(self._open_call, with_kwargs=True),
            self.decoder.register_forward_hook(self._close_call),
            self.model.register_forward_hook(self._probe_fidelity, with_kwargs=True),
        ]
        for layer in self.layers:
            layer._reversible_conversion = self
            # An instance attribute shadows the class's forward (deep copies rebind it to the copied layer).
            layer.forward = _converted_layer_forward.__get__(layer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_reversible_conversion", None)
        self.current = None

    def _probe_fidelity(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """`FidelityProbe`: on a probed training call with labels, the loss of the original layers on the same batch."""
        loss = getattr(output, "loss", None)
        if (
            self._probing
            or not (model.training and torch.is_grad_enabled())
            or not isinstance(loss, torch.Tensor)
            or loss.numel() != 1
            or not self.probe.should_probe()
        ):
            return
        self._probing = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices_of(loss)):
                original = model(*args, **kwargs).loss  # no grad: the layers run their own forward
            self.probe.record(float(loss.detach()), float(original), self.coupling)
        finally:
            self._probing = False

    def _open_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.current = None
        if not (module.training and torch.is_grad_enabled()):
            return  # inference: the original model, layer by layer
        config = getattr(module, "config", None)
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag, getattr(config, flag, False)):
                raise ValueError(
                    f"`{flag}` is not available while a model converted by `make_reversible` trains: the decoder "
                    "stack runs as one reversible step and keeps no per-layer outputs. Call it in eval mode or under "
                    "torch.no_grad(), or undo the conversion with `revert_reversible(model)`."
                )
        if kwargs.get("output_router_logits", getattr(config, "output_router_logits", False)):
            raise ValueError(
                "`output_router_logits=True` is not available while a model converted by `make_reversible` trains: "
                "the routers' logits are recorded by hooks during the forward, which runs without a graph, so the "
                "load-balancing loss would be added to the loss but give the routers no gradient. Train with "
                "`output_router_logits=False` (`model.config.output_router_logits = False`), or undo the conversion "
                "with `revert_reversible(model)`."
            )
        for name in _CACHE_ARGS:
            cache = kwargs.get(name)
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise ValueError(
                    f"A non-empty `{name}` (e.g. prefix tuning) cannot be used while a converted model trains "
                    "reversibly: the recomputing backward would update the cache a second time."
                )
        self._check_sharding()
        self.current = _StackCall()

    def _check_sharding(self) -> None:
        """Route FSDP2-sharded layers through FSDP's hooks (once); refuse the wrappers the stack cannot run under.

        The whole stack runs inside the last layer's call, while FSDP gathers each layer's weights around its own
        call: under FSDP2 (`fully_shard` per decoder layer, what Accelerate's `fsdp_version: 2` does) each layer's
        branches become forward methods of its FSDP unit (`distributed.register_fsdp_converted_layers`)."""
        layer_list = getattr(self.decoder, self.family.layers)
        if any(listed is not layer for listed, layer in zip(layer_list, self.layers)):
            raise ValueError(
                f"The decoder's layers were replaced by wrappers ({type(layer_list[0]).__name__}) after "
                "`make_reversible`: FSDP1 (`fsdp_version: 1`) and activation-checkpoint wrappers are not supported by "
                "a reversible stack. Use FSDP2 (`fsdp_version: 2`), DDP, or no wrapper (the stack already recomputes)."
            )
        if any(hasattr(p, "ds_id") for p in self.layers[0].parameters()) and any(
            getattr(b, "gradient_release_scope", None) is None for b in self.blocks
        ):
            # DeepSpeed ZeRO-3 partitions every parameter outside the hooks of its module; the recompute runs inside
            # them, but the engine delivers the summed gradients after it (`register_deepspeed_zero3_scopes`).
            from .distributed import register_deepspeed_zero3_scopes

            register_deepspeed_zero3_scopes(self.model)
        if any(callable(getattr(layer, "_get_fsdp_state", None)) for layer in self.layers):
            from .distributed import register_fsdp_converted_layers

            register_fsdp_converted_layers(self.blocks)

    def _close_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self.current = self.current, None
        if call is not None and call.calls and not call.done:
            raise RuntimeError(
                f"The reversible decoder stack ran only {call.calls} of its {len(self.layers)} layers: the model's "
                "layer loop did not call every converted layer in order."
            )

    # ---- the layers' forward ------------------------------------------------------------------------------------

    def layer_forward(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        call = self.current
        if call is None:
            return type(layer).forward(layer, *args, **kwargs)
        index = call.calls
        if index >= len(self.layers) or self.layers[index] is not layer:
            raise RuntimeError(
                "A converted decoder layer was called out of order in a reversible forward (expected layer "
                f"{index} of {len(self.layers)})."
            )
        bound = _bind(layer, args, kwargs)
        hidden = bound.pop("hidden_states")
        if index == 0:
            call.hidden = hidden
        elif not _same_tensor(hidden, call.hidden):
            raise RuntimeError(
                "The hidden state changed between two converted decoder layers (a hook or a custom layer loop?): "
                "the reversible stack can only run layers that feed each other directly."
            )
        self._record(call, str(index), bound)
        call.calls += 1
        out = self._run_stack(call) if call.calls == len(self.layers) else hidden
        return (out,) if self.returns_tuple[index] else out

    def _record(self, call: _StackCall, key: str, bound: dict[str, Any]) -> None:
        for name in self.family.layer.refused_args:
            if bound.pop(name, None) is not None:
                raise ValueError(f"`{name}` (cross-attention) is not supported by `make_reversible`.")
        if bound.get("use_cache") or any(bound.get(name) is not None for name in _CACHE_ARGS):
            # The recompute would append to the cache a second time; training does not need it (as with activation
            # checkpointing, the returned cache stays empty).
            logger.warning_once("`use_cache=True` is incompatible with reversible training: the KV cache is not filled.")
            for name in (*_CACHE_ARGS, "use_cache"):
                if name in bound:
                    bound[name] = False if name == "use_cache" else None
        static, diff_names = {}, []
        for name, value in bound.items():
            if isinstance(value, torch.Tensor) and value.requires_grad:
                call.diff[f"{key}.{name}"] = value
                diff_names.append(name)
            elif isinstance(value, (tuple, list)) and any(
                isinstance(v, torch.Tensor) and v.requires_grad for v in value
            ):
                raise ValueError(f"Layer argument `{name}` holds tensors that require grad inside a {type(value)}.")
            else:
                static[name] = value
        call.static[key] = (static, tuple(diff_names))

    def _verify(self, call: _StackCall) -> None:
        """Once per conversion, at the first training call: the first layer's own forward and its description
        (`x + b(x)` per residual sub-layer) on the real input and arguments, same RNG state (same dropout masks), no
        gradient. A transformers release that changed the layer (a new norm, scale or branch) raises here instead of
        training a different function. Tolerance: rounding of a different summation order (parallel layers), relative
        to the layer's update."""
        layer = self.layers[0]
        x = call.hidden
        static, diff_names = call.static["0"]
        kwargs = {**static, **{n: call.diff[f"0.{n}"] for n in diff_names}}
        engine_kwargs = {"0": (static, diff_names), **{f"0.{n}": call.diff[f"0.{n}"] for n in diff_names}}
        outputs = []
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices_of(x)):
            rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in _cuda_devices_of(x)]
            for described in (False, True):
                torch.set_rng_state(rng[0])
                for d, state in zip(_cuda_devices_of(x), rng[1]):
                    torch.cuda.set_rng_state(state, d)
                if described:
                    out = x
                    for step in self.sublayers:
                        if step.layer is layer:
                            out = out + step(out, engine_kwargs)
                else:
                    out = type(layer).forward(layer, x, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                outputs.append((out.float() - x.float()))
        original, described = outputs
        err = float((described - original).norm() / original.norm().clamp_min(1e-30))
        self.verification_error = err
        tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2
        if not err <= tol:  # also catches NaN
            raise RuntimeError(
                f"`make_reversible`: the structural description of {type(layer).__name__} ({self.family.pattern}) does "
                f"not reproduce the layer's own forward (relative difference of the update {err:.2e} > {tol:g}); this "
                "transformers release computes the layer differently. Undo the conversion with `revert_reversible`."
            )
        self.verified = True

    def _run_stack(self, call: _StackCall) -> torch.Tensor:
        call.done = True
        hidden = call.hidden
        if not self.verified and not _parameters_sharded(self.layers[0]):
            # (Sharded parameters -- FSDP2's DTensors, ZeRO-3's partitions -- are whole only inside the layer's own
            # hooked call, so the check runs unsharded; the sharded tests compare with one process instead.)
            self._verify(call)
        coupling = self.coupling
        if isinstance(coupling, TwoStepCoupling):
            coupling = coupling.start(2 * len(self.blocks), hidden.shape[0], hidden.device)
        x1, x2 = coupling.init_streams(hidden)
        # Autocast (e.g. Accelerate's bf16) needs nothing here: the engine replays the forward's autocast state around
        # the recompute of f/g only and computes the gradients outside it, as plain autograd does.
        y1, y2 = run_reversible_stack(
            self.blocks,
            x1,
            x2,
            reversible=self.reversible,
            static_kwargs=call.static,
            diff_kwargs=call.diff,
            coupling=coupling,
            fixed_point_bits=self.fixed_point_bits,
        )
        return coupling.merge_streams(y1, y2)


def _check_layer_structure(layer: nn.Module, family: FamilySpec) -> None:
    """The layer has every sub-module the description names, and no parameter outside them: a layer with more (a new
    norm, a gate, a cross-attention in use) would otherwise be run without it."""
    spec = family.layer
    covered: set[int] = set()
    for branch in spec.branches:
        for name in (*branch.module_names(), *((branch.scale,) if branch.scale else ())):
            try:
                value = get_attr(layer, name)
            except AttributeError:
                value = None
            if name == branch.scale:
                ok = isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, nn.Module)
            if not ok:
                kind = "attribute" if name == branch.scale else "sub-module"
                raise ValueError(
                    f"`make_reversible`: decoder layer {type(layer).__name__} has no {kind} `{name}`; its structure "
                    f"differs from the description of its family ({family.pattern})."
                )
            if isinstance(value, nn.Module):
                covered.update(id(p) for p in value.parameters())
    for name in spec.refused_args_modules:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            covered.update(id(p) for p in module.parameters())
    uncovered = [n for n, p in layer.named_parameters() if id(p) not in covered]
    if uncovered:
        raise ValueError(
            f"`make_reversible`: decoder layer {type(layer).__name__} has parameters outside the residual branches of "
            f"its family's description ({family.pattern}): {', '.join(uncovered[:5])}. Its layer computes something "
            "the conversion would not."
        )


def _parameters_sharded(layer: nn.Module) -> bool:
    """The layer's parameters are FSDP2 shards (DTensors) or ZeRO-3 partitions."""
    return any(hasattr(p, "device_mesh") or hasattr(p, "ds_id") for p in layer.parameters())


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` is `b` or an alias of it with the same geometry: FSDP2's pre-forward hook of each sharded layer hands the
    layer a new tensor object (the output of its post-backward autograd Function) that shares the hidden state's
    storage."""
    return a is b or (
        isinstance(a, torch.Tensor)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().square().mean().sqrt())


def _cuda_devices_of(t: torch.Tensor) -> list[int]:
    return [t.device.index] if t.is_cuda and t.device.index is not None else []


def _check_momentum_gamma(gamma: object) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and 0 < gamma < 1):
        raise ValueError(f"`gamma` of the momentum coupling must be a number in (0, 1), got {gamma!r}.")


def _converted_layer_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self._reversible_conversion.layer_forward(self, args, kwargs)


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bind(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The layer's call arguments by name, as its own (class) forward would see them; `**kwargs` flattened."""
    sig = _signature(type(layer))
    bound = sig.bind(layer, *args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # [0] is `self`
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(layer).__name__}: unexpected extra positional arguments")
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def make_reversible(
    model: nn.Module,
    *,
    coupling: str | Coupling | None = None,
    gamma: float | None = None,
    reversible: bool | None = None,
    fixed_point_bits: int | None = None,
    chunk_size_feed_forward: int | None = None,
    calibration_input_ids: torch.Tensor | None = None,
) -> nn.Module:
    """Train a pretrained causal LM with a reversible decoder stack; returns the same `model` object.

    Supported: the causal LM classes of `SUPPORTED_MODEL_CLASSES` (Llama, Qwen2, Mistral, GPT-2, Qwen3, Qwen3-MoE,
    Gemma 2, Gemma 3 text, Phi-3, OLMo 2, Granite, SmolLM3, Cohere2, Gemma, Mixtral, OLMo 3, Cohere, Phi, GPT-J), also
    inside a PEFT model; other families are refused with what blocks them (`conversion_families.REFUSED_MODEL_TYPES`).
    Nothing changes in eval mode, under `torch.no_grad()` or in `generate()`; `save_pretrained` writes an ordinary
    checkpoint of the original class. Calling it again on a converted model changes the options it is given
    and keeps the others (every option's default, None, means "as it is"; at the first call, the defaults below).

    The default is faithful on real pretrained LLMs: heavy-ball with gamma = +-1/32 changes SmolLM2-135M's training-mode
    loss by +0.05% (English) to +0.14% (Spanish, code), and its activation memory at depth 30 is about half of
    activation checkpointing's (docs/pretrained.md). Every training forward with labels is watched by a
    `FidelityProbe` (`model._reversible_conversion.probe`), which warns if the coupling moves the loss by more than
    0.5%.

    Args:
        coupling: the training-time update of each residual sub-layer (`couplings_twostep.py`); all are the original
            model at inference.
            `"heavy_ball"` (the default): `x_{k+1} = x_k + h_k(x_k) + g (x_{k-1} - x_k)` with `g = +-gamma` drawn per
            sample and sub-layer in training; `gamma` must be `2^-m` and costs `m` side bits per element per
            sub-layer (default 1/32: five bits). Larger gammas are cheaper and noisier: gamma 1/2 moves SmolLM2's
            training-mode loss by +146% (its massive activations), 1/16 by +0.5 to +0.9%.
            `"bdia"`: `x_{k+1} = g x_{k-1} + (1-g) x_k + (1+g) h_k(x_k)` (BDIA, ICML 2025), the same bits, about
            twice the training-time perturbation on pretrained weights (docs/pretrained.md).
            `"momentum"`: exact momentum (`v <- gamma v + (1-gamma) h(x)`, `x <- x + v`; default gamma 1/2), a
            deterministic change of the function, `log2(1/gamma)` bits in 52-bit limbs.
        gamma: the coupling's coefficient (see above).
        reversible: `False` runs the same coupling under ordinary autograd (the twin used to check gradients);
            default True.
        fixed_point_bits: fractional bits of the int64 fixed-point streams that make reversal bit-exact. The default,
            40, keeps hidden values up to 2^20 (an OverflowError names the fix otherwise).
        chunk_size_feed_forward: positions of the MLP computed (and recomputed in backward) at a time; None: 256,
            0: all at once. Keeps the MLP's wide intermediate below the attention's working set.
        calibration_input_ids: a batch of token ids (batch, length) to measure the coupling on at conversion: the
            result (`fidelity_report`) is logged and kept as `model._reversible_conversion.calibration`.
    """
    base = _unwrap(model)
    model_type, family = _family_of(base)
    conversion = getattr(base, "_reversible_conversion", None)
    if conversion is None:
        conversion = ReversibleConversion(base, model_type, family)
        conversion.configure(coupling, gamma, reversible, fixed_point_bits, chunk_size_feed_forward)
        conversion.install()
        base._reversible_conversion = conversion
    else:
        conversion.configure(coupling, gamma, reversible, fixed_point_bits, chunk_size_feed_forward)
    logger.info(f"make_reversible({type(base).__name__}): {conversion.describe()}")
    if calibration_input_ids is not None:
        conversion.calibration = fidelity_report(model, calibration_input_ids)
        logger.info(f"make_reversible: measured on the calibration batch: {conversion.calibration.summary()}")
    return model


@dataclass
class FidelityReport:
    """What the training-time coupling does to a converted model on some text (`fidelity_report`)."""

    coupling: str
    side_bits: float  # per hidden element per sub-layer
    original_loss: float
    training_loss: float  # mean over `draws` forwards with fresh random signs, dropout off
    sublayers: list[dict[str, Any]]

    @property
    def relative_change(self) -> float:
        return self.training_loss / self.original_loss - 1

    def summary(self) -> str:
        measured = [r for r in self.sublayers if math.isfinite(r["perturbation"])]
        worst = max(measured, key=lambda r: r["perturbation"], default=None)
        text = (
            f"{self.coupling}: {len(self.sublayers)} reversible sub-layers, {self.side_bits:g} side bits per element "
            f"each; training-mode loss {self.training_loss:.4f} vs {self.original_loss:.4f} for the original model "
            f"({100 * self.relative_change:+.2f}%)"
        )
        if worst is not None:
            text += (
                f"; largest perturbation at layer {worst['layer']} {worst['branch']} "
                f"({100 * worst['perturbation']:.2f}% of the stream)"
            )
        return text

    def table(self) -> str:
        rows = ["| sub-layer | layer | branch | gamma | side bits | stream RMS | update RMS | perturbation / stream |",
                "|---|---|---|---|---|---|---|---|"]
        for r in self.sublayers:
            rows.append(
                f"| {r['index']} | {r['layer']} | {r['branch']} | {r['gamma']:g} | {r['side_bits']:g} | "
                f"{r['stream_rms']:.4g} | {r['update_rms']:.4g} | "
                + (f"{100 * r['perturbation']:.3f}% |" if math.isfinite(r["perturbation"]) else "– |")
            )
        return "\n".join(rows)


def fidelity_report(model: nn.Module, input_ids: torch.Tensor, draws: int = 2, seed: int = 0) -> FidelityReport:
    """Measure a converted model's training-time coupling on a batch of token ids: the loss of the original model and
    the training-mode loss (the function the gradients come from; dropout off, so only the coupling differs), and per
    sub-layer its side bits and the coupling's perturbation relative to the stream, `|gamma| rms(previous update) /
    rms(stream)`. Leaves the model's mode, RNG state and gradients as they were."""
    base = _unwrap(model)
    conversion = getattr(base, "_reversible_conversion", None)
    if conversion is None:
        raise ValueError(f"{type(base).__name__} was not converted by `make_reversible`.")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError("`input_ids` must be a (batch, length >= 2) tensor of token ids.")
    was_training = base.training
    coupling = conversion.coupling
    two_step = isinstance(coupling, TwoStepCoupling)
    gamma = float(getattr(coupling, "gamma", 0.0))
    bits = float(getattr(coupling, "shift", math.log2(1 / gamma) if 0 < gamma < 1 else 0))
    conversion._probing = True  # the report's forwards are not training steps: no FidelityProbe
    try:
        with torch.random.fork_rng(devices=_cuda_devices_of(input_ids)), _dropout_off(base):
            torch.manual_seed(seed)
            base.eval()
            with torch.no_grad():
                original = float(base(input_ids=input_ids, labels=input_ids, use_cache=False).loss)
            base.train()
            losses = []
            for draw in range(draws):
                records: list[tuple[float, float]] = []
                for block in conversion.blocks:
                    block.recorder = records if draw == 0 else None
                with torch.enable_grad():
                    losses.append(base(input_ids=input_ids, labels=input_ids, use_cache=False).loss.detach().item())
                if draw == 0:
                    stats = records
    finally:
        for block in conversion.blocks:
            block.recorder = None
        base.train(was_training)
        conversion._probing = False
    sublayers = []
    steps = conversion.sublayers
    for k, (stream, update) in enumerate(stats):
        previous_update = stats[k - 1][1] if k else 0.0
        # The engine's sub-steps are the sub-layers in order, then the empty `g` of an odd count of parallel layers.
        layer, branch = (steps[k].index, steps[k].name) if k < len(steps) else (steps[-1].index, "empty")
        sublayers.append({
            "index": k, "layer": layer, "branch": branch, "gamma": gamma if k else 0.0,
            "side_bits": bits if k else 0.0, "stream_rms": stream, "update_rms": update,
            # Two-step couplings add gamma (x_{k-1} - x_k) ~ gamma * (previous update); momentum's change is not a noise.
            "perturbation": (gamma * previous_update / stream) if two_step and k and stream > 0 else float("nan"),
        })
    return FidelityReport(repr(coupling), bits, original, sum(losses) / len(losses), sublayers)


@contextmanager
def _dropout_off(model: nn.Module):
    """Dropout modules and the float `attention_dropout` of transformers attention modules at 0, restored after."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            saved.append((module, "p", module.p))
            module.p = 0.0
        elif isinstance(getattr(module, "attention_dropout", None), float):
            saved.append((module, "attention_dropout", module.attention_dropout))
            module.attention_dropout = 0.0
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def revert_reversible(model: nn.Module) -> nn.Module:
    """Undo `make_reversible`: the layers' own forward in every mode again. Returns the same object."""
    base = _unwrap(model)
    conversion = base.__dict__.pop("_reversible_conversion", None)
    if conversion is None:
        raise ValueError(f"{type(base).__name__} was not converted by `make_reversible`.")
    conversion.remove()
    return model


def is_reversible(model: nn.Module) -> bool:
    """Whether `make_reversible` has converted this model (or the model inside this PEFT wrapper)."""
    return getattr(_unwrap(model), "_reversible_conversion", None) is not None


__all__ = [
    "make_reversible",
    "revert_reversible",
    "is_reversible",
    "ReversibleConversion",
    "FidelityProbe",
    "FidelityReport",
    "fidelity_report",
    "SUPPORTED_MODEL_CLASSES",
    "SUPPORTED_CONVERSION_COUPLINGS",
]
