#!/usr/bin/env python
"""Train a reversible causal language model on long sequences with 🤗 Accelerate.

Modelled on `transformers`' `run_clm_no_trainer.py` (same argument names), for `RevFormerForCausalLM`:

* data through `datasets`: a hub dataset (`--dataset_name`), local text/json files (`--train_file`), or by default
  the bundled long-document corpus (whole books of the public-domain KJV and WEB Bibles, split by book);
* a byte-level tokenizer (256 bytes + 4 specials) by default, `--tokenizer_name`, or a BPE trained on the training
  split (`--tokenizer_type bpe`); saved with the model as a `PreTrainedTokenizerFast`;
* documents concatenated and cut into `--block_size` blocks (up to 65,536 tokens and more) with `datasets.map`;
* one process, multi-process DDP or FSDP through `accelerate launch` (configs in `training/configs/`), mixed
  precision, gradient accumulation, warmup + cosine schedule, clipping;
* evaluation (loss, perplexity, bits-per-byte) every `--eval_steps` and at the end, against a unigram byte-frequency
  baseline on the same tokens; final test figures; everything in `results.json`;
* atomic, rotated `accelerator.save_state` checkpoints, `--resume_from_checkpoint {path,latest}` with the same data
  order; final `save_pretrained` of model + tokenizer and a model card with the run's numbers.

With no arguments it runs the project's main job (`make train`): a 6-layer byte-level model on the bundled corpus,
in minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, set_seed
from datasets import DatasetDict, load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

import reformer_rev  # noqa: F401  (registers the `reformer_rev` model type with the Auto classes)
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.distributed import register_fsdp_reversible_methods
from reformer_rev.model_card import write_model_card

try:  # imported as `training.train_lm` (tests) or run as a script (`python training/train_lm.py`)
    from .tokenization import build_byte_tokenizer, token_byte_counts, token_byte_lengths, train_bpe_tokenizer
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tokenization import build_byte_tokenizer, token_byte_counts, token_byte_lengths, train_bpe_tokenizer

logger = get_logger(__name__)

LN2 = math.log(2.0)
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE_NAME = "trainer_state.json"
TRAIN_LOG_NAME = "train_log.jsonl"
RESULTS_NAME = "results.json"
EVAL_SPEEDUP = 3.0  # conservative ratio of evaluation to training throughput (tokens/s), for the time budget
SAVE_MARGIN_S = 20.0


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None, help="A dataset on the Hugging Face Hub.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_file", type=str, default=None, help="Local .txt/.json/.jsonl(.gz) training file.")
    data.add_argument("--validation_file", type=str, default=None)
    data.add_argument("--test_file", type=str, default=None)
    data.add_argument("--text_column_name", type=str, default="text")
    data.add_argument(
        "--validation_split_percentage", type=int, default=5,
        help="Percent of the training documents held out when the data has no validation split.",
    )
    data.add_argument("--block_size", type=int, default=1024, help="Tokens per training block (long documents are cut).")
    data.add_argument("--preprocessing_num_workers", type=int, default=None)
    data.add_argument("--overwrite_cache", action="store_true")

    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer_type", choices=("byte", "bpe"), default="byte")
    tok.add_argument("--tokenizer_name", type=str, default=None, help="A pretrained tokenizer (overrides --tokenizer_type).")
    tok.add_argument("--bpe_vocab_size", type=int, default=4096)

    model = p.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=str, default=None, help="Start from a checkpoint instead of scratch.")
    model.add_argument("--config_name", type=str, default=None)
    model.add_argument("--hidden_size", type=int, default=128)
    model.add_argument("--num_hidden_layers", type=int, default=4)
    model.add_argument("--num_attention_heads", type=int, default=4)
    model.add_argument("--num_key_value_heads", type=int, default=None)
    model.add_argument("--intermediate_size", type=int, default=512)
    model.add_argument("--hidden_dropout", type=float, default=0.0)
    model.add_argument("--attention_dropout", type=float, default=0.0)
    model.add_argument("--chunk_size_feed_forward", type=int, default=0)
    model.add_argument("--loss_chunk_size", type=int, default=1024)
    model.add_argument("--max_position_embeddings", type=int, default=None, help="Default: max(block_size, 65536).")
    model.add_argument(
        "--no_reversible", dest="reversible", action="store_false",
        help="Train the plain-autograd twin (same modules, memory grows with depth).",
    )

    train = p.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=4)
    train.add_argument("--per_device_eval_batch_size", type=int, default=4)
    train.add_argument("--learning_rate", type=float, default=3e-3)
    train.add_argument("--weight_decay", type=float, default=0.01)
    train.add_argument("--adam_beta2", type=float, default=0.99)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=200, help="Overrides --num_train_epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--lr_scheduler_type", type=str, default="cosine",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    train.add_argument("--num_warmup_steps", type=int, default=20)
    train.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None,
                       help="Default: what `accelerate config`/launch says, else 'no'.")
    train.add_argument(
        "--skip_nonfinite_steps", type=int, default=0,
        help="A step whose loss or gradient norm is NaN/inf is not applied. 0: stop training with an error naming the "
        "step (the last checkpoint stays the last good one); N: skip up to N such steps, then stop.",
    )
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--cpu", action="store_true", help="Force CPU (also: real multi-process DDP under torchrun).")
    train.add_argument(
        "--time_budget_minutes", type=float, default=9.0,
        help="Wall-clock budget of the whole job (data, training, evaluation, saving); 0 disables it. After 10 steps, "
        "the measured step time shortens --max_train_steps (and the LR schedule with it) so that training plus the "
        "final evaluation fit; training also stops at that deadline.",
    )

    ev = p.add_argument_group("evaluation and logging")
    ev.add_argument("--eval_steps", type=int, default=100, help="Evaluate on the validation split every N steps; 0: end only.")
    ev.add_argument(
        "--max_eval_blocks", type=int, default=128,
        help="Final validation/test figures use at most N blocks per split, evenly spaced through the split (every "
        "book represented); the unigram baseline uses the same blocks. 0: whole splits.",
    )
    ev.add_argument(
        "--eval_subset_blocks", type=int, default=32,
        help="Periodic evaluations during training use N evenly spaced validation blocks. 0: the final set.",
    )
    ev.add_argument("--logging_steps", type=int, default=10)
    ev.add_argument("--report_to", type=str, default="none", help="'tensorboard', 'wandb', 'all' or 'none'.")

    out = p.add_argument_group("output and checkpoints")
    out.add_argument("--output_dir", type=str, default="outputs/lm")
    out.add_argument("--checkpointing_steps", type=int, default=None, help="Save the full training state every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep only the newest N checkpoints.")
    out.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder or 'latest'.")
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", type=str, default=None)
    out.add_argument("--hub_token", type=str, default=None)

    args = p.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail before any work is done, naming the bad argument."""
    positive = ["block_size", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"`--{name}` must be a positive integer, got {getattr(args, name)}.")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
    for name in ("eval_steps", "num_warmup_steps", "logging_steps", "max_eval_blocks", "eval_subset_blocks", "skip_nonfinite_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be > 0, got {args.learning_rate}.")
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
    if (args.validation_file or args.test_file) and not (args.train_file or args.dataset_name):
        raise ValueError("`--validation_file`/`--test_file` need a `--train_file` (or `--dataset_name`).")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id` (e.g. 'user/revformer-lm').")
    if args.time_budget_minutes is not None and args.time_budget_minutes < 0:
        raise ValueError(f"`--time_budget_minutes` must be >= 0 (0: no budget), got {args.time_budget_minutes}.")
    if args.time_budget_minutes == 0:
        args.time_budget_minutes = None


def _file_format(path: str) -> str | None:
    name = path[:-3] if path.endswith(".gz") else path
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"txt": "text", "text": "text", "json": "json", "jsonl": "json"}.get(ext)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_raw_datasets(args: argparse.Namespace) -> DatasetDict:
    """train/validation(/test) splits of whole documents, each with a `text` column."""
    if args.dataset_name is not None:
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
            raw = load_dataset(fmt, data_files=files, **kwargs)
        except datasets.exceptions.DatasetGenerationError as e:  # e.g. malformed JSON, columns differing by split
            cause = e.__cause__ or e.__context__ or e
            raise ValueError(f"Could not read the data files {files}: {type(cause).__name__}: {str(cause)[:300]}") from e
    else:
        try:
            from .corpus import load_bundled_lm_dataset
        except ImportError:
            from corpus import load_bundled_lm_dataset
        raw = load_bundled_lm_dataset()

    check_text_splits(raw, args)
    if "validation" not in raw:
        if raw["train"].num_rows < 2:
            raise ValueError("The training data has no validation split and fewer than 2 documents to hold one out.")
        held = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw = DatasetDict({"train": held["train"], "validation": held["test"], **{k: v for k, v in raw.items() if k not in ("train",)}})
    return raw


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


def get_tokenizer(args: argparse.Namespace, raw: DatasetDict, accelerator: Accelerator) -> PreTrainedTokenizerBase:
    if args.tokenizer_name is not None:
        return AutoTokenizer.from_pretrained(args.tokenizer_name)
    if args.model_name_or_path is not None and Path(args.model_name_or_path, "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.tokenizer_type == "byte":
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

    with accelerator.main_process_first():
        tokenized = raw.map(
            tokenize,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            load_from_cache_file=not args.overwrite_cache,
            desc="Tokenizing documents",
        )
        grouped = tokenized.map(
            group,
            batched=True,
            batch_size=1000,
            num_proc=args.preprocessing_num_workers,
            load_from_cache_file=not args.overwrite_cache,
            desc=f"Grouping into blocks of {block_size}",
        )
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


def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Full blocks need no padding: labels are the inputs (the model shifts them)."""
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
    max_batches: int | None = None,
) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits-per-byte over every target of every block, summed over processes.

    Per-block sums are gathered with `gather_for_metrics`, which drops the duplicates padded into the last batch, so
    the figures are exact whatever the number of processes. bpb = total nats / total bytes / ln 2 (for the byte
    tokenizer this is loss / ln 2).
    """
    model.eval()
    nats, tokens, nbytes = [], [], []
    for step, batch in enumerate(dataloader):
        if max_batches is not None and step >= max_batches:
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
    model.train()
    total_nats, total_tokens, total_bytes = sum(nats), sum(tokens), sum(nbytes)
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": total_nats / total_bytes / LN2,
        "tokens": int(total_tokens),
        "bytes": int(total_bytes),
    }


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, rotated, resumable
# --------------------------------------------------------------------------------------------------------------


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (temp folders of interrupted saves are ignored), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX) and (d / TRAINER_STATE_NAME).is_file():
            try:
                found.append((int(d.name[len(CHECKPOINT_PREFIX) :]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, state: dict[str, Any], total_limit: int | None
) -> Path:
    """`accelerator.save_state` into a temp folder, then rename: a checkpoint folder is either complete or absent.

    `trainer_state.json` (step, epoch, position in the epoch) is written last, inside the temp folder, and marks the
    checkpoint complete. Older checkpoints beyond `total_limit` are then deleted (main process).
    """
    root = checkpoint_root(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state['completed_steps']}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINER_STATE_NAME, "w") as f:
            json.dump(state, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(path_or_latest: str, output_dir: str | os.PathLike) -> Path | None:
    if path_or_latest == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(path_or_latest)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"`--resume_from_checkpoint` {path_or_latest!r} is not a complete checkpoint folder.")
    return path


def remove_interrupted_saves(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp folders of saves that were killed before their rename (never a complete checkpoint)."""
    root = checkpoint_root(output_dir)
    stale = sorted(root.glob(".tmp-*")) if root.is_dir() else []
    for d in stale:
        logger.warning(f"Removing {d}: an interrupted checkpoint save.")
        shutil.rmtree(d, ignore_errors=True)
    return stale


# --------------------------------------------------------------------------------------------------------------
# Per-step training log
# --------------------------------------------------------------------------------------------------------------


def block_fingerprints(input_ids: torch.Tensor) -> list[str]:
    """A short hash of each block of a batch: the log shows which samples every step saw (none twice, none skipped)."""
    rows = input_ids.detach().to("cpu", torch.int64).numpy()
    return [f"{zlib.crc32(row.tobytes()):08x}" for row in rows]


def open_train_log(output_dir: str | os.PathLike, completed_steps: int):
    """`train_log.jsonl`, truncated to the steps <= `completed_steps` (0: a new run), opened for appending."""
    path = Path(output_dir) / TRAIN_LOG_NAME
    kept = []
    if completed_steps > 0 and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= completed_steps:
                    kept.append(line + "\n")
            except (ValueError, KeyError):  # a line cut by a kill
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return open(path, "a")


def log_step(
    log, step: int, epoch: int, loss: float | None, lr: float, grad_norm: torch.Tensor | None, skipped: bool, samples: list[str]
) -> None:
    if log is None:
        return
    record = {
        "step": step, "epoch": epoch, "loss": loss, "lr": lr,
        "grad_norm": None if grad_norm is None or not torch.isfinite(grad_norm) else grad_norm.item(),
        "skipped_nonfinite": skipped, "samples": samples,
    }
    log.write(json.dumps(record) + "\n")
    log.flush()


# --------------------------------------------------------------------------------------------------------------
# Model card and Hub
# --------------------------------------------------------------------------------------------------------------


def _get_push_function():
    """`reformer_rev.hub.push_checkpoint`, checked before training so a run does not fail at its very end."""
    try:
        from reformer_rev.hub import push_checkpoint
    except ImportError as e:
        raise RuntimeError(
            "`--push_to_hub` needs `reformer_rev.hub.push_checkpoint`, which is not available in this installation."
        ) from e
    return push_checkpoint


# --------------------------------------------------------------------------------------------------------------
# Model and distributed helpers
# --------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> RevFormerForCausalLM:
    if args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
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
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if args.config_name is not None:
        config = AutoConfig.from_pretrained(args.config_name, vocab_size=len(tokenizer), **special)
    else:
        config = RevFormerConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads,
            intermediate_size=args.intermediate_size,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            chunk_size_feed_forward=args.chunk_size_feed_forward,
            loss_chunk_size=args.loss_chunk_size,
            max_position_embeddings=args.max_position_embeddings or max(args.block_size, 65536),
            reversible=args.reversible,
            **special,
        )
    if config.max_position_embeddings < args.block_size:
        raise ValueError(
            f"`--block_size` {args.block_size} exceeds the model's max_position_embeddings {config.max_position_embeddings}."
        )
    return AutoModelForCausalLM.from_config(config)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The `Accelerator` of a run. DDP must not look for unused parameters: the recomputing backward accumulates
    gradients from inside a custom autograd Function, which `find_unused_parameters=True` misreads (docs/design.md §2)."""
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # Data order depends only on (seed, epoch): a resumed run sees the very same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (not norms, biases, or 1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    push_checkpoint = _get_push_function() if args.push_to_hub else None
    accelerator = make_accelerator(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        # e.g. plain `torchrun` on a machine without GPUs: every process would train alone, each as "rank 0".
        raise RuntimeError(
            f"Launched as {os.environ['WORLD_SIZE']} processes but Accelerate set up a single one. On CPU pass --cpu "
            "(or set ACCELERATE_USE_CPU=1) so the processes form one DDP group."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        remove_interrupted_saves(args.output_dir)
    accelerator.wait_for_everyone()
    start_time = time.time()

    # ---- data --------------------------------------------------------------------------------------------------
    raw = load_raw_datasets(args)
    tokenizer = get_tokenizer(args, raw, accelerator)
    lm = tokenize_and_group(raw, tokenizer, args, accelerator)
    token_bytes = torch.as_tensor(token_byte_lengths(tokenizer))
    byte_counts = token_byte_counts(tokenizer)
    eval_sets = {split: evenly_spaced(lm[split], args.max_eval_blocks) for split in lm if split != "train"}
    eval_sets["periodic"] = evenly_spaced(eval_sets["validation"], args.eval_subset_blocks)
    unigram = {split: unigram_baseline_bpb(ds, byte_counts) for split, ds in eval_sets.items()}
    logger.info(
        f"blocks of {args.block_size}: " + ", ".join(f"{k} {v.num_rows}" for k, v in lm.items())
        + "; unigram baseline bpb: " + ", ".join(f"{k} {v:.4f}" for k, v in unigram.items()),
        main_process_only=True,
    )

    # A private generator: creating the loader's iterator then draws no number from the global RNG, so a resumed run
    # replays dropout exactly (its restored RNG state is not shifted by re-creating the iterator).
    train_dataloader = DataLoader(
        lm["train"], shuffle=True, collate_fn=collate_blocks, batch_size=args.per_device_train_batch_size,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_dataloaders = {
        split: DataLoader(ds, collate_fn=collate_blocks, batch_size=args.per_device_eval_batch_size)
        for split, ds in eval_sets.items()
    }

    # ---- model, optimizer, schedule ----------------------------------------------------------------------------
    model = build_model(args, tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, args.adam_beta2)
    )
    model, optimizer, train_dataloader, *eval_loaders = accelerator.prepare(
        model, optimizer, train_dataloader, *eval_dataloaders.values()
    )
    eval_dataloaders = dict(zip(eval_dataloaders, eval_loaders))
    patched = register_fsdp_reversible_methods(model)
    if accelerator.distributed_type == DistributedType.FSDP and patched == 0:
        raise ValueError(
            "FSDP needs `fsdp_version: 2` with `fsdp_transformer_layer_cls_to_wrap: RevFormerBlock` "
            "(training/configs/fsdp.yaml): the reversible blocks' f/g must run under FSDP2's hooks."
        )
    if (
        isinstance(model, torch.nn.parallel.DistributedDataParallel)
        and accelerator.unwrap_model(model).config.chunk_size_feed_forward > 0
    ):
        # The recompute back-propagates each feed-forward chunk separately, so each FFN weight's gradient hook fires
        # once per chunk, which DDP rejects ("marked as ready twice"); static_graph fails with gradient accumulation.
        raise ValueError(
            "`--chunk_size_feed_forward` > 0 is not supported with multi-process DDP (the chunked recompute fires each "
            "feed-forward gradient hook once per chunk). Use 0, or FSDP."
        )

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    ckpt, resume_state = None, None
    if args.resume_from_checkpoint:
        ckpt = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if ckpt is None:
            logger.warning(f"No checkpoint found in {checkpoint_root(args.output_dir)}: starting from scratch.")
        else:
            resume_state = json.loads((ckpt / TRAINER_STATE_NAME).read_text())
            # The (possibly time-budgeted) length of the run is part of its state: the LR schedule depends on it.
            args.max_train_steps = resume_state["max_train_steps"]
    # Stepped by hand once per optimizer step (not via `prepare`, which would step it once per process).
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    accelerator.register_for_checkpointing(lr_scheduler)

    if args.report_to != "none":
        accelerator.init_trackers("train_lm", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    # ---- resume ------------------------------------------------------------------------------------------------
    completed_steps, starting_epoch, skip_batches, tokens_seen, train_time = 0, 0, 0, 0, 0.0
    nonfinite_steps = 0
    eval_history: list[dict[str, Any]] = []
    budget_fitted = resume_state is not None and resume_state.get("budget_fitted", False)
    if resume_state is not None:
        accelerator.load_state(str(ckpt))
        state = resume_state
        completed_steps, starting_epoch = state["completed_steps"], state["epoch"]
        skip_batches, tokens_seen = state["batches_in_epoch"], state["tokens_seen"]
        train_time, eval_history = state["train_time_s"], state["eval_history"]
        nonfinite_steps = state.get("nonfinite_steps", 0)
        logger.info(f"Resumed from {ckpt} at step {completed_steps} (epoch {starting_epoch}, batch {skip_batches}).")

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {num_parameters / 1e6:.2f}M parameters, {lm['train'].num_rows} blocks of {args.block_size}, "
        f"{args.max_train_steps} steps of {total_batch} blocks ({total_batch * args.block_size:,} tokens), "
        f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision} *****",
        main_process_only=True,
    )
    progress = tqdm(
        total=args.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process,
        desc="train", dynamic_ncols=True,
    )

    def run_eval(split: str) -> dict[str, float]:
        return evaluate(model, eval_dataloaders[split], accelerator, token_bytes)

    tokens_per_micro_batch = args.per_device_train_batch_size * args.block_size * accelerator.num_processes
    window_loss, window_n, window_start, window_tokens = 0.0, 0, time.time(), 0
    stopped_early = False
    first_step, calib_start, train_deadline = completed_steps, time.time(), None
    final_eval_tokens = sum(eval_sets[split].num_rows for split in ("validation", "test") if split in eval_sets)
    final_eval_tokens *= args.block_size
    periodic_eval_tokens = eval_sets["periodic"].num_rows * args.block_size
    # Per-step log (main process), flushed every step so a killed run keeps it; on resume the steps after the
    # checkpoint are dropped, so the file always describes the run that produced the current weights.
    train_log = open_train_log(args.output_dir, completed_steps) if accelerator.is_main_process else None
    step_loss, step_micro, step_samples = torch.zeros((), device=accelerator.device), 0, []
    check_grad_norm, step_nonfinite = accelerator.mixed_precision != "fp16", False
    model.train()
    segment_start = time.time()
    for epoch in range(starting_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches_in_epoch = skip_batches if epoch == starting_epoch else 0
        loader = (
            accelerator.skip_first_batches(train_dataloader, batches_in_epoch) if batches_in_epoch else train_dataloader
        )
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                step_loss, step_micro = step_loss + loss.detach().float(), step_micro + 1
                step_samples.extend(block_fingerprints(batch["input_ids"]))
                if accelerator.sync_gradients:
                    grad_norm = None
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        grad_norm = None if grad_norm is None else torch.as_tensor(grad_norm, dtype=torch.float32)
                    # fp16's GradScaler skips inf gradients itself; any other non-finite loss/norm is divergence.
                    norm_bad = grad_norm is not None and check_grad_norm and not torch.isfinite(grad_norm).item()
                    local_bad = float((not torch.isfinite(step_loss).item()) or norm_bad)
                    # One collective per step: all ranks see the mean loss and take the same skip/stop decision.
                    stats = accelerator.reduce(
                        torch.stack([torch.nan_to_num(step_loss), step_loss.new_tensor(float(step_micro)), step_loss.new_tensor(local_bad)]),
                        "sum",
                    )
                    step_nonfinite = stats[2].item() > 0
                    lr = lr_scheduler.get_last_lr()[0]
                    if step_nonfinite:
                        optimizer.zero_grad()  # the step is not applied: weights, optimizer and schedule unchanged
                        nonfinite_steps += 1
                        where = (
                            f"at step {completed_steps + 1} (epoch {epoch}, batch {batches_in_epoch + 1} of the epoch): "
                            f"loss {step_loss.item()}"
                            + (f", gradient norm {grad_norm.item()}" if grad_norm is not None else "")
                        )
                        log_step(train_log, completed_steps + 1, epoch, None, lr, grad_norm, True, step_samples)
                        if nonfinite_steps > args.skip_nonfinite_steps:
                            good = list_checkpoints(args.output_dir)
                            raise RuntimeError(
                                f"Non-finite training loss or gradients {where}. Training stopped "
                                f"({nonfinite_steps - 1} step(s) skipped before, --skip_nonfinite_steps "
                                f"{args.skip_nonfinite_steps}); no checkpoint was written after the last good step: "
                                f"last checkpoint {good[-1] if good else 'none'}. Lower --learning_rate (or lengthen "
                                "--num_warmup_steps), then --resume_from_checkpoint latest."
                            )
                        logger.warning(
                            f"Non-finite training loss or gradients {where}: step skipped "
                            f"({nonfinite_steps}/{args.skip_nonfinite_steps} allowed)."
                        )
                    else:
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            lr_scheduler.step()
                        optimizer.zero_grad()
                        mean = (stats[0] / stats[1]).item()
                        log_step(train_log, completed_steps + 1, epoch, mean, lr, grad_norm, False, step_samples)
                    step_loss, step_micro, step_samples = torch.zeros((), device=accelerator.device), 0, []
            batches_in_epoch += 1
            tokens_seen += tokens_per_micro_batch
            window_tokens += tokens_per_micro_batch
            window_loss += loss.detach().float().item()
            window_n += 1
            if not accelerator.sync_gradients:
                continue

            completed_steps += 1
            progress.update(1)
            elapsed = time.time() - window_start
            lr = lr_scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{window_loss / window_n:.4f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):.0f}", lr=f"{lr:.2e}")
            if args.logging_steps and completed_steps % args.logging_steps == 0:
                mean_loss = accelerator.reduce(torch.tensor(window_loss / window_n, device=accelerator.device), "mean").item()
                if args.report_to != "none":
                    accelerator.log(
                        {"train/loss": mean_loss, "train/bpb": mean_loss / LN2, "train/lr": lr,
                         "train/tokens_per_second": window_tokens / max(elapsed, 1e-9)},
                        step=completed_steps,
                    )
                window_loss, window_n, window_start, window_tokens = 0.0, 0, time.time(), 0

            if args.eval_steps and completed_steps % args.eval_steps == 0 and completed_steps < args.max_train_steps:
                train_time += time.time() - segment_start
                metrics = run_eval("periodic")
                eval_history.append({"step": completed_steps, **metrics})
                progress.write(
                    f"step {completed_steps}: validation loss {metrics['loss']:.4f}, ppl {metrics['perplexity']:.3f}, "
                    f"bpb {metrics['bpb']:.4f} (unigram baseline {unigram['periodic']:.4f}, {metrics['tokens']:,} tokens)"
                )
                if args.report_to != "none":
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
                segment_start = time.time()

            end_of_epoch = batches_in_epoch >= len(train_dataloader)
            # Never a checkpoint right after a non-finite step: the newest checkpoint stays the last good state.
            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0 and not step_nonfinite:
                state = {
                    "completed_steps": completed_steps,
                    "epoch": epoch + 1 if end_of_epoch else epoch,
                    "batches_in_epoch": 0 if end_of_epoch else batches_in_epoch,
                    "max_train_steps": args.max_train_steps,
                    "budget_fitted": budget_fitted,
                    "nonfinite_steps": nonfinite_steps,
                    "tokens_seen": tokens_seen,
                    "train_time_s": train_time + time.time() - segment_start,
                    "eval_history": eval_history,
                }
                save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
            if args.time_budget_minutes is not None and not budget_fitted and completed_steps == first_step + 10:
                # Fit training + final evaluation into the budget with a complete LR schedule, rather than cutting
                # the run off mid-schedule. Forward-only evaluation runs ~4x faster per token than a training step
                # (measured); EVAL_SPEEDUP is a conservative 3.
                now = time.time()
                per_step = (now - calib_start) / 9
                eval_rate = EVAL_SPEEDUP * tokens_per_micro_batch * args.gradient_accumulation_steps / per_step
                deadline = start_time + 60 * args.time_budget_minutes - final_eval_tokens / eval_rate - SAVE_MARGIN_S
                periodic = periodic_eval_tokens / eval_rate / args.eval_steps if args.eval_steps else 0.0
                fitted = completed_steps + int((deadline - now) / (per_step + periodic))
                fitted = int(accelerator.reduce(torch.tensor(float(fitted), device=accelerator.device), "min").item())
                train_deadline, budget_fitted = deadline, True
                if fitted < args.max_train_steps:
                    logger.warning(
                        f"{per_step:.2f} s/step: --max_train_steps {args.max_train_steps} -> {fitted} to fit "
                        f"--time_budget_minutes={args.time_budget_minutes}.", main_process_only=True,
                    )
                    args.max_train_steps = max(fitted, completed_steps + 1)
                    refit = get_scheduler(
                        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                        num_training_steps=args.max_train_steps,
                    )
                    lr_scheduler.lr_lambdas = refit.lr_lambdas
                    lr_scheduler.last_epoch -= 1
                    lr_scheduler.step()
                    progress.total = args.max_train_steps
            if completed_steps == first_step + 1:
                calib_start = time.time()
            if train_deadline is not None:
                # Every rank must take the same decision.
                over = accelerator.reduce(torch.tensor(float(time.time() > train_deadline), device=accelerator.device), "max")
                if over.item() > 0 and completed_steps < args.max_train_steps:
                    logger.warning(f"Time budget reached at step {completed_steps}: stopping training.")
                    stopped_early = True
            if completed_steps >= args.max_train_steps or stopped_early:
                break
        skip_batches = 0
        if completed_steps >= args.max_train_steps or stopped_early:
            break
    train_time += time.time() - segment_start
    progress.close()
    if train_log is not None:
        train_log.close()

    # ---- final evaluation, save --------------------------------------------------------------------------------
    final = {split: run_eval(split) for split in eval_dataloaders if split != "periodic"}
    unigram.pop("periodic")
    for split, metrics in final.items():
        accelerator.print(
            f"{split}: loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f}, bits-per-byte {metrics['bpb']:.4f} "
            f"| unigram byte baseline {unigram[split]:.4f} bpb ({metrics['tokens']:,} tokens, "
            f"{eval_sets[split].num_rows}/{lm[split].num_rows} blocks)"
        )
    if args.report_to != "none":
        accelerator.log({f"final/{s}_{k}": v for s, m in final.items() for k, v in m.items()}, step=completed_steps)

    unwrapped = accelerator.unwrap_model(model)
    results = {
        "model": {k: getattr(unwrapped.config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "reversible")},
        "num_parameters": num_parameters,
        "tokenizer": "byte" if args.tokenizer_name is None and args.tokenizer_type == "byte" else (args.tokenizer_name or "bpe"),
        "block_size": args.block_size,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "train": {
            "steps": completed_steps,
            "max_train_steps": args.max_train_steps,
            "stopped_early": stopped_early,
            "nonfinite_steps_skipped": nonfinite_steps,
            "tokens": tokens_seen,
            "train_time_s": train_time,
            "tokens_per_second": tokens_seen / max(train_time, 1e-9),
        },
        "validation": final["validation"],
        "test": final.get("test"),
        "unigram_bpb": unigram,
        "eval_blocks": {split: {"evaluated": eval_sets[split].num_rows, "in_split": lm[split].num_rows} for split in final},
        "eval_history": eval_history,
        "total_time_s": time.time() - start_time,
        "args": {k: v for k, v in vars(args).items() if k != "hub_token"},
    }
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(args.output_dir)
        results["total_time_s"] = time.time() - start_time
        with open(Path(args.output_dir) / RESULTS_NAME, "w") as f:
            json.dump(results, f, indent=2)
        # The same card code as `python -m reformer_rev.hub card`: YAML metadata + model-index from these results.
        write_model_card(args.output_dir, results, "causal-lm", repo_id=args.hub_model_id)
        accelerator.print(
            f"trained {completed_steps} steps, {tokens_seen:,} tokens in {train_time:.0f} s "
            f"({results['train']['tokens_per_second']:.0f} tokens/s); total {results['total_time_s']:.0f} s; "
            f"saved to {args.output_dir}"
        )
        if push_checkpoint is not None:
            push_checkpoint(args.output_dir, args.hub_model_id, args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
