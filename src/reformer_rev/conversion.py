"""Make a pretrained `transformers` causal LM train reversibly, without changing its class, weights or inference.

`make_reversible(model)` takes a loaded Llama, Qwen2, Mistral or GPT-2 causal LM and returns the *same object*. In
eval mode, under `torch.no_grad()` and in `generate()` nothing changes: every decoder layer runs its own forward. In
training with gradients enabled the decoder stack runs through the reversible engine (`reversible.py`) with a
coupling that is the original residual update at `gamma = 0` (`couplings_twostep.py`; docs/design.md §9): each
decoder layer is one engine block whose `f` is its pre-norm attention sub-layer and whose `g` its pre-norm MLP
sub-layer, so activation memory grows with depth only by the coupling's side bits (one bit per element per sub-layer
with gamma = 1/2).

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .couplings_twostep import BDIACoupling, HeavyBallCoupling, TwoStepCoupling
from .couplings import Coupling, MomentumCoupling
from .reversible import run_reversible_stack

logger = logging.get_logger(__name__)

SUPPORTED_CONVERSION_COUPLINGS = ("heavy_ball", "bdia", "momentum")

# Argument names a decoder layer has used for its KV cache across transformers releases.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class _Family:
    """Where the decoder stack and the residual sub-layers of one model family live (attribute names)."""

    decoder: str  # attribute of the LM holding the decoder module (its forward runs the layer loop)
    layers: str  # attribute of the decoder holding the `ModuleList` of layers
    attn_norm: str
    attn: str
    mlp_norm: str
    mlp: str
    # Layer arguments the layer consumes itself instead of forwarding them to its attention module.
    layer_only_args: tuple[str, ...] = ()


_LLAMA_LIKE = _Family("model", "layers", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_GPT2 = _Family("transformer", "h", "ln_1", "attn", "ln_2", "mlp", ("encoder_hidden_states", "encoder_attention_mask"))

# One adapter per family: Llama, Qwen2 and Mistral decoder layers share one structure (docs/design.md §9).
SUPPORTED_MODEL_CLASSES: dict[str, _Family] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GPT2LMHeadModel": _GPT2,
}


def _family_of(model: nn.Module) -> _Family:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_MODEL_CLASSES and cls.__module__.startswith("transformers."):
            return SUPPORTED_MODEL_CLASSES[cls.__name__]
    raise ValueError(
        f"`make_reversible` supports the transformers classes {', '.join(SUPPORTED_MODEL_CLASSES)} "
        f"(or a PEFT model wrapping one), got {type(model).__name__}."
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the layers, not the wrapper, get converted)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__module__.startswith("peft.") else model


# --------------------------------------------------------------------------------------------------------------
# One decoder layer as an engine block
# --------------------------------------------------------------------------------------------------------------


class _LayerBlock:
    """A decoder layer seen by the engine: `f` = pre-norm attention sub-layer, `g` = pre-norm MLP sub-layer.

    Sub-modules are looked up at call time, so adapters injected later (PEFT LoRA) are used. The layer's call
    arguments for the current stack call arrive through the engine's kwargs under this block's key.
    """

    g_chunk_size = 0  # the MLP runs in one piece: chunking would deliver a parameter's gradient once per chunk

    def __init__(self, layer: nn.Module, family: _Family, key: str) -> None:
        self.layer = layer
        self.family = family
        self.key = key

    @property
    def training(self) -> bool:
        return self.layer.training

    def parameters(self):
        return self.layer.parameters()

    def _attn_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        static, diff_names = kwargs[self.key]
        return {**static, **{n: kwargs[f"{self.key}.{n}"] for n in diff_names}}

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        fam = self.family
        out = getattr(self.layer, fam.attn)(getattr(self.layer, fam.attn_norm)(x), **self._attn_kwargs(kwargs))
        return out[0] if isinstance(out, tuple) else out

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return getattr(self.layer, self.family.mlp)(getattr(self.layer, self.family.mlp_norm)(x))


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


class ReversibleConversion:
    """The state `make_reversible` attaches to a model (as `model._reversible_conversion`); not a `nn.Module`, so
    `state_dict`, `save_pretrained` and the config never see it."""

    def __init__(self, model: nn.Module, family: _Family) -> None:
        self.family = family
        self.decoder: nn.Module = getattr(model, family.decoder)
        layer_list = getattr(self.decoder, family.layers)
        # Llama-like decoders loop over `layers[: config.num_hidden_layers]`, GPT-2 over all of `h`.
        count = min(len(layer_list), getattr(model.config, "num_hidden_layers", len(layer_list)))
        self.layers: list[nn.Module] = list(layer_list)[:count]
        for layer in self.layers:
            for name in (family.attn_norm, family.attn, family.mlp_norm, family.mlp):
                if not isinstance(getattr(layer, name, None), nn.Module):
                    raise ValueError(
                        f"`make_reversible`: decoder layer {type(layer).__name__} has no sub-module `{name}`; "
                        "its structure differs from the supported families."
                    )
        self.blocks = [_LayerBlock(layer, family, str(i)) for i, layer in enumerate(self.layers)]
        # A layer that still takes `output_attentions` returns a tuple `(hidden, ...)` (older releases).
        self.returns_tuple = ["output_attentions" in _signature(type(layer)).parameters for layer in self.layers]
        self.coupling: TwoStepCoupling | MomentumCoupling = HeavyBallCoupling()
        self.reversible = True
        self.fixed_point_bits = 40
        self.current: _StackCall | None = None
        self._handles: list[Any] = []

    # ---- options -------------------------------------------------------------------------------------------------

    def configure(self, coupling: str | Coupling, gamma: float | None, reversible: bool, fixed_point_bits: int):
        if isinstance(coupling, (TwoStepCoupling, MomentumCoupling)):
            if gamma is not None:
                raise ValueError("Pass `gamma` only with a coupling name, not with a coupling instance.")
            self.coupling = coupling
        elif coupling == "heavy_ball":
            self.coupling = HeavyBallCoupling(0.5 if gamma is None else gamma)
        elif coupling == "bdia":
            self.coupling = BDIACoupling(0.5 if gamma is None else gamma)
        elif coupling == "momentum":
            self.coupling = MomentumCoupling(0.5 if gamma is None else gamma)
        else:
            raise ValueError(
                f"`coupling` must be one of {SUPPORTED_CONVERSION_COUPLINGS} (or a TwoStepCoupling / MomentumCoupling): "
                f"the conversion needs a coupling that is the original residual update at inference, got {coupling!r}."
            )
        if not isinstance(reversible, bool):
            raise TypeError(f"`reversible` must be a bool, got {type(reversible).__name__}.")
        if isinstance(fixed_point_bits, bool) or not isinstance(fixed_point_bits, int) or not 8 <= fixed_point_bits <= 52:
            raise ValueError(f"`fixed_point_bits` must be an integer in [8, 52], got {fixed_point_bits!r}.")
        self.reversible = reversible
        self.fixed_point_bits = fixed_point_bits

    # ---- hooks ---------------------------------------------------------------------------------------------------

    def install(self) -> None:
        self._handles = [
            self.decoder.register_forward_pre_hook(self._open_call, with_kwargs=True),
            self.decoder.register_forward_hook(self._close_call),
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
        for name in _CACHE_ARGS:
            cache = kwargs.get(name)
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise ValueError(
                    f"A non-empty `{name}` (e.g. prefix tuning) cannot be used while a converted model trains "
                    "reversibly: the recomputing backward would update the cache a second time."
                )
        if any(callable(getattr(layer, "_get_fsdp_state", None)) for layer in self.layers):
            raise ValueError(
                "`make_reversible` does not support FSDP-sharded decoder layers (the whole stack runs inside one "
                "layer's call, while FSDP gathers each layer's weights around its own call). Use DDP."
            )
        self.current = _StackCall()

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
        elif hidden is not call.hidden:
            raise RuntimeError(
                "The hidden state changed between two converted decoder layers (a hook or a custom layer loop?): "
                "the reversible stack can only run layers that feed each other directly."
            )
        self._record(call, str(index), bound)
        call.calls += 1
        out = self._run_stack(call) if call.calls == len(self.layers) else hidden
        return (out,) if self.returns_tuple[index] else out

    def _record(self, call: _StackCall, key: str, bound: dict[str, Any]) -> None:
        for name in self.family.layer_only_args:
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

    def _run_stack(self, call: _StackCall) -> torch.Tensor:
        call.done = True
        hidden = call.hidden
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
    coupling: str | Coupling = "heavy_ball",
    gamma: float | None = None,
    reversible: bool = True,
    fixed_point_bits: int = 40,
) -> nn.Module:
    """Train a pretrained causal LM with a reversible decoder stack; returns the same `model` object.

    Supported: `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`, `GPT2LMHeadModel` (also inside a PEFT
    model). Nothing changes in eval mode, under `torch.no_grad()` or in `generate()`; `save_pretrained` writes an
    ordinary checkpoint of the original class. Calling it again on a converted model changes its options.

    Args:
        coupling: the training-time update of each residual sub-layer (`couplings_twostep.py`); all are the original
            model at inference.
            `"heavy_ball"` (default): `x_{k+1} = x_k + h_k(x_k) + g (x_{k-1} - x_k)` with `g = +-gamma` drawn per
            sample and sub-layer in training; `gamma` must be `2^-m` and costs `m` side bits per element per
            sub-layer (default 1/2: one bit).
            `"bdia"`: `x_{k+1} = g x_{k-1} + (1-g) x_k + (1+g) h_k(x_k)` (BDIA, ICML 2025), the same bits, about
            twice the training-time perturbation on pretrained weights (docs/pretrained.md).
            `"momentum"`: exact momentum (`v <- gamma v + (1-gamma) h(x)`, `x <- x + v`; default gamma 1/2), a
            deterministic change of the function, `log2(1/gamma)` bits in 52-bit limbs.
        gamma: the coupling's coefficient (see above).
        reversible: `False` runs the same coupling under ordinary autograd (the twin used to check gradients).
        fixed_point_bits: fractional bits of the int64 fixed-point streams that make reversal bit-exact. 40 keeps
            hidden values up to 2^20 (an OverflowError names the fix otherwise).
    """
    base = _unwrap(model)
    family = _family_of(base)
    conversion = getattr(base, "_reversible_conversion", None)
    if conversion is None:
        conversion = ReversibleConversion(base, family)
        conversion.configure(coupling, gamma, reversible, fixed_point_bits)
        conversion.install()
        base._reversible_conversion = conversion
    else:
        conversion.configure(coupling, gamma, reversible, fixed_point_bits)
    return model


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
    "SUPPORTED_MODEL_CLASSES",
    "SUPPORTED_CONVERSION_COUPLINGS",
]
