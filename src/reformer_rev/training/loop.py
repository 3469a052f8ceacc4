"""The training loop shared by the scripts: micro-batches, a guarded optimizer step, the per-step log, stopping.

`TrainingLoop.updates(...)` runs forward/backward over micro-batches (with Accelerate's gradient accumulation) and
yields after every optimizer step, so the caller's loop body is only what differs between scripts (evaluation,
checkpoints, logging to trackers):

    for update in loop.updates(batches_for_epoch, compute_loss):
        if update.step % eval_steps == 0:
            with loop.paused():        # evaluation time is not step time (the time budget fits both)
                evaluate(...)

Each optimizer step goes through `GuardedStep`: clipping, one all-reduce of (loss sum, weight, non-finite flag) so
every process takes the same decision, then either the optimizer and schedule step or, for a NaN/inf loss or
gradient norm, a skipped step (or a `NonFiniteLossError` after `skip_nonfinite_steps` of them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import reversible
from ..reversible import DriftMonitor
from ..safe_io import atomic_write_text
from .budget import StepFitter, refit_scheduler
from .state import TrainingState

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"
# The drift monitor's fields of each log line: monitoring, not training state (a resumed process probes its own first
# steps, so they differ from an uninterrupted run's while losses and weights are identical).
DRIFT_LOG_FIELDS = ("drift_last_rel_err", "drift_worst_rel_err", "drift_probes")


class NonFiniteLossError(RuntimeError):
    """Training stopped at a step whose loss or gradient norm was NaN/inf."""


# --------------------------------------------------------------------------------------------------------------
# Per-step log
# --------------------------------------------------------------------------------------------------------------


def block_fingerprints(input_ids: torch.Tensor) -> list[str]:
    """A short hash of each row of a batch: the log shows which samples every step saw (none twice, none skipped)."""
    rows = input_ids.detach().to("cpu", torch.int64).numpy()
    return [f"{zlib.crc32(row.tobytes()):08x}" for row in rows]


class TrainLog:
    """`train_log.jsonl`: one flushed JSON line per optimizer step (main process; a no-op elsewhere).

    Opened for a run resumed at `completed_steps`, it first drops the lines after that step (atomically), so the file
    always describes the run that produced the current weights; a new run (0) starts it empty.
    """

    def __init__(self, output_dir: str | os.PathLike, completed_steps: int, enabled: bool = True) -> None:
        self.path = Path(output_dir) / TRAIN_LOG_NAME
        self._fh = None
        if not enabled:
            return
        kept = []
        if completed_steps > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= completed_steps:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut by a kill
                    continue
        atomic_write_text(self.path, "".join(kept))
        self._fh = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    @staticmethod
    def read(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
        path = Path(output_dir) / TRAIN_LOG_NAME
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class DriftLog:
    """The engine's reconstruction-drift monitor (`reversible.default_drift_monitor`) as seen by one training run.

    The monitor probes some backward passes of every reversible stack (the first few calls, then one in `every`) and
    keeps the last and the worst relative error between a stack's input and its reconstruction. It is process-global,
    so the run starts it afresh (an earlier run in the same process must not leak into this one's figures, and the
    first steps of every run are probed). `fields()` goes into each line of `train_log.jsonl`; `summary()` into the
    results. Exact fixed-point streams give 0.0; `None` means no probe has run yet (e.g. a non-reversible model).
    """

    def __init__(self, monitor: DriftMonitor | None = None) -> None:
        # Looked up now, not at import: the engine reads the module attribute at every call.
        self.monitor = monitor = monitor or reversible.default_drift_monitor
        monitor.calls, monitor.probes, monitor.last, monitor.worst = 0, 0, None, 0.0

    def fields(self) -> dict[str, Any]:
        s = self.monitor.state_dict()
        return dict(zip(DRIFT_LOG_FIELDS, (s["last"], s["worst"] if s["probes"] else None, s["probes"])))

    def summary(self, steps_log: list[dict[str, Any]], accelerator: Any = None) -> dict[str, Any]:
        """The worst drift over the whole run: this process's probes, the other processes' (one all-reduce, so every
        process must call it) and, after a resume, the steps before it as `steps_log` recorded them."""
        s = self.monitor.state_dict()
        # float64: the value is compared with the logged one; -1 stands for "no probe on this process".
        here = torch.tensor(s["worst"] if s["probes"] else -1.0, dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            here = accelerator.reduce(here.to(accelerator.device), "max").cpu()
        logged = [r["drift_worst_rel_err"] for r in steps_log if r.get("drift_worst_rel_err") is not None]
        worst = max([*logged, *([here.item()] if here >= 0 else [])], default=None)
        return {"worst_rel_err": worst, "last_rel_err": s["last"], "probes": s["probes"],
                "threshold": self.monitor.threshold,
                "exceeded_threshold": None if worst is None else worst > self.monitor.threshold}


# --------------------------------------------------------------------------------------------------------------
# The guarded optimizer step
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Update:
    """One finished optimizer step, as the loop yields it."""

    step: int
    epoch: int
    loss: float | None  # weighted mean over the step's micro-batches and processes; None when skipped
    lr: float
    grad_norm: float | None
    skipped: bool


class GuardedStep:
    """Accumulates a step's loss, then clips, checks for NaN/inf on every process at once, and steps (or skips)."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 max_grad_norm: float, skip_nonfinite_steps: int) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.max_grad_norm, self.skip_nonfinite_steps = max_grad_norm, skip_nonfinite_steps
        # fp16's GradScaler skips inf gradients itself; any other non-finite gradient norm is divergence.
        self.check_grad_norm = accelerator.mixed_precision != "fp16"
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.accelerator.device)
        self.weight = 0.0

    def add(self, loss: torch.Tensor, weight: float = 1.0) -> None:
        """Record one micro-batch's mean loss; the step's loss is the `weight`-weighted mean."""
        self.loss_sum = self.loss_sum + loss.detach().float() * weight
        self.weight += weight

    def step(self, state: TrainingState, where: str,
             last_checkpoint: Callable[[], str]) -> tuple[float | None, float | None, float, bool, str | None]:
        """Apply (or skip) the step. Returns (mean loss, grad norm, lr used, skipped, error): `error` is the message
        of the `NonFiniteLossError` to raise (after logging the step) when too many steps were skipped."""
        acc = self.accelerator
        grad_norm = None
        if self.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            grad_norm = None if norm is None else torch.as_tensor(norm, dtype=torch.float32)
        norm_bad = grad_norm is not None and self.check_grad_norm and not torch.isfinite(grad_norm).item()
        local_bad = float((not torch.isfinite(self.loss_sum).item()) or norm_bad)
        # One collective per step: every process sees the mean loss and takes the same skip/stop decision.
        stats = acc.reduce(
            torch.stack([torch.nan_to_num(self.loss_sum), self.loss_sum.new_tensor(self.weight),
                         self.loss_sum.new_tensor(local_bad)]),
            "sum",
        )
        lr = self.scheduler.get_last_lr()[0]
        norm_value = None if grad_norm is None or not torch.isfinite(grad_norm) else grad_norm.item()
        if stats[2].item() > 0:
            self.optimizer.zero_grad()  # not applied: weights, optimizer state and schedule stay as they were
            state.nonfinite_steps += 1
            message = (
                f"at step {state.completed_steps + 1} ({where}): loss {self.loss_sum.item()}"
                + (f", gradient norm {grad_norm.item()}" if grad_norm is not None else "")
            )
            self._reset()
            if state.nonfinite_steps > self.skip_nonfinite_steps:
                return None, norm_value, lr, True, (
                    f"Non-finite training loss or gradients {message}. Training stopped "
                    f"({state.nonfinite_steps - 1} step(s) skipped before, --skip_nonfinite_steps "
                    f"{self.skip_nonfinite_steps}); no checkpoint was written after the last good step: last "
                    f"checkpoint {last_checkpoint()}. Lower --learning_rate (or lengthen --num_warmup_steps), then "
                    "--resume_from_checkpoint latest."
                )
            logger.warning(f"Non-finite training loss or gradients {message}: step skipped "
                           f"({state.nonfinite_steps}/{self.skip_nonfinite_steps} allowed).")
            return None, norm_value, lr, True, None
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad()
        mean = (stats[0] / stats[1]).item()
        self._reset()
        return mean, norm_value, lr, False, None


# --------------------------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT at a step boundary
# --------------------------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM/SIGINT while `stop_on_signals()` is active: the loop ends after the current optimizer step
    (the state stays consistent for a checkpoint). A second signal interrupts at once."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[StopFlag]:
    def handler(signum: int, frame: object) -> None:
        if flag:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        flag.reason = signal.Signals(signum).name
        logger.warning(f"{flag.reason} received: stopping after the current optimizer step (again to stop now).")

    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


class TrainingLoop:
    """Runs optimizer steps until `state.max_train_steps`, the time budget or a stop signal (see the module doc).

    `batches_for_epoch(epoch, skip)` returns `(batches, num_batches)`: the epoch's micro-batches after the first
    `skip` ones, and how many the whole epoch has. `compute_loss(model, batch)` returns `(loss, weight, tokens)`:
    the micro-batch's mean loss, its weight in the step's mean loss, and the tokens it trained on (per process).
    Per-step records go to `log` (with `fingerprint(batch)`, e.g. block CRCs, when given). Only the time spent in
    the loop itself counts as step time: what the caller does between two updates (evaluation, checkpoints) is not.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, guard: GuardedStep, state: TrainingState,
                 log: TrainLog, fitter: StepFitter | None = None, stop: StopFlag | None = None,
                 last_checkpoint: Callable[[], str] = lambda: "none",
                 fingerprint: Callable[[Any], list[str]] | None = None) -> None:
        self.accelerator, self.model, self.guard, self.state, self.log = accelerator, model, guard, state, log
        # `is None`, not `or`: an unset StopFlag is falsy, and replacing it would lose every later signal.
        self.fitter, self.stop = fitter, stop if stop is not None else StopFlag()
        self.last_checkpoint = last_checkpoint
        self.fingerprint = fingerprint
        self.stop_reason: str | None = None
        self.drift = DriftLog()

    def _agree(self, step_seconds: float) -> tuple[int | None, bool, bool]:
        """What every process must decide together after a step, in one collective: a refitted run length (the
        shortest any process fitted), whether the budget's training deadline passed, and whether to stop."""
        total = None if self.fitter is None else self.fitter.step_done(
            self.state.completed_steps, step_seconds, self.state.max_train_steps)
        late = self.fitter is not None and self.fitter.out_of_time()
        flags = torch.tensor([-1e18 if total is None else -float(total), float(late), float(bool(self.stop))],
                             device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, "max") if self.accelerator.num_processes > 1 else flags
        fitted = None if flags[0].item() <= -1e17 else int(-flags[0].item())
        return fitted, flags[1].item() > 0, flags[2].item() > 0

    def updates(self, batches_for_epoch: Callable[[int, int], tuple[Iterable[Any], int]],
                compute_loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, float, int]]) -> Iterator[Update]:
        acc, state = self.accelerator, self.state
        samples: list[str] = []
        self.model.train()
        while not state.finished:
            batches, epoch_length = batches_for_epoch(state.epoch, state.batches_in_epoch)
            if epoch_length == 0:
                raise ValueError("The training data yields no batch.")
            step_start = time.perf_counter()
            for batch in batches:
                epoch = state.epoch
                with acc.accumulate(self.model):
                    loss, weight, tokens = compute_loss(self.model, batch)
                    acc.backward(loss)
                    self.guard.add(loss, weight)
                if self.fingerprint is not None:
                    samples.extend(self.fingerprint(batch))
                state.tokens_seen += tokens * acc.num_processes
                state.batches_in_epoch += 1
                where = f"epoch {epoch}, batch {state.batches_in_epoch} of the epoch"
                if state.batches_in_epoch >= epoch_length:  # the epoch is done: the next position starts a new one
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if not acc.sync_gradients:
                    continue
                loss_value, grad_norm, lr, skipped, error = self.guard.step(state, where, self.last_checkpoint)
                state.completed_steps += 1
                self.log.write({"step": state.completed_steps, "epoch": epoch, "loss": loss_value, "lr": lr,
                                "grad_norm": grad_norm, "skipped_nonfinite": skipped, **self.drift.fields(),
                                "samples": samples})
                samples = []
                if error is not None:
                    raise NonFiniteLossError(error)
                seconds = time.perf_counter() - step_start
                state.train_time_s += seconds
                fitted, late, stop = self._agree(seconds)
                if fitted is not None and fitted != state.max_train_steps:
                    fit = self.fitter.fits[-1] if self.fitter.fits else None
                    rate = f"{fit.seconds_per_step:.2f} s/step" if fit else "the measured step time"
                    # The first fit is news; refits after a drift of the step time are routine on a shared machine.
                    log = logger.warning if len(self.fitter.fits) <= 1 else logger.info
                    log(f"Time budget: at {rate}, --max_train_steps {state.max_train_steps} -> {fitted} "
                        f"(step {state.completed_steps}); the LR schedule now ends there.")
                    state.max_train_steps = max(fitted, state.completed_steps)
                    refit_scheduler(self.guard.scheduler, state.completed_steps, state.max_train_steps)
                yield Update(state.completed_steps, epoch, loss_value, lr, grad_norm, skipped)
                if late and not state.finished:
                    self.stop_reason = "time budget"
                elif stop:
                    self.stop_reason = self.stop.reason or "stop signal on another process"
                if self.stop_reason is not None:
                    logger.warning(f"Stopping at step {state.completed_steps}: {self.stop_reason}.")
                    return
                if state.finished:
                    return
                step_start = time.perf_counter()  # the caller's evaluation/checkpoint time is not step time
