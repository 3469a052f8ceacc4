"""Configuration of the reversible Transformer family (`model_type="reformer_rev"`).

Field names follow the conventions of `transformers` (Llama/Mistral) so that tooling which reads
`hidden_size`, `num_hidden_layers`, `num_key_value_heads` ... works unchanged.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Activations usable as the gate of the gated (GLU-style) feed-forward.
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SUPPORTED_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
SUPPORTED_COUPLINGS = ("additive", "momentum", "leapfrog")
SUPPORTED_BRANCH_SCALES = (None, "none", "inv_sqrt_depth", "learnable_gate")
SUPPORTED_DEPTH_MODES = ("stack", "deq")
SUPPORTED_DEQ_SOLVERS = ("fixed_point", "anderson")
SUPPORTED_DEQ_BACKWARDS = ("implicit", "phantom")


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
        chunk_size_feed_forward: If > 0, the feed-forward runs over sequence chunks of this many positions, in the
            forward and in the recomputing backward, bounding its intermediate activations. 0 disables chunking.
        loss_chunk_size: When `labels` are given, the LM head and cross-entropy run over chunks of this many
            positions and are recomputed in backward, so the `(sequence x vocab)` logits are never materialised.
            0 computes the loss over full logits.
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

    model_type = "reformer_rev"
    keys_to_ignore_at_inference = ["past_key_values"]

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
        chunk_size_feed_forward: int = 0,
        loss_chunk_size: int = 1024,
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
        super().__init__(chunk_size_feed_forward=chunk_size_feed_forward, is_encoder_decoder=is_encoder_decoder, **kwargs)
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
        """Raise `ValueError` naming the offending field and what is allowed."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        def non_negative_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer (0 disables it), got {value!r}.")

        def probability(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}.")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "encoder_layers",
            "decoder_layers",
        ):
            positive_int(name)
        for name in ("chunk_size_feed_forward", "loss_chunk_size"):
            non_negative_int(name)
        for name in ("attention_dropout", "hidden_dropout"):
            probability(name)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"`hidden_size / num_attention_heads` = {self.head_dim} must be even for rotary embeddings."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"`hidden_act` must be one of {SUPPORTED_ACTIVATIONS}, got {self.hidden_act!r}.")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or self.rope_theta <= 0:
            raise ValueError(f"`rope_theta` must be a positive number, got {self.rope_theta!r}.")
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            raise ValueError(f"`rms_norm_eps` must be a positive number, got {self.rms_norm_eps!r}.")
        if not isinstance(self.reversible, bool):
            raise ValueError(f"`reversible` must be a bool, got {self.reversible!r}.")
        if not isinstance(self.is_encoder_decoder, bool):
            raise ValueError(f"`is_encoder_decoder` must be a bool, got {self.is_encoder_decoder!r}.")
        for name in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"`{name}` must be None or in [0, vocab_size={self.vocab_size}), got {value!r}.")
        self._validate_depth_options()
        self._validate_infinite_depth_options()
        attn = getattr(self, "_attn_implementation", None)
        if attn is not None and attn not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"`attn_implementation` must be one of {SUPPORTED_ATTENTION_IMPLEMENTATIONS}, got {attn!r}."
            )

    def _validate_depth_options(self) -> None:
        """Coupling, exact reversal, drift guard and branch scaling fields (`docs/depth.md`)."""
        if self.coupling not in SUPPORTED_COUPLINGS:
            raise ValueError(f"`coupling` must be one of {SUPPORTED_COUPLINGS}, got {self.coupling!r}.")
        h = self.coupling_step_size
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h < float("inf"):
            raise ValueError(f"`coupling_step_size` must be a positive finite number, got {h!r}.")
        gamma = self.momentum_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 1e-3 <= gamma <= 1 - 1e-3:
            raise ValueError(f"`momentum_gamma` must be a float in [0.001, 0.999], got {gamma!r}.")
        if not (isinstance(self.exact_reversal, bool) or self.exact_reversal == "auto"):
            raise ValueError(f"`exact_reversal` must be True, False or 'auto', got {self.exact_reversal!r}.")
        for name in ("debug_reversal_drift",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        bits = self.fixed_point_scale_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 56:
            raise ValueError(f"`fixed_point_scale_bits` must be an integer in [8, 56], got {bits!r}.")
        k = self.stream_checkpoint_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"`stream_checkpoint_every` must be a non-negative integer (0 disables it), got {k!r}.")
        if self.branch_scale not in SUPPORTED_BRANCH_SCALES:
            raise ValueError(f"`branch_scale` must be one of {SUPPORTED_BRANCH_SCALES}, got {self.branch_scale!r}.")

    def _validate_infinite_depth_options(self) -> None:
        """Weight tying and deep-equilibrium fields (`docs/infinite_depth.md`)."""
        unique = self.num_unique_layers
        if unique is not None and (isinstance(unique, bool) or not isinstance(unique, int) or unique <= 0):
            raise ValueError(f"`num_unique_layers` must be None or a positive integer, got {unique!r}.")
        if unique is not None and unique > self.num_hidden_layers and self.depth_mode == "stack":
            raise ValueError(
                f"`num_unique_layers` ({unique}) must not exceed `num_hidden_layers` ({self.num_hidden_layers}): "
                "blocks that are never applied would be unused parameters."
            )
        if self.depth_mode not in SUPPORTED_DEPTH_MODES:
            raise ValueError(f"`depth_mode` must be one of {SUPPORTED_DEPTH_MODES}, got {self.depth_mode!r}.")
        if self.deq_solver not in SUPPORTED_DEQ_SOLVERS:
            raise ValueError(f"`deq_solver` must be one of {SUPPORTED_DEQ_SOLVERS}, got {self.deq_solver!r}.")
        if self.deq_backward not in SUPPORTED_DEQ_BACKWARDS:
            raise ValueError(f"`deq_backward` must be one of {SUPPORTED_DEQ_BACKWARDS}, got {self.deq_backward!r}.")
        for name in ("deq_max_iter", "deq_phantom_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        tol = self.deq_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ValueError(f"`deq_tol` must be a float in (0, 1), got {tol!r}.")
        tau = self.deq_damping
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
            raise ValueError(f"`deq_damping` must be a float in (0, 1], got {tau!r}.")
        reg = self.deq_jacobian_reg
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not 0 <= reg < float("inf"):
            raise ValueError(f"`deq_jacobian_reg` must be a non-negative finite number, got {reg!r}.")


__all__ = ["RevFormerConfig", "SUPPORTED_ACTIVATIONS", "SUPPORTED_ATTENTION_IMPLEMENTATIONS", "SUPPORTED_COUPLINGS"]
