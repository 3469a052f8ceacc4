"""Reliability of `training/train_lm.py`: bad data fails before training, non-finite steps stop (or are skipped), a
SIGKILLed run resumes bit-exactly, a kill during a save leaves the previous checkpoint usable, seeds reproduce."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cut_bundled_corpus
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.training.checkpointing import list_checkpoints
from reformer_rev.training.loop import MONITOR_LOG_FIELDS, TRAIN_LOG_NAME
from reformer_rev.training.tokenization import build_byte_tokenizer, train_bpe_tokenizer
from training import train_lm

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Real English documents cut from the bundled corpus: 375 train blocks of 64 bytes."""
    return cut_bundled_corpus(tmp_path_factory.mktemp("corpus"), {"train": (4, 6000), "validation": (2, 1500)})


def tiny(corpus, out, *extra: str, train_file: Path | None = None) -> list[str]:
    return [
        "--train_file", str(train_file or corpus["train"]), "--validation_file", str(corpus["validation"]),
        "--output_dir", str(out), "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "2",
        "--num_attention_heads", "2", "--intermediate_size", "64", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "8", "--max_train_steps", "12", "--num_warmup_steps", "2",
        "--learning_rate", "1e-2", "--eval_steps", "0", "--max_eval_blocks", "4", "--eval_subset_blocks", "2",
        "--logging_steps", "4", "--time_budget_minutes", "0", "--hidden_dropout", "0.1", "--cpu", *extra,
    ]


def read_log(out: Path) -> list[dict]:
    """The per-step training records, without the drift monitor's fields (a resumed process probes its own steps)."""
    lines = (out / TRAIN_LOG_NAME).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MONITOR_LOG_FIELDS} for line in lines]


# ---------------------------------------------------------------------------------------------------------------
# Bad data: a clear ValueError naming the problem, before any training step
# ---------------------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_DATA = {  # case: (files to write {split: content}, extra arguments, expected message)
    "empty file": ({"train.jsonl": ""}, (), r"`--train_file` '.*train.jsonl' is empty \(0 bytes\)"),
    "all-blank documents": ({"train.jsonl": '{"text": ""}\n{"text": "  \\n\\t "}\n'}, (),
                            r"`--train_file` '.*train.jsonl': all 2 records have empty text"),
    "all-blank text file": (
        {"train.txt": "\n  \n\n", "validation.txt": "some text " * 20}, (), r"train split .* all empty or blank"
    ),
    "unknown column": ({}, ("--text_column_name", "content"),
                       r"`--train_file` '.*train.jsonl' line 1: no field 'content', chosen by `--text_column_name "
                       r"content` \(it has \['text'\]\)"),
    "non-text column": (
        {"train.jsonl": '{"text": 5}\n{"text": 7}\n', "validation.jsonl": '{"text": 1}\n'}, (),
        r"`--train_file` '.*train.jsonl' line 1: field 'text' must be a string, got int \(5\)"
    ),
    "a bad line among good ones": ({"train.jsonl": '{"text": "a b c"}\n\n{"text": "d e f"}\n{"text": "g h\n'}, (),
                                   r"`--train_file` '.*train.jsonl' line 4: not JSON"),
    "a binary file": ({"train.txt": "\x00\x01 PK zip"}, (), r"`--train_file` '.*train.txt' line 1: .*binary file"),
    "tab-separated instead of JSON lines": ({"train.jsonl": "a b c\td e f\n"}, (),
                                            r"line 1: not JSON \(it looks like tab-separated text\)"),
    "block larger than the data": ({}, ("--block_size", "20000"), r"fewer than `--block_size`=20000 tokens"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_before_training(corpus, tmp_path, case):
    files, extra, match = BAD_DATA[case]
    out = tmp_path / "out"
    argv = tiny(corpus, out, *extra)
    for name, content in files.items():
        split = name.split(".")[0]
        argv[argv.index(f"--{split}_file") + 1] = str(_write(tmp_path / name, content))
    with pytest.raises(ValueError, match=match) as err:
        train_lm.main(argv)
    print(f"{case}: {err.value}")
    assert not (out / TRAIN_LOG_NAME).exists() and not (out / "checkpoints").exists()


def test_tokenizer_larger_than_model_vocabulary_is_refused(corpus, tmp_path):
    model_dir, tok_dir = tmp_path / "model", tmp_path / "bpe"
    RevFormerForCausalLM(
        RevFormerConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in corpus["train"].read_text().splitlines()]
    train_bpe_tokenizer(texts, vocab_size=400).save_pretrained(tok_dir)
    out = tmp_path / "out"
    argv = tiny(corpus, out, "--model_name_or_path", str(model_dir), "--tokenizer_name", str(tok_dir))
    with pytest.raises(ValueError, match=r"tokenizer has 400 tokens but the model .* has vocab_size 260"):
        train_lm.main(argv)
    assert not (out / TRAIN_LOG_NAME).exists()


def test_nonfinite_skip_limit_must_be_non_negative():
    with pytest.raises(ValueError, match="skip_nonfinite_steps"):
        train_lm.parse_args(["--skip_nonfinite_steps", "-1"])


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss
# ---------------------------------------------------------------------------------------------------------------


def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    """A learning rate of 1e30 (after a warmup step at 0) really diverges: step 1 is healthy and checkpointed; step 2's
    weights explode (a sign: no checkpoint of it, step_1 is protected); step 3's gradients are NaN: training stops
    naming step_1. Before issue 24, a 1e30 step was checkpointed as "good" (its weights were merely huge)."""
    out = tmp_path / "out"
    argv = tiny(
        corpus, out, "--learning_rate", "1e30", "--lr_scheduler_type", "constant_with_warmup", "--num_warmup_steps",
        "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
    )
    with pytest.raises(RuntimeError, match=r"Non-finite .* at step 3 .*the healthy checkpoint is .*step_1"):
        train_lm.main(argv)
    assert [p.name for p in list_checkpoints(out)] == ["step_1"]  # nothing saved after the first sign
    weights = load_file(out / "checkpoints" / "step_1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    log = read_log(out)
    assert [(r["step"], r["skipped_nonfinite"]) for r in log] == [(1, False), (2, False), (3, True)]
    assert log[0]["divergence_signs"] == [] and "the weight norm reached" in log[1]["divergence_signs"][0]
    assert math.isfinite(log[0]["loss"]) and log[2]["loss"] is None


def test_collapse_at_learning_rate_1e3_stops_and_names_the_healthy_checkpoint(corpus, tmp_path):
    """The issue's --learning_rate 1e3: the model collapses at step 2 (weights explode, the gradient vanishes). The
    run stops within --divergence_patience steps naming step_1, which rotation (limit 2) kept; no checkpoint of a
    step with a sign was written."""
    out = tmp_path / "out"
    argv = tiny(corpus, out, "--learning_rate", "1e3", "--lr_scheduler_type", "constant_with_warmup",
                "--num_warmup_steps", "1",
                "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--max_train_steps", "40",
                "--divergence_patience", "3")
    with pytest.raises(RuntimeError, match=r"(diverged|Non-finite).*the healthy checkpoint is .*step_1\b") as err:
        train_lm.main(argv)
    print(err.value)
    log = read_log(out)
    assert log[0]["divergence_signs"] == [] and log[1]["divergence_signs"]
    assert len(log) <= 4  # stopped at the third sign, or earlier on NaN
    assert [p.name for p in list_checkpoints(out)] == ["step_1"]
    assert json.loads((out / "checkpoints" / "protected.json").read_text()) == {
        "step_1": "the first sign of divergence (step 2)"}


def test_the_checkpoint_before_a_loss_jump_survives_rotation(corpus, tmp_path, monkeypatch):
    """A loss spike at step 8 only (x4, injected): a sign, no checkpoint of step 8, and step_7 is kept by rotation
    (limit 2) to the end of the run, which goes on normally."""
    _scale_training_loss(monkeypatch, {8}, 4.0)
    out = tmp_path / "out"
    results = train_lm.main(tiny(corpus, out, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"))
    log = read_log(out)
    assert [r["step"] for r in log if r["divergence_signs"]] == [8]
    assert "the loss jumped to" in log[7]["divergence_signs"][0]
    assert [p.name for p in list_checkpoints(out)] == ["step_7", "step_11", "step_12"]
    assert results["train"]["steps"] == 12


def test_max_grad_norm_0_never_keeps_a_checkpoint_with_nonfinite_weights(corpus, tmp_path, monkeypatch):
    """Without clipping the gradient norm was not computed: an inf gradient was applied unseen and the next checkpoint
    held NaN weights. Now the norm is still computed, the step is skipped/stopped and no checkpoint is bad."""
    _poison_training_gradient(monkeypatch, {5})
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"Non-finite .* at step 5 .*gradient norm (inf|nan)"):
        train_lm.main(tiny(corpus, out, "--max_grad_norm", "0", "--checkpointing_steps", "1",
                           "--checkpoints_total_limit", "10"))
    for ckpt in list_checkpoints(out):
        assert all(torch.isfinite(w).all() for w in load_file(ckpt / "model.safetensors").values()), ckpt


def test_a_fixed_point_overflow_goes_through_the_guard(corpus, tmp_path):
    """bf16-style exact streams with little headroom (56 fractional bits: values up to 64) and a learning rate that
    makes the weights explode: the real `OverflowError` of step 3's forward is a non-finite step like any other
    (before, it escaped the guard as a raw traceback), named in the message with the healthy checkpoint."""
    from reformer_rev import RevFormerConfig

    RevFormerConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    exact_reversal=True, fixed_point_scale_bits=56).save_pretrained(tmp_path / "config")
    out = tmp_path / "out"
    argv = tiny(corpus, out, "--config_name", str(tmp_path / "config"), "--learning_rate", "1e3",
                "--lr_scheduler_type", "constant_with_warmup", "--num_warmup_steps", "1", "--checkpointing_steps", "1",
                "--divergence_patience", "0")
    with pytest.raises(RuntimeError, match=r"Non-finite .* at step 3 .*OverflowError: Fixed-point stream overflow.*"
                                           r"`fixed_point_bits` of `make_reversible`.*healthy checkpoint is .*step_1"):
        train_lm.main(argv)
    assert [p.name for p in list_checkpoints(out)] == ["step_1"]


def _change_training_loss(monkeypatch, calls: set[int], change) -> None:
    """Replace the loss of the given training forward calls (1-based) by `change(loss)`, like a bad batch would."""
    original = RevFormerForCausalLM.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and out.loss is not None:
            count["n"] += 1
            if count["n"] in calls:
                out.loss = change(out.loss)
        return out

    monkeypatch.setattr(RevFormerForCausalLM, "forward", forward)


def _poison_training_forward(monkeypatch, calls: set[int]) -> None:
    """A NaN loss in the given training forward calls."""
    _change_training_loss(monkeypatch, calls, lambda loss: loss * float("nan"))


def _scale_training_loss(monkeypatch, calls: set[int], factor: float) -> None:
    _change_training_loss(monkeypatch, calls, lambda loss: loss * factor)


class _InfGrad(torch.autograd.Function):
    """The identity, whose gradient is inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _poison_training_gradient(monkeypatch, calls: set[int]) -> None:
    """A finite loss whose gradient is inf."""
    _change_training_loss(monkeypatch, calls, _InfGrad.apply)


def test_nonfinite_step_is_skipped_with_accumulation(corpus, tmp_path, monkeypatch):
    """With 2-step accumulation, a NaN in the *first* micro-batch of step 4 poisons the whole step: it is skipped
    (no update, no schedule step, no checkpoint), and training goes on with finite weights."""
    _poison_training_forward(monkeypatch, {7})  # micro-batches 7, 8 = step 4
    out = tmp_path / "out"
    extra = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "20",
             "--max_train_steps", "6", "--skip_nonfinite_steps", "1")
    results = train_lm.main(tiny(corpus, out, *extra))
    log = read_log(out)
    assert [r["step"] for r in log if r["skipped_nonfinite"]] == [4]
    assert results["train"]["nonfinite_steps_skipped"] == 1 and results["train"]["steps"] == 6
    assert log[3]["lr"] == log[4]["lr"] != log[2]["lr"]  # the schedule did not advance on the skipped step
    assert all(len(r["samples"]) == 4 for r in log)  # 2 micro-batches x 2 blocks per step
    assert [p.name for p in list_checkpoints(out)] == ["step_1", "step_2", "step_3", "step_5", "step_6"]
    assert all(torch.isfinite(w).all() for w in load_file(out / "model.safetensors").values())
    # the default (0 tolerated) stops at that step
    _poison_training_forward(monkeypatch, {7})
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(RuntimeError, match=r"at step 4 \(epoch 0, batch 8 of the epoch\): loss nan"):
        train_lm.main(tiny(corpus, tmp_path / "strict", *extra[:-2]))


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_nonfinite_step(corpus, tmp_path):
    """2-process DDP (torchrun, gloo): only rank 1's loss is NaN at step 2; both ranks skip it (rank 0 logs it),
    and without --skip_nonfinite_steps both ranks stop with the error instead of hanging."""
    import socket

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)

    def torchrun(out: Path, *more: str) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(REPO / "tests" / "distributed" / "nonfinite_one_rank.py"),
               *tiny(corpus, out, "--gradient_accumulation_steps", "2", "--max_train_steps", "4", *more)]
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    done = torchrun(tmp_path / "skip", "--skip_nonfinite_steps", "1", "--checkpointing_steps", "1")
    assert done.returncode == 0, done.stderr[-4000:]
    log = read_log(tmp_path / "skip")
    assert [(r["step"], r["skipped_nonfinite"]) for r in log] == [(1, False), (2, True), (3, False), (4, False)]
    # limit 2, no step_2; step_1, the last one before the first sign of trouble (the NaN), is kept by rotation
    assert [p.name for p in list_checkpoints(tmp_path / "skip")] == ["step_1", "step_3", "step_4"]
    assert json.loads((tmp_path / "skip" / "results.json").read_text())["train"]["nonfinite_steps_skipped"] == 1

    stopped = torchrun(tmp_path / "stop")
    assert stopped.returncode != 0
    assert stopped.stderr.count("Non-finite training loss or gradients at step 2") >= 2, stopped.stderr[-4000:]


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_fixed_point_overflow_on_one_rank(corpus, tmp_path):
    """2-process DDP: rank 1's forward raises OverflowError in step 2, rank 0's does not. Both skip the backward and
    the step (--skip_nonfinite_steps 1) and finish; without the agreement rank 0 would hang in DDP's all-reduce."""
    import socket

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(REPO / "tests" / "distributed" / "overflow_one_rank.py"),
           *tiny(corpus, out, "--gradient_accumulation_steps", "2", "--max_train_steps", "4",
                 "--skip_nonfinite_steps", "1")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    log = read_log(out)
    assert [(r["step"], r["skipped_nonfinite"]) for r in log] == [(1, False), (2, True), (3, False), (4, False)]
    assert "a fixed-point overflow on another process" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility, kills, interrupted saves
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted in-process run (dropout on, checkpoints every 4 steps)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("reference")
    train_lm.main(tiny(corpus, out, "--checkpointing_steps", "4", "--checkpoints_total_limit", "5"))
    return out


def test_same_seed_same_losses_other_seed_other_losses(corpus, reference, tmp_path):
    ref = read_log(reference)
    again = tmp_path / "again"
    train_lm.main(tiny(corpus, again, "--checkpointing_steps", "4", "--checkpoints_total_limit", "5"))
    assert read_log(again) == ref  # losses, learning rates, gradient norms and samples, bit for bit
    # The seed really drives initialisation, dropout and data order (nothing reseeds the global RNG behind it).
    other = tmp_path / "other"
    train_lm.main(tiny(corpus, other, "--seed", "43"))
    other_log = read_log(other)
    assert other_log[0]["loss"] != ref[0]["loss"] and other_log[0]["samples"] != ref[0]["samples"]


class SimulatedKill(BaseException):
    """Stands for the process dying between writing the temp folder and renaming it."""


def test_kill_during_save_keeps_the_previous_checkpoint(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(src).name == ".tmp-step_8":
            raise SimulatedKill
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    argv = tiny(corpus, out, "--checkpointing_steps", "4", "--checkpoints_total_limit", "5")
    with pytest.raises(SimulatedKill):
        train_lm.main(argv)
    monkeypatch.setattr(os, "replace", real_replace)
    tmp = out / "checkpoints" / ".tmp-step_8"
    assert (tmp / "model.safetensors").is_file()  # the interrupted save had written its files
    assert list_checkpoints(out)[-1].name == "step_4"
    assert load_file(out / "checkpoints" / "step_4" / "model.safetensors").keys()

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    results = train_lm.main(argv + ["--resume_from_checkpoint", "latest"])
    assert results["train"]["steps"] == 12 and not tmp.exists()
    assert read_log(out) == read_log(reference)
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    """Real `kill -9` of a training subprocess once a checkpoint exists; `--resume_from_checkpoint latest` then gives
    exactly the per-step losses and samples of an uninterrupted run (fp32, CPU, dropout on)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    script = str(REPO / "training" / "train_lm.py")
    extra = ("--max_train_steps", "60", "--per_device_train_batch_size", "4", "--checkpointing_steps", "10",
             "--checkpoints_total_limit", "2", "--logging_steps", "10")

    def run(out: Path, *more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *tiny(corpus, out, *extra, *more)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    full = tmp_path / "full"
    done = run(full)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, script, *tiny(corpus, killed, *extra)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        log_file = killed / TRAIN_LOG_NAME
        # a complete checkpoint (renamed into place), and a few steps after it that the resume must drop and redo
        while not ((killed / "checkpoints" / "step_20").is_dir() and log_file.read_text().count("\n") >= 24):
            assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / train_lm.RESULTS_NAME).exists()  # really killed mid-way
    before = read_log(killed)
    ref = read_log(full)
    assert 24 <= len(before) < 60 and before == ref[: len(before)]

    latest = list_checkpoints(killed)[-1].name
    print(f"killed after {len(before)} logged steps; resuming from {latest}")
    resumed = run(killed, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    after = read_log(killed)
    assert [r["step"] for r in after] == list(range(1, 61))
    assert [r["loss"] for r in after] == [r["loss"] for r in ref]  # exact float equality
    samples = [s for r in after for s in r["samples"]]
    assert samples == [s for r in ref for s in r["samples"]]
    # No block seen twice or skipped: within this one epoch (240 of 375 blocks) no block occurs more often than it
    # does in the data (the text repeats itself in places: 4 blocks of 64 bytes occur twice).
    stream = []
    for line in corpus["train"].read_text().splitlines():
        stream += list(json.loads(line)["text"].encode()) + [build_byte_tokenizer().eos_token_id]
    blocks = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    in_data = Counter(train_lm.block_fingerprints(blocks))
    seen = Counter(samples)
    assert len(samples) == 240 and len(in_data) == 371 and all(n <= in_data[s] for s, n in seen.items())
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Preemption: a real signal to the running process
# ---------------------------------------------------------------------------------------------------------------


def test_sigterm_stops_at_a_step_boundary_and_the_resume_loses_nothing(corpus, reference, tmp_path, monkeypatch):
    """A real SIGTERM to this process after step 5 is logged: the run stops at that step boundary (before the fix the
    handler's flag never reached the loop and the run trained to the end), saves a verified `step_5` and returns;
    the resume then reproduces the uninterrupted run's per-step losses, samples and final weights exactly."""
    from reformer_rev.training.checkpointing import verify_manifest
    from reformer_rev.training.loop import TrainLog

    real_write = TrainLog.write

    def write(self, record):
        real_write(self, record)
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TrainLog, "write", write)
    out = tmp_path / "out"
    argv = tiny(corpus, out, "--checkpointing_steps", "4", "--checkpoints_total_limit", "5")
    stopped = train_lm.main(argv)
    assert stopped["stopped"] == "SIGTERM" and stopped["step"] == 5
    assert [p.name for p in list_checkpoints(out)] == ["step_4", "step_5"]
    verify_manifest(out / "checkpoints" / "step_5", ["model.safetensors"])
    assert not (out / train_lm.RESULTS_NAME).exists() and not (out / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    results = train_lm.main(argv + ["--resume_from_checkpoint", "latest"])
    assert results["train"]["steps"] == 12
    assert read_log(out) == read_log(reference)
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
