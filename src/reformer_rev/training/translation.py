"""Translation data, tokenizer, batching, decoding and scores (`training/train_translation.py`, `eval/eval_translation.py`).

* data: the bundled English-Spanish Bible corpus, any hub translation dataset (`--dataset_name`) or local json files,
  all in the Hugging Face translation format (`{"translation": {src: ..., tgt: ...}}`);
* document-level data: consecutive verses of a chapter joined into one pair (`group_into_documents`);
* a joint subword tokenizer learnt with `tokenizers` on the training split of both languages (byte-level BPE, or a
  SentencePiece-style unigram model with byte fallback), saved as a `PreTrainedTokenizerFast` that appends `</s>` to
  every sequence;
* the standard baseline: a `MarianMTModel` (random init) with as many parameters as a given model (`build_marian`);
* length-grouped batching by pairs or by tokens (little padding on CPU), padding collator, the label-smoothed loss,
  batched beam-search translation;
* BLEU and chrF through `evaluate` (sacrebleu). `evaluate.load("sacrebleu")` needs the Hub for its metric script, so
  offline we fall back to the equivalent `evaluate.Metric` classes below (same sacrebleu corpus scores).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import datasets
import evaluate
import sacrebleu
import torch
import torch.nn.functional as F
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from ..configuration_reformer_rev import MODEL_TYPE, SEQ2SEQ_MODEL_TYPE
from ..model_inputs import IGNORE_INDEX
from .corpus import load_bundled_translation_dataset
from .tokenization import EOS_TOKEN, train_byte_level_bpe, train_unigram_with_byte_fallback, wrap_tokenizer


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_translation_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
) -> datasets.DatasetDict:
    """A hub dataset, local json/jsonl(.gz) files, or (default) the bundled English-Spanish Bible corpus."""
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name)
    files = {k: v for k, v in (("train", train_file), ("validation", validation_file), ("test", test_file)) if v}
    if files:
        return datasets.load_dataset("json", data_files=files)
    return load_bundled_translation_dataset()


def pairs(split: datasets.Dataset, source_lang: str, target_lang: str) -> tuple[list[str], list[str]]:
    """(sources, targets) of a split in the translation format, with a clear error for wrong language codes."""
    if "translation" not in split.column_names:
        raise ValueError(f"Expected a `translation` column (HF translation format), got columns {split.column_names}.")
    first = split[0]["translation"]
    for lang, flag in ((source_lang, "--source_lang"), (target_lang, "--target_lang")):
        if lang not in first:
            raise ValueError(f"`{flag}={lang}` is not a language of this dataset (has {sorted(first)}).")
    translations = split["translation"]
    return [t[source_lang] for t in translations], [t[target_lang] for t in translations]


# A verse reference of the bundled corpus, "Book Chapter:Verse" ("1 Kings 3:16"): the document is "Book Chapter".
_REF = re.compile(r"^(?P<document>.+\S)\s*:\s*\d+\w*$")


def document_ids(split: datasets.Dataset, column: str = "ref") -> list[str]:
    """The document (chapter) of every pair of a split, read from its verse references (`"Genesis 1:3"` ->
    `"Genesis 1"`), with a clear error when the split has no such column."""
    if column not in split.column_names:
        raise ValueError(
            f"`--document_level` needs a `{column}` column with verse references ('Book Chapter:Verse', as in the "
            f"bundled corpus) to find each pair's document; this split has columns {split.column_names}."
        )
    documents = []
    for i, ref in enumerate(split[column]):
        match = _REF.match(str(ref).strip())
        if match is None:
            raise ValueError(f"`{column}` of pair {i} is {ref!r}, not a verse reference 'Book Chapter:Verse'.")
        documents.append(match.group("document"))
    return documents


def group_into_documents(
    sources: Sequence[str],
    targets: Sequence[str],
    documents: Sequence[str],
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    max_tokens: int | None = None,
) -> tuple[list[str], list[str], list[list[int]]]:
    """Join consecutive pairs of the same document into one pair (texts joined by a space), in input order.

    With `max_tokens`, a document whose source or target would exceed `max_tokens` tokens (`count_tokens(texts)`
    gives each text's length without special tokens; one more is kept for `</s>`) is cut between verses into
    consecutive pieces that fit; a single verse longer than that stays one piece (and is truncated by the tokenizer).
    Returns the joined sources, the joined targets and, per piece, the indices of the pairs it holds.
    """
    if not len(sources) == len(targets) == len(documents):
        raise ValueError(f"{len(sources)} sources, {len(targets)} targets and {len(documents)} document ids.")
    if max_tokens is not None and (max_tokens < 2 or count_tokens is None):
        raise ValueError(f"`max_tokens` ({max_tokens}) must be at least 2 and comes with `count_tokens`.")
    if max_tokens is None:
        src_len = tgt_len = [0] * len(sources)
        max_tokens = 1
    else:
        src_len, tgt_len = count_tokens(list(sources)), count_tokens(list(targets))
    groups: list[list[int]] = []
    used = (0, 0)
    for i, doc in enumerate(documents):
        # Joining adds a space, which byte-level and Metaspace tokenizers fold into the next word's first token.
        grown = (used[0] + src_len[i], used[1] + tgt_len[i])
        if groups and documents[groups[-1][-1]] == doc and max(grown) < max_tokens:
            groups[-1].append(i)
            used = grown
        else:
            groups.append([i])
            used = (src_len[i], tgt_len[i])
    joined_src = [" ".join(sources[i].strip() for i in g) for g in groups]
    joined_tgt = [" ".join(targets[i].strip() for i in g) for g in groups]
    return joined_src, joined_tgt, groups


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


TOKENIZER_MODELS = ("byte_bpe", "unigram")


def train_joint_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    model_max_length: int = 1024,
    model: str = "byte_bpe",
) -> PreTrainedTokenizerFast:
    """A subword tokenizer learnt on source and target texts together (shared vocabulary, tied embeddings).

    `model="byte_bpe"`: byte-level BPE (GPT-2 style); `"unigram"`: SentencePiece-style unigram with byte fallback
    (`vocab_size` includes its 256 byte tokens). Neither ever emits `<unk>`. Special tokens come first (`<pad>`=0,
    `<s>`=1, `</s>`=2, `<unk>`=3); every encoded sequence ends with `</s>`, and decoding with
    `skip_special_tokens=True` gives back the text.
    """
    if model == "byte_bpe":
        tokenizer = train_byte_level_bpe(texts, vocab_size, min_frequency, add_prefix_space=True)
    elif model == "unigram":
        tokenizer = train_unigram_with_byte_fallback(texts, vocab_size)
    else:
        raise ValueError(f"`tokenizer_model` must be one of {TOKENIZER_MODELS}, got {model!r}.")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return wrap_tokenizer(tokenizer, model_max_length)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerFast,
    sources: Sequence[str],
    targets: Sequence[str],
    max_source_length: int,
    max_target_length: int,
) -> list[dict[str, list[int]]]:
    """`input_ids` and `labels` per pair, truncated (keeping the final `</s>`)."""
    src = tokenizer(list(sources), max_length=max_source_length, truncation=True)["input_ids"]
    tgt = tokenizer(text_target=list(targets), max_length=max_target_length, truncation=True)["input_ids"]
    return [{"input_ids": s, "labels": t} for s, t in zip(src, tgt)]


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, pool: int = 50) -> list[list[int]]:
    """Shuffled batches of `batch_size` similar-length examples: shuffle, sort within pools of `pool` batches, cut,
    shuffle the batches.

    Deterministic in `seed`, so a resumed run can rebuild an epoch's order and skip the batches already seen.
    """
    return _pooled_batches(
        len(lengths), batch_size * pool, seed, lambda i: lengths[i],
        lambda chunk: [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)],
    )


def token_budget_batches(
    source_lengths: Sequence[int],
    target_lengths: Sequence[int],
    max_tokens: int,
    seed: int,
    max_pairs: int | None = None,
    pool: int = 50,
) -> list[list[int]]:
    """Shuffled batches of similar-length pairs holding at most `max_tokens` source + target tokens, padding included
    (`pairs x (longest source + longest target)`), and at most `max_pairs` pairs. Every batch then costs about the
    same, whatever its sentences' lengths; a pair longer than `max_tokens` is a batch of its own.

    Pools of about `pool` batches are sorted by length before cutting; deterministic in `seed`, like
    `length_grouped_batches`.
    """
    if max_tokens <= 0:
        raise ValueError(f"`max_tokens` must be positive, got {max_tokens}.")
    n = len(source_lengths)
    mean = (sum(source_lengths) + sum(target_lengths)) / max(n, 1)
    pairs_per_batch = max(1, int(max_tokens // max(mean, 1)))

    def cut(chunk: list[int]) -> list[list[int]]:
        batches, batch, longest = [], [], (0, 0)
        for i in chunk:
            grown = (max(longest[0], source_lengths[i]), max(longest[1], target_lengths[i]))
            full = max_pairs is not None and len(batch) >= max_pairs
            if batch and (full or (len(batch) + 1) * sum(grown) > max_tokens):
                batches.append(batch)
                batch, grown = [], (source_lengths[i], target_lengths[i])
            batch.append(i)
            longest = grown
        return batches + ([batch] if batch else [])

    return _pooled_batches(n, pairs_per_batch * pool, seed, lambda i: (target_lengths[i], source_lengths[i]), cut)


def _pooled_batches(n: int, pool_size: int, seed: int, key: Callable[[int], Any],
                    cut: Callable[[list[int]], list[list[int]]]) -> list[list[int]]:
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    batches = []
    for start in range(0, n, pool_size):
        batches += cut(sorted(order[start : start + pool_size], key=key))
    rng.shuffle(batches)
    return batches


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (with an attention mask) and `labels` (with -100, ignored by the loss)."""
    src_len = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), src_len), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(features), src_len), dtype=torch.long),
    }
    for i, f in enumerate(features):
        batch["input_ids"][i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        batch["attention_mask"][i, : len(f["input_ids"])] = 1
    if "labels" in features[0]:
        tgt_len = max(len(f["labels"]) for f in features)
        batch["labels"] = torch.full((len(features), tgt_len), -100, dtype=torch.long)
        for i, f in enumerate(features):
            batch["labels"][i, : len(f["labels"])] = torch.tensor(f["labels"])
    return batch


def seq2seq_loss(model: Any, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean (label-smoothed) cross-entropy of a seq2seq model over the batch's non-ignored target tokens.

    `reformer_rev` models smooth inside their chunked loss (the logits never exist at once, whatever the target
    length); other models (the Marian baseline) from their logits, as `transformers.Trainer`'s
    `label_smoothing_factor` does: uniform smoothing over the vocabulary, ignored targets (`-100`) excluded.
    """
    unwrapped = getattr(model, "module", model)  # DDP
    # An encoder-decoder RevFormerConfig reports "reformer_rev_seq2seq" (configuration_reformer_rev._ModelType).
    if getattr(unwrapped.config, "model_type", None) in (MODEL_TYPE, SEQ2SEQ_MODEL_TYPE):
        return model(**batch, label_smoothing=label_smoothing).loss
    if label_smoothing == 0.0:
        return model(**batch).loss
    logits = model(**batch).logits
    labels = batch["labels"].to(logits.device)
    # At least float32 (bf16 logits under autocast would lose the loss's precision).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def peak_step_bytes(model: Any, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0, accelerator: Any = None,
                    warmup_batch: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Peak memory of one training forward + backward on `batch`: the profiler's running sum of allocations
    (`reformer_rev.profiling`, docs/design.md §7), after a warm-up pass (on `warmup_batch`, default `batch`) so that
    gradient buffers already exist and only activations and temporaries count. The RNG is forked (dropout draws do not
    shift the run's randomness) and the gradients are cleared afterwards."""
    from ..profiling import peak_allocated_bytes

    device = next(model.parameters()).device
    was_training = model.training
    model.train()

    def step(inputs: dict[str, torch.Tensor]) -> None:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            loss = seq2seq_loss(model, inputs, label_smoothing)
        loss.backward()

    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        step(batch if warmup_batch is None else warmup_batch)
        model.zero_grad(set_to_none=False)
        peak = peak_allocated_bytes(lambda: step(batch), device=str(device))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {"peak_bytes": peak, "source_tokens": int(batch["input_ids"].numel()),
            "target_tokens": int(batch["labels"].numel())}


def trainable_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters, tied ones once (a Marian model's sinusoidal position tables are buffers-like
    parameters without gradient and do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


ARCHITECTURES = ("reformer_rev", "marian")


def marian_config(
    *, vocab_size: int, hidden_size: int, encoder_layers: int, decoder_layers: int, num_attention_heads: int,
    ffn_dim: int, dropout: float, attention_dropout: float, max_position_embeddings: int, pad_token_id: int,
    eos_token_id: int, decoder_start_token_id: int,
) -> Any:
    """A `MarianConfig` as OPUS-MT's models use it (post-norm, swish, scaled embeddings shared by encoder, decoder
    and output layer), with this project's special tokens. Generation must not force a token at the maximum length
    (`forced_eos_token_id`; Marian's default 0 is our `<pad>`)."""
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=vocab_size, d_model=hidden_size, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=num_attention_heads, decoder_attention_heads=num_attention_heads,
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, activation_function="swish", dropout=dropout,
        attention_dropout=attention_dropout, activation_dropout=0.0, max_position_embeddings=max_position_embeddings,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None, forced_eos_token_id=None,
        decoder_start_token_id=decoder_start_token_id,
    )


def matched_marian_ffn_dim(target_parameters: int, multiple_of: int = 16, **config: Any) -> int:
    """The feed-forward width at which `MarianMTModel(marian_config(**config))` has `target_parameters` trainable
    parameters (rounded to `multiple_of`: misaligned GEMM widths run slower on CPU). Counted on the meta device."""
    from transformers import MarianMTModel

    def count(ffn_dim: int) -> int:
        with torch.device("meta"):
            return trainable_parameters(MarianMTModel(marian_config(ffn_dim=ffn_dim, **config)))

    low, high = count(multiple_of), count(2 * multiple_of)  # parameters are linear in the width
    per_unit = (high - low) / multiple_of
    width = multiple_of + (target_parameters - low) / per_unit
    return max(multiple_of, multiple_of * round(width / multiple_of))


def build_marian(target_parameters: int, **config: Any) -> Any:
    """A randomly initialised `MarianMTModel` with `config` (see `marian_config`) whose feed-forward width makes its
    trainable parameter count match `target_parameters`."""
    from transformers import MarianMTModel

    ffn_dim = matched_marian_ffn_dim(target_parameters, **config)
    return MarianMTModel(marian_config(ffn_dim=ffn_dim, **config))


# --------------------------------------------------------------------------------------------------------------
# Decoding and scores
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def translate(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    sources: Sequence[str],
    batch_size: int = 32,
    num_beams: int = 4,
    max_source_length: int = 256,
    max_new_tokens: int = 256,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    progress: bool = False,
    max_length_ratio: float | None = None,
) -> list[str]:
    """Beam-search (or greedy, `num_beams=1`) translations of `sources`, batched by length, in input order.

    `max_length_ratio`: also stop a batch after `ratio x its longest source + 10` new tokens (never more than
    `max_new_tokens`). A model that has not learnt to stop yet repeats itself up to the limit; bounding that by the
    source length keeps the cost of evaluating it (and of translating long documents) proportional to the input.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = tokenizer(list(sources), max_length=max_source_length, truncation=True)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    bar = tqdm(total=len(order), desc="translating", unit="pair", disable=not progress)  # pairs, not batches
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([{"input_ids": encoded[i]} for i in idx], tokenizer.pad_token_id)
        limit = max_new_tokens
        if max_length_ratio is not None:
            limit = min(limit, math.ceil(max_length_ratio * batch["input_ids"].shape[1]) + 10)
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=limit,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
            outputs[i] = text.strip()
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return outputs


_FEATURES = datasets.Features(
    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
)


class SacreBleuScore(evaluate.Metric):
    """Corpus BLEU of sacrebleu (13a tokenisation), as the Hub's `sacrebleu` metric reports it (`score`, 0-100)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="sacrebleu corpus BLEU",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description="predictions: list of str; references: list of list of str",
            features=[_FEATURES],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
        bleu = sacrebleu.corpus_bleu(predictions, [list(r) for r in zip(*references)])
        return {
            "score": bleu.score,
            "counts": bleu.counts,
            "totals": bleu.totals,
            "precisions": bleu.precisions,
            "bp": bleu.bp,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
        }


class ChrFScore(evaluate.Metric):
    """Corpus chrF of sacrebleu (character n-grams up to 6, beta 2), as the Hub's `chrf` metric reports it."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="sacrebleu corpus chrF",
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015.",
            inputs_description="predictions: list of str; references: list of list of str",
            features=[_FEATURES],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
        chrf = sacrebleu.corpus_chrf(predictions, [list(r) for r in zip(*references)])
        return {"score": chrf.score, "char_order": chrf.char_order, "word_order": chrf.word_order, "beta": chrf.beta}


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`evaluate.load(name)` when the Hub (or its cache) has the script, else the local equivalent."""
    try:
        return evaluate.load(name)
    except Exception:  # offline: no metric script to download
        return {"sacrebleu": SacreBleuScore, "chrf": ChrFScore}[name]()


def translation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU and chrF (sacrebleu, via `evaluate`) of `predictions` against one reference each."""
    refs = [[r] for r in references]
    bleu = load_metric("sacrebleu").compute(predictions=list(predictions), references=refs)
    chrf = load_metric("chrf").compute(predictions=list(predictions), references=refs)
    return {"bleu": round(float(bleu["score"]), 4), "chrf": round(float(chrf["score"]), 4)}
