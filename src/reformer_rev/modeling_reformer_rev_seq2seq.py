"""Reversible encoder-decoder Transformer for `transformers` (translation, summarisation, any seq2seq task).

The encoder is a stack of the decoder-only model's `RevFormerBlock`s with bidirectional (padding-masked)
self-attention. A decoder block adds cross-attention to the residual function `f` of the other stream:

    f(x) = SelfAttn(norm(x)) + CrossAttn(norm(x + SelfAttn(norm(x))), encoder_output)
    g(x) = FeedForward(norm(x))

so `f` depends only on the other stream and on the (constant within the stack) encoder output, and the coupling
`y1 = x1 + f(x2)`, `y2 = x2 + g(y1)` stays exactly invertible. Both stacks are `RevFormerStack`s (`stack.py`), so
weight tying in depth and the deep-equilibrium mode apply to them as to the causal LM; the encoder output enters the
decoder stack as a differentiable argument whose gradient is accumulated over all decoder blocks in the recomputing
backward. `config.reversible = False` runs the very same modules under plain autograd (the twin).

This module imports only torch, transformers and its flat siblings, so `save_pretrained` can copy it next to a
checkpoint for `trust_remote_code=True` loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.utils import can_return_tuple

from .configuration_reformer_rev import RevFormerConfig, resolve_chunk_size
from .deq import DEQStats
from .losses import chunked_cross_entropy
from .model_inputs import (
    CACHE_FIELD,
    as_encoder_output,
    cached_length,
    attention_mask_for,
    check_encoder_hidden_states,
    check_finite,
    check_generate_inputs,
    check_labels,
    check_packed_pair,
    check_padding_mask,
    check_unused_kwargs,
    document_starts,
    embed_inputs,
    find_documents,
    keep_positions,
    output_cache,
    pop_cache_argument,
    prepare_stack_inputs,
    resolve_output_flags,
    resolve_position_ids,
    resolve_use_cache,
    static_cache_capacity,
    wants_logits,
)
from .modeling_reformer_rev import RevFormerAttention, RevFormerBlock, RevFormerPreTrainedModel, RevFormerRMSNorm
from .stack import CacheSlot, RevFormerStack


def shift_tokens_right(
    labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Decoder inputs for teacher forcing: `[start] + labels[:-1]`, with ignored positions (`-100`) set to padding.
    `starts` (`(batch, length)` bool) marks where further packed target documents begin: each begins with the start
    token too, not with the previous document's last label."""
    shifted = labels.new_empty(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    if starts is not None:
        shifted = shifted.masked_fill(starts.to(shifted.device), decoder_start_token_id)
    return shifted.masked_fill(shifted == -100, pad_token_id)


class RevFormerDecoderBlock(RevFormerBlock):
    """Reversible decoder block: `f` = causal self-attention then cross-attention (summed), `g` = feed-forward.

    The self-attention part, `g` and the dropout are inherited from `RevFormerBlock`; only the cross-attention
    sub-layer is added. It reads `encoder_hidden_states` (the differentiable encoder output), `encoder_attention_mask`
    and its cache slot `cross_cache`.
    """

    def __init__(self, config: RevFormerConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.cross_attn_norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = RevFormerAttention(config, layer_idx, is_cross_attention=True)

    def f(
        self,
        x: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: Any = None,
        cross_cache: CacheSlot | None = None,
        attentions: Any = None,
        encoder_attention_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        self_out = super().f(x, attentions=attentions, **kwargs)
        cross_out, weights = self.cross_attn(
            self.cross_attn_norm(x + self_out),
            attention_mask=encoder_attention_mask,
            cache=cross_cache,
            encoder_hidden_states=encoder_hidden_states,
            attention_kwargs=encoder_attention_kwargs,
        )
        if attentions is not None:
            attentions.record("cross", weights)
        # Same branch scaling as the self-attention part (a zero-initialised gate makes the whole f vanish at init).
        return self_out + self.scale_branch(self.dropout(cross_out), "attn_gate")


@dataclass
class RevFormerEncoderOutput(BaseModelOutput):
    """`BaseModelOutput` plus, in DEQ mode, the encoder's solver statistics and Jacobian regulariser."""

    deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


@dataclass
class RevFormerDecoderOutput(RevFormerEncoderOutput):
    """The decoder stack's output: also the cache and the cross-attention maps."""

    cache: Cache | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RevFormerSeq2SeqModelOutput(Seq2SeqModelOutput):
    """`Seq2SeqModelOutput` plus, in DEQ mode, both stacks' solver statistics and their summed Jacobian regulariser."""

    encoder_deq_stats: DEQStats | None = None
    decoder_deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


@dataclass
class RevFormerSeq2SeqLMOutput(Seq2SeqLMOutput):
    """`Seq2SeqLMOutput` plus, in DEQ mode, both stacks' solver statistics and their summed Jacobian regulariser."""

    encoder_deq_stats: DEQStats | None = None
    decoder_deq_stats: DEQStats | None = None
    jacobian_loss: torch.FloatTensor | None = None


class RevFormerEncoder(nn.Module):
    """Token embedding (shared with the decoder) and a bidirectional reversible stack."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = RevFormerStack.build(config, RevFormerBlock, "encoder_layers")
        self.norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> RevFormerEncoderOutput:
        """position_ids: rotary positions of the source tokens; positions that restart inside a row mark packed
        documents, which then attend only within themselves."""
        # No **kwargs: `generate()` then passes the encoder only the arguments it names (it hands an encoder that
        # takes **kwargs every model argument, labels and logits_to_keep included).
        output_attentions, output_hidden_states = resolve_output_flags(
            self.config, output_attentions, output_hidden_states
        )
        inputs_embeds = embed_inputs(self.embed_tokens, input_ids, inputs_embeds, training=self.training)
        inputs = prepare_stack_inputs(self.config, inputs_embeds, attention_mask, position_ids, causal=False)
        out = self.layers(
            inputs_embeds, self.norm, inputs.static, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return RevFormerEncoderOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions.get("self") if out.attentions is not None else None,
            deq_stats=out.deq_stats,
            jacobian_loss=out.jacobian_loss,
        )


class RevFormerDecoder(nn.Module):
    """Causal reversible stack with cross-attention to the encoder output. Takes embeddings (the encoder owns them)."""

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = RevFormerStack.build(config, RevFormerDecoderBlock, "decoder_layers")
        self.norm = RevFormerRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        encoder_position_ids: torch.LongTensor | None = None,
        packing: bool = True,
    ) -> RevFormerDecoderOutput:
        """`encoder_position_ids`: the source positions; with restarting `position_ids` (a packed batch) the k-th
        target document of a row attends to the k-th source document only. `packing=False` (the caller passed a
        cache) reads positions as positions only."""
        batch, seq_len = inputs_embeds.shape[:2]
        check_encoder_hidden_states(encoder_hidden_states, batch, self.config.hidden_size)
        self_cache = past_key_values.self_attention_cache if past_key_values is not None else None
        cross_cache = past_key_values.cross_attention_cache if past_key_values is not None else None
        static_cache_capacity(cross_cache, "cache")  # refuses a cache layer this model cannot use
        inputs = prepare_stack_inputs(
            self.config, inputs_embeds, attention_mask, position_ids, cached_length(self_cache),
            mask_name="decoder_attention_mask", packing=packing, kv_capacity=static_cache_capacity(self_cache),
        )
        static = inputs.static
        src_len = encoder_hidden_states.shape[1]
        encoder_mask = check_padding_mask(encoder_attention_mask, (batch, src_len), "attention_mask")
        source_documents = None
        if packing and encoder_position_ids is not None:
            positions = resolve_position_ids(
                encoder_position_ids, encoder_mask, 0, batch, src_len, inputs_embeds.device,
                self.config.max_position_embeddings,
            )
            source_documents, _ = find_documents(positions, encoder_mask, {}, batch, src_len)
        check_packed_pair(source_documents, inputs.documents)
        static["encoder_attention_mask"], _, static["encoder_attention_kwargs"] = attention_mask_for(
            self.config._attn_implementation, encoder_mask, batch, seq_len, src_len, causal=False,
            dtype=inputs_embeds.dtype, device=inputs_embeds.device, q_documents=inputs.documents,
            kv_documents=source_documents,
        )
        out = self.layers(
            inputs_embeds,
            self.norm,
            static,
            diff_kwargs={"encoder_hidden_states": encoder_hidden_states},
            caches={"cache": self_cache, "cross_cache": cross_cache},
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        maps = out.attentions or {}
        return RevFormerDecoderOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=maps.get("self"),
            cross_attentions=maps.get("cross"),
            deq_stats=out.deq_stats,
            jacobian_loss=out.jacobian_loss,
            cache=past_key_values,
        )


class RevFormerSeq2SeqModel(RevFormerPreTrainedModel):
    """Reversible encoder and decoder sharing one token embedding. Returns `Seq2SeqModelOutput`."""

    _no_split_modules = ["RevFormerBlock", "RevFormerDecoderBlock"]

    def __init__(self, config: RevFormerConfig) -> None:
        super().__init__(config)
        if config.decoder_start_token_id is None:
            raise ValueError(
                "`decoder_start_token_id` must be set for a sequence-to-sequence model (it defaults to `bos_token_id` "
                "when `is_encoder_decoder=True`)."
            )
        if config.pad_token_id is None:
            raise ValueError("`pad_token_id` must be set for a sequence-to-sequence model (padding of decoder inputs).")
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

    @can_return_tuple
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> RevFormerSeq2SeqModelOutput:
        """
        position_ids: source positions (default: counted over the real tokens of `attention_mask`). With
            `decoder_position_ids`, positions that restart inside a row pack several (source, target) pairs in it:
            each source document attends within itself and each target document to itself and its source.
        """
        config = self.config
        cache = pop_cache_argument(past_key_values, kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        output_attentions, output_hidden_states = resolve_output_flags(config, output_attentions, output_hidden_states)
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                position_ids=position_ids,
                return_dict=True,
            )
        else:
            encoder_outputs = as_encoder_output(encoder_outputs)
            if isinstance(encoder_outputs.last_hidden_state, torch.Tensor):
                check_finite(encoder_outputs.last_hidden_state, "encoder_outputs", self.training)
        decoder_inputs_embeds = embed_inputs(
            self.encoder.embed_tokens, decoder_input_ids, decoder_inputs_embeds, "decoder_input_ids",
            "decoder_inputs_embeds", training=self.training,
        )
        packing = cache is None  # restarting positions mark packed documents only without a caller's cache
        if not resolve_use_cache(config, use_cache):
            cache = None
        elif not isinstance(cache, EncoderDecoderCache):  # none yet, or the self-attention cache alone
            self_cache = cache if cache is not None else DynamicCache(config=config)
            cache = EncoderDecoderCache(self_cache, DynamicCache(config=config))

        decoder_outputs = self.decoder(
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            past_key_values=cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            encoder_position_ids=position_ids,
            packing=packing,
        )
        # DEQ mode: both stacks' Jacobian regularisers (an encoder output passed in by the caller has none).
        jacobian_losses = [
            o.jacobian_loss for o in (encoder_outputs, decoder_outputs) if getattr(o, "jacobian_loss", None) is not None
        ]
        return RevFormerSeq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_deq_stats=getattr(encoder_outputs, "deq_stats", None),
            decoder_deq_stats=decoder_outputs.deq_stats,
            jacobian_loss=sum(jacobian_losses) if jacobian_losses else None,
            **{CACHE_FIELD: decoder_outputs.cache},
        )


class RevFormerForConditionalGeneration(RevFormerPreTrainedModel, GenerationMixin):
    """Reversible encoder-decoder with an LM head: translation and other seq2seq tasks, `generate()` ready.

    `labels` are shifted right into `decoder_input_ids` (with `config.decoder_start_token_id`) when no decoder inputs
    are given.
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
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> RevFormerSeq2SeqLMOutput:
        """
        labels: target token ids `(batch, target length)`, aligned with the decoder outputs; `-100` is ignored.
        logits_to_keep: if > 0, only the last `logits_to_keep` positions' logits are computed (generation).
        return_logits: with `labels`, whether to return the logits as well: by default in eval mode only (metrics,
            `predict_with_generate=False` evaluation); in training the chunked loss never materialises them.
        position_ids: source positions. Restarting `position_ids` and `decoder_position_ids` pack several (source,
            target) pairs in a row (see `RevFormerSeq2SeqModel.forward`); `labels` are then shifted per document.
        label_smoothing: with `labels`, the loss's label smoothing (`F.cross_entropy`'s), computed by the chunked
            loss, so that long targets (document-level translation) still never materialise the logits.
        """
        if labels is not None:
            labels = check_labels(labels, self.config.vocab_size, None)
        cache = pop_cache_argument(past_key_values, kwargs)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            starts = None
            if decoder_position_ids is not None and cache is None:  # packed targets: each document is shifted alone
                starts = document_starts(decoder_position_ids, *labels.shape, self.config.max_position_embeddings,
                                         "decoder_position_ids")
            decoder_input_ids = shift_tokens_right(
                labels, self.config.pad_token_id, self.config.decoder_start_token_id, starts
            )
        check_unused_kwargs(kwargs, type(self).__name__)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            position_ids=position_ids,
            encoder_outputs=encoder_outputs,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"`labels` must have shape {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}.")
            chunk = resolve_chunk_size(self.config.loss_chunk_size, self.config.vocab_size)
            loss = chunked_cross_entropy(
                hidden, self.lm_head, labels, chunk, kwargs.get("num_items_in_batch"), label_smoothing
            )
            if outputs.jacobian_loss is not None:
                loss = loss + self.config.deq_jacobian_reg * outputs.jacobian_loss
        if labels is None or wants_logits(self, return_logits):
            logits = self.lm_head(keep_positions(hidden, logits_to_keep))
        return RevFormerSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            encoder_deq_stats=outputs.encoder_deq_stats,
            decoder_deq_stats=outputs.decoder_deq_stats,
            jacobian_loss=outputs.jacobian_loss,
            **{CACHE_FIELD: output_cache(outputs)},
        )


__all__ = ["RevFormerSeq2SeqModel", "RevFormerForConditionalGeneration"]
