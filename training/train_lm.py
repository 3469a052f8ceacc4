#!/usr/bin/env python
"""Train a reversible causal language model on long sequences with 🤗 Accelerate.

Modelled on `transformers`' `run_clm_no_trainer.py` (same argument names, same order of work), for
`RevFormerForCausalLM` -- or, with `--model_name_or_path`, for a pretrained `LlamaForCausalLM`, `Qwen2ForCausalLM`,
`MistralForCausalLM` or `GPT2LMHeadModel` (a local folder or a Hub id) fine-tuned reversibly through
`reformer_rev.make_reversible` (`--no_reversible`: ordinary fine-tuning); its final save is a plain checkpoint of
its own class, loadable with stock `transformers`:

* data through `datasets`: a hub dataset (`--dataset_name`), local text/json files (`--train_file`), or by default
  the bundled long-document corpus (whole books of the public-domain KJV and WEB Bibles, split by book);
* a byte-level tokenizer (256 bytes + 4 specials) by default, `--tokenizer_name`, the tokenizer saved with
  `--model_name_or_path`, or a BPE trained on the training split (`--tokenizer_type bpe`); saved with the model;
* documents concatenated and cut into `--block_size` blocks (up to 65,536 tokens and more) with `datasets.map`;
* one process, multi-process DDP or FSDP through `accelerate launch` (configs in `training/configs/`), mixed
  precision, gradient accumulation, warmup + cosine schedule, clipping, NaN/inf steps stopped or skipped;
* a time budget for the whole job (`--time_budget_minutes`): the schedule is fitted to the measured step time so that
  it completes, and the final evaluation is sized to the time left;
* evaluation (loss, perplexity, bits-per-byte) every `--eval_steps` and at the end, against a unigram byte-frequency
  baseline on the same tokens; a generated sample, `results.json` and a loss-curve PNG;
* verified, pickle-free checkpoints (`reformer_rev.training.checkpointing`), `--resume_from_checkpoint {path,latest}`
  with the same data order and RNG; one run per `--output_dir`; an atomic final save (model, tokenizer, results,
  model card).

The loop, checkpoints, budget and arguments are the shared skeleton in `reformer_rev.training`; this file holds what
is specific to language modelling. With no arguments it runs the project's main job (`make train`).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from datasets import DatasetDict, load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

import reformer_rev  # noqa: F401  (registers the `reformer_rev` model type with the Auto classes)
from reformer_rev.model_card import write_model_card
from reformer_rev.safe_io import atomic_write_json, save_model_folder
from reformer_rev.training.budget import StepFitter, TimeBudget, make_scheduler
from reformer_rev.training.checkpointing import (
    CheckpointManager,
    output_dir_lock,
    save_at_stop,
    set_aside_previous_run,
)
from reformer_rev.training.collectives import agreed_min
from reformer_rev.training.packing import collate_packed, pack_documents
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
from reformer_rev.training.corpus import load_bundled_lm_dataset
from reformer_rev.training.datafiles import check_json_lines, check_text_file, datasets_disk_errors
from reformer_rev.training.loop import (
    DivergenceMonitor,
    GuardedStep,
    Preempted,
    StopFlag,
    TrainingLoop,
    TrainLog,
    block_fingerprints,
    past_deadline_or_stopped,
    stop_on_signals,
)
from reformer_rev.training.models import (
    build_model,
    checkpoint_model_type,
    is_plain_transformers_model,
    model_class_name,
    trains_reversibly,
)
from reformer_rev.training.reporting import generate_sample, plot_loss_curve
from reformer_rev.training.settings import run_settings
from reformer_rev.training.state import TrainingState
from reformer_rev.training.tokenization import (
    build_byte_tokenizer,
    is_byte_tokenizer,
    token_byte_counts,
    token_byte_lengths,
    train_bpe_tokenizer,
)

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
RESULTS_NAME = "results.json"
LOSS_CURVE_NAME = "loss_curve.png"
SAMPLE_PROMPT = "In the beginning"
# Forward-only evaluation runs ~4x faster per token than a training step (measured); the budget assumes 3 until the
# first periodic evaluation measures it.
EVAL_SPEEDUP = 3.0
# Time the end of the job needs besides the final evaluation: the sample, the final save (model, tokenizer, results,
# card, plot; measured about 10 s on the shared 2-core machine, doubled for safety) and the exit of the process (6 s
# at a load average of 16: the budget is held from the user's enter, not only to the last line of output).
FINAL_SAVE_SECONDS = 30.0
# Evaluation speed varies on a shared machine: the time held back for the final evaluation assumes it runs this much
# slower than the periodic evaluations measured, and each split gets at least this many blocks.
EVAL_TIME_MARGIN = 1.5
MIN_FINAL_EVAL_BLOCKS = 16
TOKENS_PER_BATCH = 4096
# The RevFormerConfig fields this script exposes, with its defaults (the main job's model).
MODEL_FIELDS = {
    "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": None,
    "intermediate_size": 512, "hidden_dropout": 0.0, "attention_dropout": 0.0, "chunk_size_feed_forward": 0,
    "loss_chunk_size": 1024, "max_position_embeddings": None, "reversible": True,
}


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


OPTIONS = [
    # data
    Option("dataset_name", None, "A dataset on the Hugging Face Hub.", type=str, group="data",
           default_text="the bundled corpus"),
    Option("dataset_config_name", None, "The configuration of --dataset_name.", type=str, group="data"),
    Option("train_file", None, "Local .txt/.json/.jsonl(.gz) training file (a .txt file is one document).", type=str,
           group="data"),
    Option("validation_file", None, "Local validation file (same format as --train_file).", type=str, group="data",
           default_text="--validation_split_percentage of the training data"),
    Option("test_file", None, "Local test file (same format as --train_file).", type=str, group="data",
           default_text="none", fingerprint=False),
    Option("text_column_name", "text", "The column of the .json/.jsonl files that holds the text.", group="data"),
    Option("validation_split_percentage", 5,
           "Percent of the training data held out when there is no validation split: of the documents when there "
           "are at least 2, else the end of the single document.", minimum=1, group="data"),
    Option("block_size", 256,
           "Tokens per training block (long documents are cut). The main job's 256 trains on 16 blocks drawn from all "
           "over the corpus per step; --block_size 1024 (4 per step) or 65536 (1) trains on long context.",
           minimum=1, group="data"),
    Option("packing", False,
           "Keep documents apart in the training blocks: the same blocks, with position_ids restarting at every "
           "document start, so no token attends across a document boundary and the first token of a document is no "
           "target (reformer_rev.training.packing). Default: blocks cut from the concatenated documents, attending "
           "across boundaries (run_clm). Validation is measured the same way in both modes.", group="data"),
    Option("preprocessing_num_workers", None, "Processes for tokenising (`datasets.map(num_proc=...)`).", type=int,
           minimum=1, group="data", default_text="1", fingerprint=False),
    Option("overwrite_cache", False, "Recompute the tokenised datasets instead of reusing the `datasets` cache.",
           group="data", fingerprint=False),
    # tokenizer
    Option("tokenizer_type", None,
           "A new tokenizer: 'byte' or a BPE trained on the training split. Used with --model_name_or_path only when "
           "the checkpoint has no tokenizer.", type=str, choices=("byte", "bpe"), group="tokenizer",
           default_text="byte"),
    Option("tokenizer_name", None, "A pretrained tokenizer (folder or Hub id); overrides the others.", type=str,
           group="tokenizer"),
    Option("bpe_vocab_size", 4096, "Vocabulary of --tokenizer_type bpe (the 256 bytes, 4 specials and merges).",
           minimum=261, group="tokenizer"),
    # model
    Option("model_name_or_path", None,
           "Start from a checkpoint (local folder or Hub id) instead of scratch: a reformer_rev model, or a pretrained "
           "Llama/Qwen2/Mistral/GPT-2 causal LM, which trains through `reformer_rev.make_reversible` "
           "(--no_reversible: as it is) and is saved as a plain checkpoint of its class. Its tokenizer is used if it "
           "has one; without one, pass --tokenizer_name (or --tokenizer_type for a model trained with one of ours).",
           type=str, group="model", default_text="a new model from the options below"),
    Option("config_name", None, "A config to start from (vocabulary from the tokenizer).", type=str, group="model"),
    *model_options(MODEL_FIELDS, max_position_embeddings="max(--block_size, 65536)"),
    *with_defaults(
        TRAINING_OPTIONS,
        per_device_train_batch_size=Option(
            "per_device_train_batch_size", None, "Blocks per process and micro-batch.", type=int, minimum=1,
            default_text=f"{TOKENS_PER_BATCH} tokens // --block_size"),
        per_device_eval_batch_size=Option(
            "per_device_eval_batch_size", None, "Blocks per process and evaluation batch.", type=int, minimum=1,
            default_text=f"{TOKENS_PER_BATCH} tokens // --block_size", fingerprint=False),
        learning_rate=3e-3, adam_beta2=0.99, max_train_steps=1200, num_warmup_steps=60, time_budget_minutes=9.0,
    ),
    # evaluation and logging
    Option("eval_steps", 25, "Evaluate on the validation split every N steps; 0: at the end only.", minimum=0,
           group="evaluation and logging", fingerprint=False),
    Option("max_eval_blocks", 128,
           "Final validation/test figures use at most N blocks per split, evenly spaced through the split (every "
           "book represented; fewer if the time budget runs short); the unigram baseline uses the same blocks. 0: all.",
           minimum=0, group="evaluation and logging", fingerprint=False),
    Option("eval_subset_blocks", 32,
           "Periodic evaluations during training use N evenly spaced validation blocks. 0: the final set.", minimum=0,
           group="evaluation and logging", fingerprint=False),
    Option("logging_steps", 10, "Log the mean training loss every N steps.", minimum=0, group="evaluation and logging", fingerprint=False),
    Option("report_to", "none", "Experiment tracker: 'tensorboard', 'wandb', 'all' or 'none'.",
           group="evaluation and logging", fingerprint=False),
    Option("sample_tokens", 200, "Tokens of the sample generated at the end; 0: none.", minimum=0,
           group="evaluation and logging", fingerprint=False),
    *with_defaults(CHECKPOINT_OPTIONS, output_dir="outputs/lm"),
    # hub
    Option("push_to_hub", False, "Upload the final model to the Hub (needs --hub_model_id).", group="hub", fingerprint=False),
    Option("hub_model_id", None, "The Hub repository, e.g. 'user/revformer-lm'.", type=str, group="hub", fingerprint=False),
    Option("hub_token", None, "Hub token (default: HF_TOKEN or the `hf auth login` token).", type=str, group="hub", fingerprint=False),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = OptionParser(__doc__.split("\n\n")[0], OPTIONS).parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail before any work is done, naming the bad argument (each option's range is checked by the parser)."""
    # Unset batch sizes keep a micro-batch at TOKENS_PER_BATCH tokens whatever the block size, so that longer blocks
    # are one flag away (`--block_size 1024` trains 4 blocks of 1,024 per step, `--block_size 65536` one).
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, max(1, TOKENS_PER_BATCH // args.block_size))
    validate_training_args(args)
    if args.validation_split_percentage >= 100:
        raise ValueError(f"`--validation_split_percentage` must be below 100, got {args.validation_split_percentage}.")
    if args.dataset_name is not None and args.train_file is not None:
        raise ValueError("Pass either `--dataset_name` or `--train_file`, not both.")
    for name in ("train_file", "validation_file", "test_file"):
        path = getattr(args, name)
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"`--{name}` {path!r} does not exist.")
            if Path(path).stat().st_size == 0:
                raise ValueError(f"`--{name}` {path!r} is empty (0 bytes): there is no text to train on.")
            if _file_format(path) is None:
                raise ValueError(f"`--{name}` must be a .txt, .json or .jsonl file (optionally .gz), got {path!r}.")
            # Line by line, before `datasets` reads it: errors name the file, the line and the field.
            if _file_format(path) == "json":
                check_json_lines(path, name, [args.text_column_name], field_options={
                    args.text_column_name: f"--text_column_name {args.text_column_name}"},
                    hint=f'one JSON object per line with the text in "{args.text_column_name}" (--text_column_name)')
            else:
                check_text_file(path, name)
    if (args.validation_file or args.test_file) and not (args.train_file or args.dataset_name):
        raise ValueError("`--validation_file`/`--test_file` need a `--train_file` (or `--dataset_name`).")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id` (e.g. 'user/revformer-lm').")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def _file_format(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"txt": "text", "text": "text", "json": "json", "jsonl": "json"}.get(ext)



def load_raw_datasets(args: argparse.Namespace) -> DatasetDict:
    """train/validation(/test) splits of whole documents, each with a `text` column."""
    if args.dataset_name is not None:
        with datasets_disk_errors():
            raw = load_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_file is not None:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        if args.test_file:
            files["test"] = args.test_file
        formats = {_file_format(f) for f in files.values()}
        if len(formats) != 1:
            raise ValueError(f"All data files must have the same format, got {sorted(formats)}.")
        fmt = formats.pop()
        # A text file is one document (not one per line), so long-range context survives.
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        try:
            with datasets_disk_errors():
                raw = load_dataset(fmt, data_files=files, **kwargs)
        except datasets.exceptions.DatasetGenerationError as e:  # e.g. columns whose types differ between the files
            cause = e.__cause__ or e.__context__ or e
            raise ValueError(f"Could not read the data files {files}: {type(cause).__name__}: {str(cause)[:300]}") from e
    else:
        raw = load_bundled_lm_dataset()

    check_text_splits(raw, args)
    if "validation" not in raw:
        rest = {k: v for k, v in raw.items() if k != "train"}
        if raw["train"].num_rows < 2:  # e.g. one .txt file, which is one document: hold out its end
            train, validation = hold_out_end(raw["train"][0][args.text_column_name], args.validation_split_percentage)
            logger.info(f"No validation split and a single training document: its last "
                        f"{args.validation_split_percentage}% ({len(validation):,} characters) are the validation split.")
            column = args.text_column_name
            raw = DatasetDict({"train": datasets.Dataset.from_dict({column: [train]}),
                               "validation": datasets.Dataset.from_dict({column: [validation]}), **rest})
        else:
            held = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            raw = DatasetDict({"train": held["train"], "validation": held["test"], **rest})
    return raw


def hold_out_end(text: str, percentage: int) -> tuple[str, str]:
    """(the first 100 - `percentage` % of `text`, the rest), cut at the next line break or space so that no word is
    split."""
    cut = len(text) - max(1, len(text) * percentage // 100)
    for boundary in ("\n", " "):
        at = text.find(boundary, cut)
        if 0 < at < len(text) - 1:
            return text[:at + 1], text[at + 1:]
    return text[:cut], text[cut:]


def check_text_splits(raw: DatasetDict, args: argparse.Namespace) -> None:
    """Before any tokenising or training: every split has the text column and at least one non-blank document."""
    sources = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    for split, ds in raw.items():
        where = f"the {split} split" + (f" ({sources[split]})" if sources.get(split) else "")
        if args.text_column_name not in ds.column_names:
            raise ValueError(
                f"`--text_column_name` {args.text_column_name!r} is not a column of the data: {where} has "
                f"{ds.column_names}."
            )
        if ds.num_rows == 0:
            raise ValueError(f"{where[:1].upper() + where[1:]} is empty: it has no documents.")
        has_text = False
        for batch in ds.select_columns([args.text_column_name]).iter(batch_size=1000):  # stops at the first text
            texts = batch[args.text_column_name]
            bad = next((t for t in texts if not isinstance(t, str)), "")
            if not isinstance(bad, str):
                raise ValueError(
                    f"`--text_column_name` {args.text_column_name!r} must hold strings; {where} has "
                    f"{type(bad).__name__} ({bad!r:.40})."
                )
            if any(t.strip() for t in texts):
                has_text = True
                break
        if not has_text:
            raise ValueError(
                f"{where[:1].upper() + where[1:]} has {ds.num_rows} document(s), all empty or blank: "
                "there is no text to train on."
            )


def checkpoint_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the checkpoint `path` (local folder or Hub id), or None if it has none."""
    if Path(path).is_dir():
        has_files = any(Path(path, name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))
        return AutoTokenizer.from_pretrained(path) if has_files else None
    try:  # a Hub repository: only the download can tell whether it has tokenizer files
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        logger.warning(f"No tokenizer loaded from {path!r}: {type(err).__name__}: {str(err)[:200]}")
        return None


def get_tokenizer(args: argparse.Namespace, raw: DatasetDict, accelerator: Accelerator) -> PreTrainedTokenizerBase:
    """`--tokenizer_name`; else the tokenizer saved with `--model_name_or_path`; else a new one (`--tokenizer_type`).

    A pretrained Llama/GPT-2/... checkpoint without a tokenizer is refused unless `--tokenizer_type` or
    `--tokenizer_name` says which one it was trained with: its embedding rows mean that tokenizer's ids, and a
    default guessed here would fine-tune it on a vocabulary it never saw.
    """
    if args.tokenizer_name is not None:
        return AutoTokenizer.from_pretrained(args.tokenizer_name)
    if args.model_name_or_path is not None:
        tokenizer = checkpoint_tokenizer(args.model_name_or_path)
        if tokenizer is not None:
            return tokenizer
        if args.tokenizer_type is None and checkpoint_model_type(args.model_name_or_path) != "reformer_rev":
            raise ValueError(
                f"`--model_name_or_path` {args.model_name_or_path!r} has no tokenizer (no tokenizer_config.json or "
                "tokenizer.json): pass the one it was trained with as `--tokenizer_name` (a folder or Hub id), or "
                "`--tokenizer_type byte`/`bpe` if it was trained with this project's tokenizer."
            )
        logger.warning(f"{args.model_name_or_path} has no tokenizer: using a new {args.tokenizer_type or 'byte'} "
                       "tokenizer.")
    if args.tokenizer_type in (None, "byte"):
        return build_byte_tokenizer()
    # BPE: learnt once on the main process, read back by the others (identical vocabularies on every rank).
    path = Path(args.output_dir) / "bpe_tokenizer"
    if accelerator.is_main_process:
        texts = raw["train"][args.text_column_name]
        train_bpe_tokenizer(texts, vocab_size=args.bpe_vocab_size).save_pretrained(path)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(path)


def tokenize_and_group(
    raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, accelerator: Accelerator
) -> DatasetDict:
    """Tokenise whole documents (each followed by `</s>`), concatenate them and cut into `block_size` blocks.

    `datasets.map` (batched, cached, `num_proc`) keeps even 65,536-token blocks cheap: a block is one Arrow row.
    The remainder shorter than a block is dropped, as in `run_clm`; the number of evaluated tokens is reported.
    """
    text_column = args.text_column_name
    eos = tokenizer.eos_token_id
    block_size = args.block_size

    def tokenize(examples: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(examples[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] if eos is not None else x for x in ids]}

    def group(examples: dict[str, list]) -> dict[str, list]:
        concatenated = [t for doc in examples["input_ids"] for t in doc]
        total = (len(concatenated) // block_size) * block_size
        return {"input_ids": [concatenated[i : i + block_size] for i in range(0, total, block_size)]}

    def pack(examples: dict[str, list]) -> dict[str, list]:
        return pack_documents(examples["input_ids"], block_size)

    with accelerator.main_process_first(), datasets_disk_errors("the tokenised data into the datasets cache"):
        tokenized = raw.map(
            tokenize,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            load_from_cache_file=not args.overwrite_cache,
            desc="Tokenizing documents",
        )
        grouped = DatasetDict({
            split: ds.map(
                pack if split == "train" and getattr(args, "packing", False) else group,
                batched=True,
                batch_size=1000,
                num_proc=args.preprocessing_num_workers,
                load_from_cache_file=not args.overwrite_cache,
                desc=f"{'Packing' if split == 'train' and getattr(args, 'packing', False) else 'Grouping'} into "
                f"blocks of {block_size}",
            )
            for split, ds in tokenized.items()
        })
    for split, ds in grouped.items():
        if ds.num_rows == 0:
            raise ValueError(
                f"The {split} split has fewer than `--block_size`={block_size} tokens: no block can be formed. "
                "Use a smaller --block_size or more data."
            )
    return grouped


def evenly_spaced(ds: datasets.Dataset, n: int) -> datasets.Dataset:
    """At most `n` rows spread evenly over `ds` (0 or `n >= len(ds)`: all rows), so every document is represented."""
    if not n or n >= ds.num_rows:
        return ds
    return ds.select(np.unique(np.linspace(0, ds.num_rows - 1, n).round().astype(np.int64)).tolist())


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order (0, n/2, n/4, 3n/4, ...): every prefix is spread over the whole range."""
    bits = max(1, (n - 1).bit_length())
    order = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)]
    return [i for i in order if i < n]


def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full blocks need no padding: labels are the inputs (the model shifts them). Packed blocks (`--packing`) also
    carry their `position_ids`."""
    if "position_ids" in examples[0]:
        return collate_packed(examples)
    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": ids}


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def unigram_baseline_bpb(blocks: datasets.Dataset, byte_counts: np.ndarray) -> float:
    """Entropy (bits per byte) of the byte distribution of exactly the evaluated target tokens of `blocks`.

    This is the best any byte-frequency (unigram) model can do on these bytes, fitted on the split itself, so it is a
    *strict* baseline. Special tokens count as one extra symbol, matching the bits-per-byte denominator.
    """
    vocab = byte_counts.shape[0]
    token_counts = np.zeros(vocab, dtype=np.int64)
    for batch in blocks.iter(batch_size=256):
        ids = np.asarray(batch["input_ids"], dtype=np.int64)[:, 1:]  # targets only, like the loss
        token_counts += np.bincount(ids.ravel(), minlength=vocab)
    symbol_counts = token_counts @ byte_counts
    p = symbol_counts[symbol_counts > 0] / symbol_counts.sum()
    return float(-(p * np.log2(p)).sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    token_bytes: torch.Tensor,
    stop: StopFlag | None = None,
    deadline: float | None = None,
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits-per-byte over every target of every block, summed over processes.

    Per-block sums are gathered with `gather_for_metrics`, which drops the duplicates padded into the last batch, so
    the figures are exact whatever the number of processes. bpb = total nats / total bytes / ln 2 (for the byte
    tokenizer this is loss / ln 2). Also returns the blocks evaluated and the seconds it took (the time budget's
    measure of evaluation speed).

    After each batch every process agrees (one collective) whether to go on: a stop signal raises `Preempted`; past
    `deadline` (`time.time()`) the evaluation ends early, over the blocks evaluated so far (the first `blocks` rows of
    the dataset: the loader deals batches to the processes in turn).
    """
    start = time.perf_counter()
    model.eval()
    nats, tokens, nbytes, blocks = [], [], [], 0
    for batch in dataloader:
        if nats and past_deadline_or_stopped(accelerator, stop, deadline):
            if hasattr(dataloader, "end"):  # Accelerate's loaders unregister themselves only when exhausted
                dataloader.end()
            break
        ids = batch["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits
        targets = ids[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        sums = torch.stack(
            [
                per_token.double().sum(1),
                torch.full((ids.shape[0],), targets.shape[1], dtype=torch.float64, device=ids.device),
                token_bytes.to(ids.device)[targets].double().sum(1),
            ],
            dim=1,
        )
        sums = accelerator.gather_for_metrics(sums)
        nats.append(sums[:, 0].sum().item())
        tokens.append(sums[:, 1].sum().item())
        nbytes.append(sums[:, 2].sum().item())
        blocks += sums.shape[0]
    model.train()
    total_nats, total_tokens, total_bytes = sum(nats), sum(tokens), sum(nbytes)
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": total_nats / total_bytes / LN2,
        "tokens": int(total_tokens),
        "bytes": int(total_bytes),
        "blocks": blocks,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


def get_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A new `RevFormerForCausalLM` sized for the tokenizer, or `--model_name_or_path`, checked against the data."""
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}

    def new_config():
        if args.config_name is not None:
            return AutoConfig.from_pretrained(args.config_name, vocab_size=len(tokenizer), **special)
        positions = args.max_position_embeddings or max(args.block_size, 65536)
        return config_from_args(args, MODEL_FIELDS, vocab_size=len(tokenizer), max_position_embeddings=positions, **special)

    model = build_model(args, "causal-lm", new_config)
    if len(tokenizer) > model.config.vocab_size:
        # Ids >= vocab_size would index past the embedding matrix: refuse before training, not at some batch.
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model `--model_name_or_path` "
            f"{args.model_name_or_path!r} has vocab_size {model.config.vocab_size}: its vocabulary does not fit "
            "the model. Use the model's own tokenizer (or a smaller `--tokenizer_name`/`--bpe_vocab_size`)."
        )
    if model.config.max_position_embeddings < args.block_size:
        raise ValueError(
            f"`--block_size` {args.block_size} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}."
        )
    return model


def _get_push_function():
    """`reformer_rev.hub.push_checkpoint`, checked before training so a run does not fail at its very end."""
    try:
        from reformer_rev.hub import push_checkpoint
    except ImportError as e:
        raise RuntimeError(
            "`--push_to_hub` needs `reformer_rev.hub.push_checkpoint`, which is not available in this installation."
        ) from e
    return push_checkpoint


class EvalClock:
    """Seconds per evaluated block, measured by the periodic evaluations (estimated from the step time before)."""

    def __init__(self, blocks_per_step: int) -> None:
        self.blocks_per_step, self.seconds, self.blocks = blocks_per_step, 0.0, 0

    def per_block(self, seconds_per_step: float) -> float:
        if self.blocks:
            return self.seconds / self.blocks
        return seconds_per_step / self.blocks_per_step / EVAL_SPEEDUP


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    budget = TimeBudget(args.time_budget_minutes)  # counts from process start: imports and data included
    push_checkpoint = _get_push_function() if args.push_to_hub else None
    accelerator = make_accelerator(
        args, log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir
    )
    setup_logging(accelerator)
    set_seed(args.seed)
    with output_dir_lock(accelerator, args.output_dir, "training/train_lm.py"), \
            stop_on_signals(StopFlag(args.stop_grace_seconds)) as stop:
        set_aside_previous_run(accelerator, args.output_dir, args.resume_from_checkpoint)
        return train(args, accelerator, budget, stop, push_checkpoint)


def train(args: argparse.Namespace, accelerator: Accelerator, budget: TimeBudget, stop: StopFlag,
          push_checkpoint: Any) -> dict[str, Any]:
    # ---- data --------------------------------------------------------------------------------------------------
    raw = load_raw_datasets(args)
    tokenizer = get_tokenizer(args, raw, accelerator)
    lm = tokenize_and_group(raw, tokenizer, args, accelerator)
    token_bytes = torch.as_tensor(token_byte_lengths(tokenizer))
    byte_counts = token_byte_counts(tokenizer)
    eval_sets = {split: evenly_spaced(lm[split], args.max_eval_blocks) for split in lm if split != "train"}
    eval_sets["periodic"] = evenly_spaced(eval_sets["validation"], args.eval_subset_blocks)
    logger.info(f"blocks of {args.block_size}: " + ", ".join(f"{k} {v.num_rows}" for k, v in lm.items()))
    # A private generator: creating the loader's iterator then draws no number from the global RNG, so a resumed run
    # replays dropout exactly (its restored RNG state is not shifted by re-creating the iterator).
    train_dataloader = DataLoader(
        lm["train"], shuffle=True, collate_fn=collate_blocks, batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )

    # ---- model, optimizer, schedule, checkpoints ---------------------------------------------------------------
    model = get_model(args, tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    prepare_distributed_model(model, accelerator)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    requested_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # Stepped by hand once per optimizer step (not via `prepare`, which would step it once per process).
    lr_scheduler = make_scheduler(optimizer, args.lr_scheduler_type, args.num_warmup_steps, requested_steps)
    settings = run_settings(args, OPTIONS, num_processes=accelerator.num_processes,
                            mixed_precision=accelerator.mixed_precision)
    checkpoints = CheckpointManager(
        accelerator, args.output_dir, model, optimizer, lr_scheduler, args.checkpoints_total_limit,
        required=bool(args.checkpointing_steps or args.resume_from_checkpoint), settings=settings,
        allow_changed_settings=args.allow_changed_settings,
    )
    if accelerator.is_main_process:
        checkpoints.remove_interrupted_saves()
    state = TrainingState(max_train_steps=requested_steps, requested_steps=requested_steps)
    if args.resume_from_checkpoint:
        resumed = checkpoints.resume(args.resume_from_checkpoint, requested_steps, len(train_dataloader))
        if resumed is None:
            logger.warning(f"No checkpoint found in {checkpoints.root}: starting from scratch.")
        else:
            # The (possibly time-budgeted) length of the run is part of its state: the LR schedule was built for it.
            state = resumed
            logger.info(f"Resumed from step {state.completed_steps} (epoch {state.epoch}, batch {state.batches_in_epoch}).")
    if args.report_to != "none":
        accelerator.init_trackers("train_lm", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    # ---- train -------------------------------------------------------------------------------------------------
    periodic_loader = accelerator.prepare(
        DataLoader(eval_sets["periodic"], collate_fn=collate_blocks, batch_size=args.per_device_eval_batch_size)
    )
    clock = EvalClock(args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes)
    final_blocks = sum(eval_sets[s].num_rows for s in eval_sets if s != "periodic")

    def overhead(seconds_per_step: float) -> float:  # periodic evaluations and checkpoints, per step
        evals = eval_sets["periodic"].num_rows * clock.per_block(seconds_per_step) / args.eval_steps if args.eval_steps else 0.0
        saves = (checkpoints.last_save_seconds or 1.0) / args.checkpointing_steps if args.checkpointing_steps else 0.0
        return evals + saves

    def reserve(seconds_per_step: float) -> float:  # the final evaluation and save, plus the step that may overrun
        return EVAL_TIME_MARGIN * final_blocks * clock.per_block(seconds_per_step) + FINAL_SAVE_SECONDS + seconds_per_step

    fitter = StepFitter(budget, requested_steps, overhead=overhead, reserve=reserve)
    guard = GuardedStep(accelerator, model, optimizer, lr_scheduler, args.max_grad_norm, args.skip_nonfinite_steps)
    # Per-step log (main process), flushed every step so a killed run keeps it; on resume the steps after the
    # checkpoint are dropped, so the file always describes the run that produced the current weights.
    train_log = TrainLog(args.output_dir, state.completed_steps, enabled=accelerator.is_main_process)
    loop = TrainingLoop(accelerator, model, guard, state, train_log, fitter if budget.bounded else None, stop,
                        last_checkpoint=lambda: str(checkpoints.newest() or "none"),
                        divergence=DivergenceMonitor(args.divergence_patience),
                        protect_checkpoint=checkpoints.protect_newest,
                        fingerprint=lambda batch: block_fingerprints(batch["input_ids"]))

    def batches_for_epoch(epoch: int, skip: int):
        train_dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        return batches, len(train_dataloader)

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        # use_cache=False: a converted transformers model given a cache would not read packed positions as documents.
        return model(**batch, use_cache=False).loss, 1.0, batch["input_ids"].numel()

    def periodic_eval() -> dict[str, float]:
        metrics = evaluate(model, periodic_loader, accelerator, token_bytes, stop=stop)
        clock.seconds += metrics["seconds"]
        clock.blocks += metrics["blocks"]
        return metrics

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {num_parameters / 1e6:.2f}M parameters, {lm['train'].num_rows} blocks of {args.block_size}, "
        f"{state.max_train_steps} steps of {total_batch} blocks ({total_batch * args.block_size:,} tokens), "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}"
        + (f", time budget {args.time_budget_minutes} min" if budget.bounded else "") + " *****"
    )
    progress = tqdm(total=state.max_train_steps, initial=state.completed_steps, desc="train", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    window: list[float] = []
    update = None
    try:  # a signal during a periodic evaluation stops there (Preempted); during a step, at its end
        for update in loop.updates(batches_for_epoch, compute_loss):
            progress.total = state.max_train_steps
            progress.update(1)
            window += [] if update.skipped else [update.loss]
            progress.set_postfix(loss=f"{sum(window) / max(1, len(window)):.4f}", lr=f"{update.lr:.2e}")
            if args.logging_steps and update.step % args.logging_steps == 0:
                if args.report_to != "none" and window:
                    mean = sum(window) / len(window)
                    accelerator.log({"train/loss": mean, "train/bpb": mean / LN2, "train/lr": update.lr}, step=update.step)
                window = []
            if args.eval_steps and update.step % args.eval_steps == 0 and not state.finished:
                metrics = periodic_eval()
                state.eval_history.append({"step": update.step, **metrics})
                progress.write(f"step {update.step}: validation loss {metrics['loss']:.4f}, bpb {metrics['bpb']:.4f} "
                               f"({metrics['tokens']:,} tokens)")
                if args.report_to != "none":
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=update.step)
            # Never a checkpoint right after a non-finite step: the newest checkpoint stays the last good state.
            periodic = args.checkpointing_steps and update.step % args.checkpointing_steps == 0
            if periodic and not (update.skipped or update.suspect):
                checkpoints.save(state)
    except Preempted as stopped:
        loop.stop_reason = str(stopped)
    progress.close()
    train_log.close()
    last_skipped = update is not None and update.skipped
    if loop.stop_reason is not None and loop.stop_reason != "time budget":
        # Stopped by a signal: keep the state for a resume and skip the (long) final evaluation and save.
        return save_at_stop(accelerator, checkpoints, state, stop, loop.stop_reason, last_skipped)

    # Whatever else ended training, its state is saved first: a final evaluation or save that fails (a full disk) or
    # is stopped is redone by `--resume_from_checkpoint latest`, which then trains nothing.
    checkpoints.save_unless_saved(state, last_step_skipped=last_skipped)

    # ---- final evaluation (sized to the time left), sample, results, atomic final save ---------------------------
    seconds_per_block = clock.per_block(fitter.seconds_per_step or 1.0)
    try:
        final, unigram = final_evaluation(args, accelerator, model, eval_sets, lm, token_bytes, byte_counts, budget,
                                          seconds_per_block, stop)
    except Preempted as stopped:  # training is complete: a resume only evaluates and saves
        return save_at_stop(accelerator, checkpoints, state, stop, str(stopped), last_skipped)
    if args.report_to != "none":
        accelerator.log({f"final/{s}_{k}": v for s, m in final.items() for k, v in m.items()}, step=state.completed_steps)
    unwrapped = accelerator.unwrap_model(model)
    sample = None
    # Sharded parameters (ZeRO-3, FSDP) are gathered by collectives inside every forward: all processes generate then.
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if args.sample_tokens and (accelerator.is_main_process or sharded):
        sample = generate_sample(unwrapped, tokenizer, SAMPLE_PROMPT, args.sample_tokens, seed=args.seed)
        accelerator.print(f"sample ({args.sample_tokens} tokens after {SAMPLE_PROMPT!r}):\n{sample}\n")
    steps_log = TrainLog.read(args.output_dir) if accelerator.is_main_process else []
    applied = [r for r in steps_log if not r["skipped_nonfinite"]]
    drift = loop.drift.summary(steps_log, accelerator)  # a collective: every process
    results = {
        "model": {
            **{k: getattr(unwrapped.config, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                               "num_attention_heads", "intermediate_size")},
            "architecture": model_class_name(unwrapped),
            "reversible": trains_reversibly(unwrapped),
        },
        # A pretrained Llama/GPT-2/... fine-tuned here: the model card describes a plain `transformers` checkpoint.
        "base_model": args.model_name_or_path if is_plain_transformers_model(unwrapped) else None,
        "num_parameters": num_parameters,
        "tokenizer": "byte" if is_byte_tokenizer(tokenizer) else (
            args.tokenizer_name or (args.model_name_or_path if args.tokenizer_type is None else "bpe")),
        "block_size": args.block_size,
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,  # e.g. FSDP, MULTI_CPU, DEEPSPEED, NO
        "mixed_precision": accelerator.mixed_precision,
        "train": {
            "steps": state.completed_steps,
            "max_train_steps": state.max_train_steps,
            "requested_steps": state.requested_steps,
            "stopped_early": loop.stop_reason is not None,
            "nonfinite_steps_skipped": state.nonfinite_steps,
            "tokens": state.tokens_seen,
            "train_time_s": state.train_time_s,
            "tokens_per_second": state.tokens_seen / max(state.train_time_s, 1e-9),
            "final_lr": applied[-1]["lr"] if applied else None,
            "final_lr_fraction_of_peak": applied[-1]["lr"] / args.learning_rate if applied else None,
            "budget_fits": [vars(f) for f in fitter.fits],
            "reversal_drift": drift,
        },
        "validation": final["validation"],
        "test": final.get("test"),
        "unigram_bpb": unigram,
        "eval_blocks": {split: {"evaluated": final[split]["blocks"], "in_split": lm[split].num_rows} for split in final},
        "eval_history": state.eval_history,
        "sample": {"prompt": SAMPLE_PROMPT, "text": sample},
        "time_budget_minutes": args.time_budget_minutes,
        "args": {k: v for k, v in vars(args).items() if k != "hub_token"},
        # Resumed with --allow_changed_settings: each time, the step and every setting's old and new value.
        "changed_settings": state.extra.get("changed_settings", []),
    }
    save_outputs(args, accelerator, model, tokenizer, results, steps_log, budget)
    if accelerator.is_main_process:
        accelerator.print(
            f"trained {state.completed_steps} steps, {state.tokens_seen:,} tokens in {state.train_time_s:.0f} s "
            f"({results['train']['tokens_per_second']:.0f} tokens/s); total {results['total_time_s']:.0f} s"
            + (f" of a {args.time_budget_minutes:g}-minute budget" if budget.bounded else "")
            + f"; last learning rate {results['train']['final_lr_fraction_of_peak']:.1%} of the peak; "
            + f"worst reversal drift {drift['worst_rel_err']} ({drift['probes']} probes); saved to "
            f"{args.output_dir} ({RESULTS_NAME}, {LOSS_CURVE_NAME})"
        )
        if push_checkpoint is not None:
            push_checkpoint(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def final_evaluation(
    args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, eval_sets: dict[str, datasets.Dataset],
    lm: DatasetDict, token_bytes: torch.Tensor, byte_counts: np.ndarray, budget: TimeBudget, seconds_per_block: float,
    stop: StopFlag | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Validation and test figures (and their unigram baselines) over evenly spaced blocks; with a time budget, as
    many blocks per split as the time left allows (the same number for every split and on every process; at least
    MIN_FINAL_EVAL_BLOCKS).

    The estimate of the evaluation speed can be wrong on a loaded machine, so each split also gets a deadline, its
    share of the time left: an evaluation that runs late ends there, over the blocks done so far. The blocks are
    evaluated in an order whose every prefix is spread over the whole split (`spread_order`), so a shortened
    evaluation still covers every part of it; the unigram baseline uses exactly the evaluated blocks."""
    final, unigram = {}, {}
    splits = [s for s in eval_sets if s != "periodic"]
    per_split = None
    if budget.bounded:  # what is left after the save, shared equally by the splits
        affordable = (budget.left() - FINAL_SAVE_SECONDS) / (EVAL_TIME_MARGIN * seconds_per_block) / len(splits)
        per_split = int(agreed_min(accelerator, max(MIN_FINAL_EVAL_BLOCKS, int(affordable))))
    for i, split in enumerate(splits):
        blocks = eval_sets[split]
        deadline = None
        if per_split is not None:
            blocks = evenly_spaced(blocks, min(per_split, blocks.num_rows))
            if blocks.num_rows < eval_sets[split].num_rows:
                logger.warning(f"Time budget: the final {split} evaluation uses {blocks.num_rows} of "
                               f"{eval_sets[split].num_rows} blocks.")
            deadline = time.time() + (budget.left() - FINAL_SAVE_SECONDS) / (len(splits) - i)
        blocks = blocks.select(spread_order(blocks.num_rows))
        loader = accelerator.prepare(DataLoader(blocks, collate_fn=collate_blocks, batch_size=args.per_device_eval_batch_size))
        final[split] = evaluate(model, loader, accelerator, token_bytes, stop=stop, deadline=deadline)
        if final[split]["blocks"] < blocks.num_rows:
            logger.warning(f"Time budget: the final {split} evaluation ran late and ended after "
                           f"{final[split]['blocks']} of {blocks.num_rows} blocks.")
            blocks = blocks.select(range(final[split]["blocks"]))
        unigram[split] = unigram_baseline_bpb(blocks, byte_counts)
        accelerator.print(
            f"{split}: loss {final[split]['loss']:.4f}, perplexity {final[split]['perplexity']:.3f}, bits-per-byte "
            f"{final[split]['bpb']:.4f} | unigram byte baseline {unigram[split]:.4f} bpb ({final[split]['tokens']:,} "
            f"tokens, {blocks.num_rows}/{lm[split].num_rows} blocks)"
        )
    return final, unigram


def save_outputs(args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerBase, results: dict[str, Any], steps_log: list[dict[str, Any]],
                 budget: TimeBudget) -> None:
    """Model, tokenizer, results, loss curve and model card move into --output_dir together (one atomic save)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    byte_level = results["tokenizer"] == "byte"

    def write(folder: Path) -> None:
        unwrapped.save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(folder)
        final_point = {"step": results["train"]["steps"], "loss": results["validation"]["loss"]}
        what = results["model"]["architecture"] if results["base_model"] else "LM"
        how = "reversible" if results["model"]["reversible"] else "non-reversible"
        plot_loss_curve(folder / LOSS_CURVE_NAME, steps_log, [*results["eval_history"], final_point],
                        f"{results['num_parameters'] / 1e6:.2f}M-parameter {how} {what}, blocks of {args.block_size}",
                        scale=1 / LN2 if byte_level else 1.0, unit="bits per byte" if byte_level else "loss (nats/token)")
        results["total_time_s"] = budget.elapsed()
        atomic_write_json(folder / RESULTS_NAME, results)
        # The same card code as `python -m reformer_rev.hub card`: YAML metadata + model-index from these results.
        write_model_card(folder, results, "causal-lm", repo_id=args.hub_model_id)

    save_model_folder(args.output_dir, write)


if __name__ == "__main__":
    main()
