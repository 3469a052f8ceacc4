"""Where a training script's model comes from: a new config, or a checkpoint through a loader per `model_type`.

Registered loaders:

* `reformer_rev` checkpoints load with the Auto classes (`--no_reversible` sets `config.reversible=False`);
* ordinary pretrained causal LMs of the families `reformer_rev.make_reversible` supports (`llama`, `qwen2`,
  `mistral`, `gpt2`) load with `AutoModelForCausalLM.from_pretrained` -- a local folder or a Hub id -- and are made
  reversible unless `--no_reversible`; they stay instances of their own class, and `save_pretrained` writes a plain
  checkpoint of it.

Other architectures plug in with `register_pretrained_loader(model_type, loader)`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..conversion import SUPPORTED_MODEL_CLASSES, is_reversible, make_reversible

Task = Literal["causal-lm", "translation"]
PretrainedLoader = Callable[[str, Task, argparse.Namespace], PreTrainedModel]

_AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM, "translation": AutoModelForSeq2SeqLM}
_LOADERS: dict[str, PretrainedLoader] = {}


def register_pretrained_loader(model_type: str, loader: PretrainedLoader) -> None:
    """Use `loader(path, task, args)` for `--model_name_or_path` checkpoints whose config has this `model_type`."""
    _LOADERS[model_type] = loader


def _load_with_auto_class(path: str, task: Task, args: argparse.Namespace) -> PreTrainedModel:
    overrides = {"reversible": args.reversible} if hasattr(args, "reversible") else {}
    return _AUTO_CLASSES[task].from_pretrained(path, **overrides)


def _load_and_make_reversible(path: str, task: Task, args: argparse.Namespace) -> PreTrainedModel:
    """A pretrained causal LM of a family `make_reversible` supports whose decoder stack trains reversibly
    (`make_reversible`), or as it is with `--no_reversible`."""
    if task != "causal-lm":
        raise ValueError(
            f"`--model_name_or_path` {path!r} is a decoder-only causal LM: fine-tune it with training/train_lm.py."
        )
    # float32 master weights whatever the checkpoint's dtype: bf16 is Accelerate's autocast (--mixed_precision bf16),
    # and a model stored in bf16 would otherwise take its optimizer steps in bf16.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return make_reversible(model) if getattr(args, "reversible", True) else model


register_pretrained_loader("reformer_rev", _load_with_auto_class)
# The model types whose Auto causal-LM class `make_reversible` supports (conversion_families.SUPPORTED_FAMILIES).
CONVERTIBLE_MODEL_TYPES = tuple(
    sorted(t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls in SUPPORTED_MODEL_CLASSES)
)
for _model_type in CONVERTIBLE_MODEL_TYPES:
    register_pretrained_loader(_model_type, _load_and_make_reversible)


def checkpoint_model_type(path: str) -> str | None:
    """`model_type` of a local folder's or a Hub repository's `config.json`."""
    if Path(path, "config.json").is_file():
        return json.loads(Path(path, "config.json").read_text()).get("model_type")
    return PretrainedConfig.get_config_dict(path)[0].get("model_type")


def load_pretrained(path: str, task: Task, args: argparse.Namespace) -> PreTrainedModel:
    model_type = checkpoint_model_type(path)
    if model_type not in _LOADERS:
        raise ValueError(
            f"`--model_name_or_path` {path!r} is a {model_type!r} checkpoint; the training scripts can start from "
            f"{sorted(_LOADERS)} checkpoints (`reformer_rev.training.models.register_pretrained_loader` adds others)."
        )
    return _LOADERS[model_type](path, task, args)


def build_model(args: argparse.Namespace, task: Task, new_config: Callable[[], PretrainedConfig]) -> PreTrainedModel:
    """`--model_name_or_path` through its loader, else a freshly initialised model of `new_config()`."""
    if getattr(args, "model_name_or_path", None):
        return load_pretrained(args.model_name_or_path, task, args)
    return _AUTO_CLASSES[task].from_config(new_config())


def is_plain_transformers_model(model: PreTrainedModel) -> bool:
    """True for a model of a stock `transformers` class (e.g. a pretrained Llama made reversible), whose checkpoint
    loads without `reformer_rev`; False for a `reformer_rev` model."""
    return model.config.model_type != "reformer_rev"


def trains_reversibly(model: PreTrainedModel) -> bool:
    """Whether training runs `model`'s stack through the reversible engine (converted, or `config.reversible`)."""
    return is_reversible(model) if is_plain_transformers_model(model) else bool(getattr(model.config, "reversible", True))


def model_class_name(model: torch.nn.Module) -> str:
    """The model's own class name: FSDP2 (`fully_shard`) turns an instance's class into a generated `FSDP<Class>`
    subclass, which is no architecture anyone can load."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return type(model).__name__
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


__all__ = ["CONVERTIBLE_MODEL_TYPES", "model_class_name", "trains_reversibly", "Task", "build_model", "is_plain_transformers_model", "checkpoint_model_type", "load_pretrained", "register_pretrained_loader"]
