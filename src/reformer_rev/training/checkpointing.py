"""Checkpoints you can trust: atomic, verified, pickle-free, falling back to the newest valid one.

A checkpoint is a folder `OUTPUT_DIR/checkpoints/step_N/`:

| file | content | format |
|---|---|---|
| `model.safetensors` | model weights (tied weights stored once) | safetensors |
| `optimizer.safetensors` | optimizer state tensors; param groups and scalars in its metadata | safetensors + JSON |
| `scheduler.json` | LR scheduler `state_dict()` (the schedule object's plain attributes, no callable) | JSON |
| `grad_scaler.json` | fp16 `GradScaler` state (only with fp16) | JSON |
| `rng_state_{rank}.safetensors` | torch CPU/CUDA generators of each process; Python and NumPy states | safetensors + JSON |
| `trainer_state.json` | step, data position, counters, evaluation history (`TrainingState`) | JSON |
| whatever the script adds | e.g. its tokenizer | JSON |
| `manifest.json` | name, size and SHA-256 of every file above; written last | JSON |

Nothing in it is unpickled or executed on resume: Accelerate's `save_state` pickles the scheduler and the RNG
states and `load_state` reads them with `weights_only=False` (docs/design.md §8), so it is not used. The save writes a
temp folder `.tmp-step_N` and renames it: a `step_N` folder is complete or absent. On resume each candidate is
verified against its manifest and fully parsed before anything is applied; a bad one is skipped with a warning
naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..safe_io import (
    FolderLock,
    FolderLockedError,
    WriteError,
    atomic_write_bytes,
    atomic_write_json,
    describe_os_error,
    fsync_folder,
    reraise_as_write_error,
    sha256_file,
)
from .budget import SCHEDULES, BudgetedSchedule, refit_scheduler
from .collectives import all_processes
from .settings import RUN_SETTINGS_NAME, changes_table, check_resume_settings
from .state import TRAINER_STATE_NAME, TrainingState

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TEMP_PREFIX = ".tmp-"
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
SCHEDULER_NAME = "scheduler.json"
SCALER_NAME = "grad_scaler.json"
RNG_NAME = "rng_state_{rank}.safetensors"
LOCK_NAME = ".lock"
PROTECTED_NAME = "protected.json"
MANIFEST_FORMAT = 1
_JSON_KEY = "json"  # safetensors metadata is str -> str: the structured part goes in as one JSON string


class CheckpointError(ValueError):
    """A checkpoint failed verification or loading: `file` (name inside the checkpoint) and `reason`."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the previous checkpoints are untouched."""


# --------------------------------------------------------------------------------------------------------------
# Tensors <-> safetensors bytes, without pickle
# --------------------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def tensors_to_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """safetensors bytes of `tensors` (on CPU), with `meta` as JSON metadata. Tensors that are views of the same
    memory (tied weights) are stored once and recorded as aliases, since safetensors refuses shared storage."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in tensors.items():
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = t.detach().to("cpu").contiguous()
    meta = {**(meta or {}), "aliases": aliases}
    return save_safetensors_bytes(stored, metadata={_JSON_KEY: json.dumps(meta)})


def tensors_from_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `tensors_to_bytes`; `CheckpointError` naming the file on any damage."""
    try:
        data = path.read_bytes()
        tensors = load_safetensors_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get(_JSON_KEY, "{}"))
    except (OSError, SafetensorError, ValueError, TypeError) as err:
        raise CheckpointError(path.name, f"cannot be read as safetensors ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("aliases", {}), dict):
        raise CheckpointError(path.name, "malformed metadata")
    for alias, source in meta.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(path.name, f"alias {alias!r} points to missing tensor {source!r}")
        tensors[alias] = tensors[source]
    # safetensors returns the tensors in a per-process hash order. Under FSDP2, loading a full state dict scatters it
    # tensor by tensor in the dict's order, which must be the same on every rank (or the collectives mismatch).
    return dict(sorted(tensors.items())), meta


# --------------------------------------------------------------------------------------------------------------
# Optimizer, RNG, scheduler <-> files
# --------------------------------------------------------------------------------------------------------------


def optimizer_to_bytes(state_dict: dict[str, Any]) -> bytes:
    """`{"state": {param: {name: value}}, "param_groups": [...]}` (FQN-keyed) as tensors + JSON."""
    tensors, scalars = {}, {}
    for param, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}\x00{name}"] = value
            else:
                scalars.setdefault(param, {})[name] = value
    return tensors_to_bytes(tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars})


def optimizer_from_file(path: Path) -> dict[str, Any]:
    tensors, meta = tensors_from_file(path)
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(path.name, "metadata lacks valid 'param_groups'")
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, _, name = key.partition("\x00")
        state.setdefault(param, {})[name] = value
    for param, values in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(values)
    for group in groups:  # JSON turned tuples into lists; torch's optimizers expect e.g. `betas` as a tuple
        for k, v in group.items():
            if k != "params" and isinstance(v, list):
                group[k] = tuple(v)
    return {"state": state, "param_groups": groups}


def rng_to_bytes() -> bytes:
    """This process's generators: torch CPU and every CUDA device, NumPy and Python's `random`."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss_next]}
    return tensors_to_bytes(tensors, meta)


def rng_from_file(path: Path) -> Callable[[], None]:
    """Parse a saved RNG state; returns the function that applies it (applied only once every file parsed)."""
    tensors, meta = tensors_from_file(path)
    try:
        kind, pos, has_gauss, cached = meta["numpy"]
        version, internal, gauss_next = meta["python"]
        cpu, keys = tensors["torch_cpu"], tensors["numpy_keys"].numpy().astype(np.uint32)
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors)) if f"torch_cuda_{i}" in tensors]
        python_state = (int(version), tuple(int(x) for x in internal), gauss_next)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(path.name, f"incomplete RNG state ({type(err).__name__}: {err})") from err
    # Sizes against this process's own generators: `set_rng_state` would otherwise fail only while applying, after the
    # model and optimizer were already restored (too late to fall back to another checkpoint).
    expected = {"torch CPU generator": (cpu, torch.get_rng_state()), "NumPy keys": (keys, np.random.get_state()[1])}
    for what, (got, want) in expected.items():
        if tuple(got.shape) != tuple(want.shape) or (isinstance(got, torch.Tensor) and got.dtype != want.dtype):
            raise CheckpointError(path.name, f"the {what} state has shape {tuple(got.shape)}, expected "
                                             f"{tuple(want.shape)}")
    if len(python_state[1]) != len(random.getstate()[1]):
        raise CheckpointError(path.name, f"the Python random state has {len(python_state[1])} words, expected "
                                         f"{len(random.getstate()[1])}")
    # NumPy does not check the position: one beyond the key crashes the process at the next draw (measured).
    if not (0 <= pos <= len(keys) and has_gauss in (0, 1) and math.isfinite(cached)):
        raise CheckpointError(path.name, f"invalid NumPy RNG state (position {pos} of {len(keys)}, has_gauss "
                                         f"{has_gauss}, cached {cached})")
    try:  # what `set_state` itself checks, without touching the global generator
        np.random.RandomState().set_state((kind, keys, pos, has_gauss, cached))
        random.Random().setstate(python_state)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path.name, f"invalid RNG state ({type(err).__name__}: {err})") from err

    def apply() -> None:
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        random.setstate(python_state)

    return apply


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_optimizer_state(optim_state: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
    """Every state entry belongs to a parameter of the model, its tensors have the parameter's shape and are finite,
    and every group's hyperparameters are finite numbers (`CheckpointError` naming the entry otherwise)."""
    for fqn, values in optim_state["state"].items():
        if fqn not in params:
            raise CheckpointError(OPTIMIZER_NAME, f"holds state for {fqn!r}, which is not a parameter of the model")
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() > 0 and tuple(value.shape) != tuple(params[fqn].shape):
                raise CheckpointError(OPTIMIZER_NAME, f"{key} of {fqn} has shape {tuple(value.shape)}, the parameter "
                                                      f"{tuple(params[fqn].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(OPTIMIZER_NAME, f"{key} of {fqn} holds NaN/inf values")
    for i, group in enumerate(optim_state["param_groups"]):
        for key in ("lr", "weight_decay", "eps"):
            if key in group and not _finite_number(group[key]):
                raise CheckpointError(OPTIMIZER_NAME, f"parameter group {i}: {key} {group[key]!r:.40} is no finite number")
        if "betas" in group and not (len(group["betas"]) == 2 and all(_finite_number(b) for b in group["betas"])):
            raise CheckpointError(OPTIMIZER_NAME, f"parameter group {i}: betas {group['betas']!r:.60} are not 2 numbers")


def check_scheduler_state(state: Any, scheduler: Any, num_groups: int) -> None:
    """A `LambdaLR.state_dict()` that `load_state_dict` can take and whose schedule gives a finite learning rate:
    `load_state_dict` copies whatever the JSON holds into the schedule object, which would fail (or return garbage)
    only at the next step."""
    if not isinstance(state, dict):
        raise CheckpointError(SCHEDULER_NAME, "not a scheduler state (a JSON object)")
    last = state.get("last_epoch")
    if not isinstance(last, int) or isinstance(last, bool) or last < 0:
        raise CheckpointError(SCHEDULER_NAME, f"'last_epoch' must be an integer >= 0, got {last!r:.40}")
    for key in ("base_lrs", "_last_lr"):
        if key == "_last_lr" and key not in state:
            continue
        values = state.get(key)
        if not (isinstance(values, list) and len(values) == num_groups and all(_finite_number(v) for v in values)):
            raise CheckpointError(SCHEDULER_NAME, f"{key!r} must be {num_groups} finite numbers, got {values!r:.60}")
    lambdas = state.get("lr_lambdas")
    if not (isinstance(lambdas, list) and len(lambdas) == num_groups):
        raise CheckpointError(SCHEDULER_NAME, f"'lr_lambdas' must be a list of {num_groups}, got {lambdas!r:.60}")
    template = getattr(scheduler, "lr_lambdas", [None])[0]
    if not isinstance(template, BudgetedSchedule):
        return
    for fn in lambdas:
        if not isinstance(fn, dict) or set(fn) != set(vars(template)):
            raise CheckpointError(SCHEDULER_NAME, f"a schedule must hold exactly {sorted(vars(template))}, got {fn!r:.80}")
        probe = BudgetedSchedule(template.kind, 0, 1)
        try:
            for key, value in fn.items():
                kind = type(getattr(template, key))
                if key == "kind" and value not in SCHEDULES:
                    raise ValueError(f"'kind' must be one of {SCHEDULES}, got {value!r:.40}")
                if kind in (int, float) and not _finite_number(value):
                    raise ValueError(f"{key!r} must be a finite number, got {value!r:.40}")
                setattr(probe, key, value)
            factor = probe(last)
            if not (_finite_number(factor) and factor >= 0):
                raise ValueError(f"it gives the learning-rate factor {factor} at step {last}")
        except (TypeError, ValueError, ZeroDivisionError) as err:
            raise CheckpointError(SCHEDULER_NAME, f"invalid schedule: {err}") from err


def json_from_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(path.name, f"not valid JSON ({err})") from err


# --------------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, step: int) -> None:
    """Name, size and SHA-256 of every file in `folder`, written last (its presence marks a finished save)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    atomic_write_json(folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "step": step, "files": files})


def verify_manifest(folder: Path, required: list[str]) -> dict[str, Any]:
    """Check every file against the manifest; `CheckpointError` names the first bad file and why."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(MANIFEST_NAME, "missing (the save never finished, or this is not a checkpoint)")
    manifest = json_from_file(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(MANIFEST_NAME, f"not a format-{MANIFEST_FORMAT} manifest")
    for name, expected in files.items():
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(MANIFEST_NAME, f"lists {name!r}, which is not a file inside the checkpoint")
        if not (isinstance(expected, dict) and isinstance(expected.get("size"), int)
                and isinstance(expected.get("sha256"), str)):
            raise CheckpointError(MANIFEST_NAME, f"the entry of {name!r} is not {{'size': int, 'sha256': str}}: "
                                                 f"{expected!r:.80}")
    for name in required:
        if name not in files:
            raise CheckpointError(name, f"not listed in {MANIFEST_NAME}")
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(name, "missing")
        size = file.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(name, f"size {size} bytes, the manifest says {expected.get('size')} (truncated or replaced)")
        digest = sha256_file(file)
        if digest != expected.get("sha256"):
            raise CheckpointError(
                name, f"SHA-256 {digest[:16]}… differs from the manifest's {str(expected.get('sha256'))[:16]}… (corrupted)"
            )
    return manifest


# --------------------------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """Everything parsed from one checkpoint, not yet applied."""

    path: Path
    state: TrainingState
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    apply_rng: Callable[[], None]
    settings: dict[str, Any] | None = None  # run_settings.json (None: written before settings were recorded)
    num_processes: int = 1  # how many processes wrote it (rng_state_* files)


class CheckpointManager:
    """Saves, lists, verifies and restores the checkpoints of one run (all processes call every method).

    `extra_writer(folder)` (main process) adds script-specific files to each checkpoint, e.g. its tokenizer; they are
    covered by the manifest like the rest. `settings` (`reformer_rev.training.settings.run_settings`) go into every
    checkpoint as `run_settings.json`; a resume compares them with the checkpoint's and stops on a difference unless
    `allow_changed_settings`. Checkpoints marked with `protect` (the last healthy one before a divergence) are never
    rotated away.

    Under DeepSpeed there are no checkpoints: the state is read and restored through `torch.distributed.checkpoint`,
    which does not know DeepSpeed's ZeRO optimizer (measured: `TypeError` at the first save). `required=True` (the run
    asks for periodic checkpoints or a resume) then fails at once, before any training, instead of at the first save;
    the end-of-run `save_unless_saved` is skipped with a warning.
    """

    def __init__(
        self,
        accelerator: Any,
        output_dir: str | os.PathLike,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        total_limit: int | None = None,
        extra_writer: Callable[[Path], None] | None = None,
        required: bool = False,
        settings: dict[str, Any] | None = None,
        allow_changed_settings: bool = False,
    ) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.supported = getattr(accelerator, "distributed_type", None) != DistributedType.DEEPSPEED
        if required and not self.supported:
            raise ValueError(
                "Checkpoints (`--checkpointing_steps`, `--resume_from_checkpoint`) are not supported under DeepSpeed: "
                "they go through torch.distributed.checkpoint, which cannot read DeepSpeed's ZeRO optimizer. Train "
                "without them, or use DDP or FSDP2 (training/configs/ddp.yaml, fsdp.yaml) for a resumable run."
            )
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.total_limit, self.extra_writer = total_limit, extra_writer
        self.settings, self.allow_changed_settings = settings, allow_changed_settings
        self.last_save_seconds: float | None = None

    # ---- listing ---------------------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Finished checkpoint folders (with a manifest), oldest first."""
        return list_checkpoints(self.root.parent)

    def newest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save_unless_saved(self, state: TrainingState, last_step_skipped: bool) -> Path | None:
        """At the end of a run (or a stop): save its state unless the newest checkpoint already is this step, or the
        last step was skipped as non-finite (the newest checkpoint then stays the last good state)."""
        if not self.supported:
            logger.warning("No end-of-run checkpoint under DeepSpeed (see `CheckpointManager`): the training state "
                           "is not saved; the final model is.")
            return None
        newest = self.newest()
        if last_step_skipped or (newest is not None and newest.name == f"{CHECKPOINT_PREFIX}{state.completed_steps}"):
            return newest
        return self.save(state)

    def save_verified(self, state: TrainingState, last_step_skipped: bool) -> Path | None:
        """At a stop: `save_unless_saved`, then re-read the checkpoint against its manifest (every file's size and
        SHA-256) before the process exits; `CheckpointSaveError` on every process if it does not verify."""
        path = self.save_unless_saved(state, last_step_skipped)
        error: CheckpointError | None = None
        if path is not None and self.accelerator.is_main_process:
            try:
                verify_manifest(path, [MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME])
            except CheckpointError as err:
                error = err
        if not self._all(error is None):
            raise CheckpointSaveError(f"The checkpoint {path} saved at the stop does not verify: {error or 'see the main process'}.")
        return path

    def remove_interrupted_saves(self) -> list[Path]:
        stale = sorted(self.root.glob(TEMP_PREFIX + "*")) if self.root.is_dir() else []
        for d in stale:
            logger.warning(f"Removing {d}: an interrupted checkpoint save.")
            shutil.rmtree(d, ignore_errors=True)
        return stale

    # ---- saving ----------------------------------------------------------------------------------------------
    def _all(self, ok: bool) -> bool:
        return _all_processes(self.accelerator, ok)

    def _optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper -> torch optimizer

    def save(self, state: TrainingState) -> Path:
        """Write `checkpoints/step_N` atomically; on failure remove the temp folder, keep the older checkpoints,
        and raise `CheckpointSaveError` (on every process) naming the path and the cause."""
        start = time.perf_counter()
        acc = self.accelerator
        final = self.root / f"{CHECKPOINT_PREFIX}{state.completed_steps}"
        tmp = self.root / f"{TEMP_PREFIX}{final.name}"
        error: BaseException | None = None
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        except OSError as err:
            error = err
        acc.wait_for_everyone()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # Every process takes part in gathering (FSDP shards); only the main process writes the shared files.
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self._optimizer(), options=options)
        if error is None and acc.is_main_process:
            bad = next((n for n, t in model_state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
            if bad is not None:  # a checkpoint is a state to go back to: never one of a diverged model
                error = ValueError(f"the weights hold NaN/inf values ({bad})")
        if error is None:
            try:
                if acc.is_main_process:
                    atomic_write_bytes(tmp / MODEL_NAME, tensors_to_bytes(model_state))
                    atomic_write_bytes(tmp / OPTIMIZER_NAME, optimizer_to_bytes(optim_state))
                    atomic_write_json(tmp / SCHEDULER_NAME, self.scheduler.state_dict())
                    scaler = getattr(acc, "scaler", None)
                    if scaler is not None:
                        atomic_write_json(tmp / SCALER_NAME, scaler.state_dict())
                    if self.extra_writer is not None:
                        self.extra_writer(tmp)
                    atomic_write_bytes(tmp / TRAINER_STATE_NAME, state.to_json().encode())
                    if self.settings is not None:
                        atomic_write_json(tmp / RUN_SETTINGS_NAME, self.settings)
                atomic_write_bytes(tmp / RNG_NAME.format(rank=acc.process_index), rng_to_bytes())
            except OSError as err:
                error = err
        if self._all(error is None):
            acc.wait_for_everyone()  # every rank's RNG file is in place before the manifest covers them
            try:
                if acc.is_main_process:
                    write_manifest(tmp, state.completed_steps)
                    self._publish(tmp, final)
            except OSError as err:
                error = err
        if not self._all(error is None):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, (WriteError, ValueError)):
                detail = str(error)
            elif error is not None:
                detail = f"{describe_os_error(error)} while writing {getattr(error, 'filename', None) or tmp}"
            else:
                detail = "another process could not write its part"
            kept = ", ".join(p.name for p in self.list()) or "none"
            fix = ("Lower --learning_rate, then resume from the newest checkpoint with --allow_changed_settings."
                   if isinstance(error, ValueError) else
                   "Free space (or fix the file system), then resume with --resume_from_checkpoint latest.")
            raise CheckpointSaveError(
                f"Could not save checkpoint {final}: {detail}. Training stopped; the temporary folder was removed and "
                f"the previous checkpoints are intact ({kept}). {fix}"
            ) from error
        self.last_save_seconds = time.perf_counter() - start
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished temp folder into place, then rotate old checkpoints (main process)."""
        trash = None
        if final.exists():  # e.g. a run resumed from an older checkpoint reaches this step again
            trash = final.with_name(f"{TEMP_PREFIX}old-{final.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        fsync_folder(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        if self.total_limit is not None:
            protected = self.protected()
            for old in self.list()[: -self.total_limit]:
                if old.name not in protected:
                    shutil.rmtree(old, ignore_errors=True)

    # ---- protection from rotation ----------------------------------------------------------------------------
    def protected(self) -> dict[str, str]:
        """{checkpoint name: why it is kept} (`checkpoints/protected.json`)."""
        try:
            data = json.loads((self.root / PROTECTED_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def protect_newest(self, why: str) -> str | None:
        """Keep the newest checkpoint from rotation (e.g. the last one before a sign of divergence); its path."""
        newest = self.newest()
        if newest is None:
            return None
        self.protect(newest, why)
        return str(newest)

    def protect(self, path: Path, why: str) -> None:
        """Keep `path` whatever `--checkpoints_total_limit` says (main process writes; every process may call)."""
        if self.accelerator.is_main_process:
            marks = {**self.protected(), path.name: why}
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.root / PROTECTED_NAME, marks)

    # ---- loading ---------------------------------------------------------------------------------------------
    def read(self, path: Path, epoch_batches: int | None = None) -> LoadedCheckpoint:
        """Verify `path` against its manifest and parse and check every file this process needs (nothing applied
        yet): whatever would fail (or go wrong silently) while applying it fails here, where the resume can still fall
        back to an older checkpoint. `epoch_batches`: this run's batches per epoch and process (checks the data
        position)."""
        required = [MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME]
        if getattr(self.accelerator, "scaler", None) is not None:
            required.append(SCALER_NAME)
        manifest = verify_manifest(path, required)
        settings = None
        if RUN_SETTINGS_NAME in manifest["files"]:
            settings = json_from_file(path / RUN_SETTINGS_NAME)
            if not isinstance(settings, dict):
                raise CheckpointError(RUN_SETTINGS_NAME, "not a JSON object")
        # A checkpoint of N processes holds rng_state_0..N-1. A process beyond them (a resume with more processes,
        # allowed only with --allow_changed_settings) takes the state of rank `rank % N`.
        writers = sum(1 for name in manifest["files"] if re.fullmatch(RNG_NAME.format(rank=r"\d+"), name))
        rank = self.accelerator.process_index
        rng_name = RNG_NAME.format(rank=rank if rank < writers or writers == 0 else rank % writers)
        if rng_name not in manifest["files"]:
            raise CheckpointError(rng_name, f"not listed in {MANIFEST_NAME}")
        try:
            state = TrainingState.from_json((path / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(TRAINER_STATE_NAME, str(err)) from err
        if not state.completed_steps <= state.max_train_steps <= state.requested_steps:
            raise CheckpointError(TRAINER_STATE_NAME, f"inconsistent run length: completed_steps "
                                  f"{state.completed_steps}, max_train_steps {state.max_train_steps}, requested_steps "
                                  f"{state.requested_steps} (need completed <= max <= requested)")
        same_batches = settings is None or self.settings is None or all(
            settings.get(k) == self.settings.get(k) for k in ("per_device_train_batch_size", "num_processes"))
        if epoch_batches is not None and same_batches and state.batches_in_epoch >= epoch_batches:
            raise CheckpointError(TRAINER_STATE_NAME, f"batches_in_epoch {state.batches_in_epoch} is beyond the "
                                  f"epoch's {epoch_batches} batches")
        model_state, _ = tensors_from_file(path / MODEL_NAME)
        # Names and (global, also under FSDP) shapes of the model's tensors, without gathering them.
        expected = self.accelerator.unwrap_model(self.model).state_dict()
        if set(model_state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(model_state)), sorted(set(model_state) - set(expected))
            raise CheckpointError(MODEL_NAME, f"parameters differ from the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, t in expected.items():
            if tuple(model_state[name].shape) != tuple(t.shape):
                raise CheckpointError(MODEL_NAME, f"{name} has shape {tuple(model_state[name].shape)}, the model {tuple(t.shape)}")
            if model_state[name].is_floating_point() and not torch.isfinite(model_state[name]).all():
                raise CheckpointError(MODEL_NAME, f"{name} holds NaN/inf values")
        optim_state = optimizer_from_file(path / OPTIMIZER_NAME)
        groups = self._optimizer().param_groups
        if [len(g["params"]) for g in optim_state["param_groups"]] != [len(g["params"]) for g in groups]:
            raise CheckpointError(OPTIMIZER_NAME, "parameter groups do not match the optimizer")
        check_optimizer_state(optim_state, expected)
        scheduler = json_from_file(path / SCHEDULER_NAME)
        check_scheduler_state(scheduler, self.scheduler, len(groups))
        scaler = json_from_file(path / SCALER_NAME) if SCALER_NAME in required else None
        return LoadedCheckpoint(path, state, model_state, optim_state, scheduler, scaler, rng_from_file(path / rng_name),
                                settings, writers)

    def apply(self, ckpt: LoadedCheckpoint) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ckpt.model, options=options)
        set_optimizer_state_dict(self.model, self._optimizer(), ckpt.optimizer, options=options)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if ckpt.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt.scaler)
        ckpt.apply_rng()

    def _apply_changed_settings(self, state: TrainingState, changes: dict[str, dict[str, Any]]) -> None:
        """With --allow_changed_settings: make the new values take effect from this step on, and record both."""
        logger.warning(f"Resuming with changed settings (--allow_changed_settings):\n{changes_table(changes)}")
        now = {name: c["now"] for name, c in changes.items()}
        groups = self._optimizer().param_groups
        if "learning_rate" in now:
            self.scheduler.base_lrs = [now["learning_rate"]] * len(groups)
            for group in groups:
                group["initial_lr"] = now["learning_rate"]
        if "weight_decay" in now:  # the decay group comes first (`cli.weight_decay_groups`)
            groups[0]["weight_decay"] = now["weight_decay"]
        for i, name in enumerate(("adam_beta1", "adam_beta2")):
            if name in now:
                for group in groups:
                    betas = list(group["betas"])
                    betas[i] = now[name]
                    group["betas"] = tuple(betas)
        if {"lr_scheduler_type", "num_warmup_steps"} & set(now):
            kind = self.settings.get("lr_scheduler_type", self.scheduler.lr_lambdas[0].kind)
            warmup = self.settings.get("num_warmup_steps", self.scheduler.lr_lambdas[0].num_warmup_steps)
            schedule = BudgetedSchedule(kind, warmup, state.max_train_steps)
            self.scheduler.lr_lambdas = [schedule] * len(groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler._last_lr = [base * factor for base in self.scheduler.base_lrs]
        for group, lr in zip(groups, self.scheduler._last_lr):
            group["lr"] = lr
        # The data position in samples of the global order (batch i goes to process i % N), carried over to the new
        # batch shape; a remainder that is no whole new batch is trained again.
        shape = ("per_device_train_batch_size", "num_processes")
        if set(shape) & set(now):
            old_batch = math.prod(changes[n]["checkpoint"] if n in changes else self.settings[n] for n in shape)
            new_batch = math.prod(self.settings[n] for n in shape)
            samples = state.batches_in_epoch * old_batch
            state.batches_in_epoch = samples // new_batch
            if samples % new_batch:
                logger.warning(f"The data position ({samples} samples into epoch {state.epoch}) is no whole number of "
                               f"the new batches of {new_batch}: the last {samples % new_batch} samples train again.")
        state.extra.setdefault("changed_settings", []).append({"step": state.completed_steps, "changes": changes})

    def resume(self, resume_from: str, requested_steps: int, epoch_batches: int | None = None) -> TrainingState | None:
        """Restore `resume_from` ('latest' or a folder) and return its state; `None` when 'latest' finds no
        checkpoint at all. 'latest' skips invalid checkpoints (warning: file and reason) for the newest valid one;
        an explicit folder that fails raises `CheckpointError`.

        The run keeps its stored (possibly budget-fitted) length, so a resumed run never trains past its end; only a
        different `requested_steps` than the run was started with (the user asks for a longer or shorter run) moves
        the end, and the LR schedule with it.
        """
        explicit = resume_from != "latest"
        if explicit:
            candidates = [Path(resume_from)]
        else:  # every step_N folder, newest first: one without a manifest is reported, not silently passed over
            found = self.root.iterdir() if self.root.is_dir() else []
            candidates = sorted((d for d in found if _step_of(d) is not None), key=_step_of, reverse=True)
        if not candidates:
            return None
        tried = []
        for path in candidates:
            try:
                loaded, error = self.read(path, epoch_batches), None
            except CheckpointError as err:
                loaded, error = None, err
            if self._all(error is None):
                changes = {}
                if self.settings is not None:
                    # A checkpoint from before settings were recorded still tells how many processes wrote it.
                    old = {"num_processes": loaded.num_processes, **(loaded.settings or {})}
                    changes = check_resume_settings(path, old, self.settings, self.allow_changed_settings)
                self.apply(loaded)
                if tried:
                    logger.warning(f"Resuming from {path}, the newest valid checkpoint.")
                state = loaded.state
                if changes:
                    self._apply_changed_settings(state, changes)
                if state.requested_steps != requested_steps:
                    logger.warning(f"The run was started for {state.requested_steps} steps, now {requested_steps} are "
                                   "asked for: its LR schedule now ends there.")
                    state.requested_steps = state.max_train_steps = max(requested_steps, state.completed_steps)
                    refit_scheduler(self.scheduler, state.completed_steps, state.max_train_steps)
                return state
            error = error or CheckpointError(RNG_NAME.format(rank="*"), "another process could not read its part")
            if explicit:
                raise CheckpointError(
                    str(path / error.file), f"{error.reason}. `--resume_from_checkpoint {resume_from}` names this "
                    "checkpoint explicitly, so there is no fallback: pass another one, or 'latest'."
                ) from error
            logger.warning(f"Skipping checkpoint {path}: {path / error.file}: {error.reason}.")
            tried.append(f"{path.name} ({error})")
        raise CheckpointError(str(self.root), "no valid checkpoint; tried, newest first: " + "; ".join(tried))


def save_at_stop(accelerator: Any, checkpoints: CheckpointManager, state: TrainingState, stop: Any, reason: str,
                 last_step_skipped: bool) -> dict[str, Any]:
    """The end of a run stopped by a signal (both scripts): the state of the last finished optimizer step as a
    verified checkpoint, one line saying where and how long it took, and the summary the script returns (exit 0)."""
    saved = checkpoints.save_verified(state, last_step_skipped)
    since = stop.seconds_since_request() if stop is not None else None
    took = f", {since:.1f} s after the signal" if since is not None else ""
    where = f"checkpoint {saved} (verified)" if saved is not None else "no checkpoint (not supported here)"
    accelerator.print(f"Stopped by {reason} at step {state.completed_steps}{took}: {where}. Resume with the same "
                      "command plus --resume_from_checkpoint latest.")
    return {"stopped": reason, "step": state.completed_steps, "checkpoint": None if saved is None else str(saved),
            "seconds_after_signal": since}


def _all_processes(accelerator: Any, ok: bool) -> bool:
    """True on every process iff `ok` on every process (one collective, a real minimum)."""
    return all_processes(accelerator, ok)


@contextlib.contextmanager
def output_dir_lock(accelerator: Any, output_dir: str | os.PathLike, purpose: str) -> Iterator[None]:
    """One run per output folder: the main process holds `OUTPUT_DIR/.lock` (PID, host, start) for the whole run.

    A second run on the folder stops at once, on every process, naming the owner; a lock left by a killed run is
    taken over with a warning.
    """
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            lock = FolderLock(output_dir, LOCK_NAME, purpose=purpose, on_stale=logger.warning).acquire()
        except (FolderLockedError, OSError) as err:
            error = err
    if not _all_processes(accelerator, error is None):
        raise error if error is not None else FolderLockedError(f"{output_dir} is in use by another run.")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


PREVIOUS_RUN_DIR = "previous_run"


def set_aside_previous_run(accelerator: Any, output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """Before a new run writes anything into `output_dir` (which it holds the lock of): if the folder holds another
    run's files and this run does not resume it, move them into `output_dir/previous_run/` (replacing an older one)
    with a warning, so that the new run's checkpoints, log and final model never mix with the old run's (its
    checkpoints of higher step numbers would otherwise rotate the new ones away, and `latest` would resume the old
    run). A resume that finds no checkpoint at all starts a new run, too. Returns where the old files went."""
    folder = Path(output_dir)
    resumes = resume_from is not None and (resume_from != "latest" or _has_checkpoint_folders(folder))
    moved, error = None, None
    if accelerator.is_main_process and not resumes and folder.is_dir():
        old = [p for p in folder.iterdir() if p.name not in (LOCK_NAME, PREVIOUS_RUN_DIR)]
        if old:
            target = folder / PREVIOUS_RUN_DIR
            try:
                with reraise_as_write_error(target, "moving the previous run into"):
                    replaced = target.exists()
                    if replaced:
                        shutil.rmtree(target)
                    target.mkdir()
                    for p in old:
                        os.replace(p, target / p.name)
                moved = target
                logger.warning(
                    f"{folder} held files of an earlier run ({', '.join(sorted(p.name for p in old)[:6])}"
                    f"{', …' if len(old) > 6 else ''}) and this run does not resume it (--resume_from_checkpoint): "
                    f"they were moved to {target}" + (" (replacing the run kept there before)" if replaced else "")
                    + ". Resume a run with --resume_from_checkpoint latest."
                )
            except OSError as err:
                error = err
    if not _all_processes(accelerator, error is None):
        raise error if error is not None else WriteError(None, f"could not prepare {folder} (see the main process)")
    return moved


def _has_checkpoint_folders(output_dir: Path) -> bool:
    root = output_dir / CHECKPOINTS_DIR
    return root.is_dir() and any(_step_of(d) is not None for d in root.iterdir())


def _step_of(path: Path) -> int | None:
    if not (path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX)):
        return None
    try:
        return int(path.name[len(CHECKPOINT_PREFIX) :])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints (`checkpoints/step_N` with a manifest) of a run, oldest first; temp folders ignored."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if _step_of(d) is not None and (d / MANIFEST_NAME).is_file()]
    return sorted(found, key=_step_of)


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointSaveError",
    "WriteError",
    "list_checkpoints",
    "output_dir_lock",
    "save_at_stop",
    "set_aside_previous_run",
    "verify_manifest",
]
