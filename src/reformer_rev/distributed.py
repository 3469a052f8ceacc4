"""Distributed training support for reversible stacks: what FSDP2 needs to see the engine's recompute.

Only torch is imported here; DDP needs nothing beyond `find_unused_parameters=False` (docs/design.md §2).
"""

from __future__ import annotations

from typing import Any

import torch


def register_fsdp_reversible_methods(model: torch.nn.Module) -> int:
    """Route the reversible blocks' `f`/`g` through FSDP2's hooks, including the recompute in backward.

    The reversible engine calls `block.f` and `block.g`, never `block.forward`, so with `fully_shard` applied to each
    `RevFormerBlock` the parameters would stay sharded inside them; FSDP2's `register_fsdp_forward_method` fixes the
    forward. In backward the engine recomputes `g`, back-propagates, then recomputes `f` and back-propagates: two
    forward calls of one module inside one backward. FSDP2 treats a forward call made while the module is in its
    pre-backward state as an activation-checkpoint recompute and registers no post-backward hook, so `f`'s gradients
    would never be reduce-scattered (measured: they stay in the unsharded parameters and the step ignores them).
    Resetting the module's state to idle before each recompute call makes FSDP2 handle `f` and `g` as two ordinary
    forward/backward pairs whose sharded gradients accumulate. Returns the number of blocks patched.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    except ImportError:  # torch without FSDP2
        return 0

    def wrap(module: torch.nn.Module, name: str) -> None:
        orig_method = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            state = module._get_fsdp_state()
            if state._training_state == TrainingState.PRE_BACKWARD:
                state._training_state = TrainingState.IDLE
            args, kwargs = state._pre_forward(module, args, kwargs)
            out = orig_method(*args, **kwargs)
            return state._post_forward(module, args, out)

        setattr(module, name, wrapped)

    n = 0
    for module in model.modules():
        if isinstance(module, FSDPModule) and hasattr(module, "f") and hasattr(module, "g"):
            wrap(module, "f")
            wrap(module, "g")
            n += 1
    return n


__all__ = ["register_fsdp_reversible_methods"]
