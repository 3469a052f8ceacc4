"""Reversible encoder-decoder Transformer for `transformers` (translation, summarisation, any seq2seq task).

The encoder is a stack of the decoder-only model's `RevFormerBlock`s with bidirectional (padding-masked)
self-attention. A decoder block adds cross-attention to the residual function `f` of the other stream:

    f(x) = SelfAttn(norm(x)) + CrossAttn(norm(x + SelfAttn(norm(x))), encoder_output)
    g(x) = FeedForward(norm(x))

so `f` depends only on the other stream and on the (constant within the stack) encoder output, and the coupling
`y1 = x1 + f(x2)`, `y2 = x2 + g(y1)` stays exactly invertible. Both stacks run through the recomputing engine of
`reversible.py`; the encoder output enters the decoder stack as a differentiable argument whose gradient is
accumulated over all decoder blocks in the recomputing backward. `config.reversible = False` runs the very same modules
under plain autograd (the twin).

Blocks, attention, norms, masks, position handling, the stack runner and the chunked loss are those of
`modeling_reformer_rev`; this module only adds what an encoder-decoder needs. It imports only torch, transformers and
its flat siblings, so `save_pretrained` can copy it next to a checkpoint for `trust_remote_code=True` loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)

from .configuration_reformer_rev import RevFormerConfig
from .modeling_reformer_rev import (
    RevFormerAttention,
    RevFormerBlock,
    RevFormerPreTrainedModel,
    RevFormerRMSNorm,
    build_attention_mask,
    chunked_cross_entropy,
    embed_inputs,
    engine_options,
    output_cache,
    pop_cache_argument,
    resolve_position_ids,
    resolve_use_cache,
    rotary_tables,
    run_blocks,
)


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: `[start] + labels[:-1]`, with ignored positions (`-100`) set to padding."""
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class RevFormerDecoderBlock(RevFormerBlock):
    """Reversible decoder block: `f` = causal self-attention then cross-attention (summed), `g` = feed-forward.

    The self-attention part, `g` and the dropout are inherited from `RevFormerBlock`; only the cross-attention
    sub-layer is added. Keyword arguments used by `f`: `encoder_hidden_states` (the differentiable encoder output),
    `encoder_mask`, and the caches `past_key_values` (self-attention) / `cross_past_key_values` (cross-attention).
    """

    def __init__(self, config: RevFormerConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.cross_attn_norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = RevFormerAttention(config, layer_idx, is_cross_attention=True)

    def f(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self_out = super().f(x, **kwargs)
        cross_out = self.dropout(
            self.cross_attn(
                self.cross_attn_norm(x + self_out),
                mask=kwargs.get("encoder_mask"),
                context=kwargs["encoder_hidden_states"],
                past_key_values=kwargs.get("cross_past_key_values"),
            )
        )
        # Same branch scaling as the self-attention part (a zero-initialised gate makes the whole f vanish at init).
        return self_out + self.scale_branch(cross_out, "attn_gate")


class RevFormerEncoder(nn.Module):
    """Token embedding (shared with the decoder) and a bidirectional reversible stack. Returns `BaseModelOutput`."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(RevFormerBlock(config, i) for i in range(config.encoder_layers))
        self.norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple:
        config = self.config
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        inputs_embeds = embed_inputs(self.embed_tokens, config, input_ids, inputs_embeds)
        batch, seq_len = inputs_embeds.shape[:2]
        if seq_len > config.max_position_embeddings:
            raise ValueError(
                f"Source length {seq_len} exceeds `max_position_embeddings`={config.max_position_embeddings}."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"`attention_mask` must have shape (batch={batch}, sequence={seq_len}), got {tuple(attention_mask.shape)}."
            )
        position_ids = resolve_position_ids(None, attention_mask, 0, batch, seq_len, inputs_embeds.device)
        mask, _ = build_attention_mask(attention_mask, seq_len, seq_len, causal=False)
        if mask is not None:
            mask = mask.to(inputs_embeds.device)
        rotary = rotary_tables(position_ids, config.head_dim, config.rope_theta, torch.float32)
        static = {"rotary": rotary, "mask": mask, "is_causal": False}
        hidden, all_hidden = run_blocks(
            self.layers,
            self.norm,
            inputs_embeds,
            config.reversible,
            static,
            output_hidden_states=output_hidden_states,
            engine_kwargs=engine_options(config),
        )
        if not return_dict:
            return tuple(v for v in (hidden, all_hidden) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=all_hidden)


class RevFormerDecoder(nn.Module):
    """Causal reversible stack with cross-attention to the encoder output. Takes embeddings (the encoder owns them)."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(RevFormerDecoderBlock(config, i) for i in range(config.decoder_layers))
        self.norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        config = self.config
        batch, seq_len = inputs_embeds.shape[:2]
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"`encoder_hidden_states` must have shape (batch={batch}, source length, hidden), "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        src_len = encoder_hidden_states.shape[1]
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != (batch, src_len):
            raise ValueError(
                f"The encoder `attention_mask` must have shape (batch={batch}, source length={src_len}), "
                f"got {tuple(encoder_attention_mask.shape)}."
            )
        self_cache = past_key_values.self_attention_cache if past_key_values is not None else None
        cross_cache = past_key_values.cross_attention_cache if past_key_values is not None else None
        past_len = self_cache.get_seq_length() if self_cache is not None else 0
        total_len = past_len + seq_len
        if total_len > config.max_position_embeddings:
            raise ValueError(
                f"Target length {total_len} (cached {past_len} + new {seq_len}) exceeds "
                f"`max_position_embeddings`={config.max_position_embeddings}."
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, total_len):
            raise ValueError(
                f"`decoder_attention_mask` must have shape (batch={batch}, past+current length={total_len}), "
                f"got {tuple(attention_mask.shape)}."
            )
        position_ids = resolve_position_ids(position_ids, attention_mask, past_len, batch, seq_len, inputs_embeds.device)
        mask, is_causal = build_attention_mask(attention_mask, seq_len, total_len, causal=True)
        encoder_mask, _ = build_attention_mask(encoder_attention_mask, seq_len, src_len, causal=False)
        device = inputs_embeds.device
        static = {
            "rotary": rotary_tables(position_ids, config.head_dim, config.rope_theta, torch.float32),
            "mask": mask.to(device) if mask is not None else None,
            "is_causal": is_causal,
            "encoder_mask": encoder_mask.to(device) if encoder_mask is not None else None,
            "past_key_values": self_cache,
            "cross_past_key_values": cross_cache,
        }
        hidden, all_hidden = run_blocks(
            self.layers,
            self.norm,
            inputs_embeds,
            config.reversible,
            static,
            diff_kwargs={"encoder_hidden_states": encoder_hidden_states},
            output_hidden_states=output_hidden_states,
            engine_kwargs=engine_options(config),
        )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden, past_key_values=past_key_values, hidden_states=all_hidden
        )


def _check_seq2seq_config(config: RevFormerConfig) -> None:
    if config.decoder_start_token_id is None:
        raise ValueError(
            "`decoder_start_token_id` must be set for a sequence-to-sequence model (it defaults to `bos_token_id` "
            "when `is_encoder_decoder=True`)."
        )
    if config.pad_token_id is None:
        raise ValueError("`pad_token_id` must be set for a sequence-to-sequence model (padding of decoder inputs).")


class RevFormerSeq2SeqModel(RevFormerPreTrainedModel):
    """Reversible encoder and decoder sharing one token embedding. Returns `Seq2SeqModelOutput`."""

    _no_split_modules = ["RevFormerBlock", "RevFormerDecoderBlock"]

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        _check_seq2seq_config(config)
        self.encoder = RevFormerEncoder(config)
        self.decoder = RevFormerDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> RevFormerEncoder:
        return self.encoder

    def get_decoder(self) -> RevFormerDecoder:
        return self.decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput | tuple:
        config = self.config
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
            )
        decoder_inputs_embeds = embed_inputs(
            self.encoder.embed_tokens, config, decoder_input_ids, decoder_inputs_embeds, "decoder_input_ids"
        )

        if resolve_use_cache(config, use_cache):
            if past_key_values is None:
                past_key_values = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
            elif not isinstance(past_key_values, EncoderDecoderCache):
                past_key_values = EncoderDecoderCache(past_key_values, DynamicCache(config=config))
        else:
            past_key_values = None

        decoder_outputs = self.decoder(
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            past_key_values=past_key_values,
            output_hidden_states=output_hidden_states,
        )
        output = Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            past_key_values=output_cache(decoder_outputs),
            decoder_hidden_states=decoder_outputs.hidden_states,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


class RevFormerForConditionalGeneration(RevFormerPreTrainedModel, GenerationMixin):
    """Reversible encoder-decoder with an LM head: translation and other seq2seq tasks, `generate()` ready.

    `labels` are shifted right into `decoder_input_ids` (with `config.decoder_start_token_id`) when no decoder inputs
    are given. With `labels` the loss is computed chunk-wise and `logits` is `None` unless `return_logits=True`.
    """

    base_model_prefix = "model"
    _no_split_modules = ["RevFormerBlock", "RevFormerDecoderBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.encoder.embed_tokens.weight"}
    # `save_pretrained` records this as the checkpoint's remote-code `AutoModel` (see `RevFormerPreTrainedModel`).
    _remote_base_model = "modeling_reformer_rev_seq2seq.RevFormerSeq2SeqModel"

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        self.model = RevFormerSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.encoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None) -> RevFormerEncoder:
        return self.model.encoder

    def get_decoder(self) -> RevFormerDecoder:
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by `DataCollatorForSeq2Seq` to build `decoder_input_ids` in the collator."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput | tuple:
        """
        labels: target token ids `(batch, target length)`, aligned with the decoder outputs; `-100` is ignored.
        logits_to_keep: if > 0, only the last `logits_to_keep` positions' logits are computed (generation).
        return_logits: with `labels`, `logits` is `None` (chunked loss) unless this is `True`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = pop_cache_argument(past_key_values, kwargs)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            if labels.dim() != 2:
                raise ValueError(f"`labels` must have shape (batch, target length), got {tuple(labels.shape)}.")
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"`labels` must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}.")
            loss = chunked_cross_entropy(hidden, self.lm_head, labels, self.config.loss_chunk_size)
        if labels is None or return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)

        output = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=output_cache(outputs),
            decoder_hidden_states=outputs.decoder_hidden_states,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "RevFormerDecoderBlock",
    "RevFormerEncoder",
    "RevFormerDecoder",
    "RevFormerSeq2SeqModel",
    "RevFormerForConditionalGeneration",
    "shift_tokens_right",
]
