"""Command-line pieces shared by the training scripts: the option table, config-from-arguments, Accelerator, optimizer.

Every option of both scripts is one `Option` row: its name, default and help text. The parser, the defaults that
`--help` shows and the values an unset option takes all come from that one row, so they cannot disagree. Adding an
option to a script is one line in its table:

    Option("packing", False, "Pack several documents into one block.", group="data"),

Argument names follow `transformers`' `run_clm_no_trainer.py` / `run_translation_no_trainer.py`. Model options are
generated from `RevFormerConfig` itself (names, types and help text), so a config field is exposed on the command line
by naming it, and `config_from_args` turns the parsed values back into a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
# The option table
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One command-line option `--name`.

    * `default`: the value when the option is not given; its type is the option's type (`type` is needed only when
      the default is `None`). A boolean default makes a flag: `--name` sets True (default False), `--no_name` sets
      False (default True).
    * `help`: what the option does (required: no option goes without one).
    * `default_text`: what `--help` shows as the default when the value alone would not say it (e.g. a `None` that
      means "computed from --block_size").
    * `minimum`: the smallest accepted value (checked after parsing; a `ValueError` names the option). Float options
      must also be finite.
    * `choices`, `nargs`, `aliases` (older names), `required`, `group` (the `--help` section) as in argparse.
    * `fingerprint`: whether the option changes what a run trains (optimizer, schedule, batch, data, model,
      precision, seed). Those are recorded in every checkpoint, and a resume with another value stops unless
      `--allow_changed_settings` (`reformer_rev.training.settings`). False for what only changes evaluation,
      logging, checkpoint cadence, the run's length or where things go.
    """

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    minimum: float | None = None
    default_text: str | None = None
    group: str = "training"
    aliases: tuple[str, ...] = ()
    nargs: str | None = None
    required: bool = False
    fingerprint: bool = True

    def __post_init__(self) -> None:
        if not self.help.strip():
            raise ValueError(f"Option --{self.name} has no help text.")

    @property
    def is_flag(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def flag(self) -> str:
        return f"--no_{self.name}" if self.default is True else f"--{self.name}"

    def shown_default(self) -> str | None:
        """The default as `--help` shows it (None: nothing to show, e.g. an off flag)."""
        if self.default_text is not None:
            return self.default_text
        if self.is_flag or self.default is None or self.default == []:
            return None
        return str(self.default)

    def help_text(self) -> str:
        text = self.help.replace("%", "%%")  # argparse formats help strings with %
        if self.is_flag and self.default:
            text = f"Sets {self.name} to False (it is True unless this flag is given). {text}"
        shown = self.shown_default()
        return text if shown is None else f"{text} (default: {shown.replace('%', '%%')})"

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        names = [self.flag, *(f"--{a}" for a in self.aliases)]
        if self.is_flag:
            action = "store_false" if self.default else "store_true"
            parser.add_argument(*names, dest=self.name, action=action, help=self.help_text())
            return
        kind = self.type or (type(self.default) if self.default is not None and self.nargs is None else str)
        parser.add_argument(*names, dest=self.name, type=kind, default=self.default, choices=self.choices,
                            nargs=self.nargs, required=self.required, help=self.help_text())

    def check(self, value: Any) -> None:
        """`ValueError` naming the option when `value` is out of range (after parsing)."""
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"`--{self.name}` must be a finite number, got {v}.")
            if self.minimum is not None and v is not None and not isinstance(v, bool) and v < self.minimum:
                what = "a positive integer" if self.minimum == 1 and isinstance(v, int) else f">= {self.minimum:g}"
                raise ValueError(f"`--{self.name}` must be {what}, got {v}.")


def with_defaults(options: Iterable[Option], **defaults: Any) -> list[Option]:
    """`options` with some defaults replaced (a script's own values for shared options). `name=Option(...)` replaces
    the whole row; an unknown name is an error, so a typo cannot silently add nothing."""
    rows = list(options)
    known = {o.name for o in rows}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown}; known: {sorted(known)}.")
    out = []
    for o in rows:
        if o.name not in defaults:
            out.append(o)
        elif isinstance(defaults[o.name], Option):
            out.append(defaults[o.name])
        else:
            out.append(dataclasses.replace(o, default=defaults[o.name], default_text=None))
    return out


class OptionParser(argparse.ArgumentParser):
    """An `ArgumentParser` built from an option table; `parse_args` also checks every option's range."""

    def __init__(self, description: str, options: Iterable[Option], **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)
        self.options = list(options)
        names = [o.name for o in self.options]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"Options defined twice: {duplicated}.")
        groups: dict[str, argparse._ArgumentGroup] = {}
        for option in self.options:
            if option.group not in groups:
                groups[option.group] = self.add_argument_group(option.group)
            option.add_to(groups[option.group])

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        for option in self.options:
            option.check(getattr(parsed, option.name))
        return parsed

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}


# --------------------------------------------------------------------------------------------------------------
# Model options, generated from RevFormerConfig
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


def _annotation_type(annotation: Any) -> Callable[[str], Any]:
    """The parser of a config field's values; for an optional field, 'none' (or 'auto') parses as `None`."""
    text = str(annotation)
    kind: Callable[[str], Any] = str
    for name, candidate in (("int", int), ("float", float), ("str", str)):
        if re.search(rf"\b{name}\b", text):
            kind = candidate
            break
    if "None" not in text:
        return kind

    def optional(value: str) -> Any:
        return None if value.strip().lower() in ("none", "auto") else kind(value)

    optional.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return optional


def model_options(defaults: dict[str, Any], **default_texts: str) -> list[Option]:
    """One option per `RevFormerConfig` field in `defaults` (field name -> this script's default), with the config's
    own documentation as help. Where the script's default differs from the config's, `--help` shows both (and the
    config doc's "(the default)" remarks, which describe the config's default, are dropped). `default_texts` say what
    a `None` default means in the script (e.g. `max_position_embeddings="max(--block_size, 65536)"`)."""
    params = inspect.signature(RevFormerConfig.__init__).parameters
    docs = _config_field_help()
    rows = []
    for name, default in defaults.items():
        if name not in params:
            raise ValueError(f"{name!r} is not a RevFormerConfig field.")
        text = docs.get(name) or f"RevFormerConfig.{name}."
        config_default = params[name].default
        shown = default_texts.get(name)
        if default != config_default:
            text = re.sub(r"\s*\((?:the )?default\)", "", text)
            text = re.sub(r"\s*Defaults? to `[^`]*`\.", "", text)
            if isinstance(default, bool):  # a flag's help says what giving it does; the config's value goes last
                text += f" (RevFormerConfig's default: {config_default})"
            else:
                shown = f"{shown or default}; RevFormerConfig's default: {config_default}"
        kind = _annotation_type(params[name].annotation)
        if "None" in str(params[name].annotation) and not isinstance(default, bool):
            text += " On the command line, `none` stands for None."
        rows.append(Option(name, default, text, type=kind, group="model (RevFormerConfig fields)", default_text=shown))
    return rows


def config_from_args(args: argparse.Namespace, fields: Iterable[str], **fixed: Any) -> RevFormerConfig:
    """`RevFormerConfig` from the parsed `fields` (`None` = the config's default) plus `fixed` values."""
    values = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    return RevFormerConfig(**{**values, **fixed})


# --------------------------------------------------------------------------------------------------------------
# Training, budget and checkpoint options (both scripts; each overrides some defaults with `with_defaults`)
# --------------------------------------------------------------------------------------------------------------

TRAINING_OPTIONS = [
    Option("per_device_train_batch_size", 8, "Training examples per process and micro-batch.", minimum=1),
    Option("per_device_eval_batch_size", 8, "Evaluation examples per process and batch.", minimum=1, fingerprint=False),
    Option("learning_rate", 1e-3, "Peak learning rate (after warmup)."),
    Option("weight_decay", 0.01, "AdamW weight decay, applied to matrices only (not norms, biases, gates).", minimum=0),
    Option("adam_beta1", 0.9, "AdamW beta1 (momentum of the gradient mean).", minimum=0),
    Option("adam_beta2", 0.999, "AdamW beta2 (momentum of the squared gradient).", minimum=0),
    Option("max_grad_norm", 1.0, "Clip the gradient norm to this value; 0 disables clipping.", minimum=0),
    Option("num_train_epochs", 1, "Passes over the training data (when --max_train_steps is not given).", minimum=1, fingerprint=False),
    Option("max_train_steps", None, "Optimizer steps to train; overrides --num_train_epochs.", type=int, minimum=1,
           default_text="--num_train_epochs decides", fingerprint=False),
    Option("gradient_accumulation_steps", 1, "Micro-batches accumulated per optimizer step.", minimum=1),
    Option("lr_scheduler_type", "cosine", "Learning-rate schedule after the warmup.", choices=SCHEDULES),
    Option("num_warmup_steps", 0, "Steps of linear warmup from 0 to --learning_rate.", minimum=0),
    Option("mixed_precision", None, "Mixed precision of the forward/backward.", type=str, choices=("no", "bf16", "fp16"),
           default_text="what `accelerate config`/launch says, else 'no'"),
    Option("seed", 42, "Seed of initialisation, dropout and data order (a resumed run restores its RNG states)."),
    Option("cpu", False, "Force CPU (also: real multi-process DDP on CPU under torchrun).", fingerprint=False),
    Option("skip_nonfinite_steps", 0,
           "A step whose loss or gradient norm is NaN/inf is not applied. 0: stop training with an error naming the "
           "step and the healthy checkpoint; N: skip up to N such steps, then stop.", minimum=0, fingerprint=False),
    Option("divergence_patience", 5,
           "Stop when this many optimizer steps in a row show a sign of divergence: the loss jumping above its "
           "running reference, a gradient norm of 0, or the weight norm growing tenfold. At the first sign the newest "
           "checkpoint is kept whatever --checkpoints_total_limit says, and no checkpoint is taken of a step that "
           "shows one. 0: never stop for it.", minimum=0, fingerprint=False),
    Option("time_budget_minutes", None,
           "Wall-clock budget of the whole job from process start: data preparation, training, evaluation and "
           "saving (0 or unset: none). The measured step time shortens --max_train_steps and the learning-rate "
           "schedule with it, so that the schedule completes; it is re-fitted when the step time drifts; the final "
           "evaluation is sized to the time left. (--max_train_minutes is the older name.)",
           type=float, minimum=0, aliases=("max_train_minutes",), default_text="none", fingerprint=False),
    Option("stop_grace_seconds", 25.0,
           "SIGTERM/SIGINT stop the run at the next optimizer step boundary; it saves a verified checkpoint and exits "
           "0. If it is still running this many seconds after the signal (a step or a save longer than that), it "
           "exits at once (code 128+signal) and the newest checkpoint stays. Schedulers allow 30-120 s between "
           "SIGTERM and SIGKILL; torchrun gives its workers 30 s.", minimum=1, fingerprint=False),
    Option("allow_changed_settings", False,
           "Resume even though settings that change the run (optimizer, schedule, batch, data files, model, "
           "precision, seed, process count) differ from the checkpoint's. The new values take effect from the "
           "resumed step on (the data position is carried over in samples); results.json records both values.",
           fingerprint=False),
]

CHECKPOINT_OPTIONS = [
    Option("output_dir", None, "Where the model, results, logs and checkpoints go.", type=str, group="output and checkpoints", fingerprint=False),
    Option("checkpointing_steps", None, "Save the full training state every N optimizer steps (checkpoints/step_N).",
           type=int, minimum=1, group="output and checkpoints", fingerprint=False, default_text="only when stopped"),
    Option("checkpoints_total_limit", 2,
           "Keep only the newest N checkpoints (and always the last healthy one before a divergence).",
           minimum=1, group="output and checkpoints", fingerprint=False),
    Option("resume_from_checkpoint", None,
           "'latest' (the newest checkpoint that passes verification; damaged ones are skipped with a warning) or "
           "a checkpoint folder (used as is: an error if it fails verification).", type=str,
           group="output and checkpoints", fingerprint=False, default_text="start a new run"),
]


def validate_training_args(args: argparse.Namespace) -> None:
    """The checks every script shares beyond each option's range; fail before any work, naming the argument."""
    if args.learning_rate <= 0:
        raise ValueError(f"`--learning_rate` must be > 0, got {args.learning_rate}.")
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
    """INFO from the main process only; the other processes log warnings and errors, prefixed with their rank (under
    torchrun every process would otherwise print every INFO line)."""
    main = accelerator.is_main_process
    rank = "" if main else f"[rank {accelerator.process_index}] "
    # basicConfig does nothing where the root logger already has handlers (an application's, pytest's): only the
    # level is ours to set then.
    logging.basicConfig(format=f"%(asctime)s - %(levelname)s - %(name)s - {rank}%(message)s")
    logging.getLogger().setLevel(logging.INFO if main else logging.WARNING)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


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
    "CHECKPOINT_OPTIONS",
    "TRAINING_OPTIONS",
    "Option",
    "OptionParser",
    "config_from_args",
    "make_accelerator",
    "make_optimizer",
    "model_options",
    "prepare_distributed_model",
    "setup_logging",
    "validate_training_args",
    "weight_decay_groups",
    "with_defaults",
]
