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
import math
import os
import signal
import threading
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
from .collectives import all_reduce, any_process
from .state import TrainingState

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"
# The drift monitor's fields of each log line: monitoring, not training state (a resumed process probes its own first
# steps, so they differ from an uninterrupted run's while losses and weights are identical).
DRIFT_LOG_FIELDS = ("drift_last_rel_err", "drift_worst_rel_err", "drift_probes")
# The same for `make_reversible`'s fidelity probe (a converted model only): how far the training-time coupling moves
# the loss, measured on the training batches (`reformer_rev.conversion.FidelityProbe`).
FIDELITY_LOG_FIELDS = ("fidelity_last_rel_change", "fidelity_mean_rel_change", "fidelity_probes")
MONITOR_LOG_FIELDS = DRIFT_LOG_FIELDS + FIDELITY_LOG_FIELDS


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


def _unwrapped(model: Any) -> Any:
    """The model inside DDP/FSDP/`torch.compile` wrappers (what `Accelerator.unwrap_model` returns)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


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

    def fields(self, model: Any = None) -> dict[str, Any]:
        """The drift fields of a log line, and the fidelity probe's when `model` was converted by `make_reversible`."""
        s = self.monitor.state_dict()
        out = dict(zip(DRIFT_LOG_FIELDS, (s["last"], s["worst"] if s["probes"] else None, s["probes"])))
        conversion = getattr(_unwrapped(model), "_reversible_conversion", None) if model is not None else None
        if conversion is not None:
            out.update(conversion.probe.state_dict())
        return out

    def summary(self, steps_log: list[dict[str, Any]], accelerator: Any = None) -> dict[str, Any]:
        """The worst drift over the whole run: this process's probes, the other processes' (one all-reduce, so every
        process must call it) and, after a resume, the steps before it as `steps_log` recorded them."""
        s = self.monitor.state_dict()
        # float64: the value is compared with the logged one; -1 stands for "no probe on this process".
        here = torch.tensor(s["worst"] if s["probes"] else -1.0, dtype=torch.float64)
        if accelerator is not None:
            here = all_reduce(accelerator, here, "max")
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
    suspect: bool = False  # the step showed a sign of divergence: no checkpoint should be taken of it


class DivergenceError(RuntimeError):
    """Training stopped on signs of divergence that persisted (loss jump, gradient norm 0, exploding weights) or on
    weights that became NaN/inf; the message names the last healthy checkpoint."""


def parameter_norm(model: torch.nn.Module, accelerator: Any) -> float | None:
    """The L2 norm of all trainable parameters (every process gets the same value). Under FSDP each process holds
    shards: their squared norms are summed over the processes. None under DeepSpeed (ZeRO-3 parameters are
    placeholders outside its hooks)."""
    kind = str(getattr(accelerator, "distributed_type", ""))
    if "DEEPSPEED" in kind:
        return None
    squares = []
    for p in model.parameters():
        if p.requires_grad:
            local = p.detach()
            local = local.to_local() if hasattr(local, "to_local") else local  # FSDP2 DTensor shard
            squares.append(local.double().pow(2).sum())  # float32 squares of 1e20 weights would overflow
    total = torch.stack(squares).sum().cpu().double() if squares else torch.zeros((), dtype=torch.float64)
    if "FSDP" in kind:
        total = all_reduce(accelerator, total.reshape(1), "sum")[0]
    return float(total.sqrt())


class DivergenceMonitor:
    """Signs of divergence in the applied steps, against a running reference (the last `window` steps):

    * a loss jump: the loss exceeds the reference (median) loss by more than `jump` of it and by 0.5 nats;
    * a collapse of the gradient: norm exactly 0 while the loss is not;
    * exploding weights: the parameter norm exceeds `explode` times its reference (the median of the last norms,
      starting from the norm before the first step).

    `observe` returns the signs of a step (an empty list for a healthy one); `consecutive` counts the steps in a row
    that showed one. The loop protects the newest checkpoint at the first sign and stops after `patience` such steps
    in a row (0: never).
    """

    def __init__(self, patience: int = 5, window: int = 20, jump: float = 0.5, explode: float = 10.0,
                 min_history: int = 5) -> None:
        self.patience, self.window, self.jump, self.explode, self.min_history = patience, window, jump, explode, min_history
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.consecutive = 0
        self.first_sign_step: int | None = None

    @staticmethod
    def _median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    def start(self, weight_norm: float | None) -> None:
        if weight_norm is not None:
            self.norms = [weight_norm]

    def observe(self, step: int, loss: float, grad_norm: float | None, weight_norm: float | None) -> list[str]:
        signs = []
        if len(self.losses) >= self.min_history:
            ref = self._median(self.losses[-self.window:])
            if loss > ref + max(self.jump * abs(ref), 0.5):
                signs.append(f"the loss jumped to {loss:.4g} from a reference of {ref:.4g}")
        if grad_norm is not None and grad_norm == 0.0 and loss > 0:
            signs.append(f"the gradient norm is 0 at a loss of {loss:.4g}")
        if weight_norm is not None and self.norms:
            ref = self._median(self.norms[-self.window:])
            if weight_norm > self.explode * ref:
                signs.append(f"the weight norm reached {weight_norm:.4g} from a reference of {ref:.4g}")
        if signs:
            self.consecutive += 1
            self.first_sign_step = self.first_sign_step or step
        else:  # only healthy steps shape the reference
            self.consecutive = 0
            self.losses.append(loss)
            if weight_norm is not None:
                self.norms.append(weight_norm)
        return signs

    @property
    def diverged(self) -> bool:
        return self.patience > 0 and self.consecutive >= self.patience


class GuardedStep:
    """Accumulates a step's loss, then clips, checks for NaN/inf on every process at once, and steps (or skips).

    The gradient norm is computed even without clipping (`max_grad_norm` 0 clips at infinity), so a NaN/inf gradient
    is never applied unseen. A micro-batch whose forward raised a fixed-point `OverflowError` counts as a non-finite
    loss (`problem` keeps the error's text for the message)."""

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
        self.problem: str | None = None

    def add(self, loss: torch.Tensor, weight: float = 1.0, problem: str | None = None) -> None:
        """Record one micro-batch's mean loss; the step's loss is the `weight`-weighted mean."""
        self.loss_sum = self.loss_sum + loss.detach().float() * weight
        self.weight += weight
        self.problem = self.problem or problem

    def step(self, state: TrainingState, where: str,
             last_checkpoint: Callable[[], str]) -> tuple[float | None, float | None, float, bool, str | None]:
        """Apply (or skip) the step. Returns (mean loss, grad norm, lr used, skipped, error): `error` is the message
        of the `NonFiniteLossError` to raise (after logging the step) when too many steps were skipped."""
        acc = self.accelerator
        norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        grad_norm = None if norm is None else torch.as_tensor(norm, dtype=torch.float32).cpu()
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
                + (f" ({self.problem})" if self.problem else "")
            )
            self._reset()
            if state.nonfinite_steps > self.skip_nonfinite_steps:
                return None, norm_value, lr, True, (
                    f"Non-finite training loss or gradients {message}. Training stopped "
                    f"({state.nonfinite_steps - 1} step(s) skipped before, --skip_nonfinite_steps "
                    f"{self.skip_nonfinite_steps}); no checkpoint was written after the last good step: the healthy "
                    f"checkpoint is {last_checkpoint()}"
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


class Preempted(Exception):
    """Every process agreed to stop on a signal while the run was between optimizer steps (evaluating, preparing):
    the script saves the state of the last finished step and exits 0."""


class StopFlag:
    """Set by SIGTERM/SIGINT while `stop_on_signals()` is active: the loop ends at the next optimizer step boundary
    (evaluations check it per batch and raise `Preempted`), the script saves a verified checkpoint and exits 0.

    The time from the signal to the exit is bounded by `grace_seconds`: a watchdog exits the process when it is still
    running then (the newest checkpoint stays as it was; a save in progress leaves only a temp folder). A second signal
    exits at once. A repeat of the same signal within `DUPLICATE_SECONDS` is the same request delivered twice (a
    terminal's Ctrl-C reaches `torchrun` and its workers, and `torchrun` forwards it again), not a second one.
    """

    DUPLICATE_SECONDS = 1.0

    def __init__(self, grace_seconds: float | None = None) -> None:
        self.reason: str | None = None
        self.signum: int | None = None
        self.received_at: float | None = None
        self.grace_seconds = grace_seconds
        # What the watchdog's last words name (set by the loop: the newest checkpoint).
        self.describe_checkpoint: Callable[[], str] = lambda: "unknown"
        self._watchdog: threading.Timer | None = None

    def __bool__(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, signum: int | None = None) -> None:
        """Ask the run to stop (what the signal handler does); starts the watchdog."""
        self.reason, self.signum, self.received_at = reason, signum, time.monotonic()
        if self.grace_seconds is not None and self._watchdog is None:
            self._watchdog = threading.Timer(self.grace_seconds, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def seconds_since_request(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at

    @property
    def code(self) -> float:
        """0: no request; the signal number; `OTHER_REQUEST` for a request without a signal. The processes reduce it
        with max, so every process learns that (and, mostly, why) some process was asked to stop."""
        return 0.0 if not self else float(self.signum or self.OTHER_REQUEST)

    OTHER_REQUEST = 1000

    @classmethod
    def reason_of(cls, code: float) -> str | None:
        code = int(code)
        if code <= 0:
            return None
        return signal.Signals(code).name if code in {s.value for s in signal.Signals} else "a stop request"

    def agreed_reason(self, accelerator: Any) -> str | None:
        """Why some process was asked to stop (None: no process was); a collective: every process must call it."""
        return self.reason_of(all_reduce(accelerator, torch.tensor([self.code], dtype=torch.float64), "max").item())

    def cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _expire(self) -> None:
        logger.error(
            f"Still running {self.grace_seconds:g} s after {self.reason} (--stop_grace_seconds): exiting now without "
            f"saving. The newest checkpoint is {self.describe_checkpoint()}; resume with --resume_from_checkpoint latest."
        )
        _exit_now(self.signum)


def past_deadline_or_stopped(accelerator: Any, stop: StopFlag | None, deadline: float | None) -> bool:
    """Between two batches of an evaluation, decided by every process together (one collective): raise `Preempted`
    when any process was asked to stop; return True when any process is past `deadline` (`time.time()`)."""
    if stop is None and deadline is None:
        return False
    late = deadline is not None and time.time() > deadline
    flags = all_reduce(accelerator, torch.tensor([stop.code if stop is not None else 0.0, float(late)],
                                                 dtype=torch.float64), "max")
    reason = StopFlag.reason_of(flags[0].item())
    if reason is not None:
        raise Preempted(reason)
    return bool(flags[1] > 0)


def _exit_now(signum: int | None) -> None:
    """Exit the process at once (no cleanup that could block): the shell's code for "killed by this signal"."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(128 + (signum or signal.SIGTERM))


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[StopFlag]:
    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        since = flag.seconds_since_request()
        if since is not None and since < flag.DUPLICATE_SECONDS:
            return  # the same request, delivered twice (see StopFlag)
        if flag:
            logger.error(f"Second signal ({name}): exiting now without saving. The newest checkpoint is "
                         f"{flag.describe_checkpoint()}.")
            _exit_now(signum)
        bound = f" and exiting within {flag.grace_seconds:g} s (--stop_grace_seconds)" if flag.grace_seconds else ""
        logger.warning(f"{name} received: stopping at the next optimizer step boundary, saving a checkpoint{bound}. "
                       "Send it again to exit at once without saving.")
        flag.request(name, signum)

    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread: signals cannot be caught here
        previous = {}
    try:
        yield flag
    finally:
        flag.cancel_watchdog()
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
                 fingerprint: Callable[[Any], list[str]] | None = None,
                 divergence: DivergenceMonitor | None = None,
                 protect_checkpoint: Callable[[str], str | None] | None = None) -> None:
        self.accelerator, self.model, self.guard, self.state, self.log = accelerator, model, guard, state, log
        # `stop or StopFlag()` would replace the caller's flag: an unset StopFlag is falsy, so the signal handler's flag
        # never reached the loop (issue 24).
        self.fitter, self.last_checkpoint = fitter, last_checkpoint
        self.stop = stop if stop is not None else StopFlag()
        self.stop.describe_checkpoint = self.healthy_checkpoint
        self.fingerprint = fingerprint
        self.divergence = divergence if divergence is not None else DivergenceMonitor()
        self.protect_checkpoint = protect_checkpoint
        self.healthy: str | None = None  # the checkpoint protected at the first sign of divergence
        self.stop_reason: str | None = None
        self.drift = DriftLog()

    def healthy_checkpoint(self) -> str:
        """The checkpoint to go back to: the last one before the first sign of divergence, else the newest."""
        return self.healthy or self.last_checkpoint()

    def _first_sign(self, why: str) -> str:
        """At the first sign of trouble: keep the newest checkpoint (taken before it) from rotation; its name."""
        if self.healthy is None:
            kept = self.protect_checkpoint(why) if self.protect_checkpoint is not None else None
            self.healthy = kept or f"none (no checkpoint was taken before {why})"
        return self.healthy

    def _what_to_do(self) -> str:
        if self.healthy is not None and self.healthy.startswith("none"):
            return ("Start again with a lower --learning_rate (or a longer --num_warmup_steps), and checkpoints "
                    "(--checkpointing_steps) to go back to.")
        return ("Resume from it (--resume_from_checkpoint PATH) with a lower --learning_rate (or a longer "
                "--num_warmup_steps) and --allow_changed_settings.")

    def _forward(self, batch: Any, compute_loss: Callable) -> tuple[torch.Tensor | None, float, int, str | None]:
        """One micro-batch's forward. A fixed-point `OverflowError` (streams too large for int64: the weights are
        diverging) becomes a non-finite loss for the guard. With several processes they agree whether any of them
        overflowed, and then none runs the backward: a lone backward would wait forever in DDP's gradient
        all-reduce for the process that has no graph."""
        acc = self.accelerator
        try:
            loss, weight, tokens = compute_loss(self.model, batch)
            problem = None
        except OverflowError as err:
            loss, weight, tokens, problem = None, 1.0, 0, f"OverflowError: {err}"
        if acc.num_processes > 1 and any_process(acc, problem is not None) and problem is None:
            problem = "a fixed-point overflow on another process"
            loss = None
        return loss, weight, tokens, problem

    def _agree(self, step_seconds: float) -> tuple[int | None, bool, str | None]:
        """What every process must decide together after a step, in one collective: a refitted run length (the
        shortest any process fitted), whether the budget's training deadline passed, and whether to stop."""
        total = None if self.fitter is None else self.fitter.step_done(
            self.state.completed_steps, step_seconds, self.state.max_train_steps)
        late = self.fitter is not None and self.fitter.out_of_time()
        flags = torch.tensor([-1e18 if total is None else -float(total), float(late), self.stop.code],
                             dtype=torch.float64)
        flags = all_reduce(self.accelerator, flags, "max")
        fitted = None if flags[0].item() <= -1e17 else int(-flags[0].item())
        return fitted, flags[1].item() > 0, StopFlag.reason_of(flags[2].item())

    def updates(self, batches_for_epoch: Callable[[int, int], tuple[Iterable[Any], int]],
                compute_loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, float, int]]) -> Iterator[Update]:
        acc, state = self.accelerator, self.state
        samples: list[str] = []
        self.model.train()
        self.divergence.start(parameter_norm(self.model, acc))
        reason = self.stop.agreed_reason(acc)
        if reason is not None:  # a signal during data preparation: not one step more
            self.stop_reason = reason
            logger.warning(f"Stopping before step {state.completed_steps + 1}: {self.stop_reason}.")
            return
        while not state.finished:
            batches, epoch_length = batches_for_epoch(state.epoch, state.batches_in_epoch)
            if epoch_length == 0:
                raise ValueError("The training data yields no batch.")
            if state.batches_in_epoch >= epoch_length:
                # Only after a resume with changed data or batch settings (a checkpoint's own position is checked
                # when it is read): the epoch is over; without this the loop would wait forever for its batches.
                logger.warning(f"The data position (batch {state.batches_in_epoch} of epoch {state.epoch}) is past "
                               f"the epoch's {epoch_length} batches: continuing with epoch {state.epoch + 1}.")
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                continue
            step_start = time.perf_counter()
            for batch in batches:
                epoch = state.epoch
                with acc.accumulate(self.model):
                    loss, weight, tokens, problem = self._forward(batch, compute_loss)
                    if problem is None:
                        acc.backward(loss)
                        self.guard.add(loss, weight)
                    else:
                        self.guard.add(torch.tensor(math.nan, device=acc.device), weight, problem)
                if self.fingerprint is not None:
                    samples.extend(self.fingerprint(batch))
                state.tokens_seen += tokens * acc.num_processes
                state.batches_in_epoch += 1
                where = f"epoch {epoch}, batch {state.batches_in_epoch} of the epoch"
                if state.batches_in_epoch >= epoch_length:  # the epoch is done: the next position starts a new one
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if not acc.sync_gradients:
                    continue
                step = state.completed_steps + 1
                loss_value, grad_norm, lr, skipped, error = self.guard.step(
                    state, where, lambda: f"{self._first_sign(f'the non-finite step {step}')}. {self._what_to_do()}")
                state.completed_steps += 1
                weight_norm, signs = None, []
                if skipped:  # a skipped non-finite step is a sign too: keep the checkpoint taken before it
                    self._first_sign(f"the non-finite step {step}")
                else:
                    weight_norm = parameter_norm(self.model, acc)
                    if weight_norm is not None and not math.isfinite(weight_norm):
                        error = (f"The weights became NaN/inf at step {step} ({where}; loss {loss_value}, gradient "
                                 f"norm {grad_norm}). Training stopped; no checkpoint was written after it: the "
                                 f"healthy checkpoint is {self._first_sign(f'the NaN/inf weights at step {step}')}. "
                                 + self._what_to_do())
                    else:
                        signs = self.divergence.observe(step, loss_value, grad_norm, weight_norm)
                self.log.write({"step": state.completed_steps, "epoch": epoch, "loss": loss_value, "lr": lr,
                                "grad_norm": grad_norm, "weight_norm": weight_norm, "skipped_nonfinite": skipped,
                                "divergence_signs": signs, **self.drift.fields(self.model), "samples": samples})
                samples = []
                if error is not None:
                    raise (NonFiniteLossError if skipped else DivergenceError)(error)
                if signs:
                    kept = self._first_sign(f"the first sign of divergence (step {self.divergence.first_sign_step})")
                    logger.warning(f"Possible divergence at step {step}: {'; '.join(signs)} "
                                   f"({self.divergence.consecutive} step(s) in a row). The last checkpoint before the "
                                   f"first sign, {kept}, is kept.")
                    if self.divergence.diverged:
                        raise DivergenceError(
                            f"Training diverged: {self.divergence.consecutive} steps in a row up to step {step} showed "
                            f"signs of divergence ({'; '.join(signs)}), starting at step "
                            f"{self.divergence.first_sign_step}. Training stopped; the healthy checkpoint is {kept}. "
                            + self._what_to_do() + " (--divergence_patience 0 turns this check off.)"
                        )
                seconds = time.perf_counter() - step_start
                state.train_time_s += seconds
                fitted, late, stop = self._agree(seconds)
                if fitted is not None and fitted > state.max_train_steps and state.finished:
                    # The schedule has run out (its learning rate is 0 from here): lengthening the run now would
                    # only train at learning rate 0 (issue 24). The run ends as fitted before.
                    logger.info(f"Time budget: the step time would allow {fitted} steps, but the schedule ended at "
                                f"step {state.max_train_steps}; not lengthened.")
                    fitted = None
                if fitted is not None and fitted != state.max_train_steps:
                    fit = self.fitter.fits[-1] if self.fitter.fits else None
                    rate = f"{fit.seconds_per_step:.2f} s/step" if fit else "the measured step time"
                    # The first fit is news; refits after a drift of the step time are routine on a shared machine.
                    log = logger.warning if len(self.fitter.fits) <= 1 else logger.info
                    log(f"Time budget: at {rate}, --max_train_steps {state.max_train_steps} -> {fitted} "
                        f"(step {state.completed_steps}); the LR schedule now ends there.")
                    state.max_train_steps = max(fitted, state.completed_steps)
                    refit_scheduler(self.guard.scheduler, state.completed_steps, state.max_train_steps)
                yield Update(state.completed_steps, epoch, loss_value, lr, grad_norm, skipped, bool(signs))
                if late and not state.finished:
                    self.stop_reason = "time budget"
                elif stop is not None:
                    self.stop_reason = stop
                if self.stop_reason is not None:
                    logger.warning(f"Stopping at step {state.completed_steps}: {self.stop_reason}.")
                    return
                if state.finished:
                    return
                step_start = time.perf_counter()  # the caller's evaluation/checkpoint time is not step time
