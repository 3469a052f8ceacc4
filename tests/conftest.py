"""Shared fixtures: tiny configs and the reversible/twin model pair with identical weights."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path

import pytest
import torch

# Two CI cores are shared by the pytest-xdist workers: one intra-op thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from reformer_rev import RevFormerConfig, RevFormerForCausalLM  # noqa: E402


def tiny_config(**overrides) -> RevFormerConfig:
    kwargs = dict(
        vocab_size=48,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return RevFormerConfig(**kwargs)


def make_pair(
    dtype: torch.dtype = torch.float64, seed: int = 0, model_class=RevFormerForCausalLM, config_fn=None, **overrides
):
    """A reversible model and its non-reversible twin sharing the same weights."""
    config_fn = config_fn or tiny_config
    torch.manual_seed(seed)
    rev = model_class(config_fn(reversible=True, **overrides)).to(dtype)
    twin = model_class(config_fn(reversible=False, **overrides)).to(dtype)
    twin.load_state_dict(rev.state_dict())
    return rev, twin


def model_with_random_gates() -> RevFormerForCausalLM:
    """A tiny causal LM with learnable branch gates drawn away from their zero init (so loaded values matter)."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(branch_scale="learnable_gate"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.uniform_(0.5, 1.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_grad_rel_err(m1: torch.nn.Module, m2: torch.nn.Module, skip: tuple[str, ...] = ()) -> tuple[float, str]:
    """Largest relative gradient difference over all parameters (each must have a gradient unless in `skip`)."""
    worst, name = 0.0, ""
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        if n1 in skip:
            continue
        assert p1.grad is not None and p2.grad is not None, f"missing gradient for {n1}"
        e = rel_err(p1.grad, p2.grad)
        if e > worst:
            worst, name = e, n1
    return worst, name


@pytest.fixture
def padded_batch():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, 48, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, -5:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run builds its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def cut_bundled_corpus(root: Path, splits: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """Small jsonl splits of real English cut from the bundled corpus: `{split: (n_docs, n_chars_per_doc)}`."""
    from reformer_rev.training.corpus import bundled_lm_files

    files = {}
    for split, (n_docs, n_chars) in splits.items():
        with gzip.open(bundled_lm_files()[split], "rt") as f:
            docs = [json.loads(line)["text"][:n_chars] for line, _ in zip(f, range(n_docs))]
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return files


@pytest.fixture(autouse=True)
def fresh_drift_monitor(monkeypatch):
    """A fresh process-wide drift monitor per test: it probes the first calls, then one in 16, and a probed call keeps
    the stack's input stream alive until its backward; without a fresh one, peak-memory figures (and which calls
    are probed) would depend on how many stacks earlier tests in the same worker ran."""
    from reformer_rev import reversible
    from reformer_rev.couplings import DriftMonitor

    monkeypatch.setattr(reversible, "default_drift_monitor", DriftMonitor())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct checkpoint of `make fetch-pretrained`; the test is skipped when it is absent."""
    from eval.fetch_pretrained import cached_checkpoint

    path = cached_checkpoint("smollm2-135m")
    if path is None:
        pytest.skip("SmolLM2-135M is not fetched: run `make fetch-pretrained` (python -m eval.fetch_pretrained smollm2-135m)")
    return path


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of `size` (e.g. "64k") mounted at `folder` for the block: a disk that really fills up. Yields None where
    mounting is not allowed (no root in the container)."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def tiny_lm_args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """`training/train_lm.py` arguments of a tiny, fast run on `corpus` (from `cut_bundled_corpus`) into `out`; the
    `extra` ones come last, so they override these (argparse keeps the last value)."""
    return [
        "--train_file", str(corpus["train"]), "--validation_file", str(corpus["validation"]), "--output_dir", str(out),
        "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8",
        "--num_warmup_steps", "2", "--learning_rate", "1e-2", "--eval_steps", "0", "--max_eval_blocks", "4",
        "--sample_tokens", "0", "--time_budget_minutes", "0", "--cpu", *extra,
    ]

