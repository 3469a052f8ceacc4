"""Time budgets and the movable learning-rate schedule (`reformer_rev.training.budget`), on a fake clock."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from transformers import get_scheduler

from reformer_rev.training import budget
from reformer_rev.training.budget import BudgetedSchedule, StepFitter, TimeBudget, make_scheduler, refit_scheduler


def lrs(scheduler, steps: int, refits: dict[int, int] | None = None) -> list[float]:
    out = []
    for step in range(1, steps + 1):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
        if refits and step in refits:
            refit_scheduler(scheduler, step, refits[step])
    return out


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("kind", budget.SCHEDULES)
def test_schedule_equals_transformers_before_any_refit(kind):
    extra = {"scheduler_specific_kwargs": {"timescale": 20}} if kind == "inverse_sqrt" else {}
    ours = make_scheduler(sgd(), kind, 20, 200)
    theirs = get_scheduler(kind, sgd(), num_warmup_steps=20, num_training_steps=200, **extra)
    assert lrs(ours, 200) == lrs(theirs, 200)  # bit for bit over the whole run


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_refit_keeps_the_learning_rate_continuous_and_ends_at_zero(kind):
    values = lrs(make_scheduler(sgd(), kind, 20, 200), 100, refits={50: 80, 70: 100})
    jumps = [abs(b - a) for a, b in zip(values, values[1:])]
    assert max(jumps[20:]) < 0.05  # after warmup: no jump at either refit (a cosine step here is ~0.02-0.04)
    assert values[-1] < 0.01 and values[-1] > 0  # the last step of the refitted run has (almost) decayed
    assert lrs(make_scheduler(sgd(), kind, 20, 200), 100)[-1] > 0.4  # unfitted, it would still be high


def test_refit_during_warmup_of_a_too_short_run_still_reaches_the_peak():
    """Refit at step 6 (warmup 6/20 done) to a 30-step run: the warmup ends at step 9 instead of 20, ramping on from
    the current rate, then the decay ends at step 30; a later refit to 60 steps only moves the decay's end."""
    values = lrs(make_scheduler(sgd(), "cosine", 20, 200), 30, refits={6: 30})
    assert values[:7] == pytest.approx([i / 20 for i in range(7)])  # the original warmup up to the refit
    assert values[6:10] == pytest.approx([0.3, 0.3 + 0.7 / 3, 0.3 + 1.4 / 3, 1.0])  # ramp on, reaching the peak
    assert values[-1] < 0.01
    longer = lrs(make_scheduler(sgd(), "cosine", 20, 200), 60, refits={6: 30, 12: 60})
    assert longer[:12] == values[:12] and longer[-1] < 0.01
    assert max(abs(b - a) for a, b in zip(longer, longer[1:])) < 0.25


def test_scheduler_state_is_json_and_restores_a_refitted_schedule():
    a = make_scheduler(sgd(), "cosine", 10, 100)
    lrs(a, 30, refits={20: 60})
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores: plain JSON, no callable
    b = make_scheduler(sgd(), "cosine", 10, 100)
    b.load_state_dict(state)
    b.optimizer.param_groups[0]["lr"] = a.optimizer.param_groups[0]["lr"]
    assert lrs(a, 30) == lrs(b, 30)
    assert state["lr_lambdas"][0]["num_training_steps"] == 60


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        BudgetedSchedule("cosine_with_restarts", 0, 10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def test_fitter_fits_the_run_then_refits_when_the_machine_slows(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget.time, "time", clock.time)
    b = TimeBudget(minutes=2, start=clock.now)  # 120 s
    fitter = StepFitter(b, max_steps=1000, reserve=lambda s: 20.0, overhead=lambda s: 0.1 * s)
    total, times = 1000, {}
    for step in range(1, 200):
        seconds = 1.0 if step <= 40 else 2.0  # the machine gets twice as slow after step 40
        clock.now += seconds
        times[step] = clock.now
        new = fitter.step_done(step, seconds, total)
        if new is not None:
            total = new
        if clock.now > fitter.deadline() or step >= total:
            break
    first, *refits = fitter.fits
    # first fit after calibration: (120 - 20 reserve - 6 s elapsed) / (1 s + 10% overhead) more steps
    assert (first.step, first.new_total) == (6, 6 + int((120 - 20 - 6) / 1.1))
    # after the slowdown the mean of the last 20 steps rises; every 15% of drift refits to the time then left
    assert refits and all(f.step > 40 and f.new_total < f.old_total for f in refits)
    for f in refits:
        left = (1000.0 + 100.0) - times[f.step]
        assert f.new_total == f.step + int(left / (1.1 * f.seconds_per_step))
    assert all(b.seconds_per_step > a.seconds_per_step * 1.15 for a, b in zip(fitter.fits, refits))
    # the fitted run ends before the deadline: training + reserve fit in the budget
    assert step == total and clock.now <= b.end - 20.0


def test_fitter_never_lengthens_past_the_request_and_is_off_without_budget(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget.time, "time", clock.time)
    fitter = StepFitter(TimeBudget(minutes=60, start=clock.now), max_steps=50, reserve=lambda s: 0.0)
    totals = []
    for step in range(1, 10):
        clock.now += 1.0
        totals.append(fitter.step_done(step, 1.0, 50))
    assert totals == [None] * 9  # 50 steps fit easily: nothing to change
    unbounded = StepFitter(TimeBudget(minutes=None), max_steps=50, reserve=lambda s: 0.0)
    assert all(unbounded.step_done(i, 100.0, 50) is None for i in range(1, 20))
    assert not unbounded.out_of_time() and math.isinf(unbounded.deadline())


def test_a_late_refit_never_trains_at_learning_rate_0(tmp_path, monkeypatch):
    """A real training run whose fitter shortens it to 6 steps at step 5, then (the machine got faster) asks for 9 at
    step 6, when the schedule had ended: before issue 24 steps 7-9 ran at learning rate 0.0; now the run ends at 6."""
    from accelerate.state import AcceleratorState, GradientState

    from conftest import cut_bundled_corpus
    from reformer_rev.training.loop import TrainLog
    from training import train_lm

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    totals = {5: 6, 6: 9}
    monkeypatch.setattr(StepFitter, "step_done", lambda self, step, seconds, total: totals.get(step))
    monkeypatch.setattr(StepFitter, "out_of_time", lambda self: False)
    corpus = cut_bundled_corpus(tmp_path, {"train": (2, 3000), "validation": (1, 1000)})
    out = tmp_path / "out"
    results = train_lm.main([
        "--train_file", str(corpus["train"]), "--validation_file", str(corpus["validation"]), "--output_dir", str(out),
        "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--per_device_train_batch_size", "2", "--max_train_steps", "20",
        "--num_warmup_steps", "0", "--eval_steps", "0", "--max_eval_blocks", "2", "--sample_tokens", "0",
        "--time_budget_minutes", "10000", "--cpu",
    ])
    log = TrainLog.read(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and results["train"]["steps"] == 6
    assert all(r["lr"] > 0 for r in log), [r["lr"] for r in log]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow
def test_the_budget_holds_when_the_final_evaluation_runs_long(tmp_path):
    """A real process with a 70 s budget whose evaluation forwards became 100x slower than the fitter assumed (1 s per
    batch): the final evaluation ends at its deadline with the blocks done so far, and the whole job, counted from
    process start, stays within the budget (before: the final evaluation ran to its planned end, past the budget)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import cut_bundled_corpus

    repo = Path(__file__).resolve().parents[1]
    corpus = cut_bundled_corpus(tmp_path, {"train": (4, 6000), "validation": (2, 6000)})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "PREEMPT_SLOW_EVAL_SECONDS": "1"}
    done = subprocess.run(
        [sys.executable, str(repo / "tests" / "distributed" / "preemptible.py"), "lm",
         "--train_file", str(corpus["train"]), "--validation_file", str(corpus["validation"]), "--output_dir", str(out),
         "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
         "--intermediate_size", "64", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
         "--max_train_steps", "100000", "--eval_steps", "0", "--max_eval_blocks", "0", "--sample_tokens", "0",
         "--time_budget_minutes", str(70 / 60), "--cpu"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    print(results["total_time_s"], results["eval_blocks"])
    assert results["total_time_s"] <= 70
    assert "ran late and ended after" in done.stderr
    assert 0 < results["eval_blocks"]["validation"]["evaluated"] < results["eval_blocks"]["validation"]["in_split"]


def test_a_signal_after_the_loop_is_built_stops_it_at_a_step_boundary(tmp_path, fresh_accelerate_state):
    """The stop flag is unset (falsy) when the loop is built; a signal arriving later must still end the run."""
    from accelerate import Accelerator

    from reformer_rev.training.loop import GuardedStep, StopFlag, TrainingLoop, TrainLog
    from reformer_rev.training.state import TrainingState

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, "constant", 0, 10)
    flag = StopFlag()
    state = TrainingState(max_train_steps=10, requested_steps=10)
    loop = TrainingLoop(accelerator, model, GuardedStep(accelerator, model, optimizer, scheduler, 1.0, 0), state,
                        TrainLog(tmp_path, 0), stop=flag)
    calls = []

    def compute_loss(model, batch):
        calls.append(1)
        if len(calls) == 3:
            flag.request("SIGTERM", signal.SIGTERM)  # what the handler of `stop_on_signals` does, during step 3
        return model(batch).pow(2).mean(), 1.0, 1

    steps = [u.step for u in loop.updates(lambda epoch, skip: ([torch.ones(4, 2)] * 5, 5), compute_loss)]
    assert steps == [1, 2, 3] and loop.stop_reason == "SIGTERM" and state.completed_steps == 3


def test_fitter_refits_when_the_estimate_of_the_rest_of_the_job_changes(monkeypatch):
    """The step time holds, but the first evaluation costs a fifth of the guess the first fit reserved for the four
    still to come: the run is lengthened to use the time freed (it once ended at 20.8 of 30 minutes), and ends within
    the budget."""
    clock = FakeClock()
    monkeypatch.setattr(budget.time, "time", clock.time)
    b = TimeBudget(minutes=30, start=clock.now)
    per_eval = {"s": 200.0}  # guessed; 40.0 once measured at step 100
    fitter = StepFitter(b, max_steps=10_000, reserve=lambda s: 30.0 + 4 * per_eval["s"])
    total = 10_000
    for step in range(1, 10_000):
        clock.now += 1.7
        if step == 100:
            per_eval["s"] = 40.0
        new = fitter.step_done(step, 1.7, total)
        if new is not None:
            total = new
        if step >= total or clock.now > fitter.deadline():
            break
    first, *refits = fitter.fits
    assert first.step == 6 and first.new_total == 6 + int((1800 - 830 - 6 * 1.7) / 1.7)
    # one refit at the first step after the measurement, to the time then left, with the same step time
    assert [(f.step, f.new_total) for f in refits] == [(100, 100 + int((1800 - 190 - 100 * 1.7) / 1.7))]
    assert step == total and clock.now <= b.end - 190.0 and b.end - 190.0 - clock.now < 1.7
