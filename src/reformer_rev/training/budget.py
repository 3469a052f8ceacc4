"""Time budgets that bound the whole job, and learning-rate schedules that still complete inside them.

`TimeBudget` counts from the start of the process (imports and data preparation included). `BudgetedSchedule` is a
warmup + decay schedule (the formulas of `transformers.get_scheduler`) whose end can be moved while training:
`refit(step, total)` keeps the current learning rate and re-spreads the rest of the decay over the steps left, so
shortening (or re-lengthening) a run never makes the learning rate jump. `StepFitter` measures the time per step and
refits the schedule after a few calibration steps and again whenever the measured step time drifts (a loaded
machine), so that training, periodic evaluations, the final evaluation and the final save fit the budget.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "inverse_sqrt")
_DECAYING = ("linear", "cosine")


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux `/proc`), else now."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class BudgetedSchedule:
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR` with a movable end.

    Its state is plain attributes, which `LambdaLR.state_dict()` stores (and `load_state_dict` restores) as a JSON-able
    dict: no callable is ever pickled. Until the first refit it equals `transformers.get_scheduler(kind, ...)`
    (bit for bit) on every step of the run.
    """

    def __init__(self, kind: str, num_warmup_steps: int, num_training_steps: int) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"`lr_scheduler_type` must be one of {SCHEDULES}, got {kind!r}.")
        self.kind = kind
        self.num_warmup_steps = int(num_warmup_steps) if kind != "constant" else 0
        self.num_training_steps = int(num_training_steps)
        self.inverse_sqrt_timescale = max(1, int(num_warmup_steps))
        # The warmup ramps linearly from (warmup_anchor_step, warmup_anchor_factor) to (num_warmup_steps, 1); the decay
        # runs linearly in "remaining fraction" from (anchor_step, anchor_remaining) to (num_training_steps, 0). A refit
        # moves the anchors to the current step.
        self.warmup_anchor_step, self.warmup_anchor_factor = 0, 0.0
        self.anchor_step, self.anchor_remaining = self.num_warmup_steps, 1.0

    def remaining(self, step: int) -> float:
        """1 at the start of the decay, 0 at its end (linear's factor); written like transformers' formula."""
        span = float(max(1, self.num_training_steps - self.anchor_step))
        return min(1.0, max(0.0, self.anchor_remaining * float(self.num_training_steps - step) / span))

    def progress(self, step: int) -> float:
        """0 at the start of the decay, 1 at its end (cosine's argument); transformers' `progress` before a refit."""
        span = float(max(1, self.num_training_steps - self.anchor_step))
        r0 = self.anchor_remaining
        return min(1.0, max(0.0, (1.0 - r0) + r0 * float(step - self.anchor_step) / span))

    def __call__(self, step: int) -> float:
        if step < self.num_warmup_steps:
            a, f = self.warmup_anchor_step, self.warmup_anchor_factor
            return f + (1.0 - f) * float(step - a) / float(max(1, self.num_warmup_steps - a))
        if self.kind == "linear":
            return self.remaining(step)
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.progress(step))))
        if self.kind == "inverse_sqrt":
            shift = self.inverse_sqrt_timescale - self.num_warmup_steps
            return 1.0 / math.sqrt((step + shift) / self.inverse_sqrt_timescale)
        return 1.0

    @property
    def decays(self) -> bool:
        return self.kind in _DECAYING

    def refit(self, step: int, num_training_steps: int) -> None:
        """Make the schedule end at `num_training_steps`, continuing from the learning rate of `step`."""
        total = max(int(num_training_steps), step + 1)
        if step < self.num_warmup_steps:
            shorter = max(step + math.ceil(0.1 * total), math.ceil(0.2 * total))
            if total < 2 * self.num_warmup_steps and shorter < self.num_warmup_steps:
                # The warmup would take most of the shortened run: it ends at 20% of the run instead (at least 10% of
                # the run from now), ramping on from the current learning rate, so the run still reaches the peak
                # and decays.
                self.warmup_anchor_step, self.warmup_anchor_factor = step, self(step)
                self.num_warmup_steps = shorter
            self.anchor_step, self.anchor_remaining = self.num_warmup_steps, 1.0
        else:
            self.anchor_remaining, self.anchor_step = self.remaining(step), step
        self.num_training_steps = total


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, num_warmup_steps: int, num_training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` driven by one `BudgetedSchedule` (reach it as `scheduler.lr_lambdas[0]`)."""
    schedule = BudgetedSchedule(kind, num_warmup_steps, num_training_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))


def refit_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, completed_steps: int, num_training_steps: int) -> None:
    """Make `scheduler` (built by `make_scheduler`) end with training step `num_training_steps`, continuing from the
    current learning rate. The schedule counts applied steps only: skipped (non-finite) steps are not in it."""
    schedule: BudgetedSchedule = scheduler.lr_lambdas[0]
    skipped = completed_steps - scheduler.last_epoch
    schedule.refit(scheduler.last_epoch, num_training_steps - skipped)
    values = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, values):
        group["lr"] = lr
    scheduler._last_lr = values


class TimeBudget:
    """`minutes` of wall time from `start` (default: the start of this process); `None` = unbounded."""

    def __init__(self, minutes: float | None, start: float | None = None) -> None:
        self.minutes = minutes
        self.start = process_start_time() if start is None else start
        self.end = None if minutes is None else self.start + 60.0 * minutes

    @property
    def bounded(self) -> bool:
        return self.end is not None

    def left(self, now: float | None = None) -> float:
        return math.inf if self.end is None else self.end - (time.time() if now is None else now)

    def elapsed(self) -> float:
        return time.time() - self.start


@dataclass
class Fit:
    step: int
    seconds_per_step: float
    old_total: int
    new_total: int


class StepFitter:
    """Fits the number of training steps (and with it the LR schedule) to a `TimeBudget`.

    The caller reports each finished optimizer step with the seconds it took (training only). Two callbacks, given
    the current seconds per step, estimate the rest of the job: `overhead(s)` the periodic work per step (evaluations,
    checkpoints) and `reserve(s)` what the end of the job needs (final evaluation and save). After
    `calibration_steps` steps, and again whenever the mean step time of the last `window` steps differs from the
    one of the last fit by more than `drift`, or the refitted length would differ from the current one by more than
    `drift` of it (the callbacks' estimates changed, e.g. once the first evaluation is measured), the run is refitted:
    `total = done + time_left / (s + overhead(s))`, never above the requested `max_steps`.
    """

    def __init__(
        self,
        budget: TimeBudget,
        max_steps: int,
        reserve: Callable[[float], float],
        overhead: Callable[[float], float] = lambda s: 0.0,
        calibration_steps: int = 5,
        window: int = 20,
        drift: float = 0.15,
    ) -> None:
        self.budget, self.max_steps, self.reserve, self.overhead = budget, max_steps, reserve, overhead
        self.calibration_steps, self.window, self.drift = calibration_steps, window, drift
        self.step_seconds: list[float] = []
        self.fitted_seconds_per_step: float | None = None
        self.fits: list[Fit] = []

    @property
    def seconds_per_step(self) -> float | None:
        """Mean of the last `window` steps (the first one, which pays one-time costs, excluded). A mean, not a median:
        on a shared machine step times are often bimodal, and a median flipping between the modes refits in vain."""
        recent = self.step_seconds[1:][-self.window :]
        return sum(recent) / len(recent) if recent else None

    def deadline(self) -> float:
        """Time after which training must stop for the rest of the job to fit."""
        if not self.budget.bounded:
            return math.inf
        return self.budget.end - self.reserve(self.seconds_per_step or 0.0)

    def step_done(self, step: int, seconds: float, current_total: int) -> int | None:
        """Record one step; return the new total number of steps when a (re)fit changes it."""
        if not self.budget.bounded:
            return None
        self.step_seconds.append(seconds)
        if len(self.step_seconds) < self.calibration_steps + 1:
            return None
        per_step = self.seconds_per_step
        drifted = (self.fitted_seconds_per_step is None
                   or abs(per_step / self.fitted_seconds_per_step - 1) > self.drift)
        left = self.deadline() - time.time()
        total = min(self.max_steps, step + max(0, int(left / (per_step + self.overhead(per_step)))))
        # A refit also when the step time held but the estimate of the rest of the job moved the end by more than
        # `drift` of the run: before the first evaluation its cost is a guess (an untrained model decodes up to the
        # length limit), and a guess 5x too high, never revised, left a third of a 30-minute budget unused.
        if not drifted and abs(total - current_total) <= self.drift * current_total:
            return None
        self.fitted_seconds_per_step = per_step
        if total == current_total:
            return None
        self.fits.append(Fit(step, per_step, current_total, total))
        return total

    def out_of_time(self) -> bool:
        return time.time() > self.deadline()


__all__ = [
    "SCHEDULES",
    "BudgetedSchedule",
    "StepFitter",
    "TimeBudget",
    "make_scheduler",
    "process_start_time",
    "refit_scheduler",
]
