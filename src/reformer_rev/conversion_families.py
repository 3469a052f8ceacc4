"""Which `transformers` decoder families `make_reversible` converts, described by structure (docs/pretrained.md).

A decoder layer that `make_reversible` can run reversibly is a sequence of residual sub-layers `x <- x + b(x)`, and
in every supported family each residual branch has the form

    b(x) = scale * dropout(post_norm(module(pre_norm(x), **layer_kwargs)))

with any of `pre_norm`, `post_norm`, `dropout`, `scale` absent and only attention-like modules receiving the layer's
call arguments (mask, rotary tables, position ids). A family is then a table of attribute names (`BranchSpec` per
branch, `LayerSpec` per layer), not a class of code: Llama and Qwen3 differ only by what lives inside `self_attn`,
Gemma 2/3 add post-norms ("sandwich"), OLMo 2 drops the pre-norms, Granite multiplies both branches, Phi-3 applies a
dropout module to each branch output. A *parallel* layer (Cohere2: `x + attn(n(x)) + mlp(n(x))`) is one residual
sub-layer whose branch is the sum of its parts.

Every description was checked against the layer's own forward in transformers 5.25 by recomputing each layer from it
(max abs error 0.0 in eval and in training with dropout, same RNG state; /work/notes/families.md), and the tests
(`tests/test_families.py`) check every family end to end. Decoder-level features (embedding scaling, final norm,
logit soft-capping or scaling) sit outside the layer loop and need nothing here.

Families whose layers are *not* residual sub-layer sequences are refused with the reason (`REFUSED_MODEL_TYPES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


@dataclass(frozen=True)
class BranchSpec:
    """One residual branch of a decoder layer: `b(x) = scale * dropout(post_norm(module(pre_norm(x), **kw)))`.

    Every name is a (dotted) attribute of the layer. `takes_layer_kwargs`: the module is attention-like and gets the
    arguments the decoder passed to the layer (its output may be a tuple: the first element is the branch output);
    otherwise it gets the normed hidden state only and acts on every position independently (an MLP, a MoE block).
    """

    module: str
    pre_norm: str | None = None
    post_norm: str | None = None
    dropout: str | None = None  # an nn.Dropout of the layer applied to the branch output (Phi-3)
    scale: str | None = None  # a float (or tensor) attribute of the layer multiplying the branch output (Granite)
    takes_layer_kwargs: bool = False

    def module_names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.pre_norm, self.module, self.post_norm, self.dropout) if n is not None)


@dataclass(frozen=True)
class LayerSpec:
    """A decoder layer as residual sub-layers.

    `parallel=False`: `x <- x + b(x)` for each branch in order (one reversible sub-layer per branch).
    `parallel=True`: `x <- x + sum(b(x) for b in branches)`, every branch reading the layer input: one reversible
    sub-layer for the whole layer.
    """

    branches: tuple[BranchSpec, ...]
    parallel: bool = False
    # Parallel layers only: the layer adds its branch outputs together before the stream (`attn + mlp + residual`:
    # Phi, GPT-J), in the branches' dtype (bf16 under autocast); otherwise each is added to the stream in its precision
    # (`residual + attn + mlp`: Cohere). Matches the layer's rounding, not only its math.
    sum_branches_first: bool = False
    # Layer arguments the layer consumes itself (never forwarded to attention) that the conversion refuses when set,
    # with the sub-modules only they use (GPT-2's cross-attention).
    refused_args: tuple[str, ...] = ()
    refused_args_modules: tuple[str, ...] = ()

    def sublayers(self) -> tuple[tuple[BranchSpec, ...], ...]:
        """The residual sub-layers, each a tuple of the branches summed in it."""
        return (self.branches,) if self.parallel else tuple((b,) for b in self.branches)


@dataclass(frozen=True)
class FamilySpec:
    """Where a family's decoder loop and layers live, what its layers compute, in words for messages and docs."""

    layer: LayerSpec
    pattern: str
    decoder: str = "model"  # attribute of the causal LM: the module whose forward runs the layer loop
    layers: str = "layers"  # attribute of the decoder: the `ModuleList` of layers


def get_attr(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def branch_output(layer: nn.Module, branch: BranchSpec, x: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """`b(x)` of one branch of `layer` (sub-modules looked up at call time, so later PEFT adapters are used)."""
    h = get_attr(layer, branch.pre_norm)(x) if branch.pre_norm else x
    module = get_attr(layer, branch.module)
    out = module(h, **layer_kwargs) if branch.takes_layer_kwargs else module(h)
    if isinstance(out, tuple):  # attention: (output, weights); some MoE blocks: (output, router logits)
        out = out[0]
    if branch.post_norm:
        out = get_attr(layer, branch.post_norm)(out)
    if branch.dropout:
        out = get_attr(layer, branch.dropout)(out)
    if branch.scale:
        out = out * get_attr(layer, branch.scale)
    return out


# --------------------------------------------------------------------------------------------------------------
# The supported families
# --------------------------------------------------------------------------------------------------------------

_ATTN = BranchSpec("self_attn", "input_layernorm", takes_layer_kwargs=True)
_MLP = BranchSpec("mlp", "post_attention_layernorm")

PRE_NORM = LayerSpec((_ATTN, _MLP))
PRE_NORM_BRANCH_DROPOUT = LayerSpec((
    BranchSpec("self_attn", "input_layernorm", dropout="resid_attn_dropout", takes_layer_kwargs=True),
    BranchSpec("mlp", "post_attention_layernorm", dropout="resid_mlp_dropout"),
))
PRE_NORM_MULTIPLIER = LayerSpec((
    BranchSpec("self_attn", "input_layernorm", scale="residual_multiplier", takes_layer_kwargs=True),
    BranchSpec("mlp", "post_attention_layernorm", scale="residual_multiplier"),
))
SANDWICH = LayerSpec((
    BranchSpec("self_attn", "input_layernorm", "post_attention_layernorm", takes_layer_kwargs=True),
    BranchSpec("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
))
POST_NORM_IN_BRANCH = LayerSpec((
    BranchSpec("self_attn", post_norm="post_attention_layernorm", takes_layer_kwargs=True),
    BranchSpec("mlp", post_norm="post_feedforward_layernorm"),
))
PARALLEL_SHARED_NORM = LayerSpec((_ATTN, BranchSpec("mlp", "input_layernorm")), parallel=True)
PARALLEL_SHARED_NORM_DROPOUT = LayerSpec(
    (BranchSpec("self_attn", "input_layernorm", dropout="resid_dropout", takes_layer_kwargs=True),
     BranchSpec("mlp", "input_layernorm", dropout="resid_dropout")),
    parallel=True,
    sum_branches_first=True,
)
GPTJ_PARALLEL = LayerSpec(
    (BranchSpec("attn", "ln_1", takes_layer_kwargs=True), BranchSpec("mlp", "ln_1")),
    parallel=True,
    sum_branches_first=True,
)
GPT2_PRE_NORM = LayerSpec(
    (BranchSpec("attn", "ln_1", takes_layer_kwargs=True), BranchSpec("mlp", "ln_2")),
    refused_args=("encoder_hidden_states", "encoder_attention_mask"),
    refused_args_modules=("crossattention", "ln_cross_attn"),
)

_PRE = "pre-norm: x + attn(n1 x), then + mlp(n2 x)"
# Keyed by `config.model_type`; the class is `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]`. The first four are the
# families supported since the first release (their error message lists them first).
SUPPORTED_FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(PRE_NORM, _PRE),
    "qwen2": FamilySpec(PRE_NORM, _PRE + "; sliding-window layers get their own mask"),
    "mistral": FamilySpec(PRE_NORM, _PRE + "; sliding-window mask"),
    "gpt2": FamilySpec(GPT2_PRE_NORM, "pre-norm (ln_1/attn, ln_2/mlp); cross-attention refused", "transformer", "h"),
    "qwen3": FamilySpec(PRE_NORM, _PRE + "; q/k norms inside attention"),
    "qwen3_moe": FamilySpec(PRE_NORM, _PRE + "; the MLP is a sparse MoE block on most layers"),
    "gemma2": FamilySpec(SANDWICH, "sandwich: x + post_n(attn(pre_n x)), then + post_n(mlp(pre_n x))"),
    "gemma3_text": FamilySpec(SANDWICH, "sandwich (as Gemma 2); local and global layers get their own rotary table"),
    "phi3": FamilySpec(PRE_NORM_BRANCH_DROPOUT, "pre-norm, a dropout module on each branch output"),
    "olmo2": FamilySpec(POST_NORM_IN_BRANCH, "post-norm inside the branch: x + n(attn(x)), then + n(mlp(x))"),
    "granite": FamilySpec(PRE_NORM_MULTIPLIER, "pre-norm, both branches times residual_multiplier"),
    "smollm3": FamilySpec(PRE_NORM, _PRE + "; NoPE layers"),
    "cohere2": FamilySpec(PARALLEL_SHARED_NORM, "parallel: x + attn(n x) + mlp(n x), one residual sub-layer"),
    # Beyond the list: the same patterns, each tested like the others (tests/test_families.py).
    "gemma": FamilySpec(PRE_NORM, _PRE + "; Gemma RMSNorm (1 + w)"),
    "mixtral": FamilySpec(PRE_NORM, _PRE + "; the MLP is a sparse MoE block"),
    "olmo3": FamilySpec(POST_NORM_IN_BRANCH, "post-norm inside the branch (as OLMo 2); sliding-window layers"),
    "cohere": FamilySpec(PARALLEL_SHARED_NORM, "parallel: x + attn(n x) + mlp(n x) (as Cohere2)"),
    "phi": FamilySpec(PARALLEL_SHARED_NORM_DROPOUT, "parallel: x + drop(attn(n x)) + drop(mlp(n x))"),
    "gptj": FamilySpec(GPTJ_PARALLEL, "parallel: x + attn(ln_1 x) + mlp(ln_1 x)", "transformer", "h"),
}


def causal_lm_class_name(model_type: str) -> str:
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


# --------------------------------------------------------------------------------------------------------------
# Refusals: what blocks a layer that is not a sequence of residual sub-layers (families.md section 4)
# --------------------------------------------------------------------------------------------------------------

_POST_NORM_STREAM = "post-norm on the residual stream, x <- LN(x + b(x)), is not an additive update of the stream"
_AFFINE_STREAM = "the layer rescales or gates the stream itself (x <- a x + c b(x)), not an additive update"
_MULTI_STREAM = "several residual streams (hyper-connections / AltUp), not one stream of residual sub-layers"
_LAYER_STATE = "state passed from layer to layer besides the hidden state (top-k indices, shared KV or block states)"
_OTHER_INPUT = "a branch reads something other than the current stream (cross-attention, a shortcut or shared stack)"
_RECURRENT = "recurrent state threaded through the layer (or stacks looped several times per forward)"
_UNVERIFIED_MIXER = (
    "its token mixer is a state-space / linear-attention / recurrent kernel in some layers: the layers are residual "
    "sub-layers, but the determinism of those kernels across the reversible recompute (and their residual_in_fp32 "
    "streams) is not verified"
)

REFUSED_MODEL_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "rembert", "roberta",
         "roc_bert", "roformer", "xlm-roberta", "xmod", "git", "bart", "plbart", "marian", "mvp", "blenderbot-small",
         "trocr", "openai-gpt", "prophetnet", "xlm", "xlnet"),
        _POST_NORM_STREAM,
    ),
    **dict.fromkeys(("minimax", "doge", "beam", "ergo", "zaya", "dory", "gemma4", "gemma4_text"), _AFFINE_STREAM),
    **dict.fromkeys(("deepseek_v4", "hy_v4", "qwen4_exp", "qwen4_exp_text", "gemma3n", "gemma3n_text"), _MULTI_STREAM),
    **dict.fromkeys(("glm_moe_dsa", "kolibri1_1", "inkling2"), _LAYER_STATE),
    **dict.fromkeys(("longcat_flash", "zamba", "zamba2", "mllama", "blt"), _OTHER_INPUT),
    **dict.fromkeys(("rwkv", "xlstm", "hrm_text"), _RECURRENT),
    **dict.fromkeys(
        ("mamba", "mamba2", "falcon_mamba", "nemotron_h", "jamba", "bamba", "granitemoehybrid", "qwen3_next",
         "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "kimi_linear", "bailing_hybrid",
         "olmo_hybrid", "lfm2", "lfm2_moe", "recurrent_gemma", "falcon_h1"),
        _UNVERIFIED_MIXER,
    ),
    "reformer": "it is already reversible (two streams and its own recomputing backward)",
}


__all__ = [
    "BranchSpec",
    "LayerSpec",
    "FamilySpec",
    "SUPPORTED_FAMILIES",
    "REFUSED_MODEL_TYPES",
    "branch_output",
]
