"""Crash- and concurrency-safe files and folders: atomic writes, folder locks, model folders that are never torn.

Used by the training scripts (checkpoints, logs, results) and by `RevFormerPreTrainedModel.save_pretrained` /
`from_pretrained`. It imports only the standard library because it is a flat sibling of the modeling files, which
`save_pretrained` copies next to a checkpoint for `trust_remote_code=True` loading (docs/design.md §3).

* `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json`: a temporary file in the same folder, fsync, then
  `os.replace`: the path holds the old content or the new one, never a prefix. A failed write (disk full, I/O error)
  removes the temporary file and raises `WriteError`, whose message names the path and the cause.
* `FolderLock`: an advisory lock file (`flock`) recording the owner's PID and host. Exclusive for one writer, shared
  for readers. The kernel drops a `flock` when its process dies, so a killed owner never blocks the next run; its
  stale owner record is reported and taken over.
* `save_model_folder(path, write)`: runs `write(tmp)` (e.g. `PreTrainedModel.save_pretrained`) into a fresh sibling
  folder (the long part: a failure or a kill there leaves `path` untouched), then, under the folder's exclusive save
  lock (a `flock` on the folder itself: no lock file is left in a saved model), renames each file into place. Two concurrent saves are serialised: the folder ends up with all files of one
  of them. Files of the folder that the save does not write (a tokenizer, logs, checkpoints) are left alone.
* `load_model_folder(path, load)`: runs `load()` under the folder's shared save lock, so no save can move files while
  it reads. A save killed during its (millisecond) renaming phase leaves a marker, and loading then raises
  `InconsistentFolderError` instead of returning a silently mixed model.
* Every save records the SHA-256 of the weight files it wrote in `checksums.sha256` (the `sha256sum` format);
  `load_model_folder` verifies them first and raises `CorruptedFileError` naming the file: flipped bytes, a rewritten
  dtype or offset in a safetensors header are never loaded silently. Only weight files are listed, so editing the
  config or the model card by hand stays possible.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: locks fall back to exclusive file creation
    fcntl = None

T = TypeVar("T")

SAVE_LOCK_NAME = ".save.lock"
# Taken by a save before it waits for SAVE_LOCK_NAME, and briefly by readers before theirs: a save waits only for the
# loads already running, never for a stream of new ones (writer preference).
SAVE_INTENT_NAME = ".save.intent"
SAVE_IN_PROGRESS_NAME = ".save_in_progress"
# SHA-256 of the weight files a save wrote (`sha256sum` format: `sha256sum -c checksums.sha256` checks them too);
# loading verifies them, so flipped bytes, a rewritten header or shifted offsets are never loaded silently.
CHECKSUMS_NAME = "checksums.sha256"
_SAVING_MARK = ".saving-"
# Weight files that a new save replaces: stale ones (e.g. shards of an older, larger save) must not survive it.
_WEIGHT_FILE_RE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


class WriteError(OSError):
    """A file or folder could not be written; the message names the path and the cause (e.g. disk full).
    `errno` is the cause's (ENOSPC for a full disk)."""

    def __str__(self) -> str:
        return str(self.strerror)


class FolderLockedError(RuntimeError):
    """Another process holds the lock; the message names it (PID, host, start time, purpose)."""


class InconsistentFolderError(OSError):
    """A model folder holds files of different saves (a save was interrupted while moving its files into place)."""


class CorruptedFileError(OSError):
    """A weight file differs from the SHA-256 its save recorded in `checksums.sha256`."""


def describe_os_error(err: BaseException) -> str:
    """'no space left on device' for ENOSPC etc.; the exception text otherwise."""
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno).lower()
    return str(err) or type(err).__name__


def _as_write_error(err: BaseException, path: str | os.PathLike, action: str = "writing") -> WriteError:
    code = err.errno if isinstance(err, OSError) else None
    return WriteError(code, f"{describe_os_error(err)} while {action} {path}")


@contextlib.contextmanager
def reraise_as_write_error(path: str | os.PathLike, action: str = "writing") -> Iterator[None]:
    """Turn an `OSError` raised inside the block into a `WriteError` naming `path` (and keep it as the cause)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise _as_write_error(err, path, action) from err


def fsync_folder(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename is durable only once its folder is synced). Best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_sibling(path: Path, tag: str = ".tmp-") -> Path:
    return path.with_name(f".{path.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` all-or-nothing (temp file + fsync + rename); raise `WriteError` naming the path."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        with reraise_as_write_error(path):
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_folder(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
    what = f" ({owner['purpose']})" if owner.get("purpose") else ""
    return f"PID {owner.get('pid')} on host {owner.get('host')!r}{what}, since {since}"


class FolderLock:
    """An advisory lock on `folder/name`, with the owner's PID and host in the file.

    `shared=True` takes a shared (reader) lock; otherwise exclusive. `timeout=0` fails at once with
    `FolderLockedError` naming the owner; `timeout=None` waits forever. With `record_owner` (exclusive locks) the
    file records the holder and is removed on release; a lock file left by a dead process on this host (the kernel
    released its `flock` when it died) is taken over with a warning through `on_stale`. `ephemeral` (default: as
    `record_owner`) removes the file on release without recording anything. `name=None` locks the folder itself
    (the `flock` of its directory), which leaves no file behind: model folders are locked that way.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str | None = ".lock",
        *,
        shared: bool = False,
        timeout: float | None = 0.0,
        purpose: str = "",
        record_owner: bool = True,
        ephemeral: bool | None = None,
        on_stale: Callable[[str], None] | None = None,
    ) -> None:
        # name=None locks the folder itself (a `flock` on its directory): no file is left in it.
        self.path = Path(folder) if name is None else Path(folder) / name
        self.is_folder = name is None
        self.shared, self.timeout, self.purpose, self.on_stale = shared, timeout, purpose, on_stale
        self.record_owner = record_owner and not shared and not self.is_folder
        # An ephemeral lock file exists only while held (removed on release).
        self.ephemeral = self.record_owner if ephemeral is None else (ephemeral and not shared and not self.is_folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if fcntl is None:  # pragma: no cover
            return self._acquire_without_flock()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        while True:
            with reraise_as_write_error(self.path, "creating the lock file"):
                if self.is_folder:
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                elif self.shared:
                    fd = os.open(self.path, os.O_RDONLY)
                else:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise FolderLockedError(
                        f"{self.path.parent} is in use: {describe_owner(_read_owner(self.path))} holds {self.path}. "
                        "Wait for it to finish or use another folder."
                    ) from None
                time.sleep(0.02)
                continue
            # The previous holder may have unlinked the file between our open and our flock: lock the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        if self.record_owner:
            self._check_stale_owner()
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "purpose": self.purpose}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                os.fsync(fd)
            except OSError as err:  # e.g. a full disk: no lock file without its owner is left behind
                self.release()
                raise _as_write_error(err, self.path, "recording the owner in") from err
        return self

    def _check_stale_owner(self) -> None:
        owner = _read_owner(self.path)
        if not owner or owner.get("pid") == os.getpid():
            return
        if owner.get("host") != socket.gethostname():
            # A flock is not visible across hosts on every network file system: do not guess.
            self.release(unlink=False)
            raise FolderLockedError(
                f"{self.path.parent} is in use by {describe_owner(owner)} (lock file {self.path}). If that run is no "
                "longer alive, delete the lock file."
            )
        state = "no longer running" if not pid_alive(owner["pid"]) else "running, but not holding the lock"
        if self.on_stale is not None:
            self.on_stale(f"Taking over the stale lock {self.path} left by {describe_owner(owner)}: {state}.")

    def _acquire_without_flock(self) -> FolderLock:  # pragma: no cover - non-POSIX fallback
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                owner = _read_owner(self.path)
                if owner.get("host") == socket.gethostname() and not pid_alive(owner.get("pid", -1)):
                    self.path.unlink(missing_ok=True)
                    continue
                raise FolderLockedError(f"{self.path.parent} is in use by {describe_owner(owner)}.") from None
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        self._fd = fd
        return self

    def release(self, unlink: bool = True) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if unlink and self.ephemeral:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------------------------

# The temp folder a `save_model_folder` is writing into: a nested save into it (e.g. `save_pretrained` called by a
# training script's own atomic final save) writes directly, since the outer save already makes the result atomic.
_SAVING_INTO: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("_SAVING_INTO", default=())


# temp folder -> the folder it becomes, for the saves running in this context (`final_destination`).
_SAVE_TARGETS: contextvars.ContextVar[dict[Path, Path]] = contextvars.ContextVar("_SAVE_TARGETS", default={})


def _inside_active_save(path: Path) -> bool:
    return any(path == root or root in path.parents for root in _SAVING_INTO.get())


def final_destination(path: str | os.PathLike) -> Path:
    """Where `path` ends up: inside a running `save_model_folder`, the target folder its temp folder becomes (a model
    card written there names the model by the target, not by `.NAME.saving-PID-xxxx`); `path` itself otherwise."""
    path = Path(path).resolve()
    for tmp, target in _SAVE_TARGETS.get().items():
        if path == tmp or tmp in path.parents:
            return target.resolve() / path.relative_to(tmp)
    return path


def _remove_dead_saves(target: Path) -> None:
    """Temp folders of saves into `target` whose process died (named `.NAME.saving-PID-xxxx`)."""
    prefix = f".{target.name}{_SAVING_MARK}"
    for tmp in target.parent.glob(prefix + "*"):
        try:
            pid = int(tmp.name[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def save_model_folder(save_directory: str | os.PathLike, write: Callable[[Path], T], *, is_main_process: bool = True) -> T:
    """Run `write(tmp_folder)`, then move what it wrote into `save_directory` so that no reader or concurrent save
    ever sees a mix of two saves (see the module docstring). Returns what `write` returned.

    On failure (disk full, I/O error, an exception in `write`) the temp folder is removed, `save_directory` keeps its
    previous files, and a `WriteError` names the path and the cause.
    """
    target = Path(save_directory)
    if not is_main_process or target.is_file() or _inside_active_save(target.resolve()):
        return write(target)  # nothing to make atomic here (or the caller's own error for a file path)
    with reraise_as_write_error(target, "creating"):
        target.mkdir(parents=True, exist_ok=True)
    _remove_dead_saves(target)
    tmp = target.parent / f".{target.name}{_SAVING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    token = _SAVING_INTO.set(_SAVING_INTO.get() + (tmp.resolve(),))
    targets = _SAVE_TARGETS.set({**_SAVE_TARGETS.get(), tmp.resolve(): target})
    try:
        try:
            tmp.mkdir()
            result = write(tmp)
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            for name in names:  # the data must be on disk before the renames make it visible
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            digests = {name: sha256_file(tmp / name) for name in names if _WEIGHT_FILE_RE.match(name)}
        except OSError as err:
            raise _as_write_error(err, tmp) from err
        except Exception as err:
            if "No space left" in str(err) or "StorageFull" in str(err):  # safetensors' Rust writer
                raise WriteError(errno.ENOSPC, f"no space left on device while writing {tmp} ({err})") from err
            raise
        finally:
            _SAVING_INTO.reset(token)
            _SAVE_TARGETS.reset(targets)
        _move_into_place(tmp, target, names, digests)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _save_locks(target: Path) -> list[FolderLock]:
    """The locks a save takes, in order: the intent file (it exists only while a save waits or moves files, so a
    saved folder keeps no lock file), then the folder itself. Where `flock` is missing, the older pair of lock files.
    A `.save.lock` file left by an earlier version is taken too, so that its readers are excluded."""
    if fcntl is None:  # pragma: no cover - non-POSIX: lock files
        return [FolderLock(target, SAVE_INTENT_NAME, timeout=None, record_owner=False, ephemeral=False),
                FolderLock(target, SAVE_LOCK_NAME, timeout=None, record_owner=False, ephemeral=False)]
    locks = [FolderLock(target, SAVE_INTENT_NAME, timeout=None, record_owner=False, ephemeral=True),
             FolderLock(target, None, timeout=None)]
    if (target / SAVE_LOCK_NAME).exists():
        locks.append(FolderLock(target, SAVE_LOCK_NAME, timeout=None, record_owner=False, ephemeral=True))
    return locks


def read_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """{file name: SHA-256} from `folder/checksums.sha256` ({} when there is none or it cannot be parsed)."""
    try:
        lines = (Path(folder) / CHECKSUMS_NAME).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    found = {}
    for line in lines:
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S.*)", line.strip())
        if m:
            found[m.group(2)] = m.group(1)
    return found


def verify_checksums(folder: str | os.PathLike) -> None:
    """`CorruptedFileError` naming the first weight file of `folder` whose SHA-256 differs from the one recorded by
    its save (files that are gone are not checked: loading reports those itself)."""
    folder = Path(folder)
    for name, expected in read_checksums(folder).items():
        path = folder / name
        if not path.is_file():
            continue
        digest = sha256_file(path)
        if digest != expected:
            raise CorruptedFileError(
                f"{path}: its SHA-256 {digest[:16]}… differs from the {expected[:16]}… its save recorded in "
                f"{folder / CHECKSUMS_NAME}: the file is corrupted, or was changed after it was saved. Re-save or "
                f"re-download the model (to load it anyway, delete {CHECKSUMS_NAME})."
            )


def save_pretrained_safely(model: Any, save_directory: str | os.PathLike, **kwargs: Any) -> Any:
    """`model.save_pretrained(save_directory, **kwargs)` through `save_model_folder`, for any `transformers` model.

    `reformer_rev` models do this in their own `save_pretrained`. A model converted by `make_reversible` keeps its
    stock class (a `LlamaForCausalLM` stays one), whose `save_pretrained` writes the files in place: a process loading
    the folder meanwhile can read a mix of two saves. Save it with this, and load it with `from_pretrained_safely`,
    whenever another process may read while you write."""
    return save_model_folder(save_directory, lambda folder: model.save_pretrained(folder, **kwargs),
                             is_main_process=kwargs.get("is_main_process", True))


def from_pretrained_safely(model_class: Any, path: str | os.PathLike, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(path, **kwargs)` under the folder's shared save lock (see
    `save_pretrained_safely`); any `transformers` class, e.g. `AutoModelForCausalLM`."""
    return load_model_folder(path, lambda: model_class.from_pretrained(path, **kwargs))


def _move_into_place(tmp: Path, target: Path, names: list[str], digests: dict[str, str] | None = None) -> None:
    with contextlib.ExitStack() as held:
        for lock in _save_locks(target):
            held.enter_context(lock)
        with reraise_as_write_error(target, "moving a save into"):
            # While this marker exists the folder may hold files of two saves; a save killed in this (short) phase
            # leaves it behind, and readers then refuse the folder instead of loading a mix.
            atomic_write_json(target / SAVE_IN_PROGRESS_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                                               "started": time.time(), "files": names})
            removed = set()
            for stale in target.iterdir():  # e.g. the shards of an older save that this one does not replace
                if _WEIGHT_FILE_RE.match(stale.name) and stale.name not in names and stale.is_file():
                    stale.unlink()
                    removed.add(stale.name)
            for name in names:
                os.replace(tmp / name, target / name)
            if digests:
                kept = {n: d for n, d in read_checksums(target).items() if n not in removed and n not in digests}
                merged = {**kept, **digests}
                atomic_write_text(target / CHECKSUMS_NAME, "".join(f"{d}  {n}\n" for n, d in sorted(merged.items())))
            fsync_folder(target)
            (target / SAVE_IN_PROGRESS_NAME).unlink()
        fsync_folder(target)


def check_model_folder(folder: str | os.PathLike) -> None:
    """Raise `InconsistentFolderError` if a save into `folder` was interrupted while moving its files into place."""
    marker = Path(folder) / SAVE_IN_PROGRESS_NAME
    if marker.is_file():
        owner = _read_owner(marker)
        raise InconsistentFolderError(
            f"{folder} may hold files of two different saves: a save into it by {describe_owner(owner)} was "
            f"interrupted while moving its files into place ({marker} is left). Save the model into it again."
        )


def _shared_lock_if_present(folder: Path, name: str, timeout: float | None) -> FolderLock | None:
    """A shared lock on `folder/name`, or None when the file does not exist (or vanishes while we open it)."""
    if not (folder / name).exists():
        return None
    try:
        return FolderLock(folder, name, shared=True, timeout=timeout).acquire()
    except WriteError as err:
        if err.errno == errno.ENOENT:
            return None
        raise


def load_model_folder(folder: str | os.PathLike, load: Callable[[], T], timeout: float | None = 600.0) -> T:
    """Run `load()` (reading files of the local folder `folder`) so that it sees the files of exactly one save:
    under the folder's shared save lock no `save_model_folder` can move files in the meantime. A save that waits to
    move files holds the intent file: new readers wait for it first (writer preference)."""
    folder = Path(folder)
    if not folder.is_dir():
        return load()  # a Hub id, a file: nothing of ours to coordinate with
    if fcntl is None:  # pragma: no cover - non-POSIX: the lock files, when a save ever made them
        if not (folder / SAVE_LOCK_NAME).exists():
            check_model_folder(folder)
            verify_checksums(folder)
            return load()
    with contextlib.ExitStack() as held:
        intent = _shared_lock_if_present(folder, SAVE_INTENT_NAME, timeout)
        if fcntl is not None:
            held.enter_context(FolderLock(folder, None, shared=True, timeout=timeout))
        legacy = _shared_lock_if_present(folder, SAVE_LOCK_NAME, timeout)  # saves by earlier versions
        if legacy is not None:
            held.callback(legacy.release)
        if intent is not None:
            intent.release()  # holding the folder lock now: the next save may announce itself
        check_model_folder(folder)
        verify_checksums(folder)
        return load()


__all__ = [
    "CorruptedFileError",
    "FolderLock",
    "FolderLockedError",
    "InconsistentFolderError",
    "WriteError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_model_folder",
    "describe_os_error",
    "final_destination",
    "from_pretrained_safely",
    "load_model_folder",
    "read_checksums",
    "reraise_as_write_error",
    "save_model_folder",
    "save_pretrained_safely",
    "sha256_file",
    "verify_checksums",
]
