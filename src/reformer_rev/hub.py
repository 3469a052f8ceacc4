"""Push a saved `reformer_rev` checkpoint to the Hugging Face Hub in one commit, with its model card.

    python -m reformer_rev.hub push CHECKPOINT_DIR REPO_ID [--token TOKEN] [--private] [--results FILE]
    python -m reformer_rev.hub card CHECKPOINT_DIR --results FILE      # write README.md only

Everything is checked before anything is sent: a token is available, the repository id is valid, and the directory is
a complete checkpoint (config.json with `model_type: reformer_rev` and `auto_map`, safetensors weights, the modeling
files `auto_map` needs for `trust_remote_code=True`, generation config, tokenizer files, a parseable model card).
The upload is then a single `create_commit`, so the repository never shows a partial checkpoint: either every file
lands in one commit or none does. Only the files a user needs are uploaded (never optimizer states or logs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .model_card import REPO_ID_PLACEHOLDER, build_model_card, task_from_config, write_model_card

logger = logging.getLogger(__name__)

MODEL_TYPE = "reformer_rev"
# Tokenizer files `save_pretrained` may write; at least one vocabulary file must be present besides the config.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                         "vocab.txt")
TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
                         "chat_template.json")
# Small JSON files with a run's figures, uploaded next to the card so its numbers can be checked.
RESULTS_FILE_RE = re.compile(r"^([\w.-]*_)?(results|summary)\.json$")
_RELATIVE_IMPORT_RE = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)
_PACKAGE_IMPORT_RE = re.compile(r"^\s*(?:from|import)\s+reformer_rev\b", re.MULTILINE)


class CheckpointValidationError(ValueError):
    """The checkpoint directory cannot be pushed as is; the message lists every problem found."""


def resolve_token(token: str | None) -> str:
    """The token to push with: `token`, else `HF_TOKEN`, else the one saved by `hf auth login`."""
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token found: pass `token=` (CLI: `--token`), set the HF_TOKEN environment variable, or "
            "run `hf auth login`. Pushing needs a token with write access."
        )
    return token


def check_repo_id(hub_model_id: str) -> None:
    """Raise `ValueError` unless `hub_model_id` is a valid model repository id (`name` or `namespace/name`)."""
    if not isinstance(hub_model_id, str) or not hub_model_id:
        raise ValueError(f"Invalid repository id {hub_model_id!r}: expected 'namespace/name'.")
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as exc:
        raise ValueError(
            f"Invalid repository id {hub_model_id!r}: expected 'namespace/name' (letters, digits, '-', '_', '.'; "
            f"at most 96 characters per part; no '--' or '..'). {exc}"
        ) from exc


def _remote_code_files(output_dir: Path, auto_map: dict[str, Any], problems: list[str]) -> list[str]:
    """Every module `auto_map` names, plus the sibling modules they import with `from .x import y`."""
    pending = []
    for value in auto_map.values():
        refs = value if isinstance(value, (list, tuple)) else [value]
        for ref in refs:
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                pending.append(ref.rsplit(".", 1)[0] + ".py")
    found: list[str] = []
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = output_dir / name
        if not path.is_file():
            problems.append(f"modeling file {name} (named by config.json's auto_map or imported by it) is missing")
            continue
        found.append(name)
        source = path.read_text(encoding="utf-8")
        if _PACKAGE_IMPORT_RE.search(source):
            problems.append(
                f"{name} imports the `reformer_rev` package; remote code must only import torch, transformers and its "
                "sibling files (`from .x import y`)"
            )
        pending.extend(f"{module}.py" for module in _RELATIVE_IMPORT_RE.findall(source))
    return sorted(found)


def _weight_files(output_dir: Path, problems: list[str]) -> list[str]:
    index = output_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            problems.append(f"model.safetensors.index.json is not a valid index ({exc})")
            return []
        missing = [s for s in shards if not (output_dir / s).is_file()]
        if missing:
            problems.append(f"weight shards listed in model.safetensors.index.json are missing: {', '.join(missing)}")
        return ["model.safetensors.index.json", *shards]
    if (output_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    if any(output_dir.glob("pytorch_model*.bin")):
        problems.append("weights are in pytorch_model*.bin only: save them as safetensors "
                        "(`save_pretrained(..., safe_serialization=True)`, the default)")
    else:
        problems.append("no weights: model.safetensors (or model.safetensors.index.json and its shards) is missing")
    return []


def _tokenizer_files(output_dir: Path, problems: list[str]) -> list[str]:
    files = []
    if (output_dir / "tokenizer_config.json").is_file():
        files.append("tokenizer_config.json")
    else:
        problems.append("tokenizer_config.json is missing: save the tokenizer into the checkpoint "
                        "(`tokenizer.save_pretrained(output_dir)`)")
    vocab = [name for name in TOKENIZER_VOCAB_FILES if (output_dir / name).is_file()]
    if not vocab:
        problems.append(f"no tokenizer vocabulary file: expected one of {', '.join(TOKENIZER_VOCAB_FILES)}")
    files += vocab + [name for name in TOKENIZER_EXTRA_FILES if (output_dir / name).is_file()]
    config_path = output_dir / "tokenizer_config.json"
    if config_path.is_file():
        try:
            tok_auto_map = json.loads(config_path.read_text()).get("auto_map") or {}
        except ValueError as exc:
            problems.append(f"tokenizer_config.json does not parse as JSON ({exc})")
            tok_auto_map = {}
        if tok_auto_map:
            files += _remote_code_files(output_dir, tok_auto_map, problems)
    return files


def validate_checkpoint(output_dir: str | os.PathLike) -> tuple[list[str], dict[str, Any]]:
    """Check that `output_dir` is a complete, loadable-anywhere checkpoint.

    Returns the files to upload (paths relative to `output_dir`) and the parsed config. Raises
    `CheckpointValidationError` listing every problem at once, so one fix-and-retry cycle is enough.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise CheckpointValidationError(f"Checkpoint directory {str(output_dir)!r} does not exist.")
    problems: list[str] = []
    files: list[str] = []
    config: dict[str, Any] = {}
    config_path = output_dir / "config.json"
    if not config_path.is_file():
        problems.append("config.json is missing: save the model with `model.save_pretrained(output_dir)`")
    else:
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            problems.append(f"config.json does not parse as JSON ({exc})")
        files.append("config.json")
    if config:
        if config.get("model_type") != MODEL_TYPE:
            problems.append(f"config.json has model_type {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
        auto_map = config.get("auto_map") or {}
        architectures = config.get("architectures") or []
        if not auto_map:
            problems.append("config.json has no auto_map, so `trust_remote_code=True` loading cannot work: save with "
                            "`reformer_rev` imported (it registers the classes for auto_map)")
        else:
            if "AutoConfig" not in auto_map:
                problems.append("config.json's auto_map has no AutoConfig entry")
            mapped_classes = {str(v).rsplit(".", 1)[-1] for v in auto_map.values() if isinstance(v, str)}
            missing_arch = [a for a in architectures if a not in mapped_classes]
            if missing_arch:
                problems.append(f"config.json's auto_map does not map the saved architecture(s) {missing_arch}")
            files += _remote_code_files(output_dir, auto_map, problems)
        if not (output_dir / "generation_config.json").is_file():
            problems.append("generation_config.json is missing (written by `save_pretrained` of a generative model)")
        else:
            files.append("generation_config.json")
    files += _weight_files(output_dir, problems)
    files += _tokenizer_files(output_dir, problems)
    readme = output_dir / "README.md"
    if readme.is_file():
        try:
            ModelCard(readme.read_text(encoding="utf-8"))
        except Exception as exc:  # ModelCard raises ValueError on bad front matter, yaml errors otherwise
            problems.append(f"README.md (the model card) has invalid metadata: {exc}")
        files.append("README.md")
    files += sorted(p.name for p in output_dir.iterdir() if p.is_file() and RESULTS_FILE_RE.match(p.name))
    if problems:
        raise CheckpointValidationError(
            f"Cannot push {str(output_dir)!r}; nothing was uploaded. Problems:\n- " + "\n- ".join(problems)
        )
    return sorted(dict.fromkeys(files)), config


def push_checkpoint(
    output_dir: str,
    hub_model_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    *,
    endpoint: str | None = None,
) -> str:
    """Upload the checkpoint in `output_dir` to the model repository `hub_model_id` in one commit.

    Creates the repository if needed (`private` only applies then). If the directory has no README.md, an honest card
    without results is generated for the upload (write one with `write_model_card` to include a run's results).
    `endpoint` overrides `HF_ENDPOINT` (e.g. a self-hosted Hub). Returns the commit URL, ending in the commit id.
    """
    token = resolve_token(token)
    check_repo_id(hub_model_id)
    files, config = validate_checkpoint(output_dir)
    output_dir_path = Path(output_dir)

    operations = []
    for name in files:
        if name == "README.md":
            # A card written before the repository was known says `<your-namespace>/<model-name>`: fill it in.
            card_text = (output_dir_path / name).read_text(encoding="utf-8").replace(REPO_ID_PLACEHOLDER, hub_model_id)
            operations.append(CommitOperationAdd("README.md", card_text.encode("utf-8")))
        else:
            operations.append(CommitOperationAdd(name, str(output_dir_path / name)))
    if "README.md" not in files:
        card = build_model_card(output_dir_path, None, task_from_config(config), repo_id=hub_model_id)
        operations.append(CommitOperationAdd("README.md", str(card).encode("utf-8")))
        files = sorted([*files, "README.md"])
        logger.warning("%s has no README.md: pushing a model card without evaluation results.", output_dir)

    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id or hub_model_id
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload {config.get('architectures', ['reformer_rev model'])[0]} checkpoint",
        commit_description="Files: " + ", ".join(files),
        repo_type="model",
    )
    logger.info("Pushed %d files to %s: %s", len(files), repo_id, info.commit_url)
    return str(info.commit_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reformer_rev.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload a saved checkpoint directory in one commit")
    push.add_argument("checkpoint_dir")
    push.add_argument("repo_id", help="target model repository, 'namespace/name'")
    push.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the saved login)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--results", default=None, help="results JSON of the run: (re)write README.md from it first")
    push.add_argument("--task", choices=("causal-lm", "translation"), default=None,
                      help="card template (default: from config.json's is_encoder_decoder)")
    push.add_argument("--commit_message", default=None)
    push.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    card = sub.add_parser("card", help="write README.md (the model card) of a checkpoint from a results file")
    card.add_argument("checkpoint_dir")
    card.add_argument("--results", default=None, help="results JSON of the run (without it: a card that says so)")
    card.add_argument("--task", choices=("causal-lm", "translation"), default=None)
    card.add_argument("--repo_id", default=None, help="repository id used in the card's loading snippets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # our progress lines, without every HTTP request of the client

    try:
        results = None
        if args.results:
            try:
                results = json.loads(Path(args.results).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"Cannot read the results file {args.results!r}: {exc}") from exc
        if args.command == "push":
            # Validate before writing anything, so a failing push leaves the directory untouched.
            resolve_token(args.token)
            check_repo_id(args.repo_id)
            if results is not None:
                _, config = validate_checkpoint(args.checkpoint_dir)
                write_model_card(args.checkpoint_dir, results, args.task or task_from_config(config), args.repo_id)
            url = push_checkpoint(args.checkpoint_dir, args.repo_id, token=args.token, private=args.private,
                                  commit_message=args.commit_message, endpoint=args.endpoint)
            print(url)
        else:
            config_path = Path(args.checkpoint_dir) / "config.json"
            if not config_path.is_file():
                raise ValueError(f"{args.checkpoint_dir} has no config.json: is it a saved checkpoint?")
            task = args.task or task_from_config(json.loads(config_path.read_text()))
            print(write_model_card(args.checkpoint_dir, results, task, args.repo_id))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
