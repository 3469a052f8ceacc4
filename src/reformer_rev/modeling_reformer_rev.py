"""Reversible Transformer models for `transformers`: backbone, causal language model and sequence classifier.

Every block is reversible (`y1 = x1 + Attention(x2)`, `y2 = x2 + FeedForward(y1)`); the stack of blocks is applied by
`RevFormerStack` (`stack.py`: plain, weight-tied or deep-equilibrium) through the engine of `reversible.py`, so
training activation memory does not grow with depth. `config.reversible = False` runs the very same modules under
ordinary autograd (the "twin"). Argument checks, masks and positions live in `model_inputs.py`, the chunked losses in
`losses.py`.

This module imports only torch, transformers and its flat siblings, so `save_pretrained` can copy it next to a
checkpoint for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import can_return_tuple, logging

from .configuration_reformer_rev import MODEL_TYPE, SEQ2SEQ_MODEL_TYPE, RevFormerConfig, resolve_chunk_size
from .deq import DEQStats
from .losses import causal_lm_loss
from .model_inputs import (
    CACHE_FIELD,
    cached_length,
    check_class_labels,
    check_generate_inputs,
    check_labels,
    check_span_positions,
    check_unused_kwargs,
    embed_inputs,
    keep_positions,
    output_cache,
    pop_cache_argument,
    pop_varlen_kwargs,
    prepare_stack_inputs,
    static_cache_capacity,
    resolve_output_flags,
    resolve_use_cache,
    wants_logits,
)
from .safe_io import load_model_folder, save_model_folder
from .stack import CacheSlot, RevFormerStack

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


class RevFormerRMSNorm(nn.Module):
    """Adapted from `transformers.models.llama.modeling_llama.LlamaRMSNorm`: computed in at least float32, so float64
    models keep float64 precision (a float32 round trip would cap them at ~1e-9)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Copied from `transformers.models.llama.modeling_llama.rotate_half`."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted from `transformers.models.llama.modeling_llama.apply_rotary_pos_emb`: the float32 tables are cast to
    the queries' dtype (bf16 under autocast), so the rotation does not promote queries and keys to float32."""
    cos = cos.unsqueeze(unsqueeze_dim).to(q.dtype)
    sin = sin.unsqueeze(unsqueeze_dim).to(q.dtype)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Copied from `transformers.models.llama.modeling_llama.repeat_kv`."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted from `transformers.models.llama.modeling_llama.eager_attention_forward`: also honours `is_causal`
    without a mask (blocks driven directly, outside a model, pass only that)."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is None and is_causal:
        q_len, kv_len = query.shape[-2], key_states.shape[-2]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    elif attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class RevFormerAttention(nn.Module):
    """Adapted from `transformers.models.llama.modeling_llama.LlamaAttention`.

    Used as self-attention (keys from the same stream) and as cross-attention (`is_cross_attention=True`: keys and
    values from the constant `encoder_hidden_states`, no rotary embedding, no causal mask; with a cache they are
    projected on the first call and reused afterwards). `cache` is this application's `CacheSlot` (`stack.py`).
    """

    def __init__(self, config: RevFormerConfig, layer_idx: int, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = not is_cross_attention
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: Any = None,
        is_causal: bool = False,
        cache: CacheSlot | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_kwargs`: extra arguments of the attention function (flash attention's varlen boundaries of a
        packed batch, `model_inputs.attention_mask_for`)."""
        input_shape = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.is_cross_attention and cache is not None and cache.get_seq_length() > 0:
            # Cross-attention keys/values depend only on the constant encoder output: projected once, then reused.
            key_states, value_states = cache.stored()
        else:
            source = encoder_hidden_states if self.is_cross_attention else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.head_dim)
            key_states = self.k_proj(source).view(kv_shape).transpose(1, 2)
            value_states = self.v_proj(source).view(kv_shape).transpose(1, 2)
            if not self.is_cross_attention and position_embeddings is not None:
                query_states, key_states = apply_rotary_pos_emb(query_states, key_states, *position_embeddings)
            if cache is not None:
                key_states, value_states = cache.update(key_states, value_states)

        # A block driven outside a model (its config never went through `from_pretrained`/`__init__` of a model)
        # has no implementation set yet: it gets the model default.
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation or "sdpa", eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=is_causal,
            **(attention_kwargs or {}),
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class RevFormerMLP(nn.Module):
    """Copied from `transformers.models.llama.modeling_llama.LlamaMLP`: gated `down(act(gate(x)) * up(x))`, acting on
    every position independently (so the engine may run it over sequence chunks)."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RevFormerBlock(nn.Module):
    """One reversible block: `f` = pre-norm self-attention, `g` = pre-norm feed-forward.

    The coupling itself (`y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`) lives in the engine; this module only defines the two
    residual functions, each a function of the *other* stream and of constant arguments (`static_kwargs` of the
    stack: rotary tables, masks, the cache slot, the attention recorder).
    """

    def __init__(self, config: RevFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RevFormerAttention(config, layer_idx)
        self.ffn_norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RevFormerMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.g_chunk_size = resolve_chunk_size(config.chunk_size_feed_forward, config.intermediate_size)
        # Depth-stable branch scaling (docs/depth.md): a fixed 1/sqrt(depth), or ReZero-style gates starting at 0.
        scale = config.branch_scale
        self.branch_multiplier = 1.0 / math.sqrt(config.num_hidden_layers) if scale == "inv_sqrt_depth" else 1.0
        if scale == "learnable_gate":
            # Shape (1,), not a 0-dim scalar: FSDP2 `fully_shard` and DeepSpeed ZeRO refuse 0-dim parameters.
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.mlp_gate = nn.Parameter(torch.zeros(1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts saved while the gates were 0-dim (before they became 1-D) still load. `from_pretrained` does not
        # call this hook; it reshapes through the conversion registered below (`BranchGateToOneDim`).
        for name in ("attn_gate", "mlp_gate"):
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_branch(self, out: torch.Tensor, gate: str) -> torch.Tensor:
        """Apply the configured branch scaling to the output of `f` (`gate="attn_gate"`) or `g` (`"mlp_gate"`)."""
        if self.branch_multiplier != 1.0:
            out = out * self.branch_multiplier
        gate_param = getattr(self, gate, None)  # present only with branch_scale="learnable_gate"
        return out if gate_param is None else out * gate_param.to(out.dtype)

    def f(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: Any = None,
        is_causal: bool = False,
        cache: CacheSlot | None = None,
        attentions: Any = None,
        attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        out, weights = self.self_attn(
            self.attn_norm(x),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            is_causal=is_causal,
            cache=cache,
            attention_kwargs=attention_kwargs,
        )
        if attentions is not None:
            attentions.record("self", weights)
        return self.scale_branch(self.dropout(out), "attn_gate")

    def g(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.scale_branch(self.dropout(self.mlp(self.ffn_norm(x))), "mlp_gate")


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


class BranchGateToOneDim(ConversionOps):
    """Checkpoint conversion for `from_pretrained`: learnable branch gates saved as 0-dim scalars load as shape (1,).

    transformers 5.x loads checkpoints without calling module load hooks, so `RevFormerBlock._load_from_state_dict`
    does not run there; a registered `WeightConverter` is the loader's supported way to change a tensor on its way in.
    Gates that are already 1-D pass through unchanged, and saving writes them as they are (the reverse is this op).
    """

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        (value,) = input_dict.values()
        tensor = value[0] if isinstance(value, list) else value
        return {target_patterns[0]: tensor.reshape(1) if tensor.dim() == 0 else tensor}

    @property
    def reverse_op(self) -> ConversionOps:
        return self


# Registered for the model type, so every class of it (causal LM, classifier, backbone, encoder-decoder) gets it; also
# runs when the modeling file is imported as remote code, so `overwrite=True` (the second import re-registers).
for _model_type in (MODEL_TYPE, SEQ2SEQ_MODEL_TYPE):  # the loader looks conversions up by the instance's model_type
    register_checkpoint_conversion_mapping(
        _model_type,
        [
            WeightConverter(source_patterns=name, target_patterns=name, operations=[BranchGateToOneDim()])
            for name in ("attn_gate", "mlp_gate")
        ],
        overwrite=True,
    )


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


@dataclass
class RevFormerSequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    """`SequenceClassifierOutputWithPast` plus, in DEQ mode, the solver statistics and the Jacobian regulariser."""

    deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


@dataclass
class RevFormerTokenClassifierOutput(TokenClassifierOutput):
    """`TokenClassifierOutput` plus, in DEQ mode, the solver statistics and the Jacobian regulariser."""

    deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


@dataclass
class RevFormerQuestionAnsweringModelOutput(QuestionAnsweringModelOutput):
    """`QuestionAnsweringModelOutput` plus, in DEQ mode, the solver statistics and the Jacobian regulariser."""

    deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class RevFormerPreTrainedModel(PreTrainedModel):
    config_class = RevFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["RevFormerBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Accepted so that recipes which ask for it run (`TrainingArguments(gradient_checkpointing=True)`, peft's
    # `prepare_model_for_kbit_training`); see `_set_gradient_checkpointing`.
    supports_gradient_checkpointing = True
    # Written into `config.auto_map["AutoModel"]` on save: transformers only records the class being saved, and without
    # this entry `AutoModel.from_pretrained(..., trust_remote_code=True)` fails on a head-model checkpoint.
    _remote_base_model = "modeling_reformer_rev.RevFormerModel"

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """`generate()` hands a compileable (static) cache a 4D mask it builds itself, through this hook when the model
        defines it. The model builds its own masks (no NaN rows, static-cache slots hidden, `model_inputs.py`) from
        the 2D padding mask, so that is what it keeps."""
        return attention_mask

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None, **kwargs):
        """Activation checkpointing changes nothing here, by design.

        The reversible stack already recomputes every block in backward and keeps one block's activations whatever
        the depth; checkpointing it again would only add a third forward. The twin (`reversible=False`) is the
        plain-autograd reference of gradient tests and speed ratios and stays plain too.
        """
        if enable:
            logger.warning_once(
                f"{self.__class__.__name__}: activation (gradient) checkpointing was requested; it changes nothing. "
                "The reversible stack already recomputes every block in backward (activation memory is flat in "
                "depth), and the `reversible=False` twin stays plain autograd."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, with errors that name the file and no silent random weights.

        A checkpoint that lacks some of the model's weights raises (transformers would only warn and initialise them
        randomly); pass `allow_missing_weights=True` to accept that, e.g. to put a new head on a backbone.
        """
        allow_missing = kwargs.pop("allow_missing_weights", False)
        allow_nonfinite = kwargs.pop("allow_nonfinite_weights", False)
        want_info = kwargs.pop("output_loading_info", False)
        load = super().from_pretrained
        try:
            # Under the folder's shared save lock (no save moves files meanwhile): never a mix of two saves.
            model, info = load_model_folder(
                pretrained_model_name_or_path,
                lambda: load(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs),
            )
        except Exception as err:  # safetensors raises its own type for truncated/corrupted files
            if type(err).__name__ == "SafetensorError":
                raise OSError(
                    f"Could not read the weights of {pretrained_model_name_or_path!s}: the safetensors file is "
                    f"truncated or corrupted ({err}). Re-download or re-save the checkpoint."
                ) from err
            if "ignore_mismatched_sizes" in str(err):  # transformers: "... For details look at the above report!"
                raise ValueError(
                    f"The weights in {pretrained_model_name_or_path!s} do not fit the model its config.json describes"
                    f"{_shape_mismatches(cls, pretrained_model_name_or_path, kwargs)}. Fix config.json (or pass "
                    "`ignore_mismatched_sizes=True` to initialise those weights randomly)."
                ) from err
            raise
        tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
        missing = [k for k in info.get("missing_keys", []) if k not in tied]
        if missing and not allow_missing:
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path!s} lack {len(missing)} parameter(s) of "
                f"{cls.__name__}, e.g. {sorted(missing)[:5]}; they would be randomly initialised. Pass "
                "`allow_missing_weights=True` if that is intended."
            )
        # A config.json with fewer layers than the weights (edited, or from another save): the extra layers' weights
        # are dropped by transformers with at most a generic note. Say how many, and which field decides.
        extra = sorted({int(m.group(2)) for k in info.get("unexpected_keys", [])
                        if (m := re.search(r"(^|\.)layers\.(\d+)\.", k))})
        if extra:
            logger.warning(
                f"{pretrained_model_name_or_path!s} holds the weights of {len(extra)} more layer(s) (layers "
                f"{extra[0]}-{extra[-1]}) than its config's num_hidden_layers/encoder_layers/decoder_layers builds: "
                "they were not loaded. Fix config.json if the checkpoint has more layers than it says."
            )
        if not allow_nonfinite:
            bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise ValueError(
                    f"The weights in {pretrained_model_name_or_path!s} hold NaN/inf values in {len(bad)} tensor(s), "
                    f"e.g. {bad[:3]}: the model was saved after it diverged, or the file is damaged. Pass "
                    "`allow_nonfinite_weights=True` to load it anyway."
                )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        if self._auto_class is not None:
            # `auto_map` exists only on configs that went through remote-code registration or loading.
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {"AutoModel": self._remote_base_model, **auto_map}
        # Written to a temp sibling, then moved in under the folder's lock: concurrent saves and readers never mix.
        save = super().save_pretrained
        return save_model_folder(
            save_directory,
            lambda folder: save(folder, *args, **kwargs),
            is_main_process=kwargs.get("is_main_process", True),
        )


def _shape_mismatches(cls: Any, path: Any, kwargs: dict[str, Any]) -> str:
    """': name (checkpoint shape, config shape: `field`=value), ...' for the weights of a local folder whose shapes
    differ from those the config builds ('' when that cannot be told, e.g. a Hub id)."""
    try:
        from safetensors import safe_open

        config = cls.config_class.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "revision"})
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        found = {}
        with safe_open(f"{path}/model.safetensors", framework="pt") as fh:
            for key in fh.keys():
                found[key] = tuple(fh.get_slice(key).get_shape())
    except Exception:  # noqa: BLE001 - best effort: the caller's message stands without the details
        return ""
    fields = {n: getattr(config, n) for n in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads", "head_dim") if isinstance(getattr(config, n, None), int)}
    details = []
    for key, shape in found.items():
        want = expected.get(key)
        if want is None or want == shape:
            continue
        names = sorted({n for a, b in zip(shape, want) if a != b for n, v in fields.items() if v == b})
        said = ", ".join(f"`{n}`={fields[n]}" for n in names)
        details.append(f"{key} has shape {shape} in the checkpoint, {want} from config.json" + (f" ({said})" if said else ""))
    return (": " + "; ".join(details[:3]) + ("; …" if len(details) > 3 else "")) if details else ""


class RevFormerModel(RevFormerPreTrainedModel):
    """Embeddings, a stack of reversible blocks, stream merge and final norm. Returns `BaseModelOutputWithPast`."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = RevFormerStack.build(config, RevFormerBlock, "num_hidden_layers")
        self.norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    @property
    def last_drift_report(self):
        """The reconstruction drift measured by the last recomputing backward (`debug_reversal_drift`, drift guard)."""
        return self.layers.last_drift_report

    @property
    def deq_nonconverged(self) -> int:
        """How many DEQ solves (forward or adjoint) did not reach `deq_tol` so far."""
        return self.layers.deq_nonconverged

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> RevFormerModelOutputWithPast:
        """
        num_hidden_layers: number of block applications for this call (weight tying: the stack cycles through the
            `num_unique_layers` distinct blocks); defaults to `config.num_hidden_layers`. Ignored in DEQ mode.
        """
        cache = pop_cache_argument(past_key_values, kwargs)
        varlen = pop_varlen_kwargs(kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        output_attentions, output_hidden_states = resolve_output_flags(
            self.config, output_attentions, output_hidden_states
        )
        inputs_embeds = embed_inputs(self.embed_tokens, input_ids, inputs_embeds, training=self.training)
        # Positions that restart mark packed documents only in a call that continues no cached sequence.
        packing = cache is None
        if not resolve_use_cache(self.config, use_cache):
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        inputs = prepare_stack_inputs(
            self.config, inputs_embeds, attention_mask, position_ids, cached_length(cache), varlen=varlen,
            packing=packing, kv_capacity=static_cache_capacity(cache),
        )
        out = self.layers(
            inputs_embeds,
            self.norm,
            inputs.static,
            caches={"cache": cache},
            depth=num_hidden_layers,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return RevFormerModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions.get("self") if out.attentions is not None else None,
            deq_stats=out.deq_stats,
            jacobian_loss=out.jacobian_loss,
            **{CACHE_FIELD: cache},
        )


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

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`, after checking the prompt, mask and embeddings (clear errors, small integer
        dtypes converted)."""
        inputs = check_generate_inputs(self.config.vocab_size, inputs, kwargs)
        return super().generate(inputs, *args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> RevFormerCausalLMOutputWithPast:
        """
        labels: token ids `(batch, sequence)`, shifted inside; `-100` is ignored.
        logits_to_keep: if > 0, only the last `logits_to_keep` positions' logits are computed (generation).
        return_logits: with `labels`, whether to return the logits as well. By default they are returned in eval
            mode (Trainer metrics, lm_eval) and skipped in training mode, where the chunked loss (`loss_chunk_size`)
            never materialises the `(sequence x vocab)` logits, like Liger's fused loss; `True` forces them.
        num_hidden_layers: number of block applications for this call (weight-tied depth chosen at run time).
        """
        cache = pop_cache_argument(past_key_values, kwargs)
        varlen = pop_varlen_kwargs(kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            num_hidden_layers=num_hidden_layers,
            return_dict=True,
            **varlen,
        )
        hidden = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            labels = check_labels(labels, self.config.vocab_size, hidden.shape[:2])
            chunk = resolve_chunk_size(self.config.loss_chunk_size, self.config.vocab_size)
            loss = causal_lm_loss(hidden, self.lm_head, labels, chunk, kwargs.get("num_items_in_batch"))
            if outputs.jacobian_loss is not None:
                loss = loss + self.config.deq_jacobian_reg * outputs.jacobian_loss
        if labels is None or wants_logits(self, return_logits):
            logits = self.lm_head(keep_positions(hidden, logits_to_keep))
        return RevFormerCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            deq_stats=outputs.deq_stats,
            jacobian_loss=outputs.jacobian_loss,
            **{CACHE_FIELD: output_cache(outputs)},
        )


class RevFormerHeadModel(RevFormerPreTrainedModel):
    """The backbone (`self.model`) and the forward plumbing shared by the task heads (sequence and token
    classification, question answering): the cache argument under either name, the varlen arguments of a packed
    batch, refused unknown keyword arguments, and the DEQ Jacobian regulariser added to the task loss.

    A head's loss is a per-batch mean: `Trainer` then scales it for gradient accumulation itself.
    """

    accepts_loss_kwargs = False

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.model = RevFormerModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def run_backbone(self, past_key_values: Cache | None, kwargs: dict[str, Any], **arguments: Any):
        """`self.model(**arguments)` with the cache and varlen arguments taken out of the head's `**kwargs` (any
        other keyword argument is refused by name)."""
        cache = pop_cache_argument(past_key_values, kwargs)
        varlen = pop_varlen_kwargs(kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        return self.model(past_key_values=cache, return_dict=True, **arguments, **varlen)

    def task_loss(self, loss: torch.Tensor | None, outputs: Any) -> torch.Tensor | None:
        """The head's loss plus, in DEQ mode, the weighted Jacobian regulariser of the backbone."""
        if loss is not None and outputs.jacobian_loss is not None:
            loss = loss + self.config.deq_jacobian_reg * outputs.jacobian_loss
        return loss

    @staticmethod
    def extra_outputs(outputs: Any) -> dict[str, Any]:
        """What every head returns from the backbone besides its own logits and loss."""
        return {
            "hidden_states": outputs.hidden_states,
            "attentions": outputs.attentions,
            "deq_stats": outputs.deq_stats,
            "jacobian_loss": outputs.jacobian_loss,
        }


class RevFormerForSequenceClassification(RevFormerHeadModel):
    """Adapted from `transformers.modeling_layers.GenericForSequenceClassification` (Llama's classifier): the score of
    the last non-padding token of each row (padding = `config.pad_token_id`, left or right)."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> RevFormerSequenceClassifierOutputWithPast:
        """
        labels: `(batch,)` class ids in `[0, num_labels)` (cross-entropy), or floats for regression
            (`num_labels == 1`) / multi-label classification (`(batch, num_labels)`), as `config.problem_type` says.
        """
        outputs = self.run_backbone(
            past_key_values, kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, num_hidden_layers=num_hidden_layers,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (`config.pad_token_id`).")
        if pad_token_id is None or input_ids is None:
            if pad_token_id is not None:
                logger.warning_once(
                    f"{self.__class__.__name__} will not detect padding tokens in `inputs_embeds`: it scores the last "
                    "position of every row."
                )
            last_non_pad_token = -1
        else:
            # To handle both left- and right- padding, take the rightmost token that is not equal to pad_token_id.
            non_pad_mask = (input_ids != pad_token_id).to(logits.device, torch.int32)
            token_indices = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_non_pad_token = (token_indices * non_pad_mask).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_non_pad_token]

        loss = None
        if labels is not None:
            labels = check_class_labels(labels, self.num_labels, batch_size)
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return RevFormerSequenceClassifierOutputWithPast(
            loss=self.task_loss(loss, outputs),
            logits=pooled_logits,
            **self.extra_outputs(outputs),
            **{CACHE_FIELD: output_cache(outputs)},
        )


class RevFormerForTokenClassification(RevFormerHeadModel):
    """Adapted from `transformers.modeling_layers.GenericForTokenClassification` (Llama's token classifier): a label
    score for every position (dropout `config.classifier_dropout`, else `hidden_dropout`, then a linear layer).

    The backbone is causal, as Llama's: a position's score sees that token and the ones before it.
    """

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> RevFormerTokenClassifierOutput:
        """
        labels: `(batch, sequence)` class ids in `[0, num_labels)`; `-100` is ignored (padding, sub-word pieces).
        """
        outputs = self.run_backbone(
            past_key_values, kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, num_hidden_layers=num_hidden_layers,
        )
        hidden = outputs.last_hidden_state
        logits = self.score(self.dropout(hidden))
        loss = None
        if labels is not None:
            labels = check_labels(labels, self.num_labels, hidden.shape[:2], kind="class ids")
            loss = self.loss_function(logits, labels, self.config)
        return RevFormerTokenClassifierOutput(
            loss=self.task_loss(loss, outputs), logits=logits, **self.extra_outputs(outputs)
        )


class RevFormerForQuestionAnswering(RevFormerHeadModel):
    """Adapted from `transformers.modeling_layers.GenericForQuestionAnswering` (Llama's extractive QA head): start
    and end logits of the answer span at every position (`qa_outputs`, a linear layer to 2 scores).

    The backbone is causal, as Llama's: put the question before the context so every context token can see it.
    """

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_hidden_layers: int | None = None,
        **kwargs: Any,
    ) -> RevFormerQuestionAnsweringModelOutput:
        """
        start_positions, end_positions: `(batch,)` token indices of the answer span (both or neither); positions
            outside the sequence are ignored by the loss, as in transformers.
        """
        outputs = self.run_backbone(
            past_key_values, kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, num_hidden_layers=num_hidden_layers,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("Pass both `start_positions` and `end_positions` (the answer span), or neither.")
        if start_positions is not None:
            batch = start_logits.shape[0]
            start_positions = check_span_positions(start_positions, batch, "start_positions")
            end_positions = check_span_positions(end_positions, batch, "end_positions")
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        return RevFormerQuestionAnsweringModelOutput(
            loss=self.task_loss(loss, outputs),
            start_logits=start_logits,
            end_logits=end_logits,
            **self.extra_outputs(outputs),
        )


# `Trainer` smooths labels (`label_smoothing_factor`) on shifted targets only for the classes named in this static
# table (docs/design.md §8); registering with `AutoModelForCausalLM.register` does not add to it. Listing the causal LM
# here, when its module is imported (package or remote code, PEFT-wrapped or not), makes the Trainer shift.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(RevFormerConfig.model_type, RevFormerForCausalLM.__name__)

__all__ = [
    "RevFormerPreTrainedModel",
    "RevFormerModel",
    "RevFormerForCausalLM",
    "RevFormerForSequenceClassification",
    "RevFormerForTokenClassification",
    "RevFormerForQuestionAnswering",
]
