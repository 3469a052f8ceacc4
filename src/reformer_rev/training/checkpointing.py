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
import os
import random
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

from ..safe_io import FolderLock, FolderLockedError, WriteError, atomic_write_bytes, atomic_write_json, describe_os_error, fsync_folder, sha256_file
from .budget import refit_scheduler
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

    def apply() -> None:
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        random.setstate(python_state)

    return apply


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


class CheckpointManager:
    """Saves, lists, verifies and restores the checkpoints of one run (all processes call every method).

    `extra_writer(folder)` (main process) adds script-specific files to each checkpoint, e.g. its tokenizer; they are
    covered by the manifest like the rest.

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
            if isinstance(error, WriteError):
                detail = str(error)
            elif error is not None:
                detail = f"{describe_os_error(error)} while writing {getattr(error, 'filename', None) or tmp}"
            else:
                detail = "another process could not write its part"
            kept = ", ".join(p.name for p in self.list()) or "none"
            raise CheckpointSaveError(
                f"Could not save checkpoint {final}: {detail}. Training stopped; the temporary folder was removed and "
                f"the previous checkpoints are intact ({kept}). Free space (or fix the file system), then resume "
                "with --resume_from_checkpoint latest."
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
            for old in self.list()[: -self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)

    # ---- loading ---------------------------------------------------------------------------------------------
    def read(self, path: Path) -> LoadedCheckpoint:
        """Verify `path` against its manifest and parse every file this process needs (nothing applied yet)."""
        rng_name = RNG_NAME.format(rank=self.accelerator.process_index)
        required = [MODEL_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, rng_name]
        if getattr(self.accelerator, "scaler", None) is not None:
            required.append(SCALER_NAME)
        verify_manifest(path, required)
        try:
            state = TrainingState.from_json((path / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(TRAINER_STATE_NAME, str(err)) from err
        model_state, _ = tensors_from_file(path / MODEL_NAME)
        # Names and (global, also under FSDP) shapes of the model's tensors, without gathering them.
        expected = self.accelerator.unwrap_model(self.model).state_dict()
        if set(model_state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(model_state)), sorted(set(model_state) - set(expected))
            raise CheckpointError(MODEL_NAME, f"parameters differ from the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, t in expected.items():
            if tuple(model_state[name].shape) != tuple(t.shape):
                raise CheckpointError(MODEL_NAME, f"{name} has shape {tuple(model_state[name].shape)}, the model {tuple(t.shape)}")
        optim_state = optimizer_from_file(path / OPTIMIZER_NAME)
        groups = self._optimizer().param_groups
        if [len(g["params"]) for g in optim_state["param_groups"]] != [len(g["params"]) for g in groups]:
            raise CheckpointError(OPTIMIZER_NAME, "parameter groups do not match the optimizer")
        scheduler = json_from_file(path / SCHEDULER_NAME)
        if not isinstance(scheduler, dict) or "last_epoch" not in scheduler:
            raise CheckpointError(SCHEDULER_NAME, "not a scheduler state")
        scaler = json_from_file(path / SCALER_NAME) if SCALER_NAME in required else None
        return LoadedCheckpoint(path, state, model_state, optim_state, scheduler, scaler, rng_from_file(path / rng_name))

    def apply(self, ckpt: LoadedCheckpoint) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ckpt.model, options=options)
        set_optimizer_state_dict(self.model, self._optimizer(), ckpt.optimizer, options=options)
        self.scheduler.load_state_dict(ckpt.scheduler)
        if ckpt.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt.scaler)
        ckpt.apply_rng()

    def resume(self, resume_from: str, requested_steps: int) -> TrainingState | None:
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
                loaded, error = self.read(path), None
            except CheckpointError as err:
                loaded, error = None, err
            if self._all(error is None):
                self.apply(loaded)
                if tried:
                    logger.warning(f"Resuming from {path}, the newest valid checkpoint.")
                state = loaded.state
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


def _all_processes(accelerator: Any, ok: bool) -> bool:
    """True on every process iff `ok` on every process (one collective)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(float(ok), device=accelerator.device)
    return bool(accelerator.reduce(flag, "min").item() > 0)


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
    "verify_manifest",
]
