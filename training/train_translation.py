#!/usr/bin/env python3
"""Train a reversible encoder-decoder (`RevFormerForConditionalGeneration`) for translation with 🤗 Accelerate.

Defaults: the bundled English->Spanish Bible corpus (split by book), a joint byte-level BPE learnt on its training
split, a 3+3-layer model (d=256). Any hub translation dataset works through the same code path:

    python training/train_translation.py --output_dir outputs/mt                      # bundled en->es
    python training/train_translation.py --dataset_name wmt14 --dataset_config_name de-en \\
        --source_lang en --target_lang de --output_dir outputs/wmt14

With no `--max_train_steps` and no time budget it trains `--num_train_epochs` 20 epochs (9,980 steps of at most 4,096
tokens, about 54 pairs: many hours on a CPU); `--time_budget_minutes N` fits the run, its learning-rate schedule, the
evaluations and the final save into N minutes. `--num_evaluations` times over the run (or every `--eval_steps`) the
validation loss is computed on the validation split and BLEU/chrF (sacrebleu, through `evaluate`) on
`--val_bleu_samples` pairs spread over it; the best-BLEU model is kept in `output_dir/best`, the last one in
`output_dir/final`. The loop, checkpoints (verified, pickle-free, `checkpoints/step_N`), time budget and arguments are
the shared skeleton in `reformer_rev.training`, as in `training/train_lm.py`; SIGTERM/SIGINT stop at a step boundary
and save the state. `--no_reversible` trains the non-reversible twin (same modules, plain autograd) and
`--architecture marian` a MarianMTModel of equal size for comparisons (docs/translation.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerFast

import reformer_rev  # noqa: F401  (registers the `reformer_rev` model type with the Auto classes)
from reformer_rev.safe_io import atomic_write_json, save_model_folder
from reformer_rev.training.budget import StepFitter, TimeBudget, make_scheduler
from reformer_rev.training.checkpointing import (
    CheckpointManager,
    output_dir_lock,
    save_at_stop,
    set_aside_previous_run,
)
from reformer_rev.training.cli import (
    CHECKPOINT_OPTIONS,
    TRAINING_OPTIONS,
    Option,
    OptionParser,
    config_from_args,
    make_accelerator,
    make_optimizer,
    model_options,
    prepare_distributed_model,
    setup_logging,
    validate_training_args,
    with_defaults,
)
from reformer_rev.training.datafiles import TRANSLATION_FORMAT, check_json_lines, datasets_disk_errors
from reformer_rev.training.loop import (
    DivergenceMonitor,
    GuardedStep,
    Preempted,
    StopFlag,
    TrainingLoop,
    TrainLog,
    past_deadline_or_stopped,
    stop_on_signals,
)
from reformer_rev.training.models import build_model
from reformer_rev.training.reporting import plot_loss_curve, plot_translation_curve
from reformer_rev.training.settings import run_settings
from reformer_rev.training.state import TrainingState
from reformer_rev.training.translation import (
    ARCHITECTURES,
    TOKENIZER_MODELS,
    build_marian,
    collate,
    document_ids,
    group_into_documents,
    length_grouped_batches,
    load_translation_data,
    pairs,
    peak_step_bytes,
    seq2seq_loss,
    token_budget_batches,
    tokenize_pairs,
    train_joint_tokenizer,
    trainable_parameters,
    translate,
    translation_scores,
)

logger = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"
LOSS_CURVE_NAME = "loss_curve.png"
SCORE_CURVE_NAME = "translation_curve.png"
SAMPLES_NAME = "eval_samples.jsonl"
TOKENIZER_DIR = "tokenizer"
# The final save and the exit of the process (about 6 s under load): held back from the budget.
FINAL_SAVE_SECONDS = 30.0
# At most this share of a time budget is held back for each evaluation, and a periodic one stops at it (the final one
# gets whatever is left anyway).
EVAL_SHARE = 0.15
# A small model by default: on a CPU budget the tokens trained on, not capacity, limit quality. In 24 minutes on one
# core d=96 (1.38M parameters) reached test chrF 34.8, d=128 23.7 and d=192 16.5; the former d=256 default 12.3 in 20
# (docs/translation.md, "Choosing the defaults").
MODEL_FIELDS = {
    "hidden_size": 96, "encoder_layers": 3, "decoder_layers": 3, "num_attention_heads": 4, "intermediate_size": 384,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "chunk_size_feed_forward": 0, "tie_word_embeddings": True,
    "reversible": True,
}


OPTIONS = [
    # data
    Option("dataset_name", None, "Hub translation dataset.", type=str, group="data",
           default_text="bundled Bible en-es"),
    Option("dataset_config_name", None, "The configuration of --dataset_name (e.g. 'de-en').", type=str, group="data"),
    Option("train_file", None,
           'json/jsonl(.gz) in the HF translation format: one {"translation": {"en": ..., "es": ...}} per line.',
           type=str, group="data"),
    Option("validation_file", None, "Validation pairs (same format as --train_file).", type=str, group="data"),
    Option("test_file", None, "Test pairs (same format as --train_file).", type=str, group="data", fingerprint=False),
    Option("source_lang", "en", "Source language key of the translation pairs.", group="data"),
    Option("target_lang", "es", "Target language key of the translation pairs.", group="data"),
    Option("max_source_length", 128, "Source tokens kept per pair (longer sources are cut).", minimum=1, group="data"),
    Option("max_target_length", 128, "Target tokens kept per pair (longer targets are cut).", minimum=1, group="data"),
    Option("max_train_samples", None, "Use the first N training pairs (debugging).", type=int, minimum=1, group="data",
           default_text="all"),
    Option("max_eval_samples", None, "Use the first N validation pairs for the loss.", type=int, minimum=1,
           group="data", default_text="all", fingerprint=False),
    Option("val_bleu_samples", 200,
           "Validation pairs decoded for BLEU/chrF at each evaluation, spread evenly over the split.", minimum=0,
           group="data", fingerprint=False),
    Option("document_level", False,
           "Train and translate whole chapters: consecutive verses of a chapter (from the `ref` column, "
           "'Book Chapter:Verse') joined into one pair; a chapter longer than --max_document_tokens tokens is cut "
           "between verses. --max_train_samples/--max_eval_samples count verses.", group="data"),
    Option("max_document_tokens", 4096, "With --document_level: the longest document (source or target tokens).",
           minimum=1, group="data"),
    # tokenizer
    Option("tokenizer_name", None, "An existing tokenizer (folder or Hub id).", type=str, group="tokenizer",
           default_text="learn a joint tokenizer (--tokenizer_model) on the training pairs"),
    Option("tokenizer_model", "byte_bpe",
           "Joint tokenizer learnt on the training split: byte-level BPE, or a SentencePiece-style unigram model with "
           "byte fallback (--bpe_vocab_size is its size, byte tokens included).", choices=TOKENIZER_MODELS,
           group="tokenizer"),
    Option("bpe_vocab_size", 4000, "Vocabulary of the joint tokenizer.", minimum=261, group="tokenizer"),
    # model
    Option("model_name_or_path", None, "Fine-tune this checkpoint instead of a new model.", type=str, group="model",
           default_text="a new model from the options below"),
    Option("architecture", "reformer_rev",
           "reformer_rev: the reversible encoder-decoder (--no_reversible: its plain-autograd twin); marian: the "
           "standard baseline, a randomly initialised MarianMTModel (post-norm, sinusoidal positions) with the same "
           "width, depth, heads, dropout and tokenizer whose feed-forward width matches the reformer_rev model's "
           "parameter count.", choices=ARCHITECTURES, group="model"),
    *model_options(MODEL_FIELDS),
    *with_defaults(
        TRAINING_OPTIONS, per_device_train_batch_size=128, per_device_eval_batch_size=64, learning_rate=3e-3,
        adam_beta2=0.98, num_train_epochs=20, lr_scheduler_type="linear", num_warmup_steps=100,
        mixed_precision=Option("mixed_precision", "no", "Mixed precision of the forward/backward.",
                               choices=("no", "bf16", "fp16")),
    ),
    Option("max_tokens_per_batch", 4096,
           "Batch by tokens: at most this many source + target tokens (padding included) per micro-batch, at most "
           "--per_device_train_batch_size pairs. 0: batches of --per_device_train_batch_size pairs.", minimum=0),
    Option("label_smoothing", 0.1, "Label smoothing of the training loss (validation loss is never smoothed).",
           minimum=0),
    Option("num_threads", None, "torch intra-op threads (CPU).", type=int, minimum=1, default_text="torch's choice",
           fingerprint=False),
    # evaluation
    Option("eval_steps", None, "Validate (loss, BLEU, chrF) every N steps.", type=int, minimum=1, group="evaluation",
           default_text="--num_evaluations times, evenly spread", fingerprint=False),
    Option("num_evaluations", 5,
           "Without --eval_steps: validate this many times, evenly spread over the (time-fitted) run, the last one at "
           "its end.", minimum=0, group="evaluation", fingerprint=False),
    Option("extra_eval_steps", [], "Also validate at these steps.", type=int, nargs="*", group="evaluation",
           default_text="none", fingerprint=False),
    Option("num_beams", 1, "Beams for the validation BLEU decode.", minimum=1, group="evaluation", fingerprint=False),
    Option("max_new_tokens", None, "Longest validation translation.", type=int, minimum=1, group="evaluation",
           default_text="160, or --max_document_tokens with --document_level", fingerprint=False),
    Option("max_length_ratio", 2.0,
           "Decoding stops after this times the source length + 10 tokens (at most --max_new_tokens): an untrained "
           "model's repetitions cost no more than a translation.", group="evaluation", fingerprint=False),
    Option("num_sample_translations", 3,
           "Validation translations printed (and kept in eval_samples.jsonl) at each evaluation.", minimum=0,
           group="evaluation", fingerprint=False),
    Option("logging_steps", 50, "Print the mean training loss every N steps.", minimum=1, group="evaluation",
           fingerprint=False),
    *with_defaults(
        CHECKPOINT_OPTIONS, checkpointing_steps=500,
        output_dir=Option("output_dir", None, "Where the models, logs and checkpoints go.", type=str, required=True,
                          group="output and checkpoints", fingerprint=False),
    ),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = OptionParser(__doc__, OPTIONS).parse_args(argv)
    validate_training_args(args)
    validate_recipe_arguments(args)
    if args.dataset_name is not None and args.train_file is not None:
        raise ValueError("Pass either `--dataset_name` or `--train_file`, not both.")
    if (args.validation_file or args.test_file) and not args.train_file:
        raise ValueError("`--validation_file`/`--test_file` need a `--train_file`.")
    if args.train_file and not args.validation_file:
        raise ValueError("`--train_file` needs a `--validation_file` (the validation pairs for the loss and BLEU).")
    if args.source_lang == args.target_lang:
        raise ValueError(f"`--source_lang` and `--target_lang` are both {args.source_lang!r}.")
    langs = {f"translation.{args.source_lang}": f"--source_lang {args.source_lang}",
             f"translation.{args.target_lang}": f"--target_lang {args.target_lang}"}
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(args, name)
        if path is None:
            continue
        if not Path(path).is_file():
            raise ValueError(f"`--{name}` {path!r} does not exist.")
        if not re.search(r"\.jsonl?(\.gz)?$", path):
            raise ValueError(f"`--{name}` must be a .json or .jsonl file (optionally .gz) in the translation format "
                             f"({TRANSLATION_FORMAT}), got {path!r}.")
        # Line by line, before `datasets` reads it: errors name the file, the line and the field.
        counts = check_json_lines(path, name, list(langs), hint=TRANSLATION_FORMAT, field_options=langs)
        if counts["empty"]:
            logger.warning(f"`--{name}` {path!r}: {counts['empty']} of {counts['records']} pairs are empty on both "
                           "sides.")
    return args


def split_pairs(raw: Any, split: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(sources, targets) of a split; a pair lacking a language, or a split without any text, is a clear error."""
    try:
        src, tgt = pairs(raw[split], args.source_lang, args.target_lang)
    except (KeyError, TypeError) as err:  # `pairs` checks the languages of the first pair only
        raise ValueError(f"A pair of the {split} split lacks --source_lang {args.source_lang!r} or --target_lang "
                         f"{args.target_lang!r} ({type(err).__name__}: {err}).") from err
    if not any(isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip() for a, b in zip(src, tgt)):
        raise ValueError(f"The {split} split has {len(src)} pairs, none with both a source and a target text: there "
                         "is nothing to train or evaluate on.")
    return src, tgt


def validate_recipe_arguments(args: argparse.Namespace) -> None:
    """The recipe's checks across options (each option's own range is in `OPTIONS`), and the defaults that depend on
    other options: document mode raises the length limits to `--max_document_tokens`, and `--max_new_tokens` follows."""
    if args.architecture == "marian":
        if not args.reversible:
            raise ValueError("`--no_reversible` selects the reformer_rev twin; `--architecture marian` has no "
                             "reversible mode to switch off.")
        if args.model_name_or_path:
            raise ValueError("`--architecture marian` builds a new model; `--model_name_or_path` fine-tunes a "
                             "reformer_rev checkpoint.")
    if args.label_smoothing >= 1.0:
        raise ValueError(f"`--label_smoothing` must be in [0, 1), got {args.label_smoothing}.")
    if args.max_length_ratio <= 0:
        raise ValueError(f"`--max_length_ratio` must be positive, got {args.max_length_ratio}.")
    if args.document_level:
        # Documents are as long as --max_document_tokens; shorter limits would truncate them.
        args.max_source_length = max(args.max_source_length, args.max_document_tokens)
        args.max_target_length = max(args.max_target_length, args.max_document_tokens)
    if args.max_new_tokens is None:
        args.max_new_tokens = args.max_document_tokens if args.document_level else 160


def get_tokenizer(args: argparse.Namespace, train_src: list[str], train_tgt: list[str]) -> PreTrainedTokenizerFast:
    """The run's tokenizer, kept in `output_dir/tokenizer` so that a resumed run uses the very same one."""
    saved = Path(args.output_dir) / TOKENIZER_DIR
    if args.resume_from_checkpoint and (saved / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(saved)
    if args.tokenizer_name or args.model_name_or_path:
        return PreTrainedTokenizerFast.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    return train_joint_tokenizer(train_src + train_tgt, vocab_size=args.bpe_vocab_size, model=args.tokenizer_model)


def get_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    return build_translation_model(args, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                   tokenizer.eos_token_id)


def build_translation_model(args: argparse.Namespace, vocab_size: int, pad_token_id: int, bos_token_id: int,
                            eos_token_id: int) -> torch.nn.Module:
    """The model these arguments describe (also what `eval/bench_translation_memory.py` measures)."""

    def new_config():
        return config_from_args(
            args, MODEL_FIELDS, vocab_size=vocab_size, num_hidden_layers=args.decoder_layers,
            max_position_embeddings=max(args.max_source_length, args.max_target_length + args.max_new_tokens, 512),
            is_encoder_decoder=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
            eos_token_id=eos_token_id, decoder_start_token_id=bos_token_id,
        )

    if args.architecture == "marian":
        # The standard model gets the parameter count of the reformer_rev model these arguments describe.
        config = new_config()
        with torch.device("meta"):
            target = trainable_parameters(build_model(args, "translation", lambda: config))
        return build_marian(
            target, vocab_size=config.vocab_size, hidden_size=config.hidden_size, encoder_layers=config.encoder_layers,
            decoder_layers=config.decoder_layers, num_attention_heads=config.num_attention_heads,
            dropout=config.hidden_dropout, attention_dropout=config.attention_dropout,
            max_position_embeddings=config.max_position_embeddings, pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id, decoder_start_token_id=config.decoder_start_token_id,
        )
    model = build_model(args, "translation", new_config)
    model.config.reversible = args.reversible
    return model


def as_documents(args: argparse.Namespace, split, sources: list[str], targets: list[str], tokenizer):
    """`--document_level`: the split's verses joined into chapters (at most `--max_document_tokens` tokens each).
    Returns the joined sources and targets and how many verses each holds."""

    def count(texts: list[str]) -> list[int]:  # whole chapters: longer than model_max_length is expected
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    sources, targets, groups = group_into_documents(
        sources, targets, document_ids(split)[: len(sources)], count, args.max_document_tokens
    )
    return sources, targets, [len(g) for g in groups]


@torch.no_grad()
def validation_loss(model, examples, batch_size: int, pad_id: int, accelerator: Accelerator,
                    stop: StopFlag | None = None, deadline: float | None = None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over `examples` (teacher forcing, eval mode), and the number of pairs it
    covers: past `deadline` it ends early (shortest pairs first); a stop signal raises `Preempted`."""
    model.eval()
    total, count, done = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["labels"]))
    for start in range(0, len(order), batch_size):
        if start and past_deadline_or_stopped(accelerator, stop, deadline):
            break
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        with accelerator.autocast():
            total += model(**batch).loss.item() * n
        count += n
        done += len(batch["labels"])
    model.train()
    return total / max(count, 1), done


def spread(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over `range(n)` (all of them if `k >= n`)."""
    return list(range(n)) if k >= n else [i * n // k for i in range(k)]


class Evaluator:
    """Validation loss + BLEU/chrF, timing itself per pair so the final evaluation can be sized to a time budget.

    BLEU/chrF are computed on `--val_bleu_samples` pairs spread evenly over the validation split (all its books),
    decoded greedily (`--num_beams`); the copy-the-source baseline on the same pairs is computed once. Between batches
    it checks the stop flag (a signal raises `Preempted`) and, for the final evaluation, a deadline: past it the
    evaluation ends with the pairs done so far (the record says how many)."""

    # Sources translated between two checks of the stop flag and the deadline, in batches.
    BATCHES_PER_CHECK = 4

    def __init__(self, args, accelerator, model, tokenizer, val_examples, val_src, val_tgt, budget: TimeBudget,
                 stop: StopFlag | None = None) -> None:
        self.args, self.accelerator, self.model, self.tokenizer = args, accelerator, model, tokenizer
        self.val_examples, self.val_src, self.val_tgt = val_examples, val_src, val_tgt
        self.budget, self.stop = budget, stop
        self.seconds_per_pair = {"loss": None, "bleu": None}
        self.copy_scores: dict[str, Any] | None = None
        self.pairs_per_step = float(args.per_device_train_batch_size)  # the caller sets the measured mean

    def estimate(self, seconds_per_step: float, loss_pairs: int, bleu_pairs: int) -> float:
        """Seconds for an evaluation of that many pairs (measured after the first one; guessed before)."""
        guess = seconds_per_step / self.pairs_per_step
        loss = self.seconds_per_pair["loss"] or guess / 3
        bleu = self.seconds_per_pair["bleu"] or guess * self.args.max_new_tokens / 8
        return loss_pairs * loss + bleu_pairs * bleu

    def translate(self, sources: list[str], deadline: float | None) -> dict[int, str]:
        """{index: translation} of `sources`, shortest first in the batches `translate` itself would form, until the
        deadline."""
        args, unwrapped = self.args, self.accelerator.unwrap_model(self.model)
        encoded = self.tokenizer(sources, max_length=args.max_source_length, truncation=True)["input_ids"]
        order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
        chunk = args.per_device_eval_batch_size * self.BATCHES_PER_CHECK
        hyps: dict[int, str] = {}
        for start in range(0, len(order), chunk):
            if start and past_deadline_or_stopped(self.accelerator, self.stop, deadline):
                break
            idx = order[start : start + chunk]
            out = translate(unwrapped, self.tokenizer, [sources[i] for i in idx],
                            batch_size=args.per_device_eval_batch_size, num_beams=args.num_beams,
                            max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens,
                            max_length_ratio=args.max_length_ratio)
            hyps.update(zip(idx, out))
        return hyps

    def __call__(self, step: int, loss_pairs: int | None = None, bleu_pairs: int | None = None,
                 deadline: float | None = None) -> dict[str, Any]:
        args, unwrapped = self.args, self.accelerator.unwrap_model(self.model)
        examples = self.val_examples[:loss_pairs] if loss_pairs is not None else self.val_examples
        k = min(args.val_bleu_samples if bleu_pairs is None else bleu_pairs, len(self.val_src))
        start = start_all = time.perf_counter()
        cpu_start = time.process_time()
        # The loss gets its share of the time left by its estimated cost; BLEU the rest.
        loss_deadline = None
        if deadline is not None:
            cost = self.estimate(1.0, len(examples), 0), self.estimate(1.0, 0, k)
            loss_deadline = time.time() + (deadline - time.time()) * cost[0] / max(sum(cost), 1e-9)
        loss, done = validation_loss(unwrapped, examples, args.per_device_eval_batch_size,
                                     self.tokenizer.pad_token_id, self.accelerator, self.stop, loss_deadline)
        self.seconds_per_pair["loss"] = (time.perf_counter() - start) / max(1, done)
        record = {"step": step, "val_loss": round(loss, 5), "loss_pairs": done}
        if k > 0:
            chosen = spread(len(self.val_src), k)
            start = time.perf_counter()
            hyps = self.translate([self.val_src[i] for i in chosen], deadline)
            self.seconds_per_pair["bleu"] = (time.perf_counter() - start) / max(1, len(hyps))
            # The pairs translated before the deadline (all `k` of them unless it cut the evaluation short).
            chosen = [chosen[i] for i in sorted(hyps)]
            predictions = [hyps[i] for i in sorted(hyps)]
            sources, references = [self.val_src[i] for i in chosen], [self.val_tgt[i] for i in chosen]
            record.update({f"val_{name}": v for name, v in translation_scores(predictions, references).items()})
            record["bleu_pairs"] = len(chosen)
            if self.copy_scores is None or self.copy_scores["pairs"] != chosen:
                self.copy_scores = {**translation_scores(sources, references), "pairs": chosen}
            record["copy_source_bleu"], record["copy_source_chrf"] = self.copy_scores["bleu"], self.copy_scores["chrf"]
            shown = spread(len(chosen), min(args.num_sample_translations, len(chosen)))
            record["samples"] = [{"source": sources[i], "prediction": predictions[i], "reference": references[i]}
                                 for i in shown]
        if deadline is not None and (done < len(examples) or record.get("bleu_pairs", k) < k):
            logger.warning(f"Time budget: the evaluation at step {step} reached its deadline and ended after {done} of "
                           f"{len(examples)} pairs for the loss and {record.get('bleu_pairs', 0)} of {k} for BLEU.")
        record["eval_seconds"] = round(time.perf_counter() - start_all, 1)
        record["eval_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
        record["minutes"] = round(self.budget.elapsed() / 60, 2)
        # Processor time of this process (all threads) and the machine's load: on a shared machine the wall clock
        # alone does not say how much computing a score took.
        record["cpu_minutes"] = round(time.process_time() / 60, 2)
        record["load_average"] = round(os.getloadavg()[0], 2)
        return record


def save_model(folder: Path, model, tokenizer, accelerator: Accelerator) -> None:
    """Model + tokenizer (+ remote code) into `folder`, atomically (readers never see a mix of two saves)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_model_folder(folder, lambda tmp: (unwrapped.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    budget = TimeBudget(args.time_budget_minutes)  # counts from process start: imports and data included
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    set_seed(args.seed)
    with output_dir_lock(accelerator, args.output_dir, "training/train_translation.py"), \
            stop_on_signals(StopFlag(args.stop_grace_seconds)) as stop:
        set_aside_previous_run(accelerator, args.output_dir, args.resume_from_checkpoint)
        return train(args, accelerator, budget, stop)


def train(args: argparse.Namespace, accelerator: Accelerator, budget: TimeBudget, stop: StopFlag) -> dict[str, Any]:
    out_dir = Path(args.output_dir)
    # ---- data and tokenizer ------------------------------------------------------------------------------------
    with datasets_disk_errors():
        raw = load_translation_data(
            args.dataset_name, args.dataset_config_name, args.train_file, args.validation_file, args.test_file
        )
    if "train" not in raw or "validation" not in raw:
        raise ValueError(f"Need `train` and `validation` splits, got {list(raw)}.")
    # The subsets first: `--document_level` reads the verse references of exactly the pairs it joins.
    splits = {"train": raw["train"], "validation": raw["validation"]}
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    train_src, train_tgt = split_pairs(splits, "train", args)
    val_src, val_tgt = split_pairs(splits, "validation", args)
    tokenizer = get_tokenizer(args, train_src, train_tgt)  # learnt on verses, also in document mode
    if args.document_level:  # the saved tokenizer must not warn about (or truncate) whole chapters
        tokenizer.model_max_length = max(tokenizer.model_max_length, args.max_document_tokens)
    if accelerator.is_main_process:
        save_model_folder(out_dir / TOKENIZER_DIR, tokenizer.save_pretrained)
    verses = {"train": [1] * len(train_src), "validation": [1] * len(val_src)}
    if args.document_level:
        train_src, train_tgt, verses["train"] = as_documents(args, splits["train"], train_src, train_tgt, tokenizer)
        val_src, val_tgt, verses["validation"] = as_documents(args, splits["validation"], val_src, val_tgt, tokenizer)
        logger.info(f"Document level: {len(train_src)} training and {len(val_src)} validation documents of "
                    f"{sum(verses['train']) / len(train_src):.1f} verses on average (at most "
                    f"{args.max_document_tokens} tokens).")
    train_examples = tokenize_pairs(tokenizer, train_src, train_tgt, args.max_source_length, args.max_target_length)
    val_examples = tokenize_pairs(tokenizer, val_src, val_tgt, args.max_source_length, args.max_target_length)
    src_lengths = [len(e["input_ids"]) for e in train_examples]
    tgt_lengths = [len(e["labels"]) for e in train_examples]

    # ---- model, optimizer, schedule, checkpoints ---------------------------------------------------------------
    model = get_model(args, tokenizer)
    n_params = trainable_parameters(model)
    optimizer = make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    prepare_distributed_model(model, accelerator)

    def epoch_batches(epoch: int) -> list[list[int]]:
        # Deterministic in (seed, epoch): a resumed run rebuilds the epoch's order and skips what it already saw.
        if args.max_tokens_per_batch:
            return token_budget_batches(src_lengths, tgt_lengths, args.max_tokens_per_batch, args.seed + epoch,
                                        max_pairs=args.per_device_train_batch_size)
        lengths = [a + b for a, b in zip(src_lengths, tgt_lengths)]
        return length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed + epoch)

    first_epoch = epoch_batches(0)
    batches_per_epoch = math.ceil(len(first_epoch) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    requested_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = make_scheduler(optimizer, args.lr_scheduler_type, args.num_warmup_steps, requested_steps)
    settings = run_settings(args, OPTIONS, num_processes=accelerator.num_processes,
                            mixed_precision=accelerator.mixed_precision)
    checkpoints = CheckpointManager(accelerator, out_dir, model, optimizer, lr_scheduler, args.checkpoints_total_limit,
                                    required=bool(args.checkpointing_steps or args.resume_from_checkpoint),
                                    settings=settings, allow_changed_settings=args.allow_changed_settings)
    if accelerator.is_main_process:
        checkpoints.remove_interrupted_saves()
    state = TrainingState(max_train_steps=requested_steps, requested_steps=requested_steps,
                          extra={"best_score": None, "best_step": None})
    if args.resume_from_checkpoint:
        state = checkpoints.resume(args.resume_from_checkpoint, requested_steps, batches_per_epoch) or state
        logger.info(f"Resuming at step {state.completed_steps} (epoch {state.epoch}, batch {state.batches_in_epoch}).")

    # ---- train -------------------------------------------------------------------------------------------------
    evaluator = Evaluator(args, accelerator, model, tokenizer, val_examples, val_src, val_tgt, budget, stop)
    evaluator.pairs_per_step = len(train_examples) / max(1, len(first_epoch)) * args.gradient_accumulation_steps
    full_eval = (len(val_examples), min(args.val_bleu_samples, len(val_src)))

    spread_evaluations = args.eval_steps is None  # else every --eval_steps

    def evaluations_left() -> int:  # periodic ones still to come when spread (the final one is not periodic)
        return max(0, args.num_evaluations - 1 - len(state.eval_history)) if spread_evaluations else 0

    # No evaluation may take more than a share of the budget: each one stops translating at that deadline. Until the
    # first is measured its cost is a guess from the step time, and for whole chapters (thousands of tokens each) the
    # guess alone exceeded a 25-minute budget, so the run stopped at step 2 for "time budget".
    eval_cap = EVAL_SHARE * 60 * args.time_budget_minutes if budget.bounded else math.inf

    def one_evaluation(seconds_per_step: float) -> float:
        return min(evaluator.estimate(seconds_per_step, *full_eval), eval_cap)

    def reserve(seconds_per_step: float) -> float:  # the final evaluation, the memory measurement and the save
        one_eval = one_evaluation(seconds_per_step)
        return FINAL_SAVE_SECONDS + 3 * seconds_per_step + one_eval + evaluations_left() * one_eval

    def overhead(seconds_per_step: float) -> float:  # periodic evaluations (every --eval_steps) and checkpoints
        saves = (checkpoints.last_save_seconds or 1.0) / args.checkpointing_steps if args.checkpointing_steps else 0.0
        evals = 0.0 if spread_evaluations else one_evaluation(seconds_per_step) / args.eval_steps
        return evals + saves

    def evaluation_due(step: int) -> bool:
        if step in args.extra_eval_steps:
            return True
        if spread_evaluations:  # --num_evaluations, evenly spread over the run as currently fitted
            done = len(state.eval_history)
            return args.num_evaluations > 0 and step >= (done + 1) * state.max_train_steps / args.num_evaluations
        return step % args.eval_steps == 0

    fitter = StepFitter(budget, requested_steps, reserve=reserve, overhead=overhead)
    guard = GuardedStep(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm, args.skip_nonfinite_steps)
    train_log = TrainLog(out_dir, state.completed_steps, enabled=accelerator.is_main_process)
    loop = TrainingLoop(accelerator, model, guard, state, train_log, fitter if budget.bounded else None, stop,
                        last_checkpoint=lambda: str(checkpoints.newest() or "none"),
                        divergence=DivergenceMonitor(args.divergence_patience),
                        protect_checkpoint=checkpoints.protect_newest)

    def batches_for_epoch(epoch: int, skip: int):
        order = first_epoch if epoch == 0 else epoch_batches(epoch)
        # With token batching the number of batches varies by epoch: every process gets as many.
        per_process = len(order) // accelerator.num_processes if args.max_tokens_per_batch else batches_per_epoch
        order = order[accelerator.process_index :: accelerator.num_processes][:per_process]
        return (collate([train_examples[i] for i in idx], tokenizer.pad_token_id) for idx in order[skip:]), len(order)

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = seq2seq_loss(model, batch, args.label_smoothing)
        n_tokens = int((batch["labels"] != -100).sum())
        return loss, float(n_tokens), n_tokens

    def evaluate_now(step: int, **sizes: Any) -> None:
        record = evaluator(step, **sizes)
        samples = record.pop("samples", [])
        state.eval_history.append(record)
        # Best model: highest validation BLEU (lowest loss when BLEU is not computed).
        score = record.get("val_bleu", -record["val_loss"])
        if state.extra["best_score"] is None or score > state.extra["best_score"]:
            state.extra.update(best_score=score, best_step=step)
            save_model(out_dir / "best", model, tokenizer, accelerator)
        accelerator.print(json.dumps(record))
        for sample in samples:
            accelerator.print("  source:     " + sample["source"] + "\n  prediction: " + sample["prediction"]
                              + "\n  reference:  " + sample["reference"])
        if accelerator.is_main_process and samples:
            with open(out_dir / SAMPLES_NAME, "a") as fh:
                fh.write(json.dumps({"step": step, "minutes": record["minutes"], "samples": samples}) + "\n")

    logger.info(
        f"***** Training {model_description(args)}: {n_params / 1e6:.2f}M parameters, {len(train_examples)} "
        f"{'documents' if args.document_level else 'pairs'} ({steps_per_epoch} steps per epoch), "
        f"{state.max_train_steps} steps, {accelerator.num_processes} process(es)"
        + (f", time budget {args.time_budget_minutes} min" if budget.bounded else "") + " *****"
    )
    load_at_start = os.getloadavg()
    window, update = [], None
    try:  # a signal during an evaluation stops there (Preempted); during a step, at its end
        for update in loop.updates(batches_for_epoch, compute_loss):
            window += [] if update.skipped else [update.loss]
            if update.step % args.logging_steps == 0 and window:
                accelerator.print(f"step {update.step}/{state.max_train_steps}: train loss "
                                  f"{sum(window) / len(window):.4f}, lr {update.lr:.3e}, "
                                  f"{budget.elapsed() / 60:.1f} min")
                window = []
            if evaluation_due(update.step) and not state.finished:
                evaluate_now(update.step, **({"deadline": time.time() + eval_cap} if budget.bounded else {}))
            periodic = args.checkpointing_steps and update.step % args.checkpointing_steps == 0
            if periodic and not (update.skipped or update.suspect):
                checkpoints.save(state)
    except Preempted as stopped:
        loop.stop_reason = str(stopped)
    train_log.close()
    last_skipped = update is not None and update.skipped
    if loop.stop_reason is not None and loop.stop_reason != "time budget":
        return {"event": "end", **save_at_stop(accelerator, checkpoints, state, stop, loop.stop_reason, last_skipped)}
    # Whatever else ended the run, its state is saved (a resume continues from here), never after a skipped step.
    checkpoints.save_unless_saved(state, last_step_skipped=last_skipped)

    # ---- final evaluation (sized to the time left) and save ----------------------------------------------------
    if not state.eval_history or state.eval_history[-1]["step"] != state.completed_steps:
        sizes = {}
        if budget.bounded:
            left = budget.left() - FINAL_SAVE_SECONDS
            needed = evaluator.estimate(fitter.seconds_per_step or 1.0, *full_eval)
            if needed > left:
                scale = max(0.0, left) / needed
                sizes = {"loss_pairs": max(1, int(full_eval[0] * scale)), "bleu_pairs": int(full_eval[1] * scale)}
                logger.warning(f"Time budget: the final evaluation uses {sizes['loss_pairs']} validation pairs for "
                               f"the loss and {sizes['bleu_pairs']} for BLEU.")
            sizes["deadline"] = budget.end - FINAL_SAVE_SECONDS  # a hard stop if the estimate was too low
        try:
            evaluate_now(state.completed_steps, **sizes)
        except Preempted as stopped:  # training is complete: a resume only evaluates and saves
            return {"event": "end", **save_at_stop(accelerator, checkpoints, state, stop, str(stopped), last_skipped)}
    save_model(out_dir / "final", model, tokenizer, accelerator)
    # Peak memory of one training step (forward + backward, the profiler's running sum of allocations) on the
    # epoch's largest batch; the RNG is forked so that it does not change a resumed run's randomness.
    largest = max(first_epoch, key=lambda idx: len(idx) * (max(src_lengths[i] for i in idx)
                                                          + max(tgt_lengths[i] for i in idx)))
    batch = {k: v.to(accelerator.device)
             for k, v in collate([train_examples[i] for i in largest], tokenizer.pad_token_id).items()}
    step_bytes = peak_step_bytes(accelerator.unwrap_model(model), batch, args.label_smoothing, accelerator)
    steps_log = TrainLog.read(out_dir) if accelerator.is_main_process else []
    drift = loop.drift.summary(steps_log, accelerator)  # a collective: every process
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {"event": "end", "stop_reason": loop.stop_reason or "max_steps", "step": state.completed_steps,
               "max_train_steps": state.max_train_steps, "requested_steps": requested_steps, "parameters": n_params,
               "model": model_description(args), "minutes": round(budget.elapsed() / 60, 2),
               "best_step": state.extra["best_step"], "best_score": state.extra["best_score"],
               "last_eval": state.eval_history[-1], "budget_fits": [vars(f) for f in fitter.fits],
               "train_pairs": len(train_examples), "val_pairs": len(val_examples),
               "train_verses": sum(verses["train"]), "vocab_size": len(tokenizer),
               "tokens_per_second": state.tokens_seen / max(state.train_time_s, 1e-9),
               "target_tokens_seen": state.tokens_seen, "train_time_s": round(state.train_time_s, 1),
               # What the machine gave this run: on a shared machine wall-clock figures alone mislead.
               "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "torch_threads": torch.get_num_threads(),
               "load_average_start": [round(v, 2) for v in load_at_start],
               "load_average_end": [round(v, 2) for v in os.getloadavg()],
               "peak_step_memory_mb": round(step_bytes["peak_bytes"] / 2**20, 1),
               "peak_step_batch": {"pairs": len(largest), "source_tokens": step_bytes["source_tokens"],
                                   "target_tokens": step_bytes["target_tokens"]},
               "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
               "reversal_drift": drift, "changed_settings": state.extra.get("changed_settings", []),
               "args": vars(args)}
    if accelerator.is_main_process:
        atomic_write_json(out_dir / SUMMARY_NAME, {**summary, "evals": state.eval_history})
        evals = [{"step": e["step"], "loss": e["val_loss"]} for e in state.eval_history]
        title = f"{n_params / 1e6:.1f}M-parameter {model_description(args)}"
        plot_loss_curve(out_dir / LOSS_CURVE_NAME, steps_log, evals, title)
        plot_translation_curve(out_dir / SCORE_CURVE_NAME, state.eval_history, title)
        accelerator.print(json.dumps(summary))
    return summary


def model_description(args: argparse.Namespace) -> str:
    if args.architecture == "marian":
        return "MarianMTModel (standard)"
    return "reversible encoder-decoder" if args.reversible else "encoder-decoder twin (plain autograd)"


if __name__ == "__main__":
    main()
