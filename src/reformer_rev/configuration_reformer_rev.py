"""Configuration of the reversible Transformer family (`model_type="reformer_rev"`).

Field names follow the conventions of `transformers` (Llama/Mistral) so that tooling which reads
`hidden_size`, `num_hidden_layers`, `num_key_value_heads` ... works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from .couplings import SUPPORTED_COUPLINGS
from .deq import SUPPORTED_BACKWARDS as SUPPORTED_DEQ_BACKWARDS
from .deq import SUPPORTED_SOLVERS as SUPPORTED_DEQ_SOLVERS
from .stack import SUPPORTED_DEPTH_MODES

# Activations usable as the gate of the gated (GLU-style) feed-forward.
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# Depth-stable scaling of every residual branch (`RevFormerBlock.scale_branch`, docs/depth.md).
SUPPORTED_BRANCH_SCALES = (None, "none", "inv_sqrt_depth", "learnable_gate")


MODEL_TYPE = "reformer_rev"
# What an encoder-decoder config reports as its `model_type` (config.json and the class keep `MODEL_TYPE`).
SEQ2SEQ_MODEL_TYPE = "reformer_rev_seq2seq"


class _ModelType:
    """`RevFormerConfig.model_type`: `"reformer_rev"` on the class (Auto registration, `config.json`, the type check
    of `from_dict`), and on an instance too -- unless it configures the encoder-decoder, which reports
    `"reformer_rev_seq2seq"`.

    Tools that tell causal from sequence-to-sequence models by the config's `model_type` alone need the two apart:
    lm-evaluation-harness's `HFLM` picks its backend by looking the instance's `model_type` up in transformers'
    `MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`, then `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (both filled in below).
    One config class serves both architectures here, so the instance answers by `is_encoder_decoder`.
    """

    def __get__(self, config: Any, owner: type) -> str:
        if config is not None and config.__dict__.get("is_encoder_decoder", False):
            return SEQ2SEQ_MODEL_TYPE
        return MODEL_TYPE

    def __set__(self, config: Any, value: Any) -> None:
        # A data descriptor, so that the `model_type` key of a loaded config.json (set as an attribute by
        # `PretrainedConfig.__init__`) does not shadow it; the value is derived, never stored.
        if value not in (MODEL_TYPE, SEQ2SEQ_MODEL_TYPE):
            raise ValueError(f"`model_type` of a {type(config).__name__} is {MODEL_TYPE!r}, got {value!r}.")


# `chunk_size_feed_forward=None` / `loss_chunk_size=None` (the defaults): chunks of as many positions as keep one
# chunk's widest intermediate (FFN inner width, vocabulary) within 2^22 values (16 MB in float32), between 256 and 1024
# positions. Shorter sequences are not chunked, so memory stays flat at long sequence without any setting.
AUTO_CHUNK_VALUES = 2**22
AUTO_CHUNK_RANGE = (256, 1024)


def resolve_chunk_size(size: int | None, width: int) -> int:
    """The chunk length (positions) of a position-wise computation whose intermediate is `width` wide: `size` as
    configured (0 = no chunking), or the automatic choice for None (see `AUTO_CHUNK_VALUES`)."""
    if size is not None:
        return size
    low, high = AUTO_CHUNK_RANGE
    return max(low, min(high, AUTO_CHUNK_VALUES // width))


def supported_attention_implementations() -> tuple[str, ...]:
    """`"eager"` (in `modeling_reformer_rev.py`) and every implementation registered with transformers' attention
    interface (sdpa, flash, flex and any registered later); read at validation time so later registrations count."""
    return ("eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())


# --------------------------------------------------------------------------------------------------------------
# Validation tables: one rule per field, then the rules that relate several fields
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRule:
    """What one field accepts: `ok(value)`, and `allowed`, the words the error message uses for it."""

    ok: Callable[[Any], bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> FieldRule:
    def ok(v: Any) -> bool:
        return _is_number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return FieldRule(ok, f"a number in {interval}")


def _one_of(values: tuple) -> FieldRule:
    return FieldRule(lambda v: v in values, f"one of {values}")


def _optional(rule: FieldRule, meaning: str) -> FieldRule:
    return FieldRule(lambda v: v is None or rule.ok(v), f"None ({meaning}) or {rule.allowed}")


POSITIVE_INT = FieldRule(lambda v: _is_int(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT = FieldRule(lambda v: _is_int(v) and v >= 0, "a non-negative integer (0 disables it)")
POSITIVE_NUMBER = FieldRule(lambda v: _is_number(v) and v > 0, "a positive finite number")
NON_NEGATIVE_NUMBER = FieldRule(lambda v: _is_number(v) and v >= 0, "a non-negative finite number")
PROBABILITY = _number_in(0.0, 1.0, high_open=True)
BOOL = FieldRule(lambda v: isinstance(v, bool), "a bool")

FIELD_RULES: dict[str, FieldRule] = {
    "vocab_size": POSITIVE_INT,
    "hidden_size": POSITIVE_INT,
    "num_hidden_layers": POSITIVE_INT,
    "num_attention_heads": POSITIVE_INT,
    "num_key_value_heads": POSITIVE_INT,
    "intermediate_size": POSITIVE_INT,
    "hidden_act": _one_of(SUPPORTED_ACTIVATIONS),
    "max_position_embeddings": POSITIVE_INT,
    "rope_theta": POSITIVE_NUMBER,
    "attention_dropout": PROBABILITY,
    "hidden_dropout": PROBABILITY,
    "initializer_range": NON_NEGATIVE_NUMBER,
    "rms_norm_eps": POSITIVE_NUMBER,
    "attention_bias": BOOL,
    "mlp_bias": BOOL,
    "tie_word_embeddings": BOOL,
    "use_cache": BOOL,
    "reversible": BOOL,
    "chunk_size_feed_forward": _optional(NON_NEGATIVE_INT, "chosen automatically"),
    "loss_chunk_size": _optional(NON_NEGATIVE_INT, "chosen automatically"),
    "is_encoder_decoder": BOOL,
    "encoder_layers": POSITIVE_INT,
    "decoder_layers": POSITIVE_INT,
    "coupling": _one_of(SUPPORTED_COUPLINGS),
    "coupling_step_size": POSITIVE_NUMBER,
    "momentum_gamma": _number_in(0.001, 0.999),
    "exact_reversal": FieldRule(lambda v: isinstance(v, bool) or v == "auto", "True, False or 'auto'"),
    "fixed_point_scale_bits": FieldRule(lambda v: _is_int(v) and 8 <= v <= 56, "an integer in [8, 56]"),
    "stream_checkpoint_every": NON_NEGATIVE_INT,
    "branch_scale": _one_of(SUPPORTED_BRANCH_SCALES),
    "debug_reversal_drift": BOOL,
    "num_unique_layers": _optional(POSITIVE_INT, "all blocks distinct"),
    "depth_mode": _one_of(SUPPORTED_DEPTH_MODES),
    "deq_solver": _one_of(SUPPORTED_DEQ_SOLVERS),
    "deq_max_iter": POSITIVE_INT,
    "deq_tol": _number_in(0.0, 1.0, low_open=True, high_open=True),
    "deq_backward": _one_of(SUPPORTED_DEQ_BACKWARDS),
    "deq_phantom_steps": POSITIVE_INT,
    "deq_damping": _number_in(0.0, 1.0, low_open=True),
    "deq_jacobian_reg": NON_NEGATIVE_NUMBER,
}


def _token_id_in_vocab(name: str) -> tuple[str, Callable, Callable]:
    return (
        name,
        lambda c: getattr(c, name) is None or (_is_int(getattr(c, name)) and 0 <= getattr(c, name) < c.vocab_size),
        lambda c: f"must be None or in [0, vocab_size={c.vocab_size}), got {getattr(c, name)!r}.",
    )


# Depths beyond these are mistakes (a typo, a corrupted config.json), not models: building 10**9 blocks would run for
# hours and exhaust any memory before failing. Deeper weight-tied models cycle `num_unique_layers` distinct blocks.
MAX_DISTINCT_LAYERS = 16384
MAX_APPLIED_LAYERS = 2**20


def _stack_depths(c: RevFormerConfig) -> dict[str, int]:
    """The depth fields of the stacks the config builds (both stacks of an encoder-decoder)."""
    if c.is_encoder_decoder:
        return {"encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers}
    return {"num_hidden_layers": c.num_hidden_layers}


def _deq_ignores(name: str, what: str) -> tuple[str, Callable, Callable]:
    """A reversible-backward option that a deep equilibrium (implicit gradient, no reconstruction) cannot honour.
    Its default (falsy, or `"auto"` for `exact_reversal`) is fine: it only switches things on for explicit stacks."""
    return (
        name,
        lambda c: c.depth_mode != "deq" or not getattr(c, name) or getattr(c, name) == "auto",
        lambda c: f"is {getattr(c, name)!r}, but it {what}, and `depth_mode='deq'` differentiates implicitly at the "
        "fixed point and reconstructs nothing. Leave it at its default with DEQ.",
    )


# (field, holds(config), message(config)): checked after every field passed its own rule.
RELATIONS: tuple[tuple[str, Callable[[Any], bool], Callable[[Any], str]], ...] = (
    (
        "hidden_size",
        lambda c: c.hidden_size % c.num_attention_heads == 0,
        lambda c: f"({c.hidden_size}) must be divisible by `num_attention_heads` ({c.num_attention_heads}).",
    ),
    (
        "hidden_size",
        lambda c: c.head_dim % 2 == 0,
        lambda c: f"/ `num_attention_heads` = {c.head_dim} must be even for rotary embeddings.",
    ),
    (
        "num_key_value_heads",
        lambda c: c.num_attention_heads % c.num_key_value_heads == 0,
        lambda c: f"({c.num_key_value_heads}) must divide `num_attention_heads` ({c.num_attention_heads}).",
    ),
    _token_id_in_vocab("pad_token_id"),
    _token_id_in_vocab("bos_token_id"),
    _token_id_in_vocab("decoder_start_token_id"),
    (
        "eos_token_id",
        lambda c: c.eos_token_id is None or all(
            _is_int(i) and 0 <= i < c.vocab_size
            for i in (c.eos_token_id if isinstance(c.eos_token_id, (list, tuple)) else [c.eos_token_id])
        ),
        lambda c: f"must be None, or a token id or list of ids in [0, vocab_size={c.vocab_size}), "
        f"got {c.eos_token_id!r}.",
    ),
    (
        "num_unique_layers",
        lambda c: c.depth_mode != "stack" or c.num_unique_layers is None
        or all(c.num_unique_layers <= d for d in _stack_depths(c).values()),
        lambda c: f"({c.num_unique_layers}) must not exceed the depth of the stack ("
        + ", ".join(f"`{k}`={v}" for k, v in _stack_depths(c).items())
        + "): blocks that are never applied would be unused parameters.",
    ),
    (
        "num_hidden_layers",
        lambda c: all(d <= MAX_APPLIED_LAYERS for d in _stack_depths(c).values())
        and all(min(d, c.num_unique_layers or d) <= MAX_DISTINCT_LAYERS for d in _stack_depths(c).values()),
        lambda c: ("(" + ", ".join(f"`{k}`={v}" for k, v in _stack_depths(c).items()) + ")"
                   if c.is_encoder_decoder else f"({c.num_hidden_layers})")
        + f" is beyond what this model can build or run: at most {MAX_DISTINCT_LAYERS} distinct blocks per stack "
        f"(more with `num_unique_layers`, weight tying) and {MAX_APPLIED_LAYERS} applied layers.",
    ),
    _deq_ignores("exact_reversal", "makes the reversible backward of an explicit stack bit-exact"),
    _deq_ignores("stream_checkpoint_every", "guards the reconstruction of an explicit stack"),
    _deq_ignores("debug_reversal_drift", "measures the reconstruction of an explicit stack"),
)


class RevFormerConfig(PretrainedConfig):
    r"""
    Configuration for [`RevFormerModel`] and [`RevFormerForCausalLM`].

    A reversible Transformer keeps two residual streams `(x1, x2)` of width `hidden_size`. Each block applies
    `y1 = x1 + Attention(x2)` and `y2 = x2 + FeedForward(y1)`; the backward pass reconstructs every block's inputs
    from its outputs instead of storing them, so activation memory does not grow with `num_hidden_layers`.

    Args:
        vocab_size: Number of tokens in the vocabulary.
        hidden_size: Width of each of the two residual streams.
        num_hidden_layers: Number of reversible blocks (one attention + one feed-forward sub-block each).
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention). Defaults to `num_attention_heads`.
        intermediate_size: Inner width of the gated feed-forward.
        hidden_act: Gate activation of the feed-forward, one of `SUPPORTED_ACTIVATIONS`.
        max_position_embeddings: Longest sequence (prompt + generated tokens) the model accepts.
        rope_theta: Base of the rotary position embedding; larger values suit longer contexts.
        attention_dropout: Dropout on attention probabilities (training only).
        hidden_dropout: Dropout on the output of every attention and feed-forward sub-block (training only).
        initializer_range: Standard deviation of the normal initialisation of linear and embedding weights.
        rms_norm_eps: Epsilon of the RMSNorm layers.
        attention_bias / mlp_bias: Whether the projections carry biases.
        tie_word_embeddings: Share the input embedding matrix with the LM head.
        use_cache: Return key/value caches for fast generation.
        reversible: `True` runs the memory-saving recomputing backward; `False` runs the very same modules as an
            ordinary autograd stack (the "twin" used for gradient checks and speed ratios).
        chunk_size_feed_forward: The feed-forward runs over sequence chunks of this many positions, in the forward
            and in the recomputing backward, bounding its `(sequence x intermediate_size)` activations. `None` (the
            default) chooses it: chunks whose intermediate holds at most 2^22 values, between 256 and 1024 positions
            (`resolve_chunk_size`), so raising the sequence length keeps memory flat without any setting. 0 disables
            chunking.
        loss_chunk_size: When `labels` are given, the LM head and cross-entropy run over chunks of this many
            positions and are recomputed in backward, so the `(sequence x vocab)` logits are never materialised in
            training. `None` (the default) chooses it as for the feed-forward, from `vocab_size`. 0 computes the loss
            over full logits.
        is_encoder_decoder: `True` for the sequence-to-sequence model (`RevFormerForConditionalGeneration`).
        encoder_layers / decoder_layers: Depth of the reversible encoder and decoder stacks of the sequence-to-sequence
            model. Default to `num_hidden_layers`; unused by the decoder-only models.
        decoder_start_token_id: First token fed to the decoder (sequence-to-sequence model); defaults to
            `bos_token_id` when `is_encoder_decoder`.
        coupling: How the two streams are coupled (see `docs/depth.md`): `"additive"` (`y1 = x1 + F(x2)`,
            `y2 = x2 + G(y1)`), `"momentum"` (Momentum ResNet: streams are position and velocity, `v <- gamma v +
            (1 - gamma) F(x)`, `x <- x + v`) or `"leapfrog"` (second-order network `y_{j+1} = 2 y_j - y_{j-1} +
            h^2 F(y_j)`).
        coupling_step_size: Step size `h` of the leapfrog coupling.
        momentum_gamma: Velocity decay `gamma` in (0, 1) of the momentum coupling (used as the nearest fraction n/d
            with d <= 1024).
        exact_reversal: `True`: hold the streams as int64 fixed point and round every F/G output onto that grid, so
            the backward reconstructs every block's inputs bit for bit in any compute dtype (gradients treat the
            rounding as the identity); needed by `"momentum"` at depth, whose float inverse amplifies rounding by
            1/gamma. `False`: float streams. `"auto"` (default): exact when the stack computes in half precision
            (bf16/fp16 weights, or autocast to a half dtype), where float reversal drifts (docs/precision.md), with the
            scale chosen from the input magnitude; float in fp32/fp64, where it is measured to be accurate.
        fixed_point_scale_bits: Fractional bits of the fixed-point streams when `exact_reversal=True` (resolution
            2^-bits, range +-2^(62-bits)).
        stream_checkpoint_every: Drift guard for float streams: keep an exact copy of the streams every this many
            blocks and restore it in backward (0 disables; costs `2 * layers / k` stream copies).
        branch_scale: Depth-stable scaling of every F/G output: `None`/`"none"`, `"inv_sqrt_depth"` (times
            `1/sqrt(num_hidden_layers)`) or `"learnable_gate"` (a scalar gate per branch, initialised at 0).
        debug_reversal_drift: Measure the reconstruction error of every block in backward and keep it in
            `model.last_drift_report` (the forward then stores every block's inputs: memory grows with depth).
        num_unique_layers: Weight tying in depth (`docs/infinite_depth.md`): build only this many distinct blocks and
            cycle through them for the `num_hidden_layers` applications (`None` = all distinct). The number of applied
            layers can then be changed at inference (`model(..., num_hidden_layers=n)` or by setting
            `model.config.num_hidden_layers`).
        depth_mode: `"stack"` (apply the blocks `num_hidden_layers` times) or `"deq"` (deep equilibrium: solve for the
            fixed point `h* = x + R(h*)` of the weight-tied block group, `R` = the group's residual update, `x` = the
            input injection, and differentiate implicitly; activation memory independent of the solver iterations).
        deq_solver: `"anderson"` or `"fixed_point"` (damped Picard iteration); the solver state is kept in float32.
        deq_max_iter / deq_tol: Solver limits: at most this many applications of the group, stop when the relative
            residual `||f(h) - h|| / ||f(h)||` of every sequence is `<= deq_tol`. Also used by the adjoint solve.
        deq_backward: `"implicit"` (solve the adjoint fixed point) or `"phantom"` (back-propagate through
            `deq_phantom_steps` damped steps from the fixed point).
        deq_phantom_steps: Unrolled steps of the phantom gradient.
        deq_damping: Damping `tau` in (0, 1] of the Picard iteration, Anderson mixing and phantom steps (1 = none).
        deq_jacobian_reg: Weight of the Jacobian regulariser (Hutchinson estimate of `||J_f||_F^2 / n` at the fixed
            point) added to the LM loss during training; 0 disables it.
    """

    model_type = _ModelType()
    # The cache field's name in outputs before and from transformers 5.24: the Trainer leaves both out of predictions.
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 260,
        hidden_size: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 1536,
        hidden_act: str = "silu",
        max_position_embeddings: int = 65536,
        rope_theta: float = 500000.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        use_cache: bool = True,
        reversible: bool = True,
        chunk_size_feed_forward: int | None = None,
        loss_chunk_size: int | None = None,
        is_encoder_decoder: bool = False,
        encoder_layers: int | None = None,
        decoder_layers: int | None = None,
        decoder_start_token_id: int | None = None,
        coupling: str = "additive",
        coupling_step_size: float = 1.0,
        momentum_gamma: float = 0.9,
        exact_reversal: bool | str = "auto",
        fixed_point_scale_bits: int = 32,
        stream_checkpoint_every: int = 0,
        branch_scale: str | None = None,
        debug_reversal_drift: bool = False,
        num_unique_layers: int | None = None,
        depth_mode: str = "stack",
        deq_solver: str = "anderson",
        deq_max_iter: int = 40,
        deq_tol: float = 1e-3,
        deq_backward: str = "implicit",
        deq_phantom_steps: int = 5,
        deq_damping: float = 1.0,
        deq_jacobian_reg: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.use_cache = use_cache
        self.reversible = reversible
        self.loss_chunk_size = loss_chunk_size
        self.encoder_layers = num_hidden_layers if encoder_layers is None else encoder_layers
        self.decoder_layers = num_hidden_layers if decoder_layers is None else decoder_layers
        if decoder_start_token_id is None and is_encoder_decoder:
            decoder_start_token_id = bos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.coupling = coupling
        self.coupling_step_size = coupling_step_size
        self.momentum_gamma = momentum_gamma
        self.exact_reversal = exact_reversal
        self.fixed_point_scale_bits = fixed_point_scale_bits
        self.stream_checkpoint_every = stream_checkpoint_every
        self.branch_scale = branch_scale
        self.debug_reversal_drift = debug_reversal_drift
        self.num_unique_layers = num_unique_layers
        self.depth_mode = depth_mode
        self.deq_solver = deq_solver
        self.deq_max_iter = deq_max_iter
        self.deq_tol = deq_tol
        self.deq_backward = deq_backward
        self.deq_phantom_steps = deq_phantom_steps
        self.deq_damping = deq_damping
        self.deq_jacobian_reg = deq_jacobian_reg
        self.chunk_size_feed_forward = chunk_size_feed_forward
        self.is_encoder_decoder = is_encoder_decoder
        # Before transformers' own validators, which fail on a wrongly typed field with an unrelated TypeError.
        self._validate_fields()
        super().__init__(
            chunk_size_feed_forward=chunk_size_feed_forward, is_encoder_decoder=is_encoder_decoder, **kwargs
        )
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "RevFormerConfig":
        """Refuse a config written for another architecture instead of building a model with random weights."""
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"This checkpoint's config.json has model_type={model_type!r}; {cls.__name__} expects "
                f"{cls.model_type!r}. Load it with the matching Auto class instead."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise `ValueError` naming the offending field and what is allowed (`FIELD_RULES`, then `RELATIONS`)."""
        self._validate_fields()
        attn = self._attn_implementation
        allowed = supported_attention_implementations()
        if attn is not None and attn not in allowed:
            raise ValueError(f"`attn_implementation` must be one of {allowed}, got {attn!r}.")

    def _validate_fields(self) -> None:
        for name, rule in FIELD_RULES.items():
            value = getattr(self, name)
            if not rule.ok(value):
                raise ValueError(f"`{name}` must be {rule.allowed}, got {value!r}.")
        for name, holds, message in RELATIONS:
            if not holds(self):
                raise ValueError(f"`{name}` {message(self)}")



# transformers declares `chunk_size_feed_forward: int` and its `@strict` dataclass checks that type on every assignment
# (transformers 5.15 with huggingface_hub 1.x; 5.24 declares the type as a string the check skips). Here `None`, the
# default, means "chosen from the sequence length", so this class checks the field with its own rule (FIELD_RULES)
# instead of the inherited type check.
RevFormerConfig.__validators__ = {**getattr(PretrainedConfig, "__validators__", {}), "chunk_size_feed_forward": []}

# transformers' static name tables, read by model type (lm-evaluation-harness's backend choice, pipelines' model-class
# checks). Filled here, when the config is imported, because lm_eval reads them before it loads the model (remote code
# included). The causal LM's entry is also what makes `Trainer` shift smoothed labels (modeling_reformer_rev.py).
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MODEL_TYPE, "RevFormerForCausalLM")
MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.setdefault(SEQ2SEQ_MODEL_TYPE, "RevFormerForConditionalGeneration")

__all__ = ["RevFormerConfig"]
