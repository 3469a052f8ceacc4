"""What every model class does with its arguments before the stack runs: checks with clear errors, token embedding,
positions, rotary tables, attention masks, and the generation cache argument.

Bad input gets a `TypeError`/`ValueError` naming the argument and what is allowed, never an error from inside torch
and never silence (docs/reliability.md); harmless integer dtypes (uint8/int16/int32 ids and labels) are converted.
This module imports only torch and transformers (remote-code export).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    bidirectional_mask_function,
    causal_mask_function,
)
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
# The output field holding the cache: `cache` from transformers 5.24 on, `past_key_values` before. Outputs are built
# with the installed name (the old name would log a deprecation warning at every step).
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_tensor(value: Any, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, got {type(value).__name__}"
            + (" (wrap it with torch.tensor(...))." if isinstance(value, (list, tuple)) else ".")
        )


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_token_ids(input_ids: Any, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """`(batch, sequence)` ids in `[0, vocab_size)` as int64 (other integer dtypes are converted)."""
    _check_tensor(input_ids, name)
    if not _is_integer(input_ids):
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {input_ids.dtype}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
    if input_ids.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(input_ids.shape)}); pass at least one token.")
    input_ids = input_ids.long()
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"`{name}` contains token id {bad}, outside the vocabulary [0, {vocab_size}).")
    return input_ids


def check_labels(labels: Any, vocab_size: int, shape: tuple[int, ...] | None, name: str = "labels") -> torch.Tensor:
    """Target ids of `shape` (any `(batch, length)` when None) in `[0, vocab_size)` or `-100` (ignored), as int64."""
    _check_tensor(labels, name)
    if not _is_integer(labels):
        raise TypeError(f"`{name}` must be an integer tensor of token ids (or -100), got dtype {labels.dtype}.")
    if shape is None and labels.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, length), got {tuple(labels.shape)}.")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(labels.shape)}.")
    labels = labels.long()
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))]
    if bad.numel():
        raise ValueError(
            f"`{name}` contains {int(bad[0])}: targets must be token ids in [0, {vocab_size}) or {IGNORE_INDEX} "
            "(ignored)."
        )
    return labels


def check_class_labels(labels: Any, num_labels: int, batch: int, name: str = "labels") -> torch.Tensor:
    """Sequence-classification targets: `(batch,)` class ids in `[0, num_labels)`, or float targets for regression
    and multi-label classification (which `transformers`' loss tells apart by dtype and `config.problem_type`)."""
    _check_tensor(labels, name)
    if labels.dim() == 0 or labels.shape[0] != batch:
        raise ValueError(f"`{name}` must have one row per sequence (batch={batch}), got shape {tuple(labels.shape)}.")
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"`{name}` must hold class ids (integers) or float targets, got dtype {labels.dtype}.")
    if _is_integer(labels) and num_labels > 1:
        labels = labels.long()
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if bad.numel():
            raise ValueError(f"`{name}` contains class {int(bad[0])}, outside [0, num_labels={num_labels}).")
    return labels


def check_padding_mask(mask: Any, shape: tuple[int, int], name: str = "attention_mask") -> torch.Tensor | None:
    """A `(batch, length)` mask of 1 (attend) / 0 (padding), or None when it masks nothing.

    Any dtype is accepted as long as every value is exactly 0 or 1: a mask of 2, -1 or NaN is a bug upstream (an
    additive mask, or ids passed as the mask) that would otherwise silently change what attends to what.
    """
    if mask is None:
        return None
    _check_tensor(mask, name)
    if mask.is_complex():
        raise TypeError(f"`{name}` must be a real (bool, integer or float) tensor, got dtype {mask.dtype}.")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape (batch={shape[0]}, length={shape[1]}), got {tuple(mask.shape)}.")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise ValueError(f"`{name}` must contain only 0 (padding) and 1 (attend), found {bad!r}.")
        mask = mask != 0
    return None if bool(mask.all()) else mask


def embed_inputs(
    embed_tokens: nn.Embedding,
    input_ids: Any,
    inputs_embeds: Any,
    name: str = "input_ids",
    embeds_name: str = "inputs_embeds",
) -> torch.Tensor:
    """Exactly one of ids / embeddings; returns the embeddings `(batch, sequence, hidden)`."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"Pass exactly one of `{name}` or `{embeds_name}`.")
    if input_ids is not None:
        return embed_tokens(check_token_ids(input_ids, embed_tokens.num_embeddings, name))
    _check_tensor(inputs_embeds, embeds_name)
    hidden_size, dtype = embed_tokens.embedding_dim, embed_tokens.weight.dtype
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"`{embeds_name}` must be a floating-point tensor, got dtype {inputs_embeds.dtype}.")
    if inputs_embeds.dtype != dtype:
        raise TypeError(
            f"`{embeds_name}` has dtype {inputs_embeds.dtype} but the model's weights are {dtype}; "
            f"pass `{embeds_name}.to({dtype})` (or load the model in that dtype)."
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size or 0 in inputs_embeds.shape[:2]:
        raise ValueError(
            f"`{embeds_name}` must have shape (batch>0, sequence>0, hidden_size={hidden_size}), "
            f"got {tuple(inputs_embeds.shape)}."
        )
    return inputs_embeds


def check_generate_inputs(vocab_size: int, inputs: Any, kwargs: dict[str, Any]) -> Any:
    """Check what `generate()` is given before its own code touches it (it would fail with an AttributeError or
    IndexError on a list or a 1-D tensor). Returns `inputs` as int64 ids when they are ids; `kwargs` is updated."""
    name = "input_ids"
    if inputs is None and "input_ids" in kwargs:
        inputs = kwargs.pop("input_ids")
    if inputs is not None:
        inputs = check_token_ids(inputs, vocab_size, name)
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        _check_tensor(embeds, "inputs_embeds")
        if not embeds.is_floating_point() or embeds.dim() != 3:
            raise TypeError(
                f"`inputs_embeds` must be a floating-point tensor of shape (batch, sequence, hidden), got dtype "
                f"{embeds.dtype} and shape {tuple(embeds.shape)}."
            )
    reference = inputs if inputs is not None else embeds
    mask = kwargs.get("attention_mask")
    if mask is not None and reference is not None:
        kwargs["attention_mask"] = check_padding_mask(mask, tuple(reference.shape[:2]), "attention_mask")
        if kwargs["attention_mask"] is None:
            kwargs["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        else:
            kwargs["attention_mask"] = kwargs["attention_mask"].long()
    return inputs


# --------------------------------------------------------------------------------------------------------------
# Positions and attention masks
# --------------------------------------------------------------------------------------------------------------


def resolve_position_ids(
    position_ids: Any,
    padding_mask: torch.Tensor | None,
    past_length: int,
    batch: int,
    seq_len: int,
    device: torch.device,
    name: str = "position_ids",
) -> torch.Tensor:
    """Rotary positions of the new tokens, counted from each sequence's first real token (left padding aware)."""
    if position_ids is None:
        if padding_mask is not None:
            return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
        return torch.arange(past_length, past_length + seq_len, device=device)[None].expand(batch, -1)
    _check_tensor(position_ids, name)
    if not _is_integer(position_ids):
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {position_ids.dtype}.")
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seq_len or position_ids.dim() == 2 and (
        position_ids.shape[0] not in (1, batch)
    ):
        raise ValueError(
            f"`{name}` must have shape (batch={batch} or 1, sequence={seq_len}), got {tuple(position_ids.shape)}."
        )
    return position_ids


def rotary_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `(batch, seq, head_dim)` for rotary embeddings, computed in float32 from the positions.

    Adapted from `transformers.models.llama.modeling_llama.LlamaRotaryEmbedding` (default rope), computed on the fly
    instead of from a buffer: nothing to re-initialise after meta-device loading, and no length limit.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _boolean_mask(
    padding_mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool, materialize: bool, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """`(mask, is_causal)` with a boolean `(batch or 1, 1, q, kv)` mask (True = attend), or no mask at all.

    Without padding, causal self-attention uses `is_causal=True` (about 2x faster on CPU than a boolean mask, and no
    T^2 buffer, docs/design.md §7); a single new query with a cache needs no mask at all. Otherwise a mask is built;
    query rows that would see no key at all (left padding) are un-masked, since SDPA may return NaN for them and the
    NaN would leak into real positions through the gradient. Those rows are padding and ignored by the loss.
    """
    if padding_mask is None and not materialize:
        if not causal or q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
    if padding_mask is None and not causal:
        return None, False
    allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(kv_len - q_len)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :].to(device)
    return allowed | ~allowed.any(dim=-1, keepdim=True), False


def attention_mask_for(
    implementation: str,
    padding_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Any, bool]:
    """The mask argument of the attention function for `implementation`, and its `is_causal` flag.

    `sdpa` and `eager` get this module's masks (causal fast path, no NaN rows; `eager` an additive float mask like
    Llama's). Any other implementation with a mask builder in transformers' `ALL_MASK_ATTENTION_FUNCTIONS` (flash:
    the 2D padding mask; flex: a `BlockMask`) gets that builder's mask.
    """
    builder = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) if implementation not in ("sdpa", "eager") else None
    if builder is None:
        eager = implementation == "eager"
        mask, is_causal = _boolean_mask(padding_mask, q_len, kv_len, causal, materialize=eager, device=device)
        if eager and mask is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask, is_causal
    mask = builder(
        batch_size=batch,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=kv_len - q_len,
        kv_offset=0,
        mask_function=causal_mask_function if causal else bidirectional_mask_function,
        attention_mask=padding_mask,
        allow_is_causal_skip=True,
        dtype=dtype,
        device=device,
    )
    return mask, causal


def prepare_stack_inputs(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: Any,
    position_ids: Any = None,
    past_length: int = 0,
    causal: bool = True,
    mask_name: str = "attention_mask",
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The arguments every block of a stack reads (rotary tables, the self-attention mask), from the embeddings,
    the 2D padding mask and the positions, after checking them. Also returns the checked padding mask.

    Shared by the causal LM, the encoder and the decoder: the only input preparation of the package.
    """
    batch, seq_len = inputs_embeds.shape[:2]
    total = past_length + seq_len
    if total > config.max_position_embeddings:
        raise ValueError(
            f"Sequence length {total} (cached {past_length} + new {seq_len}) exceeds "
            f"`max_position_embeddings`={config.max_position_embeddings}."
        )
    padding_mask = check_padding_mask(attention_mask, (batch, total), mask_name)
    position_ids = resolve_position_ids(position_ids, padding_mask, past_length, batch, seq_len, inputs_embeds.device)
    mask, is_causal = attention_mask_for(
        config._attn_implementation, padding_mask, batch, seq_len, total, causal, inputs_embeds.dtype,
        inputs_embeds.device,
    )
    static = {
        "position_embeddings": rotary_tables(position_ids, config.head_dim, config.rope_theta, torch.float32),
        "attention_mask": mask,
        "is_causal": is_causal,
    }
    return static, padding_mask


def resolve_output_flags(config: Any, output_attentions: bool | None, output_hidden_states: bool | None) -> tuple[bool, bool]:
    """`output_attentions` / `output_hidden_states`, defaulting to the config. Attention maps exist only on the eager
    path (the fused kernels never form them): asking for them with another implementation is an error, not `None`."""
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    if output_attentions and config._attn_implementation != "eager":
        raise ValueError(
            f"`output_attentions=True` needs the eager attention, but this model uses "
            f"{config._attn_implementation!r}: call `model.set_attn_implementation('eager')` or load it with "
            "`from_pretrained(..., attn_implementation='eager')`."
        )
    return bool(output_attentions), bool(output_hidden_states)


def wants_logits(model: nn.Module, return_logits: bool | None) -> bool:
    """Whether a model given `labels` also returns logits: by default in eval mode only (Trainer metrics, lm_eval);
    in training the chunked loss skips the `(sequence x vocab)` logits, like Liger's fused loss."""
    return (not model.training) if return_logits is None else bool(return_logits)


# --------------------------------------------------------------------------------------------------------------
# The generation cache
# --------------------------------------------------------------------------------------------------------------


def resolve_use_cache(config: Any, use_cache: bool | None) -> bool:
    """`use_cache` (default from the config), switched off when a reversible or DEQ model computes gradients."""
    explicit = use_cache
    use_cache = use_cache if use_cache is not None else config.use_cache
    if use_cache and torch.is_grad_enabled():
        if config.reversible:
            # The recomputing backward re-runs attention, which would append to the cache a second time.
            if explicit:
                logger.warning_once("`use_cache=True` needs `torch.no_grad()` with a reversible model; ignoring it.")
            use_cache = False
        elif config.depth_mode == "deq":
            use_cache = False  # the solver applies the group many times; a cache only serves generation
    return bool(use_cache)


def pop_cache_argument(past_key_values: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The generation cache, whichever name the caller used.

    transformers >= 5.24 passes it to `forward` as `cache=` (older releases as `past_key_values=`); reading only one
    name silently drops the cache and every decoding step then sees a single token without its history.
    """
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the generation cache once, as `cache=` or `past_key_values=`, not both.")
    cache = past_key_values if past_key_values is not None else cache
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(
            f"The generation cache must be a transformers `Cache` (e.g. DynamicCache), got {type(cache).__name__}."
        )
    return cache


def output_cache(output: Any) -> Cache | None:
    """The cache held by a model output (field `cache` from transformers 5.24 on, `past_key_values` before)."""
    # Plain dict access: the 5.24 BC alias `output.past_key_values` logs a deprecation warning on every call.
    return OrderedDict.get(output, "cache", OrderedDict.get(output, "past_key_values"))
