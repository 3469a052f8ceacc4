"""The settings that make a run what it is, recorded in every checkpoint and compared on resume.

A resumed run restores the optimizer, the schedule, the RNG states and the data position of its checkpoint. Had the
command changed meanwhile (another learning rate, batch size, data file, precision, seed or process count), the
resume would silently train a different run than the one its `results.json` describes. So every checkpoint holds
`run_settings.json`: every option marked `fingerprint=True` in the script's option table (all but those that only
change evaluation, logging, checkpoint cadence or the run's length), the number of processes and precision actually
used, and the SHA-256 of every local data file. A resume with different values stops with a table of them, unless
`--allow_changed_settings` is given: then the new values take effect where they can (optimizer hyperparameters,
schedule, data position in samples, RNG states of new processes) and `results.json` records both.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..safe_io import sha256_file

RUN_SETTINGS_NAME = "run_settings.json"
# Options whose value is a local file: the run depends on its content (compared by SHA-256), not on its path.
FILE_OPTIONS = ("train_file", "validation_file", "test_file")


class RunSettingsChanged(ValueError):
    """A resume with settings that differ from the checkpoint's, without `--allow_changed_settings`."""


def file_digest(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return {"path": str(path), "sha256": sha256_file(path)}


def run_settings(args: argparse.Namespace, options: Iterable[Any], **derived: Any) -> dict[str, Any]:
    """The fingerprint of a run: the `fingerprint=True` options of the table (files by content), plus `derived`
    values measured at run time (e.g. `num_processes`, the `mixed_precision` actually used)."""
    settings: dict[str, Any] = {}
    for option in options:
        if not getattr(option, "fingerprint", True):
            continue
        value = getattr(args, option.name)
        if option.name in FILE_OPTIONS:
            value = file_digest(value)
        settings[option.name] = value
    settings.update(derived)
    return json.loads(json.dumps(settings))  # as stored: tuples become lists, so a comparison is like for like


def _comparable(value: Any) -> Any:
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: {"checkpoint": old value, "now": new value}} for every setting that differs (a setting only one side
    knows, e.g. an option added since the checkpoint was written, is not a difference)."""
    return {
        name: {"checkpoint": old[name], "now": new[name]}
        for name in sorted(set(old) & set(new))
        if _comparable(old[name]) != _comparable(new[name])
    }


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['path']} (SHA-256 {value['sha256'][:12]}…)"
    return repr(value)


def changes_table(changes: dict[str, dict[str, Any]]) -> str:
    rows = [("setting", "checkpoint", "now")] + [(n, _shown(c["checkpoint"]), _shown(c["now"])) for n, c in changes.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  " + "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def check_resume_settings(path: Path, old: dict[str, Any] | None, new: dict[str, Any],
                          allow: bool) -> dict[str, dict[str, Any]]:
    """Compare a checkpoint's recorded settings with this run's: `RunSettingsChanged` with the table of differences,
    unless `allow` (then the differences are returned for the caller to apply and record)."""
    if old is None:
        return {}
    changes = changed_settings(old, new)
    if changes and not allow:
        processes = changes.get("num_processes")
        count = (f" It was written by {processes['checkpoint']} process(es); this run has {processes['now']}."
                 if processes else "")
        raise RunSettingsChanged(
            f"Resuming from {path} would silently change the run: these settings differ from the ones it was "
            f"trained with:\n{changes_table(changes)}\n{count.strip() + ' ' if count else ''}Resume with the "
            "checkpoint's values, or pass --allow_changed_settings to continue with the new ones (they take effect "
            "from this step on; results.json records both)."
        )
    return changes


__all__ = [
    "FILE_OPTIONS",
    "RUN_SETTINGS_NAME",
    "RunSettingsChanged",
    "changed_settings",
    "changes_table",
    "check_resume_settings",
    "run_settings",
]
