"""Command-line pieces shared by the training scripts: argument groups, config-from-arguments, Accelerator, optimizer.

Argument names follow `transformers`' `run_clm_no_trainer.py` / `run_translation_no_trainer.py`. Model arguments are
generated from `RevFormerConfig` itself (names, types and help text), so a config field is exposed on the command line
by naming it, and `config_from_args` turns the parsed values back into a config.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
)

from ..configuration_reformer_rev import RevFormerConfig
from ..distributed import register_deepspeed_zero3_scopes, register_fsdp_reversible_methods
from .budget import SCHEDULES


# --------------------------------------------------------------------------------------------------------------
# Model arguments, generated from RevFormerConfig
# --------------------------------------------------------------------------------------------------------------


def _config_field_help() -> dict[str, str]:
    """`name: text` entries of `RevFormerConfig`'s docstring (joined continuation lines; 'a / b:' names both)."""
    doc = inspect.getdoc(RevFormerConfig) or ""
    entries, current = {}, None
    for line in doc.splitlines():
        m = re.match(r"^    ([\w]+(?: / [\w]+)*): (.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split("/")]
            for name in current:
                entries[name] = m.group(2)
        elif current and line.startswith("        "):
            for name in current:
                entries[name] += " " + line.strip()
        else:
            current = None
    return entries


def add_model_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """One option per `RevFormerConfig` field in `defaults` (field name -> this script's default).

    Booleans become `--name` (default False) or `--no_name` (default True); a `None` default takes the type of the
    field's annotation. Help texts are the config's own documentation.
    """
    params = inspect.signature(RevFormerConfig.__init__).parameters
    help_text = _config_field_help()
    group = parser.add_argument_group("model (RevFormerConfig fields)")
    for name, default in defaults.items():
        if name not in params:
            raise ValueError(f"{name!r} is not a RevFormerConfig field.")
        text = help_text.get(name, "")
        if isinstance(default, bool):
            flag = f"--no_{name}" if default else f"--{name}"
            group.add_argument(flag, dest=name, action="store_false" if default else "store_true", help=text)
            continue
        kind = type(default) if default is not None else _annotation_type(params[name].annotation)
        group.add_argument(f"--{name}", type=kind, default=default, help=text)


def _annotation_type(annotation: Any) -> type:
    text = str(annotation)
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if re.search(rf"\b{name}\b", text):
            return kind
    return str


def config_from_args(args: argparse.Namespace, fields: Iterable[str], **fixed: Any) -> RevFormerConfig:
    """`RevFormerConfig` from the parsed `fields` (`None` = the config's default) plus `fixed` values."""
    values = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    return RevFormerConfig(**{**values, **fixed})


# --------------------------------------------------------------------------------------------------------------
# Training, budget and checkpoint arguments
# --------------------------------------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Optimisation, precision, time budget and fault-handling options (`defaults` overrides per script)."""
    d = {
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
        "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999, "max_grad_norm": 1.0, "num_train_epochs": 1,
        "max_train_steps": None, "gradient_accumulation_steps": 1, "lr_scheduler_type": "cosine",
        "num_warmup_steps": 0, "mixed_precision": None, "seed": 42, "time_budget_minutes": None,
        "batch_size_help": None, **defaults,
    }
    g = parser.add_argument_group("training")
    g.add_argument("--per_device_train_batch_size", type=int, default=d["per_device_train_batch_size"],
                   help=d.get("batch_size_help"))
    g.add_argument("--per_device_eval_batch_size", type=int, default=d["per_device_eval_batch_size"],
                   help=d.get("batch_size_help"))
    g.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="Peak learning rate.")
    g.add_argument("--weight_decay", type=float, default=d["weight_decay"], help="AdamW decay of matrices only.")
    g.add_argument("--adam_beta1", type=float, default=d["adam_beta1"])
    g.add_argument("--adam_beta2", type=float, default=d["adam_beta2"])
    g.add_argument("--max_grad_norm", type=float, default=d["max_grad_norm"], help="Gradient clipping; 0 disables it.")
    g.add_argument("--num_train_epochs", type=int, default=d["num_train_epochs"])
    g.add_argument("--max_train_steps", type=int, default=d["max_train_steps"], help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d["gradient_accumulation_steps"])
    g.add_argument("--lr_scheduler_type", choices=SCHEDULES, default=d["lr_scheduler_type"])
    g.add_argument("--num_warmup_steps", type=int, default=d["num_warmup_steps"])
    g.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=d["mixed_precision"],
                   help="Default: what `accelerate config`/launch says, else 'no'.")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--cpu", action="store_true", help="Force CPU (also: real multi-process DDP under torchrun).")
    g.add_argument(
        "--skip_nonfinite_steps", type=int, default=0,
        help="A step whose loss or gradient norm is NaN/inf is not applied. 0: stop training with an error naming the "
        "step (the last checkpoint stays the last good one); N: skip up to N such steps, then stop.",
    )
    g.add_argument(
        "--time_budget_minutes", "--max_train_minutes", dest="time_budget_minutes", type=float,
        default=d["time_budget_minutes"],
        help="Wall-clock budget of the whole job from process start: data preparation, training, evaluation and "
        "saving (0 or unset: none). The measured step time shortens --max_train_steps and the learning-rate schedule "
        "with it, so that the schedule completes; it is re-fitted when the step time drifts; the final evaluation is "
        "sized to the time left. (--max_train_minutes is the older name.)",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser, output_dir: str | None,
                             checkpointing_steps: int | None = None, total_limit: int = 2) -> None:
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=str, default=output_dir, required=output_dir is None)
    g.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps,
                   help="Save the full training state every N optimizer steps (checkpoints/step_N).")
    g.add_argument("--checkpoints_total_limit", type=int, default=total_limit, help="Keep only the newest N checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint", type=str, default=None,
        help="'latest' (the newest checkpoint that passes verification; damaged ones are skipped with a warning) or "
        "a checkpoint folder (used as is: an error if it fails verification).",
    )


def validate_training_args(args: argparse.Namespace) -> None:
    """The checks every script shares; fail before any work, naming the argument."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs"):
        if getattr(args, name) <= 0:
            raise ValueError(f"`--{name}` must be a positive integer, got {getattr(args, name)}.")
    for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
    for name in ("num_warmup_steps", "skip_nonfinite_steps", "max_grad_norm", "weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be > 0, got {args.learning_rate}.")
    if args.time_budget_minutes is not None and args.time_budget_minutes < 0:
        raise ValueError(f"`--time_budget_minutes` must be >= 0 (0: no budget), got {args.time_budget_minutes}.")
    if args.time_budget_minutes == 0:
        args.time_budget_minutes = None
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise ValueError(f"`--resume_from_checkpoint` {resume!r} is neither 'latest' nor a checkpoint folder.")


# --------------------------------------------------------------------------------------------------------------
# Accelerator, logging, optimizer
# --------------------------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace, **kwargs: Any) -> Accelerator:
    """The `Accelerator` of a run. DDP must not look for unused parameters: the recomputing backward accumulates
    gradients from inside a custom autograd Function, which `find_unused_parameters=True` misreads (docs/design.md §2).
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # DeepSpeed without GPUs initialises gloo itself; Accelerate would find no backend and record a single
        # process while DeepSpeed reduces over all of them (docs/distributed.md).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
        # Data order depends only on (seed, epoch): a resumed run sees the very same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=handlers,
        **kwargs,
    )
    adopt_fsdp_on_cpu(accelerator)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        # e.g. plain `torchrun` on a machine without GPUs: every process would train alone, each as "rank 0".
        raise RuntimeError(
            f"Launched as {os.environ['WORLD_SIZE']} processes but Accelerate set up a single one. On CPU pass --cpu "
            "(or set ACCELERATE_USE_CPU=1) so the processes form one DDP group."
        )
    return accelerator


def adopt_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin | None = None) -> bool:
    """Honour an FSDP2 plugin on CPU (gloo), which Accelerate silently drops: its `AcceleratorState` turns FSDP on only
    for accelerator devices and gives plain DDP (`MULTI_CPU`) otherwise (docs/distributed.md). Without `plugin`, the one
    `accelerate launch --config_file ...fsdp.yaml` describes through its `ACCELERATE_USE_FSDP`/`FSDP_*` environment.
    Then `accelerator.prepare` runs Accelerate's own FSDP2 preparation (`fully_shard` per `_no_split_modules` layer and
    the root, sharded optimizer state, FSDP state dicts). Used by the training scripts (`make_accelerator`) and by the
    CPU tests; a no-op on GPUs, where Accelerate does this itself. Returns whether FSDP2 was adopted."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    if plugin is None:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
            return False
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` sets
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP on CPU needs `fsdp_version: 2` (FSDP2, `fully_shard`), got fsdp_version {plugin.fsdp_version}."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # Both shared states: a later `AcceleratorState()` (Accelerate builds them inside `prepare`) copies the partial one.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return True


def prepare_distributed_model(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """After `accelerator.prepare`, what the reversible blocks need from the distributed wrapper (docs/distributed.md):
    under FSDP2 their f/g run through FSDP's hooks; under DeepSpeed their gradients are delivered while ZeRO-3 has
    their parameters gathered (a no-op for ZeRO-1/2). Both training scripts call it; DDP needs nothing."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        register_deepspeed_zero3_scopes(model)
    patched = register_fsdp_reversible_methods(model)
    if accelerator.distributed_type == DistributedType.FSDP and patched == 0:
        raise ValueError(
            "FSDP needs `fsdp_version: 2` with `fsdp_transformer_layer_cls_to_wrap: RevFormerBlock` "
            "(training/configs/fsdp.yaml): the reversible blocks' f/g must run under FSDP2's hooks."
        )


def setup_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        logging.getLogger("reformer_rev").setLevel(logging.ERROR)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: not norms, biases, gates or any other 1-D parameter."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        weight_decay_groups(model, args.weight_decay), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2)
    )


__all__ = [
    "add_checkpoint_arguments",
    "add_model_arguments",
    "add_training_arguments",
    "config_from_args",
    "make_accelerator",
    "make_optimizer",
    "prepare_distributed_model",
    "setup_logging",
    "validate_training_args",
    "weight_decay_groups",
]
