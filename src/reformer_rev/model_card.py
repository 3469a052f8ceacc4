"""Model cards for `reformer_rev` checkpoints, filled from a run's results file — never with invented numbers.

`write_model_card(output_dir, results, task)` renders `model_cards/{lm,translation}_card_template.md` with
`huggingface_hub.ModelCard` and writes `output_dir/README.md`. A checkpoint of a stock `transformers` class (a
pretrained Llama/GPT-2/... fine-tuned reversibly by `training/train_lm.py --model_name_or_path`) gets
`model_cards/lm_finetuned_card_template.md`: a plain model, loaded without `reformer_rev` or remote code. The YAML metadata carries `license`,
`library_name: transformers`, `tags` (incl. `custom_code` and `reversible`), `language`, `datasets` (Hub dataset ids
only), `metrics`, `pipeline_tag` and a `model-index` built from the measured evaluation results; the body describes the
architecture (read from the checkpoint's `config.json` and weights), data, hyperparameters, measured memory figures,
both ways of loading, and limitations. Whatever the results do not contain is reported as not measured.

The results dict is what the training scripts write as JSON. Recognised keys (all optional):

    {
      "model_name": "revformer-bible-lm",          # title of the card and of the model-index entry
      "hub_model_id": "user/revformer-bible-lm",   # used in the loading snippets
      "license": "apache-2.0",
      "language": "en" | ["en", "es"],             # translation: defaults to [source_lang, target_lang]
      "source_lang": "en", "target_lang": "es",
      "dataset": "bible_lm" | {"name": ..., "id": <Hub dataset id>, "config": ..., "description": ...},
      "metrics": {"validation": {"loss": 1.2, "bits_per_byte": 1.7}, "test": {...}},
      "validation": {...}, "test": {...},           # same as metrics[split]
      "eval_loss": 1.2, "test_bleu": 20.1, ...      # flat `<split>_<metric>` keys (HF Trainer style)
      "baselines": {"unigram_bits_per_byte": 4.3} | {"test": {"copy_source_bleu": 1.0}},
      "unigram_bpb": {"validation": 4.4, "test": 4.4},  # top-level `unigram_*` / `*baseline*` keys are baselines too
      "hyperparameters": {...} | "args": {...},     # the run's arguments (`dataset_name`, `train_file`, `*_lang`...)
      "memory": {"peak_activation_mb": ...},        # measured memory figures
      "training" | "train": {"steps": ..., "tokens_per_second": ..., "train_time_s": ...},
      "base_model": "org/name" | "/local/dir",     # the checkpoint a plain transformers model was fine-tuned from
      "notes": "free text"
    }

This covers the `results.json` that `training/train_lm.py` writes (`validation`/`test` with `loss`, `perplexity`,
`bpb`; `unigram_bpb`; `train`; `args`).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .safe_io import atomic_write_text, final_destination

Task = Literal["causal-lm", "translation"]
TASKS: tuple[str, ...] = ("causal-lm", "translation")

# The string written in loading snippets when the Hub repository is not known yet; `push_checkpoint` replaces it with
# the repository it pushes to.
REPO_ID_PLACEHOLDER = "<your-namespace>/<model-name>"

_PIPELINE_TAG = {"causal-lm": "text-generation", "translation": "translation"}
_TEMPLATE_NAME = {"causal-lm": "lm_card_template.md", "translation": "translation_card_template.md"}
# Checkpoints of stock transformers classes (no `reformer_rev` model type): pretrained models fine-tuned reversibly.
_PLAIN_TEMPLATE_NAME = "lm_finetuned_card_template.md"
_SPLIT_ALIASES = {"eval": "validation", "val": "validation", "valid": "validation", "validation": "validation",
                  "dev": "validation", "test": "test", "train": "train"}
# metric key (lower case) -> (metric type for the Hub, display name)
_METRIC_NAMES = {
    "loss": ("loss", "Cross-entropy loss (nats/token)"),
    "perplexity": ("perplexity", "Perplexity"),
    "ppl": ("perplexity", "Perplexity"),
    "bits_per_byte": ("bits_per_byte", "Bits per byte"),
    "bpb": ("bits_per_byte", "Bits per byte"),
    "bits_per_token": ("bits_per_token", "Bits per token"),
    "bleu": ("bleu", "BLEU (sacrebleu)"),
    "sacrebleu": ("bleu", "BLEU (sacrebleu)"),
    "chrf": ("chrf", "chrF"),
    "accuracy": ("accuracy", "Accuracy"),
}
# Flat result keys that are bookkeeping, not evaluation metrics.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "tokens_per_second", "epoch", "step", "samples",
                "tokens", "bytes", "count", "examples", "sentences", "num_", "n_", "time", "seconds", "len")
# Run arguments that say nothing about how the model was trained.
_BOOKKEEPING_ARGS = ("output_dir", "push_to_hub", "hub_model_id", "hub_token", "overwrite_cache",
                     "overwrite_output_dir",
                     "report_to", "with_tracking", "logging_steps", "checkpointing_steps", "checkpoints_total_limit",
                     "resume_from_checkpoint", "preprocessing_num_workers", "num_proc", "logging_dir")
# What the training scripts train on when given no data argument (docs/design.md §6; built by scripts/build_corpus.py).
_BUNDLED_DATA = {
    "causal-lm": {"name": "Public-domain English Bibles (KJV and WEB), whole books split by book "
                          "(bundled `data/bible_lm`)",
                  "type": "bible_lm", "language": ["en"]},
    "translation": {"name": "English-Spanish Bible verse pairs (KJV/WEB and Reina-Valera 1909), split by book "
                            "(bundled `data/bible_mt`)", "type": "bible_mt"},
}


def default_template_dir() -> Path:
    """`model_cards/` of the source checkout (the templates are versioned next to the code, not inside the wheel)."""
    return Path(__file__).resolve().parents[2] / "model_cards"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metric_info(key: str) -> tuple[str, str]:
    return _METRIC_NAMES.get(key.lower(), (key.lower(), key.replace("_", " ")))


def extract_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{split: {metric_type: value}}` of every finite numeric evaluation result found in `results`."""
    found: dict[str, dict[str, float]] = {}

    def add(split: str, key: str, value: Any) -> None:
        if not _is_number(value) or any(key.lower().startswith(p) or key.lower().endswith(p) for p in _NOT_METRICS):
            return
        metric_type, _ = _metric_info(key)
        found.setdefault(_SPLIT_ALIASES[split], {})[metric_type] = float(value)

    nested = results.get("metrics")
    if isinstance(nested, dict):
        for split, values in nested.items():
            if split.lower() in _SPLIT_ALIASES and isinstance(values, dict):
                for key, value in values.items():
                    add(split.lower(), key, value)
    for split in _SPLIT_ALIASES:
        values = results.get(split)
        if isinstance(values, dict):
            for key, value in values.items():
                add(split, key, value)
    for key, value in results.items():
        prefix, _, rest = key.partition("_")
        if rest and prefix.lower() in _SPLIT_ALIASES and prefix.lower() != "train":
            add(prefix.lower(), rest, value)
    found.pop("train", None)  # training-set figures are not evaluation results
    return {split: found[split] for split in ("validation", "test") if split in found}


def _run_args(results: dict[str, Any]) -> dict[str, Any]:
    args = results.get("hyperparameters") or results.get("args") or results.get("training_args")
    return args if isinstance(args, dict) else {}


def _dataset_info(results: dict[str, Any], task: str) -> dict[str, Any]:
    dataset = results.get("dataset") or results.get("dataset_name")
    args = _run_args(results)
    info: dict[str, Any] = {}
    if isinstance(dataset, dict):
        info = dict(dataset)
    elif isinstance(dataset, str):
        info = {"name": dataset}
        # `--dataset_name` of the training scripts is a Hub dataset id.
        if "dataset_name" in results:
            info["id"] = dataset
    elif args.get("dataset_name"):
        info = {"name": args["dataset_name"], "id": args["dataset_name"]}
    elif args.get("train_file"):
        info = {"name": f"local files ({args['train_file']})"}
    elif "dataset_name" in args and "train_file" in args:
        # The training scripts were run without a data argument: they used their bundled corpus.
        info = dict(_BUNDLED_DATA[task])
    config_name = results.get("dataset_config_name") or args.get("dataset_config_name")
    if config_name and "config" not in info:
        info["config"] = config_name
    if info.get("id") and not info.get("name"):
        info["name"] = info["id"]
    if info.get("name") and not info.get("type"):
        info["type"] = info.get("id") or re.sub(r"[^\w.-]+", "_", info["name"].lower()).strip("_")[:64]
    return info


def _language(results: dict[str, Any], task: str, dataset: dict[str, Any]) -> list[str] | None:
    language = results.get("language") or dataset.get("language")
    if isinstance(language, str):
        return [language]
    if isinstance(language, list) and language:
        return [str(x) for x in language]
    if task == "translation":
        args = _run_args(results)
        langs = [results.get("source_lang") or args.get("source_lang"),
                 results.get("target_lang") or args.get("target_lang")]
        if all(isinstance(x, str) and x for x in langs):
            return langs  # type: ignore[return-value]
    return None


def count_parameters(output_dir: str | os.PathLike) -> int | None:
    """Number of stored parameters, read from the safetensors headers (no tensor is loaded)."""
    output_dir = Path(output_dir)
    index = output_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (output_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        return None
    total = 0
    for name in files:
        with open(output_dir / name, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for key, meta in header.items():
            if key != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_format_value(k)} | {_format_value(v)} |" for k, v in rows]
    return "\n".join(lines)


def _dict_table(values: Any, header: tuple[str, str]) -> str | None:
    if not isinstance(values, dict) or not values:
        return None
    rows = [(k, v) for k, v in values.items() if v is not None and not isinstance(v, dict) and len(str(v)) < 200]
    return _table(rows, header) if rows else None


def _architecture(config: dict[str, Any], num_parameters: int | None, task: str) -> str:
    rows: list[tuple[str, Any]] = [("model_type", config.get("model_type")),
                                   ("architectures", config.get("architectures"))]
    if task == "translation":
        rows += [("encoder_layers", config.get("encoder_layers")), ("decoder_layers", config.get("decoder_layers"))]
    else:
        rows.append(("num_hidden_layers", config.get("num_hidden_layers")))
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_act",
                "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings", "reversible",
                "chunk_size_feed_forward", "loss_chunk_size", "attention_dropout", "hidden_dropout"):
        if key in config:
            rows.append((key, config[key]))
    if num_parameters is not None:
        rows.append(("parameters (stored)", f"{num_parameters:,}"))
    return _table([r for r in rows if r[1] is not None], ("field", "value"))


def _baselines_text(results: dict[str, Any]) -> str | None:
    """Baselines from `baselines` and from top-level `unigram_*` / `*baseline*` keys (number or `{split: number}`)."""
    items = dict(results["baselines"]) if isinstance(results.get("baselines"), dict) else {}
    items.update(
        {k: v for k, v in results.items() if k != "baselines" and (k.startswith("unigram_") or "baseline" in k)}
    )
    rows: list[tuple[str, Any]] = []
    for key, value in items.items():
        if isinstance(value, dict):
            rows += [(f"{key} ({k})", v) for k, v in value.items() if _is_number(v)]
        elif _is_number(value):
            rows.append((key, value))
    return _table(rows, ("baseline", "value")) if rows else None


def build_model_card(
    output_dir: str | os.PathLike,
    results: dict[str, Any] | None,
    task: Task,
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of the checkpoint in `output_dir` from `results` (may be None: the card then says so)."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    if results is not None and not isinstance(results, dict):
        raise ValueError(f"`results` must be a dict (the parsed results JSON) or None, got {type(results).__name__}.")
    results = dict(results or {})
    output_dir = Path(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.exists():
        raise ValueError(f"{output_dir} has no config.json: save the model with `save_pretrained` first.")
    config = json.loads(config_path.read_text())
    plain = config.get("model_type") != "reformer_rev"
    if plain and task != "causal-lm":
        raise ValueError(f"{output_dir} holds a {config.get('model_type')!r} checkpoint: only causal LMs of stock "
                         "transformers classes have a card here (task='causal-lm').")
    default_name = _PLAIN_TEMPLATE_NAME if plain else _TEMPLATE_NAME[task]
    template_path = Path(template_path) if template_path else default_template_dir() / default_name
    if not template_path.exists():
        raise FileNotFoundError(f"Model card template not found: {template_path} (pass `template_path=`).")

    repo_id = repo_id or results.get("hub_model_id") or None
    # Named by the folder the checkpoint ends up in: a card written during an atomic save sits in its temp folder.
    model_name = results.get("model_name") or (repo_id.split("/")[-1] if repo_id else final_destination(output_dir).name)
    dataset = _dataset_info(results, task)
    metrics = extract_metrics(results)
    language = _language(results, task, dataset)
    pipeline_tag = _PIPELINE_TAG[task]

    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            task_name="Causal language modeling" if task == "causal-lm" else "Translation",
            dataset_type=dataset.get("type") or "unknown",
            dataset_name=dataset.get("name") or "unrecorded dataset",
            dataset_config=dataset.get("config"),
            dataset_split=split,
            metric_type=metric_type,
            metric_name=_metric_info(metric_type)[1],
            metric_value=value,
        )
        for split, values in metrics.items()
        for metric_type, value in values.items()
    ]
    metric_types = sorted({m for values in metrics.values() for m in values})
    base_model = results.get("base_model") if isinstance(results.get("base_model"), str) else None
    if plain:  # loads with stock transformers: no remote code
        tags = ["reformer_rev", "reversible-fine-tuning", str(config.get("model_type")), pipeline_tag]
    else:
        tags = ["reformer_rev", "reversible", "custom_code", pipeline_tag]
    card_data = ModelCardData(
        model_name=model_name,
        license=results.get("license", "apache-2.0"),
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        # The Hub's `base_model` field takes repository ids only; a local starting point is named in the text.
        base_model=base_model if base_model and not Path(base_model).exists() else None,
        language=language,
        # Only Hub dataset ids belong here; a local corpus is described in the card's text instead.
        datasets=[dataset["id"]] if dataset.get("id") else None,
        metrics=metric_types or None,
        eval_results=eval_results or None,
    )

    metric_rows = [
        f"| {split} | {_metric_info(m)[1]} | {_format_value(v)} |"
        for split, values in metrics.items()
        for m, v in values.items()
    ]
    results_table = "\n".join(["| split | metric | value |", "|---|---|---|", *metric_rows]) if metric_rows else None
    hyperparameters = {k: v for k, v in _run_args(results).items() if k not in _BOOKKEEPING_ARGS}
    training = results.get("training") if isinstance(results.get("training"), dict) else results.get("train")
    auto_class = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModelForSeq2SeqLM"

    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        auto_class=auto_class,
        architecture_table=_architecture(config, count_parameters(output_dir), task),
        architecture=(config.get("architectures") or [config.get("model_type")])[0],
        base_model=base_model,
        # A plain checkpoint does not record how it was trained: the run's results do.
        reversible=bool((results.get("model") or {}).get("reversible", True) if plain else config.get("reversible", True)),
        dataset_name=dataset.get("name"),
        dataset_id=dataset.get("id"),
        dataset_config=dataset.get("config"),
        dataset_description=dataset.get("description"),
        language_text=", ".join(language) if language else None,
        source_lang=results.get("source_lang") or _run_args(results).get("source_lang"),
        target_lang=results.get("target_lang") or _run_args(results).get("target_lang"),
        results_table=results_table,
        baselines_table=_baselines_text(results),
        hyperparameters_table=_dict_table(hyperparameters, ("hyperparameter", "value")),
        memory_table=_dict_table(results.get("memory"), ("measurement", "value")),
        training_table=_dict_table(training, ("quantity", "value")),
        notes=results.get("notes"),
    )
    # Template conditionals leave runs of blank lines: collapse them (the front matter is unaffected).
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def write_model_card(
    output_dir: str | os.PathLike,
    results: dict[str, Any] | None,
    task: Task,
    repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> str:
    """Write `output_dir/README.md` from `results` (see the module docstring); return its path."""
    card = build_model_card(output_dir, results, task, repo_id=repo_id, template_path=template_path)
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, str(card))  # never leave a half-written card next to a finished checkpoint
    return str(path)


def task_from_config(config: dict[str, Any]) -> Task:
    """`translation` for the encoder-decoder model, `causal-lm` otherwise."""
    return "translation" if config.get("is_encoder_decoder") else "causal-lm"


__all__ = [
    "REPO_ID_PLACEHOLDER",
    "TASKS",
    "build_model_card",
    "count_parameters",
    "extract_metrics",
    "task_from_config",
    "write_model_card",
]
