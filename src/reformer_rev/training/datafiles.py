"""Local data files checked before `datasets` reads them, so that a bad file gets an error naming the option, the file,
the line and the field instead of a `StopIteration`, an Arrow `DatasetGenerationError` or a `KeyError` from deep
inside `datasets`; and `datasets` cache writes that fail for lack of space named as such.

* `check_json_lines(path, option, fields)`: every non-blank line is a JSON object with the given fields (a dotted
  path such as `translation.en`) holding strings. Blank lines are skipped, as `datasets` does.
* `check_text_file(path, option)`: UTF-8 text (not a binary file).
* `datasets_disk_errors()`: a full disk while `datasets` writes its cache becomes a `WriteError` naming the cache.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..safe_io import WriteError

# The translation format, quoted in the errors.
TRANSLATION_FORMAT = '{"translation": {"<source_lang>": "...", "<target_lang>": "..."}} per line'


class DataFileError(ValueError):
    """A local data file that cannot be used; the message names the option, the file, the line and the field."""


def _open_text(path: str | os.PathLike) -> Any:
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _lines(path: str | os.PathLike, option: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, checking that the file is UTF-8 text."""
    try:
        with _open_text(path) as fh:
            for number, raw in enumerate(fh, start=1):
                if b"\x00" in raw:
                    raise DataFileError(f"`--{option}` {str(path)!r} line {number}: holds NUL bytes; this is a binary "
                                        "file, not text.")
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFileError(
                        f"`--{option}` {str(path)!r} line {number}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                        f"column {err.start + 1}); is it a binary file?"
                    ) from None
    except (OSError, EOFError) as err:  # e.g. a .gz that is not gzip, or is cut short
        raise DataFileError(f"`--{option}` {str(path)!r} cannot be read: {type(err).__name__}: {err}") from err


def _field(record: Any, dotted: str) -> tuple[bool, Any, str]:
    """(found, value, where it stopped) of `record["a"]["b"]` for "a.b"."""
    value, path = record, []
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return False, None, ".".join(path) or "the line"
        if key not in value:
            where = ".".join(path)
            return False, sorted(value), where
        value = value[key]
        path.append(key)
    return True, value, dotted


def check_json_lines(path: str | os.PathLike, option: str, fields: Sequence[str], *, hint: str = "",
                     field_options: dict[str, str] | None = None) -> dict[str, int]:
    """Check a JSON-lines file (`.json`/`.jsonl`, optionally `.gz`) line by line: each non-blank line is a JSON
    object whose `fields` (dotted paths) are strings. A `.json` file holding one JSON array of objects is checked
    record by record. Returns counts: `records`, `empty` (records whose fields are all blank strings).

    `DataFileError` on the first bad line, naming `--option`, the file, the line number and the field; `hint` (e.g.
    the expected format) is appended; `field_options` names the option that chose a field (e.g.
    `{"translation.es": "--target_lang es"}`)."""
    field_options = field_options or {}
    tail = f" Expected {hint}." if hint else ""
    name = str(path)
    lines = list(_lines(path, option))
    text = "".join(t for _, t in lines)
    if not text.strip():
        raise DataFileError(f"`--{option}` {name!r} is empty: it holds no records.{tail}")
    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("[") and (name[:-3] if name.endswith(".gz") else name).endswith(".json"):
        try:
            array = json.loads(text)
        except ValueError as err:
            raise DataFileError(f"`--{option}` {name!r}: not valid JSON ({err}).{tail}") from err
        if not isinstance(array, list):
            raise DataFileError(f"`--{option}` {name!r}: expected a JSON array of objects.{tail}")
        records = [(f"record {i + 1}", r) for i, r in enumerate(array)]
    else:
        for number, line in lines:
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except ValueError as err:
                looks = " (it looks like tab-separated text)" if "\t" in line and not line.lstrip().startswith("{") else ""
                raise DataFileError(f"`--{option}` {name!r} line {number}: not JSON{looks}: {err}.{tail}") from None
    empty = 0
    for where, record in records:
        if not isinstance(record, dict):
            raise DataFileError(f"`--{option}` {name!r} {where}: a JSON {type(record).__name__}, not an object.{tail}")
        values = []
        for dotted in fields:
            found, value, _ = _field(record, dotted)
            if not found:
                has = f" (it has {value})" if isinstance(value, list) else ""
                chosen = f", chosen by `{field_options[dotted]}`" if dotted in field_options else ""
                raise DataFileError(f"`--{option}` {name!r} {where}: no field {dotted!r}{chosen}{has}.{tail}")
            if not isinstance(value, str):
                raise DataFileError(f"`--{option}` {name!r} {where}: field {dotted!r} must be a string, got "
                                    f"{type(value).__name__} ({value!r:.40}).{tail}")
            values.append(value)
        empty += all(not v.strip() for v in values)
    if records and empty == len(records):
        raise DataFileError(f"`--{option}` {name!r}: all {len(records)} records have empty {' and '.join(fields)}: "
                            "there is nothing to train on.")
    return {"records": len(records), "empty": empty}


def check_text_file(path: str | os.PathLike, option: str) -> None:
    """A `.txt` file must be UTF-8 text; `DataFileError` names the line otherwise."""
    for _ in _lines(path, option):
        pass


def _no_space(err: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT `OSError` in `err`'s chain, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        if "No space left on device" in str(err):
            return OSError(errno.ENOSPC, str(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def datasets_disk_errors(what: str = "the datasets cache") -> Iterator[None]:
    """A full disk while `datasets` prepares data (it writes Arrow files into its cache) is reported as such, naming
    the cache folder and how to move it, instead of a raw `OSError` or a `DatasetGenerationError` that blames the
    data files."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        full = _no_space(err)
        if full is None:
            raise
        import datasets  # noqa: PLC0415 - only for the cache location

        cache = Path(datasets.config.HF_DATASETS_CACHE)
        raise WriteError(full.errno, f"no space left on device while writing {what} ({cache}): free space there, or "
                                     "set HF_DATASETS_CACHE to a folder on a larger disk") from err


__all__ = ["DataFileError", "TRANSLATION_FORMAT", "check_json_lines", "check_text_file", "datasets_disk_errors"]
