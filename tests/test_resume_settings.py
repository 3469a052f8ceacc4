"""A resume trains the run its checkpoint belongs to: changed settings stop it with a table (or, with
`--allow_changed_settings`, take effect and are recorded), a different process count is refused naming both counts,
every all-process decision is a real min/max (a locked folder stops a 2-process run), and a new run in a folder that
holds another one moves the old one aside."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cut_bundled_corpus, tiny_lm_args
from reformer_rev.safe_io import FolderLock
from reformer_rev.training.checkpointing import PREVIOUS_RUN_DIR, list_checkpoints
from reformer_rev.training.loop import TRAIN_LOG_NAME, TrainLog
from reformer_rev.training.settings import RunSettingsChanged
from training import train_lm

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return cut_bundled_corpus(tmp_path_factory.mktemp("corpus"), {"train": (4, 6000), "validation": (2, 1500)})


def tiny(corpus, out: Path, *extra: str) -> list[str]:
    return tiny_lm_args(corpus, out, "--max_train_steps", "6", "--max_eval_blocks", "4", "--checkpointing_steps", "3",
                        "--checkpoints_total_limit", "5", *extra)


def reset() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def checkpointed(corpus, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6 (copied by the tests that resume it)."""
    reset()
    out = tmp_path_factory.mktemp("run") / "out"
    train_lm.main(tiny(corpus, out))
    return out


def copy_at_step_3(src: Path, dst: Path) -> Path:
    """`dst` as a run killed after step 3: its checkpoint step_3 and the log's first 3 lines."""
    import shutil

    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_3", dst / "checkpoints" / "step_3")
    lines = (src / TRAIN_LOG_NAME).read_text().splitlines()[:3]
    (dst / TRAIN_LOG_NAME).write_text("".join(line + "\n" for line in lines))
    return dst


def test_changed_settings_stop_the_resume_with_a_table(corpus, checkpointed, tmp_path):
    other_data = tmp_path / "train.jsonl"
    other_data.write_text(corpus["train"].read_text().replace("the", "thy"))
    out = copy_at_step_3(checkpointed, tmp_path / "out")
    argv = tiny(corpus, out, "--learning_rate", "2e-2", "--per_device_train_batch_size", "4", "--seed", "7",
                "--resume_from_checkpoint", "latest")
    argv[argv.index("--train_file") + 1] = str(other_data)
    with pytest.raises(RunSettingsChanged) as err:
        train_lm.main(argv)
    message = str(err.value)
    print(message)
    for row in (r"learning_rate +\| 0\.01 +\| 0\.02", r"per_device_train_batch_size +\| 2 +\| 4", r"seed +\| 42 +\| 7",
                r"train_file +\| .*train\.jsonl \(SHA-256 \w+…\) \| .*train\.jsonl \(SHA-256 \w+…\)"):
        assert __import__("re").search(row, message), row
    assert "--allow_changed_settings" in message
    assert len(TrainLog.read(out)) == 3  # nothing trained
    # Options that change nothing the run trains (evaluation, logging, length, cadence) are no difference.
    reset()
    results = train_lm.main(tiny(corpus, out, "--eval_steps", "2", "--max_train_steps", "7", "--logging_steps", "1",
                                 "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest"))
    assert results["train"]["steps"] == 7 and results["changed_settings"] == []


def test_allowed_changes_take_effect_and_are_recorded(corpus, checkpointed, tmp_path):
    """--learning_rate 2e-2 with --allow_changed_settings: the resumed steps run at twice the learning rate of the
    uninterrupted run, and results.json records both values."""
    out = copy_at_step_3(checkpointed, tmp_path / "out")
    results = train_lm.main(tiny(corpus, out, "--learning_rate", "2e-2", "--allow_changed_settings",
                                 "--resume_from_checkpoint", "latest"))
    assert results["changed_settings"] == [
        {"step": 3, "changes": {"learning_rate": {"checkpoint": 0.01, "now": 0.02}}}
    ]
    ref, now = TrainLog.read(checkpointed), TrainLog.read(out)
    assert [r["lr"] for r in now[:3]] == [r["lr"] for r in ref[:3]]
    assert [r["lr"] for r in now[3:]] == pytest.approx([2 * r["lr"] for r in ref[3:]], rel=1e-12)


def test_a_larger_batch_continues_at_the_same_sample(corpus, checkpointed, tmp_path):
    """Batch 2 -> 4 after 3 steps (6 samples): the resumed run's first batch is samples 4-7 of the epoch's order
    (samples 4, 5 train again, a warning says so); before, 12 never-trained samples were skipped."""
    reset()
    ref4 = tmp_path / "ref4"
    train_lm.main(tiny(corpus, ref4, "--per_device_train_batch_size", "4", "--max_train_steps", "2"))
    out = copy_at_step_3(checkpointed, tmp_path / "out")
    reset()
    train_lm.main(tiny(corpus, out, "--per_device_train_batch_size", "4", "--allow_changed_settings",
                       "--resume_from_checkpoint", "latest"))
    order4 = [s for r in TrainLog.read(ref4) for s in r["samples"]]  # the epoch's order, 4 per step
    assert TrainLog.read(out)[3]["samples"] == order4[4:8]


def test_a_new_run_moves_the_old_one_aside(corpus, checkpointed, tmp_path):
    """A folder holding a 6-step run; a new 4-step run without --resume_from_checkpoint. Before, the old step_6 stayed
    and rotation deleted the new run's checkpoints, and `latest` resumed the old run."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(checkpointed, out)
    reset()
    train_lm.main(tiny(corpus, out, "--max_train_steps", "4", "--checkpointing_steps", "1",
                       "--checkpoints_total_limit", "2"))
    assert [p.name for p in list_checkpoints(out)] == ["step_3", "step_4"]
    old = out / PREVIOUS_RUN_DIR
    assert [p.name for p in list_checkpoints(old)] == ["step_3", "step_6"]
    assert len(TrainLog.read(old)) == 6 and len(TrainLog.read(out)) == 4
    assert json.loads((old / "results.json").read_text())["train"]["steps"] == 6


# ---------------------------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo)
# ---------------------------------------------------------------------------------------------------------------


def torchrun(script_args: list[str], cwd: Path, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(REPO / "training" / "train_lm.py"), *script_args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_stop_on_a_folder_locked_by_a_live_run(corpus, tmp_path):
    """Before, the check reduced with 'min' (Accelerate sums): rank 1's "ok" outvoted rank 0's "locked", and the
    2-process run trained in the folder."""
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out, ".lock", purpose="a live run"):
        done = torchrun(tiny(corpus, out), tmp_path)
    assert done.returncode != 0
    assert done.stderr.count(f"{out} is in use: PID {os.getpid()}") >= 1, done.stderr[-3000:]
    assert not (out / TRAIN_LOG_NAME).exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_a_different_process_count_is_refused_or_resumed_with_the_flag(corpus, checkpointed, tmp_path):
    """A 1-process checkpoint resumed by 2 processes: refused on both ranks, naming both counts (before: rank 1
    crashed with `'NoneType' object has no attribute 'model'`); with --allow_changed_settings it trains on, rank 1
    starting from rank 0's RNG state, the position carried over in samples."""
    out = copy_at_step_3(checkpointed, tmp_path / "out")
    refused = torchrun(tiny(corpus, out, "--resume_from_checkpoint", "latest"), tmp_path)
    assert refused.returncode != 0
    assert "It was written by 1 process(es); this run has 2." in refused.stderr, refused.stderr[-3000:]
    assert len(TrainLog.read(out)) == 3
    allowed = torchrun(tiny(corpus, out, "--resume_from_checkpoint", "latest", "--allow_changed_settings"), tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["train"]["steps"] == 6
    assert results["changed_settings"][0]["changes"]["num_processes"] == {"checkpoint": 1, "now": 2}
    log = TrainLog.read(out)
    assert [len(r["samples"]) for r in log] == [2, 2, 2, 2, 2, 2]  # rank 0's blocks are logged
