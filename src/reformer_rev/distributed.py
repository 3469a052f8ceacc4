"""Distributed training of reversible models: what DDP, DeepSpeed ZeRO and FSDP2 need from the recomputing backward.

**DDP** needs nothing from this module. The engine delivers each parameter's gradient once per backward
(`reversible.py`), which is what DDP's default mode expects; only `find_unused_parameters=True` must be avoided (the
`Trainer`'s default for a `PreTrainedModel`), because the parameters are not on the forward graph that DDP searches.
See `docs/distributed.md` for the settings of Accelerate, `Trainer` and DeepSpeed.

**DeepSpeed ZeRO-1/2** need nothing either. **ZeRO-3** partitions every parameter to an empty tensor outside the
forward/backward hooks of the sub-module that owns it; the engine's recompute runs inside those hooks, but it hands
each parameter its gradient after the block's recompute, when ZeRO-3 has partitioned it again:
`register_deepspeed_zero3_scopes` gathers a block's parameters for that moment.

**FSDP2** (`torch.distributed.fsdp.fully_shard`) all-gathers a module's parameters in the pre-forward hook of its
`forward`, but the engine calls each block's `f` and `g`, never `forward`, in the forward pass and again in the
recompute. `shard_reversible_model` shards every reversible block and the root and routes `f`/`g` through FSDP's
hooks; `register_fsdp_reversible_methods` does only the routing, for models that Accelerate (or a user) already
sharded. The routing needs one private piece of FSDP2 (its per-module training state): there is no version pin, but
`check_fsdp2_support` verifies that piece is there and raises if a torch release changed it, and
`tests/test_distributed.py` checks on every torch CI runs (the local release and the newest one, `make
test-newest-torch`) that the private step is still needed and still gives one-process gradients.

Models converted by `make_reversible` need no call: their decoder layers are the FSDP2 units (Accelerate shards the
model's `_no_split_modules`), and the conversion routes each layer's branches through them at its first training
forward (`register_fsdp_converted_layers`), or gives them their ZeRO-3 release scopes.

Only torch is imported at module level (DeepSpeed lazily, by the function that needs it).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

# `fully_shard`, `FSDPModule` and `register_fsdp_forward_method` are public in `torch.distributed.fsdp` from 2.6.
FSDP2_MIN_TORCH = (2, 6)

_PATCHED = "_reformer_rev_fsdp_routed"


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_fsdp2_support(allow_untested_torch: bool | None = None) -> None:
    """Raise a clear `RuntimeError` where the FSDP2 routing of the recompute cannot work on the installed torch.

    Below `FSDP2_MIN_TORCH` FSDP2 is not public. From there on no release is refused by its number: what is checked is
    the private piece of FSDP2 that the routing resets (`_leave_pre_backward`), i.e. the `TrainingState` enum with its
    `IDLE` and `PRE_BACKWARD` members and `FSDPModule._get_fsdp_state()` whose state keeps `_training_state`. A release
    that renames or removes them raises here, before any training, instead of training with wrong gradients. Verified
    on torch 2.13 and 2.15 by the parity tests (`tests/test_distributed.py`), which CI runs on the newest release too.

    `allow_untested_torch` is accepted for compatibility and ignored (there is no version pin to lift any more).
    """
    if allow_untested_torch is not None:
        warnings.warn(
            "`allow_untested_torch` is deprecated and has no effect: FSDP2 support no longer pins torch releases "
            "(the private FSDP2 state it relies on is checked instead).",
            FutureWarning,
            stacklevel=3,
        )
    if _torch_version() < FSDP2_MIN_TORCH:
        raise RuntimeError(
            f"FSDP2 support for reversible models needs torch>={'.'.join(map(str, FSDP2_MIN_TORCH))} "
            f"(`torch.distributed.fsdp.fully_shard`); torch {torch.__version__} is installed. Use DDP, or upgrade torch."
        )
    changed = f"FSDP2's private per-module training state changed in torch {torch.__version__}"
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    except ImportError as err:
        raise RuntimeError(
            f"{changed} (no `torch.distributed.fsdp._fully_shard._fsdp_common.TrainingState`): the recompute of the "
            "reversible blocks cannot be routed through FSDP2. Use DDP or DeepSpeed, or a torch release that the "
            "reformer_rev release you use was tested with, and report it."
        ) from err
    missing = [name for name in ("IDLE", "PRE_BACKWARD") if not hasattr(TrainingState, name)]
    if missing or not callable(getattr(FSDPModule, "_get_fsdp_state", None)):
        what = f"`TrainingState` has no {', '.join(missing)}" if missing else "`FSDPModule` has no `_get_fsdp_state`"
        raise RuntimeError(
            f"{changed} ({what}): the recompute of the reversible blocks cannot be routed through FSDP2. Use DDP or "
            "DeepSpeed, or a torch release that the reformer_rev release you use was tested with, and report it."
        )


def is_reversible_block(module: nn.Module) -> bool:
    """A block the reversible engine runs: it has the two residual functions `f`, `g` and a `g_chunk_size`."""
    return callable(getattr(module, "f", None)) and callable(getattr(module, "g", None)) and hasattr(module, "g_chunk_size")


def reversible_blocks(model: nn.Module) -> list[nn.Module]:
    """The distinct reversible blocks of `model` (a weight-tied block applied several times is listed once)."""
    return [m for m in model.modules() if is_reversible_block(m)]


def _leave_pre_backward(module: nn.Module) -> None:
    """Make FSDP2 treat the next call of `f`/`g` as an ordinary forward, even in the middle of a backward.

    In backward the engine recomputes `g`, back-propagates through it, then recomputes `f` and back-propagates: two
    forward calls of one module inside one backward. After the first, FSDP2 has put the module in its PRE_BACKWARD
    state, in which it takes a forward call for an activation-checkpoint recompute and registers no post-backward
    hook, so `f`'s gradients would never be reduce-scattered (measured: they stay in the unsharded parameters and
    the optimizer step ignores them). Back in IDLE, each recompute call gets its own pre-forward (all-gather if
    resharded) and post-backward (reduce-scatter), and the sharded gradients accumulate. No public API sets this.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    state = module._get_fsdp_state()
    training_state = getattr(state, "_training_state", None)
    if not isinstance(training_state, TrainingState):
        raise RuntimeError(
            f"FSDP2's private per-module training state changed in torch {torch.__version__} (the FSDP state of "
            f"{type(module).__name__} has no `_training_state`): the recompute cannot be routed through FSDP2."
        )
    if training_state == TrainingState.PRE_BACKWARD:
        state._training_state = TrainingState.IDLE


def _route_through_fsdp(owner: nn.Module, name: str, fn: Any) -> Any:
    """`fn`, which uses the parameters of the FSDP2 module `owner`, as a forward method of `owner` that the engine can
    call again in backward: FSDP's pre-forward (all-gather, post-backward hook on the inputs) and post-forward (reshard,
    pre-backward hook on the output) run around every call, after `_leave_pre_backward`. `name` is the attribute the
    public `register_fsdp_forward_method` patches on `owner`; the returned callable is what the engine calls."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(owner, name, fn)
    register_fsdp_forward_method(owner, name)
    through_fsdp = getattr(owner, name)

    def routed(*args: Any, **kwargs: Any) -> Any:
        _leave_pre_backward(owner)
        return through_fsdp(*args, **kwargs)

    return routed


def _converted_layer_blocks(model: nn.Module) -> list[Any]:
    """The engine blocks of a model converted by `make_reversible` (also inside a PEFT wrapper), [] otherwise."""
    for module in (model, getattr(model, "module", None)):  # `module`: a DDP-style wrapper
        get_base = getattr(module, "get_base_model", None)
        base = get_base() if callable(get_base) and type(module).__module__.startswith("peft.") else module
        conversion = getattr(base, "_reversible_conversion", None)
        if conversion is not None:
            return list(conversion.blocks)
    return []


def register_fsdp_converted_layers(blocks: list[Any]) -> int:
    """Route the branches of converted decoder layers (`make_reversible`) through FSDP2, like the native blocks' f/g.

    Each engine block of a converted model wraps one decoder layer (two for paired parallel layers: `block.layers`),
    each the FSDP2 unit (Accelerate shards `_no_split_modules`, e.g. `LlamaDecoderLayer`). The block's `f` (pre-norm attention) and `g` (pre-norm MLP)
    become forward methods of that layer (`_reversible_f`/`_reversible_g`), so every call -- forward and recompute --
    all-gathers the layer's parameters, reshards after and reduce-scatters the gradients of that call. The block then
    also answers FSDP's own `_get_fsdp_state`, which tells the engine to accumulate in place (FSDP2 owns the unsharded
    gradients). `make_reversible` calls this itself at the first training forward after sharding; idempotent. Returns
    the number of blocks whose layer is sharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return 0
    layers = [layer for b in blocks for layer in b.layers]  # a block holds one decoder layer, or two parallel ones
    sharded = [layer for layer in layers if isinstance(layer, FSDPModule)]
    if not sharded:
        return 0
    if len(sharded) != len(layers):
        raise ValueError(
            f"FSDP2 shards {len(sharded)} of the {len(layers)} converted decoder layers: a reversible stack needs every "
            "decoder layer to be its own FSDP2 unit (Accelerate: `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` "
            "with the model's decoder layer class, its default) or none."
        )
    check_fsdp2_support()
    for name in sorted({type(layer).__name__ for layer in sharded}):
        # A layer's own call only records its arguments and returns its input, which FSDP2's pre-forward has replaced
        # by an alias (the output of its post-backward Function): FSDP2 warns about returned views because an in-place
        # op on one would drop its pre-backward hook. The stack reads that tensor and never modifies it in place.
        warnings.filterwarnings(
            "ignore", message=rf"FSDP2-wrapped module \({re.escape(name)}\) returned a view tensor", category=UserWarning
        )
    for block in blocks:
        if getattr(block, _PATCHED, False):
            continue
        # Each branch runs as a forward method of the layer that owns it (paired parallel layers: f of layer 2k, g of
        # layer 2k + 1); a missing g (an odd last parallel layer) has no parameters to gather.
        for name, step in (("f", block.f_step), ("g", block.g_step)):
            if step is not None:
                setattr(block, name, _route_through_fsdp(step.layer, f"_reversible_{name}", getattr(block, name)))
        block._get_fsdp_state = block.f_step.layer._get_fsdp_state
        setattr(block, _PATCHED, True)
    return len(blocks)


def register_fsdp_reversible_methods(model: nn.Module, allow_untested_torch: bool | None = None) -> int:
    """Route `f`/`g` of every FSDP2-sharded reversible block of `model` through FSDP2's hooks, recompute included.

    For a model that is already sharded (by Accelerate's FSDP2 plugin with `fsdp_transformer_layer_cls_to_wrap` set
    to the block class, or by your own `fully_shard` calls); `shard_reversible_model` shards and routes in one call.
    Uses the public `register_fsdp_forward_method` and, before each call, `_leave_pre_backward`. Idempotent. Returns
    the number of blocks routed (0 if none is sharded, e.g. under DDP, or without FSDP2 in this torch).

    A model converted by `make_reversible` has its decoder layers routed instead (`register_fsdp_converted_layers`;
    the conversion also does it by itself at its first training forward).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without public FSDP2: nothing can be sharded by it
        return 0
    converted = _converted_layer_blocks(model)
    if converted:
        if allow_untested_torch is not None:
            check_fsdp2_support(allow_untested_torch)
        return register_fsdp_converted_layers(converted)
    blocks = [b for b in reversible_blocks(model) if isinstance(b, FSDPModule)]
    if not blocks:
        return 0
    check_fsdp2_support(allow_untested_torch)
    for block in blocks:
        if getattr(block, _PATCHED, False):
            continue
        for name in ("f", "g"):
            setattr(block, name, _route_through_fsdp(block, name, getattr(block, name)))
        setattr(block, _PATCHED, True)
    return len(blocks)


def shard_reversible_model(
    model: nn.Module, mesh: Any = None, *, allow_untested_torch: bool | None = None, **fully_shard_kwargs: Any
) -> nn.Module:
    """Shard a reversible model with FSDP2: `fully_shard` on every reversible block, then on the root.

    One shard unit per block bounds the unsharded parameters to one block at a time in the forward and in the
    recompute; the root unit holds the rest (embeddings, final norm, head). `f`/`g` are routed through FSDP's hooks
    (`register_fsdp_reversible_methods`). Call it after moving the model to its device and before building the
    optimizer (FSDP2 replaces the parameters by sharded DTensors), in every process. Works in users' own loops and
    under `Trainer`/Accelerate when their own FSDP plugin is not used (see `docs/distributed.md`).

    Args:
        model: a model whose reversible blocks expose `f`, `g` and `g_chunk_size` (every RevFormer model).
        mesh: the `DeviceMesh` to shard over (default: all processes of the default group).
        allow_untested_torch: deprecated, ignored (FSDP2 support no longer pins torch releases).
        **fully_shard_kwargs: passed to every `fully_shard` call (`reshard_after_forward`, `mp_policy`,
            `offload_policy`, ...).

    Returns `model`, now an `FSDPModule`.
    """
    check_fsdp2_support(allow_untested_torch)
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    blocks = reversible_blocks(model)
    if not blocks:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no reversible blocks (modules with `f`, `g` and `g_chunk_size`) to "
            "shard: use `fully_shard` directly for other models."
        )
    if model in blocks:
        raise ValueError("`model` is itself a reversible block: pass the model that contains the blocks.")
    for block in blocks:
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    register_fsdp_reversible_methods(model)
    return model


def register_deepspeed_zero3_scopes(model: nn.Module) -> int:
    """Let every reversible block of `model` receive its parameters' gradients under DeepSpeed ZeRO-3.

    The engine delivers each parameter's summed gradient once, after the block's recompute (`reversible.py`); by then
    ZeRO-3's module hooks have partitioned the parameter again and `torch.autograd.backward` refuses a full-size
    gradient for a 0-element tensor ("Mismatch in shape"). This sets each block's `gradient_release_scope` to
    `deepspeed.zero.GatheredParameters(block parameters)`: the parameters are gathered for the delivery, ZeRO-3's
    gradient hooks reduce-scatter the gradients as usual, and the parameters are partitioned again on exit. Cost: one
    extra all-gather of each block's parameters per backward. A no-op for parameters that ZeRO-3 does not manage
    (ZeRO-1/2, DDP, one process), so it can be called unconditionally, before or after `accelerator.prepare`.
    Returns the number of blocks prepared.
    """
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("`register_deepspeed_zero3_scopes` needs DeepSpeed (`pip install deepspeed`).") from err
    # A model converted by `make_reversible`: its engine blocks wrap the decoder layers (`block.parameters()` are the
    # layer's), the same delivery after the recompute.
    blocks = _converted_layer_blocks(model) or reversible_blocks(model)
    for block in blocks:
        block.gradient_release_scope = lambda _block=block: deepspeed.zero.GatheredParameters(list(_block.parameters()))
    return len(blocks)


__all__ = [
    "FSDP2_MIN_TORCH",
    "check_fsdp2_support",
    "is_reversible_block",
    "reversible_blocks",
    "register_deepspeed_zero3_scopes",
    "register_fsdp_converted_layers",
    "register_fsdp_reversible_methods",
    "shard_reversible_model",
]
