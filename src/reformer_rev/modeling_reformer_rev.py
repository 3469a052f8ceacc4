"""Reversible Transformer models for `transformers`: backbone and causal language model.

Every block is reversible (`y1 = x1 + Attention(x2)`, `y2 = x2 + FeedForward(y1)`) and the whole stack runs through
the model-agnostic engine in `reversible.py`, so training activation memory does not grow with depth. Setting
`config.reversible = False` runs the very same modules under ordinary autograd (the "twin").

This module only imports torch, transformers and its flat siblings, so `save_pretrained` can copy it next to a
checkpoint for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_reformer_rev import RevFormerConfig
from .couplings import DriftReport, make_coupling
from .deq import DEQStats, deq_fixed_point, jacobian_regularizer
from .reversible import run_reversible_stack

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


class RevFormerRMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the input dtype (stable under bf16 autocast)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        # At least float32 (float64 stays float64: a float32 round trip would cap float64 models at ~1e-9 precision).
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotary_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `(batch, seq, head_dim)` for rotary embeddings, computed in float32 from the positions.

    Computed on the fly (no buffer): nothing to re-initialise after meta-device loading, and no length limit.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` of shape `(batch, heads, seq, head_dim)` by tables of shape `(batch, seq, head_dim)`."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float,
    implementation: str,
) -> torch.Tensor:
    """Scaled dot-product attention on `(batch, heads, seq, head_dim)`; `mask` is boolean (True = attend)."""
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if is_causal:
        q_len, k_len = query.shape[-2], key.shape[-2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


class RevFormerAttention(nn.Module):
    """Multi-head attention with grouped key/value heads and rotary positions.

    Used as self-attention (keys from the same stream) and as cross-attention (`is_cross_attention=True`: keys and
    values from a constant `context`, no rotary embedding, no causal mask; with a cache they are projected on the first
    call and reused afterwards).
    """

    def __init__(self, config: RevFormerConfig, layer_idx: int, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _shape(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        past_key_values: Cache | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = self._shape(self.q_proj(hidden_states), self.num_heads)
        if self.is_cross_attention and past_key_values is not None and past_key_values.get_seq_length(self.layer_idx):
            # Cross-attention keys/values depend only on the constant encoder output: projected once, then reused.
            layer = past_key_values.layers[self.layer_idx]
            key, value = layer.keys, layer.values
        else:
            source = context if self.is_cross_attention else hidden_states
            key = self._shape(self.k_proj(source), self.num_kv_heads)
            value = self._shape(self.v_proj(source), self.num_kv_heads)
            if rotary is not None and not self.is_cross_attention:
                cos, sin = rotary
                query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
        n_rep = self.num_heads // self.num_kv_heads
        key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
        dropout = self.config.attention_dropout if self.training else 0.0
        implementation = self.config._attn_implementation or "sdpa"
        out = attention(query, key, value, mask, is_causal, dropout, implementation)
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return self.o_proj(out)


class RevFormerFeedForward(nn.Module):
    """Gated feed-forward `down(act(gate(x)) * up(x))`; acts on every position independently."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RevFormerBlock(nn.Module):
    """One reversible block: `f` = pre-norm self-attention, `g` = pre-norm feed-forward.

    The coupling itself (`y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`) lives in the engine; this module only defines the two
    residual functions, each a function of the *other* stream and of constant arguments.
    """

    def __init__(self, config: RevFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RevFormerAttention(config, layer_idx)
        self.ffn_norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RevFormerFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.g_chunk_size = config.chunk_size_feed_forward
        self._has_dropout = config.hidden_dropout > 0 or config.attention_dropout > 0
        # Depth-stable branch scaling (docs/depth.md): a fixed 1/sqrt(depth), or ReZero-style gates starting at 0.
        branch_scale = getattr(config, "branch_scale", None)
        self.branch_multiplier = 1.0 / math.sqrt(config.num_hidden_layers) if branch_scale == "inv_sqrt_depth" else 1.0
        if branch_scale == "learnable_gate":
            self.attn_gate = nn.Parameter(torch.zeros(()))
            self.mlp_gate = nn.Parameter(torch.zeros(()))

    def scale_branch(self, out: torch.Tensor, gate: str) -> torch.Tensor:
        """Apply the configured branch scaling to the output of `f` (`gate="attn_gate"`) or `g` (`"mlp_gate"`)."""
        if self.branch_multiplier != 1.0:
            out = out * self.branch_multiplier
        gate_param = getattr(self, gate, None)
        return out if gate_param is None else out * gate_param.to(out.dtype)

    @property
    def uses_rng(self) -> bool:
        """Whether f/g draw random numbers now (the engine records RNG states only then)."""
        return self.training and self._has_dropout

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.dropout(
            self.self_attn(
                self.attn_norm(x),
                rotary=kwargs.get("rotary"),
                mask=kwargs.get("mask"),
                is_causal=kwargs.get("is_causal", False),
                past_key_values=kwargs.get("past_key_values"),
            )
        )
        return self.scale_branch(out, "attn_gate")

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.scale_branch(self.dropout(self.mlp(self.ffn_norm(x))), "mlp_gate")


# --------------------------------------------------------------------------------------------------------------
# Masks and input checks
# --------------------------------------------------------------------------------------------------------------


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool
) -> tuple[torch.Tensor | None, bool]:
    """Turn a 2D padding mask `(batch, kv_len)` into what SDPA wants: `(mask, is_causal)`.

    Without padding, causal self-attention uses `is_causal=True` (about 2x faster on CPU than a boolean mask, and no
    T^2 buffer); a single new query with a cache needs no mask at all. Otherwise a boolean `(batch, 1, q, kv)` mask is
    built; query rows that would see no key at all (left padding) are un-masked, since SDPA returns NaN for them and
    the NaN would leak into real positions through the gradient. Those rows are padding and ignored by the loss.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None:
        if not causal or q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
    device = attention_mask.device if attention_mask is not None else None
    allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(kv_len - q_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty_rows
    return allowed, False


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise `ValueError`/`TypeError` for ids torch would otherwise reject with an opaque IndexError."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(input_ids).__name__}.")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {input_ids.dtype}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
    if input_ids.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(input_ids.shape)}); pass at least one token.")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"`{name}` contains token id {bad}, outside the vocabulary [0, {vocab_size}).")


def embed_inputs(
    embed_tokens: nn.Embedding,
    config: RevFormerConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    name: str = "input_ids",
) -> torch.Tensor:
    """Check that exactly one of ids/embeddings is given and return the embeddings `(batch, seq, hidden)`."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"Pass exactly one of `{name}` or `inputs_embeds`.")
    if input_ids is not None:
        check_input_ids(input_ids, config.vocab_size, name)
        return embed_tokens(input_ids)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size or inputs_embeds.shape[1] == 0:
        raise ValueError(
            f"`inputs_embeds` must have shape (batch, sequence>0, hidden_size={config.hidden_size}), "
            f"got {tuple(inputs_embeds.shape)}."
        )
    return inputs_embeds


def resolve_use_cache(config: RevFormerConfig, use_cache: bool | None) -> bool:
    """`use_cache` (default from the config), switched off when a reversible model computes gradients."""
    explicit = use_cache
    use_cache = use_cache if use_cache is not None else config.use_cache
    if use_cache and config.reversible and torch.is_grad_enabled():
        # The recomputing backward re-runs attention, which would append to the cache a second time.
        if explicit:
            logger.warning_once("`use_cache=True` needs `torch.no_grad()` with a reversible model; ignoring it.")
        use_cache = False
    return bool(use_cache)


def pop_cache_argument(past_key_values: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """The generation cache, whichever name the caller used.

    transformers >= 5.24 passes it to `forward` as `cache=` (older releases as `past_key_values=`); reading only one
    name silently drops the cache and every decoding step then sees a single token without its history.
    """
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the generation cache once, as `cache=` or `past_key_values=`, not both.")
    return past_key_values if past_key_values is not None else cache


def output_cache(output: Any) -> Cache | None:
    """The cache held by a model output (field `cache` from transformers 5.24 on, `past_key_values` before)."""
    # Plain dict access: the 5.24 BC alias `output.past_key_values` logs a deprecation warning on every call.
    return OrderedDict.get(output, "cache", OrderedDict.get(output, "past_key_values"))


def resolve_position_ids(
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_len: int,
    batch: int,
    seq_len: int,
    device: torch.device,
) -> torch.Tensor:
    """Rotary positions of the new tokens, counted from each sequence's first real token (left padding aware)."""
    if position_ids is None:
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        return torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch, -1)
    if position_ids.shape[-1] != seq_len:
        raise ValueError(f"`position_ids` must have length {seq_len}, got shape {tuple(position_ids.shape)}.")
    return position_ids


def engine_options(config: RevFormerConfig) -> dict[str, Any]:
    """The engine's coupling options from a config (`docs/depth.md`); a fresh `DriftReport` when one is asked for."""
    report = None
    if getattr(config, "debug_reversal_drift", False) or getattr(config, "stream_checkpoint_every", 0):
        report = DriftReport(per_block=getattr(config, "debug_reversal_drift", False))
    return {
        "coupling": make_coupling(
            getattr(config, "coupling", "additive"),
            step_size=getattr(config, "coupling_step_size", 1.0),
            gamma=getattr(config, "momentum_gamma", 0.9),
        ),
        "fixed_point_bits": {True: config.fixed_point_scale_bits, False: None}.get(config.exact_reversal, "auto"),
        "checkpoint_every": getattr(config, "stream_checkpoint_every", 0),
        "drift_report": report,
    }


def run_blocks(
    layers: nn.ModuleList,
    norm: nn.Module,
    hidden: torch.Tensor,
    reversible: bool,
    static_kwargs: dict[str, Any],
    diff_kwargs: dict[str, torch.Tensor] | None = None,
    output_hidden_states: bool = False,
    engine_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run a reversible stack with both streams starting from `hidden`, merge the streams and norm.

    Returns the normed output and, with `output_hidden_states`, the per-layer merged states (the last one normed).
    `diff_kwargs` (e.g. an encoder output) get their gradient accumulated over all blocks. `engine_kwargs` (see
    `engine_options`) choose the coupling, exact fixed-point streams and the drift guard.
    """
    engine_kwargs = dict(engine_kwargs or {})
    coupling = make_coupling(engine_kwargs.pop("coupling", None))
    merge = coupling.merge_streams
    all_hidden = None
    if output_hidden_states:
        # Per-layer states need every block's output: run block by block (memory grows with depth).
        all_hidden = (hidden,)
        x1, x2 = coupling.init_streams(hidden)
        for layer in layers:
            x1, x2 = run_reversible_stack(
                [layer], x1, x2, reversible=reversible, static_kwargs=static_kwargs, diff_kwargs=diff_kwargs,
                coupling=coupling, **engine_kwargs,
            )
            all_hidden += (merge(x1, x2),)
    else:
        x1, x2 = run_reversible_stack(
            layers, *coupling.init_streams(hidden), reversible=reversible, static_kwargs=static_kwargs,
            diff_kwargs=diff_kwargs, coupling=coupling, **engine_kwargs,
        )
    hidden = norm(merge(x1, x2))
    if output_hidden_states:
        all_hidden = all_hidden[:-1] + (hidden,)
    return hidden, all_hidden


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class RevFormerPreTrainedModel(PreTrainedModel):
    config_class = RevFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["RevFormerBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # The reversible stack already recomputes in backward: HF-style gradient checkpointing would only add work.
    supports_gradient_checkpointing = False
    # Written into `config.auto_map["AutoModel"]` on save: transformers only records the class being saved, and without
    # this entry `AutoModel.from_pretrained(..., trust_remote_code=True)` fails on a head-model checkpoint.
    _remote_base_model = "modeling_reformer_rev.RevFormerModel"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, with errors that name the file and no silent random weights.

        A checkpoint that lacks some of the model's weights raises (transformers would only warn and initialise them
        randomly); pass `allow_missing_weights=True` to accept that, e.g. to put a new head on a backbone.
        """
        allow_missing = kwargs.pop("allow_missing_weights", False)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as err:  # safetensors raises its own type for truncated/corrupted files
            if type(err).__name__ == "SafetensorError":
                raise OSError(
                    f"Could not read the weights of {pretrained_model_name_or_path!s}: the safetensors file is "
                    f"truncated or corrupted ({err}). Re-download or re-save the checkpoint."
                ) from err
            raise
        missing = [k for k in info.get("missing_keys", []) if k not in model._tied_missing_ok()]
        if missing and not allow_missing:
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path!s} lack {len(missing)} parameter(s) of "
                f"{cls.__name__}, e.g. {sorted(missing)[:5]}; they would be randomly initialised. Pass "
                "`allow_missing_weights=True` if that is intended."
            )
        return (model, info) if want_info else model

    def _tied_missing_ok(self) -> set[str]:
        """Keys that are legitimately absent from a checkpoint because they are tied to another weight."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return set()
        return set(getattr(self, "_tied_weights_keys", None) or {})

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", self._remote_base_model)
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Infinite depth: weight tying and deep-equilibrium mode (docs/infinite_depth.md)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RevFormerModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus, in DEQ mode, the solver statistics and the Jacobian regulariser."""

    deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


@dataclass
class RevFormerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, in DEQ mode, the solver statistics (`deq_stats.forward.iterations`,
    `.residual`, `.converged`; `deq_stats.backward` once backward has run) and the Jacobian regulariser."""

    deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


class _CacheSlot:
    """The key/value cache seen by one *application* of a block: slot `index` of the shared cache.

    With weight tying a block is applied several times, so its `layer_idx` cannot address the cache. With
    `commit=False` (DEQ solver iterations) the new keys/values are concatenated to the cached ones but not stored.
    """

    def __init__(self, cache: Cache, index: int, commit: bool = True) -> None:
        self.cache, self.index, self.commit = cache, index, commit
        while len(cache.layers) <= index:
            cache.layers.append(DynamicLayer())

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int | None = None, *args: Any, **kwargs: Any):
        if self.commit:
            return self.cache.update(key, value, self.index, *args, **kwargs)
        layer = self.cache.layers[self.index]
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            return key, value
        return torch.cat([layer.keys, key], dim=-2), torch.cat([layer.values, value], dim=-2)

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        return self.cache.get_seq_length(self.index)


class _BlockApplication:
    """A block applied at depth `index`: the same module (same parameters), its own key/value cache slot."""

    def __init__(self, block: RevFormerBlock, index: int, commit_cache: bool = True) -> None:
        self.block, self.index, self.commit_cache = block, index, commit_cache

    def __getattr__(self, name: str) -> Any:  # training, g_chunk_size, uses_rng, parameters, ...
        return getattr(self.__dict__["block"], name)

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        cache = kwargs.get("past_key_values")
        if cache is not None:
            kwargs = {**kwargs, "past_key_values": _CacheSlot(cache, self.index, self.commit_cache)}
        return self.block.f(x, **kwargs)

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.block.g(x, **kwargs)


def applied_layers(layers: nn.ModuleList, num_applied: int, has_cache: bool) -> Any:
    """The blocks in application order: `num_applied` applications cycling through the distinct `layers`."""
    if isinstance(num_applied, bool) or not isinstance(num_applied, int) or num_applied <= 0:
        raise ValueError(f"`num_hidden_layers` must be a positive integer, got {num_applied!r}.")
    unique = len(layers)
    if num_applied == unique:
        return layers
    if num_applied < unique or not has_cache:
        return [layers[i % unique] for i in range(num_applied)]
    return [_BlockApplication(layers[i % unique], i) for i in range(num_applied)]


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


def deq_blocks(
    model: nn.Module,
    hidden: torch.Tensor,
    static_kwargs: dict[str, Any],
    engine_kwargs: dict[str, Any],
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, DEQStats, torch.Tensor | None]:
    """Deep-equilibrium forward of the weight-tied block group `model.layers`.

    State `h = (h1, h2)` (both streams), input injection `x = init_streams(rms_normalise(hidden))`, and
    `f(h) = x + R(h)` with `R(h) = group(h) - h` the group's residual update: the fixed point `h* = x + R(h*)` is the
    implicit (infinitely deep, weight-tied) version of one explicit step `h = x + R(x)`. Solved by `deq.py`; dropout
    draws the same masks in every application of `f` within one forward, so `f` is one fixed map.
    """
    config = model.config
    coupling = make_coupling(engine_kwargs.get("coupling"))
    group = list(model.layers)
    cache = static_kwargs.get("past_key_values")
    # Unit-RMS input injection: the blocks' pre-norms amplify perturbations of h by 1/rms(h), so with the raw
    # (std 0.02) embedding f starts far from contractive (measured at d=128: Anderson stalls at residual ~0.2).
    h32 = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    injection = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)).to(hidden.dtype)
    x1, x2 = coupling.init_streams(injection)
    width = x1.shape[-1]
    uses_rng = any(getattr(b, "uses_rng", False) for b in group)
    seed = int(torch.randint(0, 2**62, (1,))) if uses_rng else None  # advances the global generator once
    devices = sorted({t.device.index for t in (hidden,) if t.is_cuda and t.device.index is not None})

    def f(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reversible: bool = False, commit: bool = False):
        h1, h2 = h[..., :width], h[..., width:]
        blocks = group if cache is None else [_BlockApplication(m, i, commit_cache=commit) for i, m in enumerate(group)]
        with _seeded_rng(seed, devices):
            y1, y2 = run_reversible_stack(
                blocks, h1, h2, reversible=reversible, static_kwargs=static_kwargs, coupling=coupling
            )
        return torch.cat([a + (y1 - h1), b + (y2 - h2)], dim=-1)

    def report(stats: DEQStats) -> None:
        if not stats.converged:
            model._deq_warn(stats)

    phantom = config.deq_backward == "phantom"
    h, stats = deq_fixed_point(
        (lambda h, a, b: f(h, a, b, reversible=config.reversible)) if phantom else f,
        torch.cat([x1, x2], dim=-1),
        (x1, x2),
        solver=config.deq_solver,
        max_iter=config.deq_max_iter,
        tol=config.deq_tol,
        damping=config.deq_damping,
        backward=config.deq_backward,
        phantom_steps=config.deq_phantom_steps,
        on_backward=report,
    )
    if not stats.forward.converged:
        model._deq_warn(stats)
    jacobian_loss = None
    if config.deq_jacobian_reg > 0 and model.training and torch.is_grad_enabled():
        # Double backward: the fused SDPA kernels have none, the math kernel does.
        with sdpa_kernel([SDPBackend.MATH]):
            jacobian_loss = jacobian_regularizer(f, h.detach(), (x1, x2))
        stats.jacobian_loss = float(jacobian_loss.detach())
    if cache is not None:
        with torch.no_grad():  # store the keys/values of the fixed point (causal: later tokens do not change them)
            f(h.detach(), x1, x2, commit=True)
    out = model.norm(coupling.merge_streams(h[..., :width], h[..., width:]))
    all_hidden = (hidden, out) if output_hidden_states else None
    return out, all_hidden, stats, jacobian_loss


class RevFormerModel(RevFormerPreTrainedModel):
    """Embeddings, a stack of reversible blocks, stream merge and final norm. Returns `BaseModelOutputWithPast`."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # Weight tying in depth: `num_unique_layers` distinct blocks, cycled through at run time (None = all distinct).
        num_blocks = getattr(config, "num_unique_layers", None) or config.num_hidden_layers
        self.layers = nn.ModuleList(RevFormerBlock(config, i) for i in range(num_blocks))
        self.norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.deq_nonconverged = 0
        self.post_init()

    def _deq_warn(self, stats: DEQStats) -> None:
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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """
        num_hidden_layers: number of block applications for this call (weight tying: the stack cycles through the
            `num_unique_layers` distinct blocks); defaults to `config.num_hidden_layers`. Ignored in DEQ mode.
        """
        config = self.config
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        use_cache = resolve_use_cache(config, use_cache)
        deq = getattr(config, "depth_mode", "stack") == "deq"
        if deq and torch.is_grad_enabled():
            use_cache = False  # the solver applies the group many times; a cache only serves generation
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict

        inputs_embeds = embed_inputs(self.embed_tokens, config, input_ids, inputs_embeds)
        batch, seq_len = inputs_embeds.shape[:2]

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        if not use_cache:
            past_key_values = None
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        total_len = past_len + seq_len
        if total_len > config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {total_len} (cached {past_len} + new {seq_len}) exceeds "
                f"`max_position_embeddings`={config.max_position_embeddings}."
            )
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != total_len:
                raise ValueError(
                    f"`attention_mask` must have shape (batch={batch}, past+current length={total_len}), "
                    f"got {tuple(attention_mask.shape)}."
                )
        position_ids = resolve_position_ids(position_ids, attention_mask, past_len, batch, seq_len, inputs_embeds.device)

        mask, is_causal = build_attention_mask(attention_mask, seq_len, total_len, causal=True)
        if mask is not None:
            mask = mask.to(inputs_embeds.device)
        rotary = rotary_tables(position_ids, config.head_dim, config.rope_theta, torch.float32)

        # Both streams start from the embedding and stay in float32 under autocast.
        static = {"rotary": rotary, "mask": mask, "is_causal": is_causal, "past_key_values": past_key_values}
        options = engine_options(config)
        # Filled by the recomputing backward when a drift report is configured (debug_reversal_drift, checkpoints).
        self.last_drift_report = options["drift_report"]
        deq_stats = jacobian_loss = None
        if deq:
            hidden, all_hidden, deq_stats, jacobian_loss = deq_blocks(
                self, inputs_embeds, static, options, output_hidden_states
            )
        else:
            depth = config.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
            hidden, all_hidden = run_blocks(
                applied_layers(self.layers, depth, past_key_values is not None),
                self.norm,
                inputs_embeds,
                config.reversible,
                static,
                output_hidden_states=output_hidden_states,
                engine_kwargs=options,
            )

        if not return_dict:
            return tuple(v for v in (hidden, past_key_values, all_hidden) if v is not None)
        return RevFormerModelOutputWithPast(
            last_hidden_state=hidden, past_key_values=past_key_values, hidden_states=all_hidden,
            deq_stats=deq_stats, jacobian_loss=jacobian_loss,
        )


def chunked_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Causal LM cross-entropy (labels shifted inside, HF convention) without materialising all logits.

    Logits are computed `chunk_size` positions at a time under activation checkpointing, so backward recomputes one
    chunk's logits at a time. Parameters are used inside the graph (not passed around), which keeps DDP/FSDP hooks
    intact.
    """
    return chunked_cross_entropy(hidden_states[:, :-1], lm_head, labels[:, 1:], chunk_size, ignore_index)


def chunked_cross_entropy(
    hidden_states: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of `lm_head(hidden_states[:, t])` against `labels[:, t]` (no shift), chunk by chunk.

    Shared by the causal LM (which shifts first) and the sequence-to-sequence model (whose labels are aligned).
    """
    shift_hidden = hidden_states
    shift_labels = labels.to(hidden_states.device)
    n_valid = (shift_labels != ignore_index).sum()

    # Cross-entropy in at least float32 (bf16 logits under autocast would lose the loss's precision).
    loss_dtype = torch.promote_types(hidden_states.dtype, torch.float32)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h).to(loss_dtype)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction="sum")

    length = shift_hidden.shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        total = chunk_loss(shift_hidden, shift_labels)
    else:
        total = shift_hidden.new_zeros((), dtype=loss_dtype)
        for start in range(0, length, chunk_size):
            h, y = shift_hidden[:, start : start + chunk_size], shift_labels[:, start : start + chunk_size]
            if torch.is_grad_enabled():
                total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
            else:
                total = total + chunk_loss(h, y)
    # Mean over non-ignored targets; a batch with none gives 0 (not NaN) so accumulation stays finite.
    return total / n_valid.clamp(min=1)


class RevFormerForCausalLM(RevFormerPreTrainedModel, GenerationMixin):
    """Reversible decoder-only language model with a chunked LM loss and `generate()` support."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.model = RevFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _validate_generated_length(self, generation_config: Any, input_ids_length: int, has_default_max_length: bool):
        """Fail before generating, not at the step that runs out of positions."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = self.config.max_position_embeddings
        if generation_config.max_length is not None and generation_config.max_length > limit:
            raise ValueError(
                f"Generation would reach {generation_config.max_length} tokens (prompt {input_ids_length} + new "
                f"tokens), more than `max_position_embeddings`={limit}. Lower `max_new_tokens` to at most "
                f"{limit - input_ids_length}."
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """
        num_hidden_layers: number of block applications for this call (weight-tied depth chosen at run time).
        labels: token ids `(batch, sequence)`, shifted inside; `-100` is ignored.
        logits_to_keep: if > 0, only the last `logits_to_keep` positions' logits are computed (generation).
        return_logits: with `labels`, the loss is computed chunk-wise and `logits` is `None` unless this is `True`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            num_hidden_layers=num_hidden_layers,
        )
        hidden = outputs.last_hidden_state
        loss = None
        logits = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"`labels` must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}.")
            loss = chunked_lm_loss(hidden, self.lm_head, labels, self.config.loss_chunk_size)
            num_items = kwargs.get("num_items_in_batch")
            if num_items is not None:
                # `Trainer` passes the target count of the whole accumulated (and multi-process) batch and then skips
                # its own loss scaling: turn this batch's mean into its share of that global mean.
                n_valid = (labels[:, 1:] != -100).sum().clamp(min=1)
                loss = loss * n_valid / torch.as_tensor(num_items, device=loss.device).clamp(min=1)
            if getattr(outputs, "jacobian_loss", None) is not None:
                loss = loss + self.config.deq_jacobian_reg * outputs.jacobian_loss
        if labels is None or return_logits:
            keep = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            logits = self.lm_head(keep)

        if not return_dict:
            out = (logits, output_cache(outputs), outputs.hidden_states)
            out = tuple(v for v in out if v is not None)
            return ((loss,) + out) if loss is not None else out
        return RevFormerCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=output_cache(outputs), hidden_states=outputs.hidden_states,
            deq_stats=getattr(outputs, "deq_stats", None), jacobian_loss=getattr(outputs, "jacobian_loss", None),
        )


__all__ = [
    "RevFormerPreTrainedModel",
    "RevFormerModel",
    "RevFormerForCausalLM",
    "RevFormerBlock",
    "RevFormerAttention",
    "RevFormerFeedForward",
    "RevFormerRMSNorm",
    "build_attention_mask",
    "chunked_lm_loss",
    "chunked_cross_entropy",
    "check_input_ids",
    "embed_inputs",
    "resolve_use_cache",
    "resolve_position_ids",
    "pop_cache_argument",
    "output_cache",
    "run_blocks",
    "engine_options",
    "applied_layers",
    "deq_blocks",
    "RevFormerModelOutputWithPast",
    "RevFormerCausalLMOutputWithPast",
]
