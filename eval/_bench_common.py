"""Shared pieces of the benchmarks: the candidates at equal shape, one training step, fresh-process workers.

Every memory figure is taken in a fresh Python process (this file run as a script with `--worker`), so allocator
state, lazily built kernels or a previous configuration's garbage cannot leak into the next measurement. The parent
only launches workers, collects their JSON and writes tables and plots.

Candidates (all fp32, batch 1, dropout 0, d=256, 4 heads, FFN 1024, vocab 256 by default):

* `reversible`: `RevFormerForCausalLM` with the recomputing backward;
* `twin`: the same modules under plain autograd (`reversible=False`);
* `gpt2`: `GPT2LMHeadModel` with SDPA attention;
* `gpt2_ckpt`: the same with `gradient_checkpointing_enable()`;
* `hf_reformer_local`: `transformers`' own `ReformerModelWithLMHead` with local attention only (chunk length 64,
  one chunk before: each query sees 64-128 keys, not the whole prefix, so it does far less attention work).

RevFormer's feed-forward is gated (3 matrices, no biases). `intermediate_size=683` would match GPT-2's FFN weights
exactly (3*256*683 = 524,544 vs 2*256*1024 = 524,288 + 1,280 biases), but a 683-wide GEMM runs ~25% slower per FLOP
on CPU than a 16-aligned one (measured: 62 vs 82 GFLOP/s, 1 thread). The default is 688 (528,384 weights, +0.5%).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATES = ("reversible", "twin", "gpt2", "gpt2_ckpt", "hf_reformer_local")
LABELS = {
    "reversible": "reformer_rev (reversible)",
    "twin": "reformer_rev twin (plain autograd)",
    "gpt2": "GPT-2 (sdpa)",
    "gpt2_ckpt": "GPT-2 (sdpa) + activation checkpointing",
    "hf_reformer_local": "transformers Reformer (local attn)",
}
RESULT_MARKER = "@@BENCH_RESULT@@"
# Benchmarks write here unless asked (`--update_docs`) to refresh the committed figures in DOCS_DIR.
REPO_ROOT = Path(__file__).resolve().parents[1]
SCRATCH_DIR = REPO_ROOT / "outputs" / "benchmarks"
DOCS_DIR = REPO_ROOT / "docs" / "benchmarks"


def write_bench_outputs(name: str, result: dict, table: str, output_dir: str | None, docs: bool) -> list[Path]:
    """`{name}.json` and `{name}.md` in `output_dir` (default: a fresh scratch folder), and in docs/benchmarks with
    `docs`. Returns the folders written."""
    import tempfile

    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    folders = [out] + ([DOCS_DIR] if docs else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (folder / f"{name}.md").write_text(table)
        print(f"wrote {folder / (name + '.md')}")
    return folders


def results_dir(args: argparse.Namespace) -> Path:
    """`--output_dir` (default: the scratch folder), or the docs folder with `--update_docs`."""
    return DOCS_DIR if getattr(args, "update_docs", False) else args.output_dir
MB = 1024**2
GB = 1024**3


@dataclass
class BenchShape:
    """One configuration of one candidate. Defaults are the issue's target shape."""

    candidate: str = "reversible"
    num_layers: int = 12
    seq_len: int = 4096
    hidden_size: int = 256
    num_heads: int = 4
    ffn_size: int = 1024
    vocab_size: int = 256
    batch_size: int = 1
    # reformer_rev knobs: gated-FFN width matching the FFN parameter count, FFN chunking and chunked LM loss.
    rev_intermediate_size: int = 688
    chunk_size_feed_forward: int = 0
    loss_chunk_size: int = 1024
    # Reformer-local attention window.
    local_chunk_length: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.candidate not in CANDIDATES:
            raise ValueError(f"`candidate` must be one of {CANDIDATES}, got {self.candidate!r}.")
        for name in ("num_layers", "seq_len", "hidden_size", "num_heads", "ffn_size", "vocab_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}.")
        if self.candidate == "hf_reformer_local" and self.seq_len % self.local_chunk_length != 0:
            raise ValueError(
                f"`seq_len` ({self.seq_len}) must be a multiple of `local_chunk_length` ({self.local_chunk_length}): "
                "transformers' Reformer refuses other lengths in training."
            )

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size


def build_model(shape: BenchShape):
    """The candidate model, fp32, in train mode, without dropout (dropout would only add RNG bookkeeping)."""
    import torch

    torch.manual_seed(shape.seed)
    name = shape.candidate
    if name in ("reversible", "twin"):
        from reformer_rev import RevFormerConfig, RevFormerForCausalLM

        config = RevFormerConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            intermediate_size=shape.rev_intermediate_size,
            max_position_embeddings=max(shape.seq_len, 2048),
            reversible=name == "reversible",
            chunk_size_feed_forward=shape.chunk_size_feed_forward,
            loss_chunk_size=shape.loss_chunk_size,
            use_cache=False,
            attn_implementation="sdpa",
        )
        model = RevFormerForCausalLM(config)
    elif name in ("gpt2", "gpt2_ckpt"):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=shape.vocab_size,
            n_positions=shape.seq_len,
            n_embd=shape.hidden_size,
            n_layer=shape.num_layers,
            n_head=shape.num_heads,
            n_inner=shape.ffn_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=shape.vocab_size - 1,
            eos_token_id=shape.vocab_size - 1,
        )
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        if name == "gpt2_ckpt":
            # transformers 5.x name; `gradient_checkpointing_enable` is its deprecated alias.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:  # pragma: no cover - transformers < 5.x
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from transformers import ReformerConfig, ReformerModelWithLMHead

        config = ReformerConfig(
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            num_attention_heads=shape.num_heads,
            attention_head_size=shape.hidden_size // shape.num_heads,
            feed_forward_size=shape.ffn_size,
            attn_layers=["local"] * shape.num_layers,
            local_attn_chunk_length=shape.local_chunk_length,
            local_num_chunks_before=1,
            local_num_chunks_after=0,
            axial_pos_embds=False,
            max_position_embeddings=shape.seq_len,
            hidden_act="gelu",
            is_decoder=True,
            hidden_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = ReformerModelWithLMHead(config)
    model.train()
    return model


def count_parameters(model) -> dict[str, int]:
    return {"total": sum(p.numel() for p in model.parameters())}


def make_batch(shape: BenchShape, seq_len: int | None = None):
    import torch

    g = torch.Generator().manual_seed(shape.seed + 1)
    return torch.randint(0, shape.vocab_size, (shape.batch_size, seq_len or shape.seq_len), generator=g)


def make_optimizer(model):
    """AdamW with `foreach=False`: the foreach path allocates per-step temporaries that scale with depth."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)


def make_step(model, optimizer, input_ids) -> Callable[[], float]:
    """One full training step: forward with labels, backward, optimizer step, zero_grad keeping the buffers."""

    def step() -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return float(loss.detach())

    return step


def warm_up(model, optimizer, shape: BenchShape) -> None:
    """Allocate gradients and optimizer state with one short step (their size does not depend on the length)."""
    warm_len = min(shape.seq_len, 256)
    warm_len -= warm_len % (shape.local_chunk_length if shape.candidate == "hf_reformer_local" else 1)
    make_step(model, optimizer, make_batch(shape, warm_len))()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------------------------
# Worker (runs in a fresh process)
# --------------------------------------------------------------------------------------------------------------


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one candidate and measure one training step.

    `mode="profile"`: peak activation memory of the step with `reformer_rev.profiling.peak_allocated_bytes` (after a
    warm-up step), plus the process peak RSS. `mode="rss"`: the step runs without the profiler and only the process
    peak RSS (`ru_maxrss`) is reported: what a user's process needs, allocator slack included.
    """
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    mode = spec.get("mode", "profile")
    shape = BenchShape(**spec["shape"])
    rss_start = current_rss_bytes()
    model = build_model(shape)
    optimizer = make_optimizer(model)
    n_params = count_parameters(model)["total"]
    warm_up(model, optimizer, shape)
    rss_after_warmup = current_rss_bytes()
    step = make_step(model, optimizer, make_batch(shape))
    result: dict[str, Any] = {"shape": dataclasses.asdict(shape), "mode": mode, "num_parameters": n_params}
    start = time.perf_counter()
    if mode == "profile":
        from reformer_rev.profiling import peak_allocated_bytes

        result["peak_activation_bytes"] = peak_allocated_bytes(step)
    elif mode == "rss":
        step()
    else:
        raise ValueError(f"`mode` must be 'profile' or 'rss', got {mode!r}.")
    result["step_seconds"] = time.perf_counter() - start
    result["rss_at_start_bytes"] = rss_start
    result["rss_after_warmup_bytes"] = rss_after_warmup
    result["peak_rss_bytes"] = peak_rss_bytes()
    # Weights + gradients + two AdamW moments, fp32.
    result["static_bytes"] = n_params * 4 * 4
    result["status"] = "ok"
    return result


def run_worker(
    spec: dict[str, Any], timeout: float | None = None, memory_limit_bytes: int | None = None, env: dict | None = None,
    module: str | None = None,
) -> dict[str, Any]:
    """Run `worker_main(spec)` in a fresh process; return its result or `{"status": "timeout"|"error", ...}`.

    `memory_limit_bytes` caps the child's data segment (RLIMIT_DATA covers anonymous mmaps on Linux >= 4.7), so a
    configuration that would swamp the shared machine fails with an allocation error instead. `module`: run
    `python -m module --worker SPEC` from the repository root instead (a benchmark with its own worker, which prints
    `RESULT_MARKER` + JSON like this one).
    """

    def limit() -> None:
        if memory_limit_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_limit_bytes, memory_limit_bytes))

    script = ["-m", module] if module else [str(Path(__file__).resolve())]
    cmd = [sys.executable, *script, "--worker", json.dumps(spec)]
    child_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=child_env, check=False,
            cwd=REPO_ROOT if module else None,
        )
    except subprocess.TimeoutExpired:
        return {"shape": spec["shape"], "mode": spec.get("mode", "profile"), "status": "timeout", "timeout_s": timeout}
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            out = json.loads(line[len(RESULT_MARKER) :])
            out["wall_seconds"] = wall
            return out
    tail = (proc.stderr or proc.stdout)[-1500:]
    oom = any(s in tail for s in ("MemoryError", "DefaultCPUAllocator: can't allocate", "not enough memory", "Cannot allocate"))
    return {
        "shape": spec["shape"],
        "mode": spec.get("mode", "profile"),
        "status": "oom" if oom else "error",
        "returncode": proc.returncode,
        "stderr_tail": tail,
        "wall_seconds": wall,
    }


# --------------------------------------------------------------------------------------------------------------
# Small numeric and reporting helpers
# --------------------------------------------------------------------------------------------------------------


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through `(xs, ys)`; slope 0 for a single point."""
    n = len(xs)
    if n == 0:
        raise ValueError("least_squares needs at least one point.")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n == 1 or sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    return {"min": ordered[0], "median": median, "max": ordered[-1], "n": n}


def environment() -> dict[str, Any]:
    """Library versions and machine facts, stored with every result file."""
    import torch
    import transformers

    import reformer_rev

    try:
        import matplotlib

        mpl = matplotlib.__version__
    except ImportError:  # pragma: no cover - plots are optional
        mpl = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reformer_rev": reformer_rev.__version__,
        "matplotlib": mpl,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_candidates(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in CANDIDATES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown candidate(s) {bad}; choose from {', '.join(CANDIDATES)}")
    return names


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Benchmark worker: one configuration in this fresh process.")
    parser.add_argument("--worker", required=True, help="JSON spec: {'shape': {...}, 'mode': 'profile'|'rss'}")
    args = parser.parse_args()
    res = worker_main(json.loads(args.worker))
    print(RESULT_MARKER + json.dumps(res), flush=True)
