"""Translation data, tokenizer, batching, decoding and scores (`training/train_translation.py`, `eval/eval_translation.py`).

* data: the bundled English-Spanish Bible corpus, any hub translation dataset (`--dataset_name`) or local json files,
  all in the Hugging Face translation format (`{"translation": {src: ..., tgt: ...}}`);
* a joint subword tokenizer (byte-level BPE learnt with `tokenizers` on the training split of both languages), saved
  as a `PreTrainedTokenizerFast` that appends `</s>` to every sequence;
* length-grouped batching (little padding on CPU), padding collator, batched beam-search translation;
* BLEU and chrF through `evaluate` (sacrebleu). `evaluate.load("sacrebleu")` needs the Hub for its metric script, so
  offline we fall back to the equivalent `evaluate.Metric` classes below (same sacrebleu corpus scores).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import datasets
import evaluate
import sacrebleu
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from .corpus import load_bundled_translation_dataset
from .tokenization import EOS_TOKEN, train_byte_level_bpe, wrap_tokenizer


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


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def train_joint_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Byte-level BPE learnt on source and target texts together (shared vocabulary, tied embeddings).

    Special tokens come first (`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3); every encoded sequence ends with `</s>`,
    and decoding with `skip_special_tokens=True` gives back the text.
    """
    tokenizer = train_byte_level_bpe(texts, vocab_size, min_frequency, add_prefix_space=True)
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
    """Shuffled batches of similar-length examples: shuffle, sort within pools of `pool` batches, shuffle batches.

    Deterministic in `seed`, so a resumed run can rebuild an epoch's order and skip the batches already seen.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    size = batch_size * pool
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
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
) -> list[str]:
    """Beam-search (or greedy, `num_beams=1`) translations of `sources`, batched by length, in input order."""
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
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
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
