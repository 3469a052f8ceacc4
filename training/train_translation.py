#!/usr/bin/env python3
"""Train a reversible encoder-decoder (`RevFormerForConditionalGeneration`) for translation with 🤗 Accelerate.

Defaults: the bundled English->Spanish Bible corpus (split by book), a joint byte-level BPE learnt on its training
split, a 3+3-layer model (d=256). Any hub translation dataset works through the same code path:

    python training/train_translation.py --output_dir outputs/mt                      # bundled en->es
    python training/train_translation.py --dataset_name wmt14 --dataset_config_name de-en \\
        --source_lang en --target_lang de --output_dir outputs/wmt14

With no `--max_train_steps` and no time budget it trains `--num_train_epochs` 20 epochs (11,320 steps: many hours on a
CPU); `--time_budget_minutes N` fits the run, its learning-rate schedule, the evaluations and the final save into N
minutes. Every `--eval_steps` the validation loss is computed on the validation split and BLEU/chrF (sacrebleu, through
`evaluate`) on its first `--val_bleu_samples` pairs; the best-BLEU model is kept in `output_dir/best`, the last one in
`output_dir/final`. The loop, checkpoints (verified, pickle-free, `checkpoints/step_N`), time budget and arguments are
the shared skeleton in `reformer_rev.training`, as in `training/train_lm.py`; SIGTERM/SIGINT stop at a step boundary
and save the state. `--no_reversible` trains the non-reversible twin (same modules, plain autograd) for comparisons.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
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
from reformer_rev.training.reporting import plot_loss_curve
from reformer_rev.training.settings import run_settings
from reformer_rev.training.state import TrainingState
from reformer_rev.training.translation import (
    collate,
    length_grouped_batches,
    load_translation_data,
    pairs,
    tokenize_pairs,
    train_joint_tokenizer,
    translate,
    translation_scores,
)

logger = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"
LOSS_CURVE_NAME = "loss_curve.png"
TOKENIZER_DIR = "tokenizer"
# The final save and the exit of the process (about 6 s under load): held back from the budget.
FINAL_SAVE_SECONDS = 30.0
# At most this share of a time budget is held back for the final evaluation (it gets whatever is left anyway).
FINAL_EVAL_SHARE = 0.15
MODEL_FIELDS = {
    "hidden_size": 256, "encoder_layers": 3, "decoder_layers": 3, "num_attention_heads": 4, "intermediate_size": 768,
    "hidden_dropout": 0.1, "attention_dropout": 0.0, "chunk_size_feed_forward": 0, "tie_word_embeddings": True,
    "reversible": True,
}


OPTIONS = [
    # data
    Option("dataset_name", None, "Hub translation dataset.", type=str, group="data", default_text="bundled Bible en-es"),
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
    Option("val_bleu_samples", 300, "Validation pairs decoded for BLEU/chrF at each evaluation.", minimum=0,
           group="data", fingerprint=False),
    # tokenizer
    Option("tokenizer_name", None, "An existing tokenizer (folder or Hub id).", type=str, group="tokenizer",
           default_text="learn a joint BPE on the training pairs"),
    Option("bpe_vocab_size", 8000, "Vocabulary of the joint BPE.", minimum=261, group="tokenizer"),
    # model
    Option("model_name_or_path", None, "Fine-tune this checkpoint instead of a new model.", type=str, group="model",
           default_text="a new model from the options below"),
    *model_options(MODEL_FIELDS),
    *with_defaults(
        TRAINING_OPTIONS, per_device_train_batch_size=48, per_device_eval_batch_size=64, learning_rate=1.5e-3,
        adam_beta2=0.98, num_train_epochs=20, lr_scheduler_type="inverse_sqrt", num_warmup_steps=300,
        mixed_precision=Option("mixed_precision", "no", "Mixed precision of the forward/backward.",
                               choices=("no", "bf16", "fp16")),
    ),
    Option("num_threads", None, "torch intra-op threads (CPU).", type=int, minimum=1, default_text="torch's choice", fingerprint=False),
    # evaluation
    Option("eval_steps", 500, "Validate (loss, BLEU, chrF) every N steps.", minimum=1, group="evaluation", fingerprint=False),
    Option("extra_eval_steps", [], "Also validate at these steps.", type=int, nargs="*", group="evaluation",
           default_text="none", fingerprint=False),
    Option("num_beams", 1, "Beams for the validation BLEU decode.", minimum=1, group="evaluation", fingerprint=False),
    Option("max_new_tokens", 160, "Longest translation generated for BLEU.", minimum=1, group="evaluation", fingerprint=False),
    Option("logging_steps", 50, "Print the mean training loss every N steps.", minimum=1, group="evaluation", fingerprint=False),
    *with_defaults(
        CHECKPOINT_OPTIONS, checkpointing_steps=500,
        output_dir=Option("output_dir", None, "Where the models, logs and checkpoints go.", type=str, required=True,
                          group="output and checkpoints", fingerprint=False),
    ),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = OptionParser(__doc__, OPTIONS).parse_args(argv)
    validate_training_args(args)
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


def get_tokenizer(args: argparse.Namespace, train_src: list[str], train_tgt: list[str]) -> PreTrainedTokenizerFast:
    """The run's tokenizer, kept in `output_dir/tokenizer` so that a resumed run uses the very same one."""
    saved = Path(args.output_dir) / TOKENIZER_DIR
    if args.resume_from_checkpoint and (saved / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(saved)
    if args.tokenizer_name or args.model_name_or_path:
        return PreTrainedTokenizerFast.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    return train_joint_tokenizer(train_src + train_tgt, vocab_size=args.bpe_vocab_size)


def get_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    def new_config():
        return config_from_args(
            args, MODEL_FIELDS, vocab_size=len(tokenizer), num_hidden_layers=args.decoder_layers,
            max_position_embeddings=max(args.max_source_length, args.max_target_length + args.max_new_tokens, 512),
            is_encoder_decoder=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
        )

    model = build_model(args, "translation", new_config)
    model.config.reversible = args.reversible
    return model


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


class Evaluator:
    """Validation loss + BLEU/chrF, timing itself per pair so the final evaluation can be sized to a time budget.

    Between batches it checks the stop flag (a signal raises `Preempted`) and, for the final evaluation, a deadline:
    past it the evaluation ends with the pairs done so far (the record says how many)."""

    # Sources translated between two checks of the stop flag and the deadline, in batches.
    BATCHES_PER_CHECK = 4

    def __init__(self, args, accelerator, model, tokenizer, val_examples, val_src, val_tgt,
                 stop: StopFlag | None = None) -> None:
        self.args, self.accelerator, self.model, self.tokenizer = args, accelerator, model, tokenizer
        self.val_examples, self.val_src, self.val_tgt = val_examples, val_src, val_tgt
        self.stop = stop
        self.seconds_per_pair = {"loss": None, "bleu": None}

    def estimate(self, seconds_per_step: float, loss_pairs: int, bleu_pairs: int) -> float:
        """Seconds for an evaluation of that many pairs (measured after the first one; guessed before)."""
        guess = seconds_per_step / self.args.per_device_train_batch_size
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
                            max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens)
            hyps.update(zip(idx, out))
        return hyps

    def __call__(self, step: int, loss_pairs: int | None = None, bleu_pairs: int | None = None,
                 deadline: float | None = None) -> dict[str, Any]:
        args, unwrapped = self.args, self.accelerator.unwrap_model(self.model)
        examples = self.val_examples[:loss_pairs] if loss_pairs is not None else self.val_examples
        k = min(args.val_bleu_samples if bleu_pairs is None else bleu_pairs, len(self.val_src))
        start = start_all = time.perf_counter()
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
            start = time.perf_counter()
            hyps = self.translate(self.val_src[:k], deadline)
            self.seconds_per_pair["bleu"] = (time.perf_counter() - start) / max(1, len(hyps))
            idx = sorted(hyps)
            scores = translation_scores([hyps[i] for i in idx], [self.val_tgt[i] for i in idx])
            record.update({f"val_{name}": v for name, v in scores.items()})
            record["bleu_pairs"] = len(idx)
            first = idx[0]
            record["val_example"] = {"source": self.val_src[first], "prediction": hyps[first],
                                     "reference": self.val_tgt[first]}
        if deadline is not None and (done < len(examples) or record.get("bleu_pairs", k) < k):
            logger.warning(f"Time budget: the final evaluation ran late and ended after {done} of {len(examples)} "
                           f"pairs for the loss and {record.get('bleu_pairs', 0)} of {k} for BLEU.")
        record["eval_seconds"] = round(time.perf_counter() - start_all, 1)
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
    train_src, train_tgt = split_pairs(raw, "train", args)
    val_src, val_tgt = split_pairs(raw, "validation", args)
    if args.max_train_samples:
        train_src, train_tgt = train_src[: args.max_train_samples], train_tgt[: args.max_train_samples]
    if args.max_eval_samples:
        val_src, val_tgt = val_src[: args.max_eval_samples], val_tgt[: args.max_eval_samples]
    tokenizer = get_tokenizer(args, train_src, train_tgt)
    if accelerator.is_main_process:
        save_model_folder(out_dir / TOKENIZER_DIR, tokenizer.save_pretrained)
    train_examples = tokenize_pairs(tokenizer, train_src, train_tgt, args.max_source_length, args.max_target_length)
    val_examples = tokenize_pairs(tokenizer, val_src, val_tgt, args.max_source_length, args.max_target_length)
    lengths = [len(e["input_ids"]) + len(e["labels"]) for e in train_examples]

    # ---- model, optimizer, schedule, checkpoints ---------------------------------------------------------------
    model = get_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    prepare_distributed_model(model, accelerator)
    batches_per_epoch = math.ceil(len(train_examples) / args.per_device_train_batch_size / accelerator.num_processes)
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
    evaluator = Evaluator(args, accelerator, model, tokenizer, val_examples, val_src, val_tgt, stop)
    full_eval = (len(val_examples), min(args.val_bleu_samples, len(val_src)))

    def reserve(seconds_per_step: float) -> float:  # the final evaluation and save
        share = FINAL_EVAL_SHARE * 60 * args.time_budget_minutes if budget.bounded else math.inf
        return FINAL_SAVE_SECONDS + min(evaluator.estimate(seconds_per_step, *full_eval), share)

    def overhead(seconds_per_step: float) -> float:  # periodic evaluations and checkpoints, per step
        saves = (checkpoints.last_save_seconds or 1.0) / args.checkpointing_steps if args.checkpointing_steps else 0.0
        return evaluator.estimate(seconds_per_step, *full_eval) / args.eval_steps + saves

    fitter = StepFitter(budget, requested_steps, reserve=reserve, overhead=overhead)
    guard = GuardedStep(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm, args.skip_nonfinite_steps)
    train_log = TrainLog(out_dir, state.completed_steps, enabled=accelerator.is_main_process)
    loop = TrainingLoop(accelerator, model, guard, state, train_log, fitter if budget.bounded else None, stop,
                        last_checkpoint=lambda: str(checkpoints.newest() or "none"),
                        divergence=DivergenceMonitor(args.divergence_patience),
                        protect_checkpoint=checkpoints.protect_newest)

    def batches_for_epoch(epoch: int, skip: int):
        # Deterministic in (seed, epoch): a resumed run rebuilds the epoch's order and skips what it already saw.
        order = length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed + epoch)
        order = order[accelerator.process_index :: accelerator.num_processes][:batches_per_epoch]
        return (collate([train_examples[i] for i in idx], tokenizer.pad_token_id) for idx in order[skip:]), len(order)

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = model(**batch).loss
        n_tokens = int((batch["labels"] != -100).sum())
        return loss, float(n_tokens), n_tokens

    def evaluate_now(step: int, **sizes: Any) -> None:
        record = evaluator(step, **sizes)
        state.eval_history.append({k: v for k, v in record.items() if k != "val_example"})
        # Best model: highest validation BLEU (lowest loss when BLEU is not computed).
        score = record.get("val_bleu", -record["val_loss"])
        if state.extra["best_score"] is None or score > state.extra["best_score"]:
            state.extra.update(best_score=score, best_step=step)
            save_model(out_dir / "best", model, tokenizer, accelerator)
        accelerator.print(json.dumps(record))

    logger.info(
        f"***** Training: {n_params / 1e6:.2f}M parameters, {len(train_examples)} pairs ({steps_per_epoch} steps per "
        f"epoch), {state.max_train_steps} steps, {accelerator.num_processes} process(es)"
        + (f", time budget {args.time_budget_minutes} min" if budget.bounded else "") + " *****"
    )
    window, update = [], None
    try:  # a signal during an evaluation stops there (Preempted); during a step, at its end
        for update in loop.updates(batches_for_epoch, compute_loss):
            window += [] if update.skipped else [update.loss]
            if update.step % args.logging_steps == 0 and window:
                accelerator.print(f"step {update.step}/{state.max_train_steps}: train loss "
                                  f"{sum(window) / len(window):.4f}, lr {update.lr:.3e}, {budget.elapsed() / 60:.1f} min")
                window = []
            if (update.step % args.eval_steps == 0 or update.step in args.extra_eval_steps) and not state.finished:
                evaluate_now(update.step)
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
    steps_log = TrainLog.read(out_dir) if accelerator.is_main_process else []
    drift = loop.drift.summary(steps_log, accelerator)  # a collective: every process
    summary = {"event": "end", "stop_reason": loop.stop_reason or "max_steps", "step": state.completed_steps,
               "max_train_steps": state.max_train_steps, "requested_steps": requested_steps, "parameters": n_params,
               "minutes": round(budget.elapsed() / 60, 2), "best_step": state.extra["best_step"],
               "best_score": state.extra["best_score"], "last_eval": state.eval_history[-1],
               "budget_fits": [vars(f) for f in fitter.fits], "train_pairs": len(train_examples),
               "val_pairs": len(val_examples), "vocab_size": len(tokenizer),
               "tokens_per_second": state.tokens_seen / max(state.train_time_s, 1e-9),
               "reversal_drift": drift, "changed_settings": state.extra.get("changed_settings", []),
               "args": vars(args)}
    if accelerator.is_main_process:
        atomic_write_json(out_dir / SUMMARY_NAME, {**summary, "evals": state.eval_history})
        evals = [{"step": e["step"], "loss": e["val_loss"]} for e in state.eval_history]
        plot_loss_curve(out_dir / LOSS_CURVE_NAME, steps_log, evals,
                        f"{n_params / 1e6:.1f}M-parameter reversible encoder-decoder")
        accelerator.print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
