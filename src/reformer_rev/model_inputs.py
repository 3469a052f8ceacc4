"""What every model class does with its arguments before the stack runs: checks with clear errors, token embedding,
positions, rotary tables, attention masks, and the generation cache argument.

Bad input gets a `TypeError`/`ValueError` naming the argument and what is allowed, never an error from inside torch
and never silence (docs/reliability.md); harmless integer dtypes (uint8/int16/int32 ids and labels) are converted.
This module imports only torch and transformers (remote-code export).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    flash_attention_mask,
)
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPast
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


def checking_values() -> bool:
    """Whether checks that read tensor values run: in eager mode, not while `torch.compile` traces the model.

    Such a check (an out-of-range id, a mask of 2, a NaN embedding) needs the values on the host: under `torch.compile`
    it would split the graph at every call (a graph break per check) or fail with `fullgraph=True`. Compiled code gets
    the shape and dtype checks only, as transformers' models skip their data-dependent checks while compiling
    (docs/training.md, "torch.compile").
    """
    return not torch.compiler.is_compiling()


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
    if not checking_values():
        return input_ids
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"`{name}` contains token id {bad}, outside the vocabulary [0, {vocab_size}).")
    return input_ids


def check_labels(
    labels: Any, vocab_size: int, shape: tuple[int, ...] | None, name: str = "labels", kind: str = "token ids"
) -> torch.Tensor:
    """Target ids of `shape` (any `(batch, length)` when None) in `[0, vocab_size)` or `-100` (ignored), as int64.
    `kind` names what the ids are in errors (token ids, class ids)."""
    _check_tensor(labels, name)
    if not _is_integer(labels):
        raise TypeError(f"`{name}` must be an integer tensor of {kind} (or -100), got dtype {labels.dtype}.")
    if shape is None and labels.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, length), got {tuple(labels.shape)}.")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(labels.shape)}.")
    labels = labels.long()
    if not checking_values():
        return labels
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))]
    if bad.numel():
        raise ValueError(
            f"`{name}` contains {int(bad[0])}: targets must be {kind} in [0, {vocab_size}) or {IGNORE_INDEX} "
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


def check_span_positions(positions: Any, batch: int, name: str) -> torch.Tensor:
    """Question-answering span ends: `(batch,)` integer token indices (int64). Indices outside the sequence are left
    to transformers' loss, which ignores them (an answer cut off by truncation)."""
    _check_tensor(positions, name)
    if not _is_integer(positions):
        raise TypeError(f"`{name}` must be an integer tensor of token indices, got dtype {positions.dtype}.")
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    if positions.dim() != 1 or positions.shape[0] != batch:
        raise ValueError(f"`{name}` must have shape (batch={batch},), got {tuple(positions.shape)}.")
    return positions.long()


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
    if not checking_values():  # compiled: the mask is used as given (a mask of ones costs speed, not correctness)
        return mask != 0
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise ValueError(f"`{name}` must contain only 0 (padding) and 1 (attend), found {bad!r}.")
        mask = mask != 0
    return None if bool(mask.all()) else mask


def as_encoder_output(encoder_outputs: Any) -> BaseModelOutput:
    """The `encoder_outputs` a caller passed (generate() passes the encoder's own output), as a `BaseModelOutput`."""
    if isinstance(encoder_outputs, BaseModelOutput):
        return encoder_outputs
    if not isinstance(encoder_outputs, (tuple, list)) or not encoder_outputs:
        raise TypeError(
            "`encoder_outputs` must be the encoder's output (a BaseModelOutput, or a tuple whose first element is the "
            f"encoder's last hidden state), got {type(encoder_outputs).__name__}."
        )
    hidden_states = encoder_outputs[1] if len(encoder_outputs) > 1 else None
    return BaseModelOutput(last_hidden_state=encoder_outputs[0], hidden_states=hidden_states)


def check_encoder_hidden_states(encoder_hidden_states: Any, batch: int, hidden_size: int) -> None:
    """The encoder output a decoder attends to: `(batch, source length, hidden_size)`, one row per decoder row."""
    if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3 or (
        encoder_hidden_states.shape[-1] != hidden_size
    ):
        shape = tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, torch.Tensor) else None
        raise ValueError(
            f"`encoder_hidden_states` (the encoder output) must be a tensor of shape (batch, source length, "
            f"hidden_size={hidden_size}), got {shape or type(encoder_hidden_states).__name__}."
        )
    if encoder_hidden_states.shape[0] != batch:
        raise ValueError(
            f"The decoder inputs (`decoder_input_ids`/`decoder_inputs_embeds`, or `labels` shifted into them) have "
            f"batch {batch} but the encoder inputs (`input_ids`/`inputs_embeds`/`encoder_outputs`) have batch "
            f"{encoder_hidden_states.shape[0]}."
        )


def embed_inputs(
    embed_tokens: nn.Embedding,
    input_ids: Any,
    inputs_embeds: Any,
    name: str = "input_ids",
    embeds_name: str = "inputs_embeds",
    training: bool = False,
) -> torch.Tensor:
    """Exactly one of ids / embeddings; returns the embeddings `(batch, sequence, hidden)`.

    `training`: the model is in training mode, where non-finite embeddings are an error (`check_finite`)."""
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
    check_finite(inputs_embeds, embeds_name, training)
    return inputs_embeds


def check_finite(tensor: torch.Tensor, name: str, training: bool) -> None:
    """In training mode, NaN/inf in a floating-point input (`inputs_embeds`, `encoder_outputs`) is an error naming the
    argument: one such step would turn every weight NaN through the optimizer, like the non-finite loss the training
    scripts stop at. In eval mode the values pass through unchecked, as in transformers' models (a NaN input gives NaN
    outputs for the rows it reaches; docs/reliability.md), so inference pays no device sync for the check."""
    if training and checking_values() and not bool(torch.isfinite(tensor).all()):
        bad = tensor[~torch.isfinite(tensor)].flatten()[0].item()
        raise ValueError(
            f"`{name}` contains non-finite values (e.g. {bad}) in training mode; a step on them would make every "
            "weight non-finite. Check what produced it (an overflow under fp16, a NaN in the data)."
        )


def _int_at_least(low: int) -> tuple[Any, str]:
    return (lambda v, _: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _token_ids(v: Any, vocab: int) -> bool:
    ids = v.tolist() if isinstance(v, torch.Tensor) else v
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return bool(ids) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TOKEN_ID = (_token_ids, "a token id (or list of ids) in [0, {vocab})")
_POSITIVE = ((lambda v, _: _real(v) and v > 0), "a positive number")
# The generation arguments most often mistyped, checked before `generate()` reaches its own code (which would fail
# with a ZeroDivisionError for num_beams=0, or quietly misbehave for an out-of-vocabulary pad/eos id).
GENERATE_RULES: dict[str, tuple[Any, str]] = {
    "max_new_tokens": _int_at_least(1),
    "min_new_tokens": _int_at_least(0),
    "max_length": _int_at_least(1),
    "min_length": _int_at_least(0),
    "num_beams": _int_at_least(1),
    "num_beam_groups": _int_at_least(1),
    "num_return_sequences": _int_at_least(1),
    "top_k": _int_at_least(0),
    "no_repeat_ngram_size": _int_at_least(0),
    "top_p": ((lambda v, _: _real(v) and 0 < v <= 1), "a number in (0, 1]"),
    "temperature": _POSITIVE,
    "repetition_penalty": _POSITIVE,
    "pad_token_id": _TOKEN_ID,
    "eos_token_id": _TOKEN_ID,
    "bos_token_id": _TOKEN_ID,
    "decoder_start_token_id": _TOKEN_ID,
}

GENERATE_TYPES: dict[str, tuple[type, ...]] = {
    "generation_config": (GenerationConfig,),
    "logits_processor": (list,),  # LogitsProcessorList
    "stopping_criteria": (list,),  # StoppingCriteriaList
    "assistant_model": (nn.Module,),
}


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
    for arg, kinds in GENERATE_TYPES.items():
        if kwargs.get(arg) is not None and not isinstance(kwargs[arg], kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise TypeError(f"`{arg}` must be a {names}, got {type(kwargs[arg]).__name__}.")
    for arg, (ok, allowed) in GENERATE_RULES.items():
        if arg in kwargs and kwargs[arg] is not None and not ok(kwargs[arg], vocab_size):
            raise ValueError(f"`{arg}` must be {allowed.format(vocab=vocab_size)}, got {kwargs[arg]!r}.")
    reference = inputs if inputs is not None else embeds
    mask = kwargs.get("attention_mask")
    if mask is not None and reference is not None:
        kwargs["attention_mask"] = check_padding_mask(mask, tuple(reference.shape[:2]), "attention_mask")
        if kwargs["attention_mask"] is None:
            kwargs["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        else:
            kwargs["attention_mask"] = kwargs["attention_mask"].long()
    return inputs


# Keyword arguments that clients pass and a model may ignore: Trainer's target count (read by the loss), the cache
# position of transformers < 5.23's generate() (positions come from the cache length here), and all-zero token type
# ids from generic tokenizers (this model has no segment embedding).
IGNORED_KWARGS = ("num_items_in_batch", "cache_position", "token_type_ids")


def check_unused_kwargs(kwargs: dict[str, Any], owner: str) -> None:
    """Refuse keyword arguments the model would otherwise drop without a word (a typo like `attention_masks=`)."""
    unknown = sorted(set(kwargs) - set(IGNORED_KWARGS))
    if unknown:
        raise TypeError(f"{owner}.forward() got unexpected keyword argument(s) {unknown}.")
    token_types = kwargs.get("token_type_ids")
    if isinstance(token_types, torch.Tensor) and bool(token_types.any()):
        raise ValueError("`token_type_ids` must be all zeros: this model has no segment embedding.")


def keep_positions(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """The positions whose logits are computed: the last `logits_to_keep` (0 = all) or the given 1-D indices."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1 and _is_integer(logits_to_keep):
        return hidden[:, logits_to_keep]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(
            "`logits_to_keep` must be a non-negative integer (0 = every position) or a 1-D tensor of position "
            f"indices, got {logits_to_keep!r}."
        )
    return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden


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
    max_positions: int,
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
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"`{name}` must have shape (batch={batch} or 1, sequence={seq_len}), got {tuple(position_ids.shape)}."
        )
    if checking_values() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= max_positions):
        raise ValueError(
            f"`{name}` must lie in [0, max_position_embeddings={max_positions}), got values in "
            f"[{int(position_ids.min())}, {int(position_ids.max())}]."
        )
    return position_ids.long()


def rotary_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `(batch, seq, head_dim)` for rotary embeddings, computed in float32 from the positions.

    Adapted from `transformers.models.llama.modeling_llama.LlamaRotaryEmbedding` (default rope), computed on the fly
    instead of from a buffer: nothing to re-initialise after meta-device loading, and no length limit.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Packed (padding-free) batches
# --------------------------------------------------------------------------------------------------------------

# What padding-free collators pass besides `position_ids` (TRL's `padding_free`/`packing`, transformers'
# `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`): the flash-attention "varlen" arguments. They describe
# the batch flattened to one stream of tokens: `cu_seq_lens_*` are the document boundaries in it, `max_length_*` the
# longest document, `seq_idx` the document of each token.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def pop_varlen_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the varlen arguments from a `forward`'s `**kwargs` (those that are not None)."""
    varlen = {name: kwargs.pop(name) for name in VARLEN_KWARGS if name in kwargs}
    return {name: value for name, value in varlen.items() if value is not None}


def _restarts_from_positions(position_ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """`(batch, length)` True where a new document starts (never at column 0): a real token whose position is not one
    more than the position of the previous real token of its row.

    Without padding this is transformers' rule (`masking_utils.find_packed_sequence_indices`). With padding, pads are
    skipped, so a row whose positions were counted over its real tokens only (left padding, holes) stays one document.
    """
    batch, length = position_ids.shape
    if real is None:
        previous = position_ids[:, :-1]
        restart = position_ids[:, 1:] != previous + 1
        return torch.cat([restart.new_zeros(batch, 1), restart], dim=1)
    columns = torch.arange(length, device=position_ids.device).expand(batch, -1)
    last_real = torch.where(real, columns, -1).cummax(dim=-1).values
    before = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=1)  # last real token before t
    previous = position_ids.gather(-1, before.clamp(min=0))
    return real & (before >= 0) & (position_ids != previous + 1)


def document_starts(position_ids: Any, batch: int, length: int, max_positions: int, name: str) -> torch.Tensor:
    """`(batch, length)` True where `position_ids` restart (a packed document starts; never at column 0)."""
    position_ids = resolve_position_ids(position_ids, None, 0, batch, length, torch.device("cpu"), max_positions, name)
    return _restarts_from_positions(position_ids.expand(batch, -1), None)


def _restarts_from_boundaries(cu_seq_lens: Any, name: str, batch: int, length: int) -> torch.Tensor:
    """Document starts from flash-attention boundaries over the flattened batch, checked against the batch shape."""
    _check_tensor(cu_seq_lens, name)
    total = batch * length
    if not _is_integer(cu_seq_lens) or cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2:
        raise ValueError(
            f"`{name}` must be a 1-D integer tensor of document boundaries [0, ..., {total}] over the flattened batch, "
            f"got dtype {cu_seq_lens.dtype} and shape {tuple(cu_seq_lens.shape)}."
        )
    bounds = cu_seq_lens.to(torch.long)
    if int(bounds[0]) != 0 or int(bounds[-1]) != total or bool((bounds[1:] <= bounds[:-1]).any()):
        raise ValueError(
            f"`{name}` must increase strictly from 0 to batch x length = {total} (the flattened batch), got "
            f"{bounds.tolist()[:8]}{' ...' if bounds.numel() > 8 else ''}."
        )
    starts = torch.zeros(total, dtype=torch.bool, device=bounds.device)
    starts[bounds[:-1]] = True
    starts = starts.view(batch, length)
    if not bool(starts[:, 0].all()):
        raise ValueError(f"`{name}` puts a document across two rows of the batch: every row must start a document.")
    starts[:, 0] = False
    return starts


def find_documents(
    position_ids: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    varlen: dict[str, Any],
    batch: int,
    length: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The document of every token of a packed batch, `(batch, length)` ids counted from 0 in each row, or None when
    no row holds more than one document; and the positions (counted from each document's start when only the
    boundaries were given).

    A packed row is told by `position_ids` that restart (what `DataCollatorWithFlattening` and TRL pass) or by the
    flash-attention boundaries `cu_seq_lens_q/k`; when both are given they must agree, as must `seq_idx` and
    `max_length_q/k`. Attention never crosses documents, so each document gives what it gives alone.
    """
    real = padding_mask
    restarts = None if position_ids is None else _restarts_from_positions(position_ids.expand(batch, -1), real)
    cu = {name: varlen[name] for name in ("cu_seq_lens_q", "cu_seq_lens_k") if name in varlen}
    for name, bounds in cu.items():
        from_bounds = _restarts_from_boundaries(bounds, name, batch, length).to(restarts.device if restarts is not None
                                                                                 else bounds.device)
        if restarts is None:
            restarts = from_bounds
        elif bool(((restarts != from_bounds) if real is None else ((restarts != from_bounds) & real)).any()):
            raise ValueError(
                f"`{name}` and `position_ids` disagree on where the packed documents start; pass both as the same "
                "collator made them (or only one of them)."
            )
    if restarts is None:
        if varlen:
            raise ValueError(
                f"{sorted(varlen)} describe a packed batch only together with `position_ids` or `cu_seq_lens_q`/"
                "`cu_seq_lens_k`."
            )
        return None, position_ids
    if position_ids is None:
        # Positions restart at every document start (what the collator would have passed as `position_ids`).
        columns = torch.arange(length, device=restarts.device).expand(batch, -1)
        starts = torch.where(restarts, columns, 0).cummax(dim=-1).values
        position_ids = columns - starts
    documents = restarts.long().cumsum(-1)
    if "seq_idx" in varlen:
        seq_idx = varlen["seq_idx"]
        _check_tensor(seq_idx, "seq_idx")
        if seq_idx.numel() != batch * length:
            raise ValueError(f"`seq_idx` must hold one document index per token ({batch} x {length}), got shape "
                             f"{tuple(seq_idx.shape)}.")
        seq_idx = seq_idx.reshape(batch, length).to(documents.device)
        if not torch.equal(seq_idx[:, 1:] != seq_idx[:, :-1], restarts[:, 1:]):
            raise ValueError("`seq_idx` disagrees with the document starts of `position_ids`/`cu_seq_lens_q`.")
    longest = _longest_document(restarts)
    for name in ("max_length_q", "max_length_k"):
        value = varlen.get(name)
        value = int(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < longest):
            raise ValueError(f"`{name}` must be an integer >= the longest packed document ({longest}), got {value!r}.")
    return (documents if bool(restarts.any()) else None), position_ids


def _longest_document(restarts: torch.Tensor) -> int:
    batch, length = restarts.shape
    starts = restarts.clone()
    starts[:, 0] = True
    flat = torch.nonzero(starts.flatten()).flatten()
    ends = torch.cat([flat[1:], flat.new_tensor([batch * length])])
    return int((ends - flat).max())


def varlen_boundaries(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`cu_seq_lens` (int32) and the longest document of a packed batch flattened to one stream of tokens, as the
    flash-attention varlen kernels take them."""
    batch, length = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    flat = torch.nonzero(starts.flatten()).flatten()
    bounds = torch.cat([flat, flat.new_tensor([batch * length])])
    return bounds.to(torch.int32), int(bounds.diff().max())


def check_packed_pair(source_documents: torch.Tensor | None, target_documents: torch.Tensor | None) -> None:
    """A packed encoder-decoder batch packs both sides: every row holds as many source as target documents, and the
    k-th target document attends to the k-th source document only."""
    if source_documents is None and target_documents is None:
        return
    if source_documents is None or target_documents is None:
        packed, plain = ("`position_ids`", "`decoder_position_ids`")[:: 1 if target_documents is None else -1]
        raise ValueError(
            f"{packed} mark a packed batch (positions restart inside a row) but {plain} do not: pack the sources "
            "and the targets of the same documents together, with positions restarting at each document."
        )
    if not torch.equal(source_documents[:, -1].to(target_documents.device), target_documents[:, -1]):
        raise ValueError(
            f"A packed row must hold as many source as target documents, got {(source_documents[:, -1] + 1).tolist()} "
            f"source and {(target_documents[:, -1] + 1).tolist()} target documents per row."
        )


def same_document_mask_function(q_documents: torch.Tensor, kv_documents: torch.Tensor):
    """A transformers mask function (flex attention): query and key belong to the same packed document."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return q_documents[batch_idx, q_idx] == kv_documents[batch_idx, kv_idx]

    return inner_mask


def _boolean_mask(
    padding_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    causal: bool,
    materialize: bool,
    device: torch.device,
    q_documents: torch.Tensor | None = None,
    kv_documents: torch.Tensor | None = None,
    kv_capacity: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """`(mask, is_causal)` with a boolean `(batch or 1, 1, q, kv)` mask (True = attend), or no mask at all.

    Without padding, causal self-attention uses `is_causal=True` (about 2x faster on CPU than a boolean mask, and no
    T^2 buffer, docs/design.md §7); a single new query with a cache needs no mask at all. Otherwise a mask is built;
    query rows that would see no key at all (left padding) are un-masked, since SDPA may return NaN for them and the
    NaN would leak into real positions through the gradient. Those rows are padding and ignored by the loss. A packed
    batch (`q_documents`/`kv_documents`: the document of every query/key) gets a block-diagonal mask: no attention
    across documents. With a static cache (`kv_capacity` > `kv_len`) the keys fill all its slots: those past the
    `kv_len` real ones are masked.
    """
    packed = q_documents is not None
    capacity = kv_len if kv_capacity is None else kv_capacity
    static = capacity > kv_len
    if padding_mask is None and not materialize and not packed and not static:
        if not causal or q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
    if padding_mask is None and not causal and not packed and not static:
        return None, False
    allowed = torch.ones(1, 1, q_len, capacity, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(kv_len - q_len)
    elif static:
        allowed[..., kv_len:] = False
    if padding_mask is not None:
        padding = padding_mask.to(device)
        if static:
            padding = torch.cat([padding, padding.new_zeros(padding.shape[0], capacity - kv_len)], dim=-1)
        allowed = allowed & padding[:, None, None, :]
    if packed:
        allowed = allowed & (q_documents[:, None, :, None] == kv_documents[:, None, None, :]).to(device)
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
    q_documents: torch.Tensor | None = None,
    kv_documents: torch.Tensor | None = None,
    kv_capacity: int | None = None,
) -> tuple[Any, bool, dict[str, Any]]:
    """The mask argument of the attention function for `implementation`, its `is_causal` flag, and the extra keyword
    arguments the attention function needs (the varlen boundaries of a packed batch under flash attention).

    `sdpa` and `eager` get this module's masks (causal fast path, no NaN rows; `eager` an additive float mask like
    Llama's). Any other implementation with a mask builder in transformers' `ALL_MASK_ATTENTION_FUNCTIONS` (flex: a
    `BlockMask`) gets that builder's mask; flash attention, which takes no mask, gets the 2D padding mask or, for a
    packed batch, `cu_seq_lens_q/k` and `max_length_q/k` (its varlen kernel keeps the documents apart).
    `q_documents`/`kv_documents` (`(batch, q_len)`/`(batch, kv_len)`, from `find_documents`) mark a packed batch.
    `kv_capacity`: the length of a static cache's keys (`static_cache_capacity`), None for a dynamic cache.
    """
    if kv_documents is None:
        kv_documents = q_documents
    builder = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) if implementation not in ("sdpa", "eager") else None
    if builder is not None and kv_capacity is not None:
        raise ValueError(
            f"A static cache needs the 'sdpa' or 'eager' attention here, not {implementation!r}: generate with the "
            "default dynamic cache, or switch with `model.set_attn_implementation('sdpa')`."
        )
    if builder is None:
        eager = implementation == "eager"
        mask, is_causal = _boolean_mask(
            padding_mask, q_len, kv_len, causal, materialize=eager, device=device, q_documents=q_documents,
            kv_documents=kv_documents, kv_capacity=kv_capacity,
        )
        if eager and mask is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask, is_causal, {}
    if q_documents is not None and builder is flash_attention_mask:
        if padding_mask is not None:
            raise ValueError(
                f"A packed batch with padding cannot run with {implementation!r}: pass it padding-free (no "
                "`attention_mask`, documents told apart by `position_ids` or `cu_seq_lens_q/k`), or use sdpa."
            )
        cu_q, max_q = varlen_boundaries(q_documents)
        cu_k, max_k = varlen_boundaries(kv_documents)
        varlen = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": max_q, "max_length_k": max_k}
        return None, causal, varlen
    mask_function = causal_mask_function if causal else bidirectional_mask_function
    if q_documents is not None:
        mask_function = and_masks(mask_function, same_document_mask_function(q_documents, kv_documents))
    mask = builder(
        batch_size=batch,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=kv_len - q_len,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=padding_mask,
        allow_is_causal_skip=q_documents is None,
        dtype=dtype,
        device=device,
    )
    return mask, causal, {}


@dataclass
class StackInputs:
    """What `prepare_stack_inputs` derives from a model's arguments."""

    static: dict[str, Any]  # the arguments every block reads: rotary tables, the self-attention mask and flags
    padding_mask: torch.Tensor | None  # the checked `(batch, total length)` padding mask, None when nothing is padded
    documents: torch.Tensor | None  # `(batch, length)` document ids of a packed batch, None when not packed


def prepare_stack_inputs(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: Any,
    position_ids: Any = None,
    past_length: int = 0,
    causal: bool = True,
    mask_name: str = "attention_mask",
    varlen: dict[str, Any] | None = None,
    packing: bool = True,
    kv_capacity: int | None = None,
) -> StackInputs:
    """The arguments every block of a stack reads (rotary tables, the self-attention mask), from the embeddings,
    the 2D padding mask, the positions and the varlen arguments of a packed batch, after checking them.

    `packing=False` (the caller passed a generation cache) reads positions as positions only: a decoding step
    continues its cached sequence, and generate()'s positions of a padded prompt do not mark documents.
    `kv_capacity`: the length of a static cache's keys (None: dynamic cache or none).
    Shared by the causal LM, the encoder and the decoder: the only input preparation of the package.
    """
    batch, seq_len = inputs_embeds.shape[:2]
    total = past_length + seq_len
    if kv_capacity is not None and total > kv_capacity:
        raise ValueError(
            f"The static cache holds {kv_capacity} positions; cached {past_length} + new {seq_len} = {total} do not "
            "fit. Create it with a larger `max_cache_len`."
        )
    varlen = varlen or {}
    # The limit is on positions: a packed row may be longer than `max_position_embeddings` as long as each of its
    # documents is not (given positions are checked by `resolve_position_ids`, derived ones below).
    if total > config.max_position_embeddings and position_ids is None and not (packing and varlen):
        raise ValueError(
            f"Sequence length {total} (cached {past_length} + new {seq_len}) exceeds "
            f"`max_position_embeddings`={config.max_position_embeddings}."
        )
    padding_mask = check_padding_mask(attention_mask, (batch, total), mask_name)
    if position_ids is not None:
        position_ids = resolve_position_ids(
            position_ids, padding_mask, past_length, batch, seq_len, inputs_embeds.device,
            config.max_position_embeddings,
        )
    documents = None
    if packing and (position_ids is not None or varlen):
        documents, position_ids = find_documents(position_ids, padding_mask, varlen, batch, seq_len)
        if int(position_ids.max()) >= config.max_position_embeddings:
            raise ValueError(
                f"A packed document is longer than `max_position_embeddings`={config.max_position_embeddings} "
                f"(position {int(position_ids.max())})."
            )
    elif varlen:
        raise ValueError(
            f"{sorted(varlen)} describe a packed training batch; they cannot be combined with a generation cache."
        )
    if position_ids is None:
        position_ids = resolve_position_ids(
            None, padding_mask, past_length, batch, seq_len, inputs_embeds.device, config.max_position_embeddings
        )
    mask, is_causal, attention_kwargs = attention_mask_for(
        config._attn_implementation, padding_mask, batch, seq_len, total, causal, inputs_embeds.dtype,
        inputs_embeds.device, q_documents=documents, kv_capacity=kv_capacity,
    )
    static = {
        "position_embeddings": rotary_tables(position_ids, config.head_dim, config.rope_theta, torch.float32),
        "attention_mask": mask,
        "is_causal": is_causal,
        "attention_kwargs": attention_kwargs,
    }
    return StackInputs(static, padding_mask, documents)


def resolve_output_flags(
    config: Any, output_attentions: bool | None, output_hidden_states: bool | None
) -> tuple[bool, bool]:
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


SUPPORTED_CACHES = (
    "DynamicCache (the default), StaticCache (`cache_implementation='static'`, 'offloaded_static', or the deprecated "
    "'sliding_window', which builds a StaticCache of full-attention layers for this model), and an EncoderDecoderCache "
    "of those for the encoder-decoder"
)


def static_cache_capacity(cache: Cache | None, name: str = "cache") -> int | None:
    """The number of positions a static cache holds (its keys and values always have that length, the slots past the
    cached tokens being zeros that the mask must hide), or None for a dynamic cache.

    Every layer must be a full-attention `DynamicLayer` or `StaticLayer`: this model attends to its whole history, so a
    sliding-window or otherwise truncating layer would silently drop keys. Anything else is refused by name.
    """
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    kinds = {type(layer) for layer in layers or ()}
    if layers is None or not kinds <= {DynamicLayer, StaticLayer}:
        found = ", ".join(sorted(k.__name__ for k in kinds - {DynamicLayer, StaticLayer})) or "no"
        raise ValueError(
            f"`{name}` is a {type(cache).__name__} with {found} layers, which this model cannot use: it attends to the "
            f"whole history of every layer. Supported caches: {SUPPORTED_CACHES}."
        )
    if kinds == {StaticLayer}:
        return int(layers[0].max_cache_len)
    if StaticLayer in kinds:
        raise ValueError(f"`{name}` mixes static and dynamic layers. Supported caches: {SUPPORTED_CACHES}.")
    return None


def cached_length(cache: Cache | None) -> int:
    """Tokens already in `cache` (a static cache counts them in a tensor)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def output_cache(output: Any) -> Cache | None:
    """The cache held by a model output (field `cache` from transformers 5.24 on, `past_key_values` before)."""
    # Plain dict access: the 5.24 BC alias `output.past_key_values` logs a deprecation warning on every call.
    return OrderedDict.get(output, "cache", OrderedDict.get(output, "past_key_values"))
