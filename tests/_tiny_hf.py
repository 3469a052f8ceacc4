"""Tiny random-weight models of the families `make_reversible` supports (shared by tests and test workers)."""

from __future__ import annotations

import textwrap

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 64


def tiny_model(
    family: str, depth: int = 3, dropout: float = 0.0, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides
):
    """A small causal LM with random weights. `dropout` goes into every dropout the family has (GPT-2: embedding,
    attention and residual; the Llama family: attention only). Qwen2 gets sliding-window attention from layer 1 on
    and Mistral on every layer (window 6), so the layers receive different masks."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        overrides.setdefault("n_positions", 128)
        config = GPT2Config(
            n_embd=32, n_layer=depth, n_head=4, attn_pdrop=dropout, resid_pdrop=dropout,
            embd_pdrop=dropout, **common, **overrides,
        )
        return GPT2LMHeadModel(config).to(dtype)
    overrides.setdefault("max_position_embeddings", 128)
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
        attention_dropout=dropout, **common,
    )
    if family == "llama":
        config = LlamaConfig(**llama_like, **overrides)
        return LlamaForCausalLM(config).to(dtype)
    if family == "qwen2":
        config = Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=6, max_window_layers=1, **overrides)
        return Qwen2ForCausalLM(config).to(dtype)
    if family == "mistral":
        config = MistralConfig(**llama_like, sliding_window=6, **overrides)
        return MistralForCausalLM(config).to(dtype)
    raise ValueError(family)


def random_ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


# Every family `make_reversible` supports (conversion_families.SUPPORTED_FAMILIES), by model_type, with the family's
# distinguishing features switched on: sliding-window layers (own masks), Gemma's soft-capping and local/global rotary
# tables, Granite's multipliers, Phi-3's branch dropouts, SmolLM3's NoPE layers, a MoE block with a dense layer.
ALL_FAMILIES = (
    "llama", "qwen2", "mistral", "gpt2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2", "granite",
    "smollm3", "cohere2", "gemma", "mixtral", "olmo3", "cohere", "phi", "gptj",
)
# Mixture-of-experts families: float64 on CPU needs the eager experts kernel (grouped_mm has no float64).
MOE_FAMILIES = ("qwen3_moe", "mixtral")
# Gemma 2/3 give NaN with left padding even in plain transformers (a padded query row with no visible key).
NO_LEFT_PADDING = ("gemma2", "gemma3_text")


def _family_config(model_type: str, depth: int, dropout: float):
    from transformers import AutoConfig

    alternating = [("sliding_attention", "full_attention")[i % 2] for i in range(depth)]
    if model_type == "gptj":
        return AutoConfig.for_model(
            "gptj", n_embd=32, n_layer=depth, n_head=4, rotary_dim=4, n_positions=128, vocab_size=VOCAB,
            resid_pdrop=dropout, attn_pdrop=dropout, embd_pdrop=dropout, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    common = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attention_dropout=dropout,
    )
    extra = {
        "qwen3": dict(head_dim=8, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          decoder_sparse_step=1, mlp_only_layers=[1]),
        "gemma2": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=6, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
        "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=6, layer_types=alternating,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "phi3": dict(resid_pdrop=dropout, embd_pdrop=dropout, sliding_window=6),
        "olmo2": {},
        "granite": dict(
            residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.3, logits_scaling=4.0
        ),
        "smollm3": dict(use_sliding_window=True, sliding_window=6, layer_types=alternating, no_rope_layer_interval=2),
        "cohere2": dict(sliding_window=6, layer_types=alternating, logit_scale=0.5),
        "gemma": dict(head_dim=8),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
        "olmo3": dict(sliding_window=6, layer_types=alternating),
        "cohere": dict(logit_scale=0.5, use_qk_norm=True),
        "phi": dict(resid_pdrop=dropout, embd_pdrop=dropout, qk_layernorm=True, partial_rotary_factor=0.5),
    }[model_type]
    return AutoConfig.for_model(model_type, **common, **extra)


def family_model(
    model_type: str, depth: int = 3, dropout: float = 0.0, dtype: torch.dtype = torch.float64, seed: int = 0
):
    """A tiny random causal LM of any supported family, its norm weights randomised (they initialise to 1 or 0, which
    would hide a missing or swapped norm). MoE experts run eagerly (the grouped kernel has no float64 on CPU)."""
    from transformers import AutoModelForCausalLM

    if model_type in FAMILIES:
        model = tiny_model(model_type, depth=depth, dropout=dropout, dtype=dtype, seed=seed)
    else:
        torch.manual_seed(seed)
        extra = {"experts_implementation": "eager"} if model_type in MOE_FAMILIES else {}
        attn = "eager" if model_type in ("gemma2", "gemma3_text") else "sdpa"  # soft-capping needs eager attention
        model = AutoModelForCausalLM.from_config(
            _family_config(model_type, depth, dropout), dtype=dtype, attn_implementation=attn, **extra
        )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# Run in a subprocess: loads each checkpoint folder given on the command line with plain transformers, in a process
# where `import reformer_rev` fails, and prints one JSON line per folder: its class, whether its logits on the saved
# `ids.pt` equal the saved `logits.pt`, and whether reformer_rev was importable. A folder's optional
# `load_kwargs.json` adds `from_pretrained` arguments that are not part of a checkpoint (MoE experts implementation).
LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["reformer_rev"] = None  # `import reformer_rev` now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM
    for path in sys.argv[1:]:
        extra = os.path.join(path, "load_kwargs.json")
        kwargs = json.load(open(extra)) if os.path.exists(extra) else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **kwargs).eval()
        ids = torch.load(path + "/ids.pt")
        ref = torch.load(path + "/logits.pt")
        logits = model(ids).logits
        try:
            import reformer_rev  # noqa: F401
            importable = True
        except ImportError:
            importable = False
        print(json.dumps({"class": type(model).__name__, "equal": bool(torch.equal(logits, ref)),
                          "reformer_rev_importable": importable}))
    """
)


def lora_model(base, lora_config):
    """`get_peft_model` with a seeded initialisation and non-zero B matrices (so every adapter's A gets a gradient)."""
    from peft import get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(base, lora_config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def twin_trainable_errors(models, ids, mask, labels, seed: int = 13) -> tuple[float, float]:
    """One backward of each of (reversible, twin) on the same batch and seed: (|loss difference|, largest relative
    difference of a trainable parameter's gradient). Every trainable parameter must have a gradient."""
    losses = []
    for m in models:
        torch.manual_seed(seed)
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    trainable = [(n, p, q) for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters())
                 if p.requires_grad]
    assert trainable, "no trainable parameters"
    for n, p, q in trainable:
        assert p.grad is not None and q.grad is not None, f"missing gradient for {n}"
    worst = max(((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item() for _, p, q in trainable)
    return abs(losses[0] - losses[1]), worst
