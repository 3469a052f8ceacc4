"""Tiny random-weight models of the four families `make_reversible` supports (shared by tests and test workers)."""

from __future__ import annotations

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
