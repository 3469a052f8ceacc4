"""Checkpoints you can trust (issue 16): every damage of the issue's table done to a real short run.

A reference run (12 steps, dropout on, a checkpoint every 3 steps) is copied as if it had been killed after step 9;
the newest checkpoint is then damaged and `--resume_from_checkpoint latest` must skip it with a warning naming the
file and the cause, resume from `step_6`, and reproduce the reference's per-step losses from step 7 on and its final
weights bit for bit. Payloads planted in every file must never run; a full disk must leave the older checkpoints
loadable; one run per output folder; a finished run is never trained further.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cut_bundled_corpus, small_tmpfs
from eval.fuzz_inputs import json_edit, numpy_position_out_of_range, short_rng_state, tensors_edit, transpose_exp_avg
from reformer_rev.safe_io import FolderLock, FolderLockedError, InconsistentFolderError, WriteError
from reformer_rev.training.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointSaveError,
    list_checkpoints,
    write_manifest,
)
from reformer_rev.training.loop import TrainLog
from training import train_lm

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return cut_bundled_corpus(tmp_path_factory.mktemp("corpus"), {"train": (4, 6000), "validation": (2, 1500)})


def tiny(corpus, out, *extra: str) -> list[str]:
    return [
        "--train_file", str(corpus["train"]), "--validation_file", str(corpus["validation"]), "--output_dir", str(out),
        "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8",
        "--max_train_steps", "12", "--num_warmup_steps", "2", "--learning_rate", "1e-2", "--eval_steps", "0",
        "--max_eval_blocks", "4", "--logging_steps", "4", "--time_budget_minutes", "0", "--hidden_dropout", "0.1",
        "--checkpointing_steps", "3", "--checkpoints_total_limit", "10", "--sample_tokens", "0", "--cpu", *extra,
    ]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    reset_accelerate()
    out = tmp_path_factory.mktemp("reference") / "run"
    train_lm.main(tiny(corpus, out))
    assert [p.name for p in list_checkpoints(out)] == ["step_3", "step_6", "step_9", "step_12"]
    return out


def killed_after_step_9(reference: Path, dst: Path) -> Path:
    """The state a run killed right after writing step_9 leaves behind: checkpoints 3-9 and the log up to step 9."""
    (dst / "checkpoints").mkdir(parents=True)
    for name in ("step_3", "step_6", "step_9"):
        shutil.copytree(reference / "checkpoints" / name, dst / "checkpoints" / name)
    lines = (reference / "train_log.jsonl").read_text().splitlines()[:9]
    (dst / "train_log.jsonl").write_text("".join(line + "\n" for line in lines))
    return dst


def weights_equal(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class Payload:
    """Unpickling this creates `marker`: proof that a file was unpickled (i.e. code from a checkpoint ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------------------------
# The damage table
# ---------------------------------------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_key(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["batches_in_epoch"]
    path.write_text(json.dumps(state))


def unknown_optimizer_entry(tensors, meta):
    tensors["model.no_such.weight\x00exp_avg"] = torch.zeros(3)


DAMAGE = {  # case: (file, damage, expected reason in the warning)
    "model 64 bytes flipped": ("model.safetensors", _flip, "SHA-256 .* differs from the manifest"),
    "rng state truncated": ("rng_state_0.safetensors", _truncate, "size .* bytes, the manifest says"),
    "model truncated": ("model.safetensors", _truncate, "size .* bytes, the manifest says"),
    "model deleted": ("model.safetensors", Path.unlink, "model.safetensors: missing"),
    "optimizer truncated": ("optimizer.safetensors", _truncate, "size .* bytes"),
    "optimizer deleted": ("optimizer.safetensors", Path.unlink, "optimizer.safetensors: missing"),
    "scheduler emptied": ("scheduler.json", lambda p: p.write_text(""), "size 0 bytes"),
    "trainer state invalid": ("trainer_state.json", lambda p: p.write_text("{not json"), "size|SHA-256"),
    "trainer state missing a key": ("trainer_state.json", _drop_key, "size|SHA-256"),
    "manifest deleted": (MANIFEST_NAME, Path.unlink, "manifest.json: missing"),
    "manifest entry not an object": (MANIFEST_NAME, json_edit(("files", "model.safetensors"), "big"),
                                     r"the entry of 'model.safetensors' is not \{'size': int, 'sha256': str\}"),
    "manifest size a string": (MANIFEST_NAME, json_edit(("files", "scheduler.json", "size"), "748"), "is not {'size'"),
    "manifest lists a path outside": (MANIFEST_NAME, json_edit(("files", "../../x"), {"size": 1, "sha256": "0"}),
                                      "lists '../../x', which is not a file inside the checkpoint"),
}
# Damage that passes the manifest (it was rewritten to match) and must fail in loading instead.
LOAD_DAMAGE = {
    "trainer state missing a key (manifest rewritten)": ("trainer_state.json", _drop_key, "lacks the key 'batches_in_epoch'"),
    "trainer state invalid (manifest rewritten)": ("trainer_state.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    "model not safetensors (manifest rewritten)": ("model.safetensors", lambda p: p.write_bytes(b"\x00" * 64), "cannot be read as safetensors"),
    "scheduler emptied (manifest rewritten)": ("scheduler.json", lambda p: p.write_text(""), "not valid JSON"),
    # Issue 24: cases that passed the parse and aborted (or silently broke) the resume while being applied.
    "RNG state of the wrong size": ("rng_state_0.safetensors", tensors_edit(short_rng_state),
                                    r"the torch CPU generator state has shape \(100,\), expected \(5056,\)"),
    "NumPy RNG position out of range": ("rng_state_0.safetensors", tensors_edit(numpy_position_out_of_range),
                                        r"invalid NumPy RNG state \(position 1000000 of 624"),
    "optimizer tensor of the wrong shape": ("optimizer.safetensors", tensors_edit(transpose_exp_avg),
                                            r"exp_avg of .* has shape \(\d+, \d+\), the parameter \(\d+, \d+\)"),
    "optimizer state of an unknown parameter": ("optimizer.safetensors", tensors_edit(unknown_optimizer_entry),
                                                "holds state for 'model.no_such.weight'"),
    "scheduler last_epoch not an integer": ("scheduler.json", json_edit(("last_epoch",), "9"), "'last_epoch' must be"),
    "scheduler base_lrs of the wrong length": ("scheduler.json", json_edit(("base_lrs",), [0.01]), "'base_lrs' must be 2"),
    "scheduler with an unknown schedule": ("scheduler.json", json_edit(("lr_lambdas", 0, "kind"), "nope"),
                                           "'kind' must be one of"),
    "scheduler with a junk field": ("scheduler.json", json_edit(("lr_lambdas", 1, "hack"), 1), "a schedule must hold"),
    "data position beyond the epoch": ("trainer_state.json", json_edit(("batches_in_epoch",), 10**9),
                                       "batches_in_epoch 1000000000 is beyond the epoch's 188 batches"),
    "run length beyond the request": ("trainer_state.json", json_edit(("max_train_steps",), 10**9),
                                      "inconsistent run length"),
}


@pytest.mark.parametrize("case", list(DAMAGE) + list(LOAD_DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_reproduces_the_run(corpus, reference, tmp_path, case, caplog):
    name, damage, reason = {**DAMAGE, **LOAD_DAMAGE}[case]
    out = killed_after_step_9(reference, tmp_path / "run")
    damage(out / "checkpoints" / "step_9" / name)
    if case in LOAD_DAMAGE:
        write_manifest(out / "checkpoints" / "step_9", 9)
    reset_accelerate()
    with caplog.at_level(logging.WARNING):
        results = train_lm.main(tiny(corpus, out, "--resume_from_checkpoint", "latest"))
    warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping checkpoint"))
    print(f"{case}: {warning}")
    # the message names the file and the cause
    assert f"{out / 'checkpoints' / 'step_9' / name}:" in warning
    assert __import__("re").search(reason, warning), warning
    assert any("Resuming from" in r.getMessage() and "step_6" in r.getMessage() for r in caplog.records)
    # fallback to step_6, then exactly the reference run from step 7 on
    log, ref = TrainLog.read(out), TrainLog.read(reference)
    assert [r["step"] for r in log] == list(range(1, 13)) and results["train"]["steps"] == 12
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]
    assert [r["samples"] for r in log] == [r["samples"] for r in ref]
    assert weights_equal(out, reference)


def test_no_payload_runs_on_resume(corpus, reference, tmp_path, monkeypatch):
    """A pickle payload planted in every file of the newest checkpoint (also under Accelerate's old file names, and
    with the manifest rewritten to vouch for them) never runs: nothing on the resume path unpickles."""
    marker = tmp_path / "PAYLOAD_RAN"
    payload = pickle.dumps(Payload(marker))
    out = killed_after_step_9(reference, tmp_path / "run")
    step_9 = out / "checkpoints" / "step_9"
    names = [p.name for p in step_9.iterdir() if p.name != MANIFEST_NAME]
    names += ["random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin"]
    for name in names:
        (step_9 / name).write_bytes(payload)
    write_manifest(step_9, 9)
    # and the same files, but failing verification, in step_6's place: a damaged fallback must not run code either
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (out / "checkpoints" / "step_6" / name).write_bytes(payload)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError("torch.load")))
    reset_accelerate()
    results = train_lm.main(tiny(corpus, out, "--resume_from_checkpoint", "latest"))
    assert not marker.exists() and loads == []
    assert results["train"]["steps"] == 12
    ref = TrainLog.read(reference)
    # resumed from step_6: its extra payload files are not in its manifest and nothing reads them
    assert [r["loss"] for r in TrainLog.read(out)] == [r["loss"] for r in ref]
    assert weights_equal(out, reference)


def test_no_valid_checkpoint_lists_what_was_tried(corpus, reference, tmp_path):
    out = killed_after_step_9(reference, tmp_path / "run")
    for name in ("step_3", "step_6", "step_9"):
        _flip(out / "checkpoints" / name / "optimizer.safetensors")
    reset_accelerate()
    with pytest.raises(CheckpointError) as err:
        train_lm.main(tiny(corpus, out, "--resume_from_checkpoint", "latest"))
    message = str(err.value)
    print(message)
    assert "no valid checkpoint; tried, newest first: step_9 (optimizer.safetensors: SHA-256" in message
    assert message.index("step_9") < message.index("step_6") < message.index("step_3")


def test_explicit_checkpoint_fails_instead_of_falling_back(corpus, reference, tmp_path):
    out = killed_after_step_9(reference, tmp_path / "run")
    _truncate(out / "checkpoints" / "step_9" / "model.safetensors")
    reset_accelerate()
    with pytest.raises(CheckpointError, match=r"step_9/model.safetensors: size .* no fallback"):
        train_lm.main(tiny(corpus, out, "--resume_from_checkpoint", str(out / "checkpoints" / "step_9")))
    assert TrainLog.read(out)[-1]["step"] == 9  # nothing was trained or truncated


# ---------------------------------------------------------------------------------------------------------------
# Disk full, I/O errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1.3 MB tmpfs (two of these checkpoints fit, a third does not) when mounting is allowed, else None."""
    with small_tmpfs(tmp_path / "small_disk", "1300k") as mount:
        yield mount


def test_disk_full_during_a_checkpoint_keeps_the_older_ones(corpus, reference, tmp_path, small_disk, monkeypatch):
    if small_disk is None:  # no mount permission: the file writer itself reports a full disk at step 9
        from reformer_rev.training import checkpointing

        real = checkpointing.atomic_write_bytes

        def full_disk(path, data):
            if ".tmp-step_9" in str(path) and path.name == "optimizer.safetensors":
                raise WriteError(28, f"no space left on device while writing {path}")
            return real(path, data)

        monkeypatch.setattr(checkpointing, "atomic_write_bytes", full_disk)
        out = tmp_path / "run"
    else:
        out = small_disk / "run"
    reset_accelerate()
    with pytest.raises(CheckpointSaveError) as err:
        train_lm.main(tiny(corpus, out))
    message = str(err.value)
    print(f"{'tmpfs' if small_disk else 'patched writer'}: {message}")
    assert f"Could not save checkpoint {out / 'checkpoints' / 'step_9'}: no space left on device while writing" in message
    assert ".tmp-step_9" in message and "previous checkpoints are intact (step_3, step_6)" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]  # temp folder removed
    assert not (out / ".lock").exists()  # the run released its folder
    # the older checkpoints still verify and resume to the uninterrupted run's losses and weights
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    reset_accelerate()
    train_lm.main(tiny(corpus, resumed, "--resume_from_checkpoint", "latest"))
    assert [r["loss"] for r in TrainLog.read(resumed)] == [r["loss"] for r in TrainLog.read(reference)]
    assert weights_equal(resumed, reference)


def test_io_error_in_the_final_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """`save_pretrained` through the library's own path: a disk that fills while the weights are written leaves the
    previous save complete and no temp folder; the error names the path and the cause."""
    import transformers.modeling_utils

    from reformer_rev import RevFormerConfig, RevFormerForCausalLM

    config = RevFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = RevFormerForCausalLM(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    real = transformers.modeling_utils.safe_save_file

    def half_then_full(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_full)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(WriteError, match=r"no space left on device while writing .*\.model\.saving-"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".model.saving-*"))


# ---------------------------------------------------------------------------------------------------------------
# A finished run is never trained further; kills during the final evaluation/save
# ---------------------------------------------------------------------------------------------------------------


class SimulatedKill(BaseException):
    pass


def test_resume_at_the_final_step_only_finishes_evaluation_and_save(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shutil.copy(reference / "train_log.jsonl", out / "train_log.jsonl")
    # as if killed during the final save: that save's temp folder holds a half-written weights file
    from reformer_rev import safe_io

    real_move = safe_io._move_into_place

    def killed(tmp, target, names, digests=None):
        _truncate(tmp / "model.safetensors")
        raise SimulatedKill

    monkeypatch.setattr(safe_io, "_move_into_place", killed)
    reset_accelerate()
    with pytest.raises(SimulatedKill):
        train_lm.main(tiny(corpus, out, "--resume_from_checkpoint", "latest"))
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    monkeypatch.setattr(safe_io, "_move_into_place", real_move)
    reset_accelerate()
    results = train_lm.main(tiny(corpus, out, "--resume_from_checkpoint", "latest"))
    assert results["train"]["steps"] == 12  # not 13: nothing is trained past the end
    assert TrainLog.read(out) == TrainLog.read(reference)
    assert weights_equal(out, reference)
    assert results["validation"] == json.loads((reference / "results.json").read_text())["validation"] | {
        "seconds": results["validation"]["seconds"]}


def test_kill_while_moving_a_save_into_place_is_detected(tmp_path, monkeypatch):
    """A save killed in its renaming phase leaves a marker: loading then refuses the folder instead of returning a
    model whose config and weights may come from different saves; the next save repairs it."""
    from transformers import AutoModelForCausalLM

    from reformer_rev import RevFormerConfig, RevFormerForCausalLM

    model = RevFormerForCausalLM(RevFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    real_replace = os.replace

    def dies_after_first_file(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == folder and Path(dst).name == "config.json":
            raise SimulatedKill

    monkeypatch.setattr(os, "replace", dies_after_first_file)
    with pytest.raises(SimulatedKill):
        model.save_pretrained(folder)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(InconsistentFolderError, match=r"save into it .* was interrupted while moving its files"):
        AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(folder)
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), RevFormerForCausalLM)


# ---------------------------------------------------------------------------------------------------------------
# One writer per output folder
# ---------------------------------------------------------------------------------------------------------------


def test_second_run_on_a_folder_stops_naming_the_owner(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, ".lock", purpose="another training run"):  # held through another open file description
        reset_accelerate()
        start = time.time()
        with pytest.raises(FolderLockedError) as err:
            train_lm.main(tiny(corpus, out))
    message = str(err.value)
    print(message)
    assert f"PID {os.getpid()} on host {socket.gethostname()!r} (another training run)" in message
    assert time.time() - start < 30 and not (out / "train_log.jsonl").exists() and not (out / "checkpoints").exists()


def test_stale_lock_of_a_dead_run_is_taken_over(corpus, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "purpose": "killed run"}
    (out / ".lock").write_text(json.dumps(record))
    reset_accelerate()
    with caplog.at_level(logging.WARNING):
        results = train_lm.main(tiny(corpus, out, "--max_train_steps", "3"))
    assert results["train"]["steps"] == 3 and not (out / ".lock").exists()
    assert any(f"stale lock {out / '.lock'} left by PID {dead.pid}" in r.getMessage() and "no longer running" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_two_training_processes_on_one_folder(corpus, tmp_path):
    """Real processes: the second stops at once naming the first (PID, host); the first finishes normally."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    script = str(REPO / "training" / "train_lm.py")
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, script, *tiny(corpus, out, "--max_train_steps", "400")], env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "train_log.jsonl").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, script, *tiny(corpus, out)], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert f"is in use: PID {first.pid} on host {socket.gethostname()!r} (training/train_lm.py)" in second.stderr
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert [r["step"] for r in TrainLog.read(out)] == list(range(1, 401))


# ---------------------------------------------------------------------------------------------------------------
# Concurrent saves and readers; multi-process checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_writers_and_reader_while_writer_never_mix(tmp_path):
    from eval import save_concurrency

    results = save_concurrency.main(["--trials", "20", "--reader_seconds", "15", "--no_baseline",
                                     "--output", str(tmp_path / "r.json")])["reformer_rev"]
    writers, reader = results["concurrent_writers"], results["reader_while_writer"]
    assert writers["torn"] == 0 and writers["errors"] == 0 and set(writers["outcomes"]) <= {"A", "B"}
    assert reader["torn"] == 0 and reader["errors"] == 0
    assert reader["saves"] >= 5 and reader["loads"] >= 5  # both really ran concurrently (neither starved)
    assert {"A", "B"} <= set(reader["outcomes"])


@pytest.mark.slow
def test_a_converted_model_saved_and_loaded_through_safe_io_never_mixes(tmp_path):
    """A model made reversible keeps its stock class (here a LlamaForCausalLM), whose own save_pretrained writes in
    place: measured 147 mixed loads of 3,712 while a save was writing. `safe_io.save_pretrained_safely` /
    `from_pretrained_safely` (the documented way for such models): none."""
    from eval import save_concurrency

    results = save_concurrency.main(["--family", "llama", "--trials", "6", "--reader_seconds", "10", "--no_baseline",
                                     "--output", str(tmp_path / "r.json")])["safe_io"]
    writers, reader = results["concurrent_writers"], results["reader_while_writer"]
    assert writers["torn"] == 0 and writers["errors"] == 0
    assert reader["torn"] == 0 and reader["errors"] == 0 and reader["saves"] >= 3 and reader["loads"] >= 3


@pytest.mark.slow
def test_ddp_checkpoint_resume_restores_every_rank(corpus, tmp_path):
    """2-process DDP (torchrun, gloo), dropout on: resuming from step_3 reproduces the uninterrupted run's per-step
    losses and final weights exactly, each rank restoring its own RNG state (rng_state_0/1.safetensors)."""
    import socket as _socket

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)

    def torchrun(out: Path, *more: str) -> None:
        with _socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(REPO / "training" / "train_lm.py"),
               *tiny(corpus, out, "--max_train_steps", "6", "--gradient_accumulation_steps", "2", *more)]
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]

    full = tmp_path / "full"
    torchrun(full)
    step_3 = full / "checkpoints" / "step_3"
    assert (step_3 / "rng_state_0.safetensors").is_file() and (step_3 / "rng_state_1.safetensors").is_file()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_3, resumed / "checkpoints" / "step_3")
    shutil.copy(full / "train_log.jsonl", resumed / "train_log.jsonl")
    torchrun(resumed, "--resume_from_checkpoint", "latest")
    assert [r["loss"] for r in TrainLog.read(resumed)] == [r["loss"] for r in TrainLog.read(full)]
    assert weights_equal(resumed, full)
