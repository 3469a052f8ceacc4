"""The position of a training run: everything besides tensors that a resumed run needs, stored as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class TrainingState:
    """Counters of a run, saved in every checkpoint as `trainer_state.json` (no code, no pickle).

    `epoch` / `batches_in_epoch` are the data position: the next batch to train on is batch `batches_in_epoch` of
    epoch `epoch` (each epoch's order depends only on the seed and the epoch). `requested_steps` is the length the run
    was asked for; `max_train_steps` its length as last fitted (a time budget may shorten it), where the LR schedule
    ends. `extra` holds what a script adds (e.g. the best validation score so far).
    """

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    max_train_steps: int = 0
    requested_steps: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    nonfinite_steps: int = 0
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.completed_steps >= self.max_train_steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainingState:
        """Parse and check every field (type and range); `ValueError` names the bad field."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"must hold a JSON object, got {type(data).__name__}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise ValueError(f"lacks the key {f.name!r}")
            value = data[f.name]
            expected = {"eval_history": list, "extra": dict, "train_time_s": (int, float)}.get(f.name, int)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(f"{f.name!r} must be {getattr(expected, '__name__', 'a number')}, got {value!r:.60}")
            if expected is int and value < 0:
                raise ValueError(f"{f.name!r} must be >= 0, got {value}")
            kwargs[f.name] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingState:
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
