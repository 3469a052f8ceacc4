"""Where a training script's model comes from: a new config, or a checkpoint through a loader per `model_type`.

The loader registry is the pluggable piece: `reformer_rev` checkpoints load with the Auto classes; a converter of
other architectures (e.g. pretrained Llama or GPT-2 checkpoints made reversible) registers a loader for their
`model_type`, and `--model_name_or_path` then fine-tunes them with the same scripts:

    register_pretrained_loader("llama", lambda path, task, args: make_reversible(LlamaForCausalLM.from_pretrained(path)))
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel

Task = Literal["causal-lm", "translation"]
PretrainedLoader = Callable[[str, Task, argparse.Namespace], PreTrainedModel]

_AUTO_CLASSES = {"causal-lm": AutoModelForCausalLM, "translation": AutoModelForSeq2SeqLM}
_LOADERS: dict[str, PretrainedLoader] = {}


def register_pretrained_loader(model_type: str, loader: PretrainedLoader) -> None:
    """Use `loader(path, task, args)` for `--model_name_or_path` checkpoints whose config has this `model_type`."""
    _LOADERS[model_type] = loader


def _load_with_auto_class(path: str, task: Task, args: argparse.Namespace) -> PreTrainedModel:
    return _AUTO_CLASSES[task].from_pretrained(path)


register_pretrained_loader("reformer_rev", _load_with_auto_class)


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


__all__ = ["Task", "build_model", "checkpoint_model_type", "load_pretrained", "register_pretrained_loader"]
