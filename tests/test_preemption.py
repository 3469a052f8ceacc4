"""Preemption of real training processes: SIGTERM/SIGINT stop at a step boundary, save a verified checkpoint and exit
0 within a bounded time; a second signal or an expired grace period exits at once; under torchrun a signal to one
rank stops every rank at the same step. (The exactness of the resume is tested in-process in test_reliability.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cut_bundled_corpus, tiny_lm_args
from reformer_rev.training.checkpointing import list_checkpoints, verify_manifest
from reformer_rev.training.loop import TRAIN_LOG_NAME

REPO = Path(__file__).resolve().parents[1]
WRAPPER = str(REPO / "tests" / "distributed" / "preemptible.py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return cut_bundled_corpus(tmp_path_factory.mktemp("corpus"), {"train": (4, 6000), "validation": (2, 1500)})


def lm_args(corpus, out: Path, *extra: str) -> list[str]:
    return tiny_lm_args(corpus, out, "--max_train_steps", "2000", "--logging_steps", "50", "--hidden_dropout", "0.1",
                        *extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(pid_dir: Path, **more: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "PREEMPT_PID_DIR": str(pid_dir), **more}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def steps_logged(out: Path) -> int:
    log = out / TRAIN_LOG_NAME
    return log.read_text().count("\n") if log.is_file() else 0


def start(cmd: list[str], env: dict[str, str], cwd: Path, console: Path) -> subprocess.Popen:
    """The process, its stdout and stderr going to the file `console` (a pipe left unread could fill and block it)."""
    with open(console, "w") as fh:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(proc: subprocess.Popen, out: Path, n: int, console: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while steps_logged(out) < n:
        assert proc.poll() is None, f"training ended early: {console.read_text()[-3000:]}"
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.02)


def signal_and_wait(proc: subprocess.Popen, pid: int, signum: int, console: Path,
                    timeout: float = 120) -> tuple[int, float, str]:
    """Send `signum` to `pid`; return (exit code of `proc`, seconds from the signal to its exit, its console output)."""
    sent = time.monotonic()
    os.kill(pid, signum)
    proc.wait(timeout=timeout)
    return proc.returncode, time.monotonic() - sent, console.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_saves_a_verified_checkpoint_and_exits_0(corpus, tmp_path, signum):
    out = tmp_path / "run"
    console = tmp_path / "console.txt"
    proc = start([sys.executable, WRAPPER, "lm", *lm_args(corpus, out)], environment(tmp_path / "pids"), REPO, console)
    wait_for_steps(proc, out, 10, console)
    code, seconds, err = signal_and_wait(proc, proc.pid, signum, console)
    name = signal.Signals(signum).name
    print(f"{name}: exit {code} after {seconds:.1f} s")
    assert code == 0, err[-3000:]
    assert seconds < 25, "the stop must be bounded by --stop_grace_seconds (25 s)"
    step = steps_logged(out)
    assert 10 <= step < 2000
    assert f"Stopped by {name} at step {step}" in err and "(verified)" in err
    assert [p.name for p in list_checkpoints(out)] == [f"step_{step}"]
    verify_manifest(out / "checkpoints" / f"step_{step}", ["model.safetensors", "optimizer.safetensors"])
    assert not (out / ".lock").exists()


def test_a_second_signal_exits_at_once_and_the_grace_period_bounds_the_stop(corpus, tmp_path):
    """Checkpoint saves made slow (8 s) by the wrapper: a second SIGTERM 2 s into the stop exits at once (128+15)
    without a checkpoint; with --stop_grace_seconds 3 the watchdog exits 3 s after the first signal."""
    slow = environment(tmp_path / "pids", PREEMPT_SLOW_SAVE_SECONDS="8")
    out = tmp_path / "twice"
    console = tmp_path / "twice.txt"
    proc = start([sys.executable, WRAPPER, "lm", *lm_args(corpus, out)], slow, REPO, console)
    wait_for_steps(proc, out, 5, console)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(2)
    code, seconds, err = signal_and_wait(proc, proc.pid, signal.SIGTERM, console)
    assert code == 128 + signal.SIGTERM and seconds < 5, (code, seconds, err[-2000:])
    assert "Second signal (SIGTERM): exiting now without saving" in err
    assert list_checkpoints(out) == []

    out = tmp_path / "grace"
    console = tmp_path / "grace.txt"
    proc = start([sys.executable, WRAPPER, "lm", *lm_args(corpus, out, "--stop_grace_seconds", "3")], slow, REPO,
                 console)
    wait_for_steps(proc, out, 5, console)
    code, seconds, err = signal_and_wait(proc, proc.pid, signal.SIGTERM, console)
    print(f"watchdog: exit {code} after {seconds:.1f} s")
    assert code == 128 + signal.SIGTERM and 3 <= seconds < 6, (code, seconds, err[-2000:])
    assert "Still running 3 s after SIGTERM (--stop_grace_seconds): exiting now without saving" in err


def test_translation_script_stops_on_sigint_and_resumes(tmp_path):
    out = tmp_path / "mt"
    args = ["--output_dir", str(out), "--max_train_samples", "96", "--max_eval_samples", "8", "--val_bleu_samples", "2",
            "--bpe_vocab_size", "320", "--hidden_size", "32", "--intermediate_size", "64", "--encoder_layers", "1",
            "--decoder_layers", "1", "--num_attention_heads", "2", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--max_train_steps", "400", "--eval_steps", "1000",
            "--checkpointing_steps", "1000", "--num_warmup_steps", "2", "--max_new_tokens", "8", "--cpu"]
    env = environment(tmp_path / "pids")
    console = tmp_path / "console.txt"
    proc = start([sys.executable, WRAPPER, "translation", *args], env, REPO, console)
    wait_for_steps(proc, out, 6, console)
    code, seconds, err = signal_and_wait(proc, proc.pid, signal.SIGINT, console)
    assert code == 0, err[-3000:]
    step = steps_logged(out)
    assert f"Stopped by SIGINT at step {step}" in err and [p.name for p in list_checkpoints(out)] == [f"step_{step}"]
    done = subprocess.run([sys.executable, WRAPPER, "translation", *args, "--max_train_steps", str(step + 4),
                           "--resume_from_checkpoint", "latest"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / TRAIN_LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step + 5))


def test_torchrun_signal_to_one_rank_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """2 processes (gloo): SIGTERM to rank 1 only. Both ranks stop after the same step (the stop flag is agreed by a
    max-reduction), the checkpoint holds both ranks' RNG states, both exit 0, and a 2-process resume continues."""
    pids = tmp_path / "pids"
    out = tmp_path / "ddp"

    def torchrun(*more: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", WRAPPER, "lm", *lm_args(corpus, out, *more)]

    console = tmp_path / "console.txt"
    proc = start(torchrun(), environment(pids), tmp_path, console)
    wait_for_steps(proc, out, 6, console)
    rank1 = int((pids / "rank_1").read_text())
    code, seconds, err = signal_and_wait(proc, rank1, signal.SIGTERM, console)
    assert code == 0, err[-4000:]
    step = steps_logged(out)
    assert f"Stopped by SIGTERM at step {step}" in err  # printed by the main process (rank 0 got no signal)
    assert err.count("***** Training:") == 1, "INFO lines come from the main process only"
    ckpt = out / "checkpoints" / f"step_{step}"
    verify_manifest(ckpt, ["rng_state_0.safetensors", "rng_state_1.safetensors"])
    resumed = subprocess.run(torchrun("--max_train_steps", str(step + 3), "--resume_from_checkpoint", "latest"), env=environment(pids), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = [json.loads(line) for line in (out / TRAIN_LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step + 4))
