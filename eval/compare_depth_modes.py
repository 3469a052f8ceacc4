"""Reversible stack vs weight-tied reversible stack vs deep equilibrium (DEQ), same width and step budget.

Byte-level language modelling on the bundled long-document corpus (`training/corpus.py`, ids = UTF-8 bytes). The
three candidates are trained *interleaved* (one step of each in turn, same batches, same seed), so their tokens/s are
measured under the same machine load and can be compared as ratios. Reported per candidate:

* validation bits-per-byte (mean cross-entropy over fixed validation windows / ln 2), during and after training;
* peak activation memory of one training step (`reformer_rev.profiling.peak_allocated_bytes`, after a warm-up step,
  `foreach=False` optimiser, docs/design.md §7);
* training tokens/s (wall clock of the training steps only), and for DEQ the solver statistics;
* at the end, "depth chosen at run time": validation bpb of the weight-tied model applied at other depths and of the
  DEQ model with other iteration budgets, without retraining.

Writes `<output_dir>/results.json` after every evaluation (nothing lost if the run dies) and, at the end, the table
(`infinite_depth_comparison.md` + `.json`) and the plot (`infinite_depth_comparison.png`) next to it, or into `docs/`
with `--update_docs`.

    python eval/compare_depth_modes.py                # ~10-15 min on 2 shared CPU cores
    python -m eval.compare_depth_modes --max_train_steps 20 --eval_windows 4 --output_dir outputs/smoke
    python -m eval.compare_depth_modes --update_docs           # the committed table and plot in docs/
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from reformer_rev import RevFormerForCausalLM
from reformer_rev.profiling import peak_allocated_bytes
from reformer_rev.safe_io import atomic_write_json, atomic_write_text
from reformer_rev.training.cli import config_from_args
from reformer_rev.training.corpus import load_corpus_bytes

ROOT = Path(__file__).resolve().parents[1]

LN2 = math.log(2.0)
CANDIDATES = ("stack", "tied", "deq")
LABELS = {
    "stack": "reversible stack (distinct blocks)",
    "tied": "weight-tied reversible stack",
    "deq": "DEQ (implicit, Anderson)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=6, help="applied depth of the stack and tied models")
    p.add_argument("--num_unique_layers", type=int, default=2, help="distinct blocks of the tied model / DEQ group")
    p.add_argument("--deq_solver", default="anderson", choices=("anderson", "fixed_point"))
    p.add_argument("--deq_max_iter", type=int, default=16)
    p.add_argument("--deq_tol", type=float, default=1e-3)
    p.add_argument("--deq_backward", default="implicit", choices=("implicit", "phantom"))
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=150)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--num_warmup_steps", type=int, default=15)
    p.add_argument("--eval_steps", type=int, default=50)
    p.add_argument("--eval_windows", type=int, default=16, help="validation windows of block_size bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 avoids oversubscription)")
    p.add_argument("--output_dir", default="outputs/compare_depth_modes")
    p.add_argument("--docs_dir", default=str(ROOT / "docs"))
    p.add_argument("--update_docs", action="store_true", help="also write the table and plot into --docs_dir")
    args = p.parse_args(argv)
    for name in ("max_train_steps", "eval_steps", "eval_windows", "block_size", "per_device_train_batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if args.num_unique_layers > args.num_hidden_layers:
        p.error("--num_unique_layers must not exceed --num_hidden_layers")
    return args


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def load_bytes() -> dict[str, torch.Tensor]:
    """Train/validation splits as one byte stream each (`reformer_rev.training.corpus.load_corpus_bytes`)."""
    return {split: load_corpus_bytes(split) for split in ("train", "validation")}


def train_batches(data: torch.Tensor, block: int, batch: int, steps: int, seed: int):
    """Random windows of `block + 1` bytes; the same sequence for every candidate (fixed generator)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - block - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + block] for s in starts.tolist()])


def eval_windows(data: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """`n` evenly spaced validation windows (deterministic)."""
    stride = (data.numel() - block - 1) // n
    return torch.stack([data[i * stride : i * stride + block] for i in range(n)])


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


# The config fields each candidate takes from the command line (same names as RevFormerConfig's).
CONFIG_FIELDS = {
    "stack": ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"),
    "tied": ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "num_unique_layers"),
    "deq": ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "num_unique_layers",
            "deq_solver", "deq_max_iter", "deq_tol", "deq_backward"),
}


def build(name: str, args: argparse.Namespace) -> RevFormerForCausalLM:
    fixed = dict(vocab_size=256, max_position_embeddings=args.block_size, loss_chunk_size=args.block_size, reversible=True)
    if name == "deq":
        fixed["depth_mode"] = "deq"
    torch.manual_seed(args.seed)
    return RevFormerForCausalLM(config_from_args(args, CONFIG_FIELDS[name], **fixed))


@torch.no_grad()
def evaluate(model: RevFormerForCausalLM, windows: torch.Tensor, **forward_kwargs: Any) -> dict[str, float]:
    """Validation bits-per-byte (each window's targets are its bytes 1..T-1), and DEQ stats if any."""
    model.eval()
    nats, count, iters, converged = 0.0, 0, [], []
    for i in range(0, windows.shape[0], 4):
        ids = windows[i : i + 4]
        out = model(ids, labels=ids, **forward_kwargs)
        n = ids.shape[0] * (ids.shape[1] - 1)
        nats += out.loss.item() * n
        count += n
        if out.deq_stats is not None:
            iters.append(out.deq_stats.forward.iterations)
            converged.append(out.deq_stats.forward.converged)
    model.train()
    result = {"bpb": nats / count / LN2}
    if iters:
        result["deq_iterations"] = sum(iters) / len(iters)
        result["deq_converged_fraction"] = sum(converged) / len(converged)
    return result


def step_peak_mb(model: RevFormerForCausalLM, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """Peak activation memory of one training step (the caller has already taken steps: buffers exist)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(ids, labels=ids).loss.backward()

    peak = peak_allocated_bytes(step) / 2**20
    model.load_state_dict(state)  # the measured step does not count as training
    opt.load_state_dict(opt_state)
    opt.zero_grad(set_to_none=False)
    return peak


# --------------------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # DEQ non-convergence is counted in the results (deq_nonconverged_steps) instead of logged at every step.
    hf_logging.get_logger("reformer_rev").setLevel(hf_logging.ERROR)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_bytes()
    val = eval_windows(data["validation"], args.block_size, args.eval_windows)
    models = {name: build(name, args) for name in CANDIDATES}
    opts = {
        name: torch.optim.AdamW(m.parameters(), lr=args.learning_rate, weight_decay=0.0, foreach=False)
        for name, m in models.items()
    }
    scheds = {
        name: torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: min(1.0, (s + 1) / args.num_warmup_steps)
            * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.max_train_steps)))
        )
        for name, o in opts.items()
    }
    results: dict[str, Any] = {
        "args": vars(args),
        "torch": torch.__version__,
        "candidates": {
            name: {
                "label": LABELS[name],
                "parameters": sum(p.numel() for p in m.parameters()),
                "distinct_blocks": len(m.model.layers),
                "curve": [],
                "train_seconds": 0.0,
                "train_tokens": 0,
                "train_loss": [],
                "deq_forward_iterations": [],
                "deq_backward_iterations": [],
                "deq_nonconverged_steps": 0,
            }
            for name, m in models.items()
        },
    }
    tokens_per_step = args.per_device_train_batch_size * (args.block_size - 1)

    def save() -> None:
        atomic_write_json(out_dir / "results.json", results)

    def run_eval(step: int) -> None:
        for name, m in models.items():
            r = evaluate(m, val)
            results["candidates"][name]["curve"].append({"step": step, **r})
        save()

    run_eval(0)
    batches = train_batches(
        data["train"], args.block_size, args.per_device_train_batch_size, args.max_train_steps, args.seed
    )
    progress = tqdm(total=args.max_train_steps, desc="interleaved training")
    for step, ids in enumerate(batches, start=1):
        for name, m in models.items():
            rec = results["candidates"][name]
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=False)
            out = m(ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[name].step()
            scheds[name].step()
            rec["train_seconds"] += time.perf_counter() - t0
            rec["train_tokens"] += tokens_per_step
            rec["train_loss"].append(out.loss.item())
            if out.deq_stats is not None:
                rec["deq_forward_iterations"].append(out.deq_stats.forward.iterations)
                rec["deq_backward_iterations"].append(out.deq_stats.backward.iterations)
                rec["deq_nonconverged_steps"] += int(not out.deq_stats.converged)
            if step == 2:  # buffers and optimizer state exist now: measure one step's activation memory
                rec["peak_activation_mb"] = step_peak_mb(m, opts[name], ids)
        progress.update(1)
        progress.set_postfix({n: f"{results['candidates'][n]['train_loss'][-1]:.3f}" for n in CANDIDATES})
        if step % args.eval_steps == 0 or step == args.max_train_steps:
            run_eval(step)
    progress.close()

    # Depth chosen at run time, without retraining.
    tied, deq = models["tied"], models["deq"]
    results["candidates"]["tied"]["runtime_depth"] = [
        {"num_hidden_layers": n, **evaluate(tied, val, num_hidden_layers=n)}
        for n in sorted({args.num_unique_layers, args.num_hidden_layers // 2, args.num_hidden_layers,
                         2 * args.num_hidden_layers, 4 * args.num_hidden_layers})
        if n >= 1
    ]
    budgets = []
    for max_iter in (2, 5, args.deq_max_iter, 2 * args.deq_max_iter):
        deq.config.deq_max_iter = max_iter
        budgets.append({"deq_max_iter": max_iter, **evaluate(deq, val)})
    deq.config.deq_max_iter = args.deq_max_iter
    results["candidates"]["deq"]["runtime_iterations"] = budgets

    for name, rec in results["candidates"].items():
        rec["tokens_per_second"] = rec["train_tokens"] / rec["train_seconds"]
        rec["final_bpb"] = rec["curve"][-1]["bpb"]
        rec["train_loss"] = [round(v, 5) for v in rec["train_loss"]]
    base = results["candidates"]["stack"]["tokens_per_second"]
    for rec in results["candidates"].values():
        rec["speed_vs_stack"] = rec["tokens_per_second"] / base
    save()
    write_docs(results, out_dir)
    if args.update_docs:
        write_docs(results, Path(args.docs_dir))
    return results


def markdown_table(results: dict[str, Any]) -> str:
    a = results["args"]
    rows = [
        f"Byte-level LM on the bundled long-document corpus; width {a['hidden_size']}, "
        f"{a['num_attention_heads']} heads, "
        f"FFN {a['intermediate_size']}, {a['max_train_steps']} steps x {a['per_device_train_batch_size']} x "
        f"{a['block_size']} bytes, AdamW lr {a['learning_rate']}, fp32, {a['threads']} CPU thread(s), interleaved.",
        "",
        "| model | distinct blocks | applied depth | parameters | validation bpb | peak activation MB (1 step) "
        "| train tokens/s | speed vs stack |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in results["candidates"].items():
        if name == "deq":
            fwd = rec["deq_forward_iterations"]
            bwd = rec["deq_backward_iterations"]
            depth = (
                f"fixed point ({sum(fwd) / len(fwd):.1f} fwd / {sum(bwd) / len(bwd):.1f} adjoint iterations, "
                f"{rec['deq_nonconverged_steps']}/{len(fwd)} steps unconverged)"
            )
        else:
            depth = str(a["num_hidden_layers"])
        rows.append(
            f"| {rec['label']} | {rec['distinct_blocks']} | {depth} | {rec['parameters']:,} | {rec['final_bpb']:.4f} "
            f"| {rec['peak_activation_mb']:.1f} | {rec['tokens_per_second']:.0f} | {rec['speed_vs_stack']:.2f} |"
        )
    rows += ["", "Depth chosen at run time (no retraining):", ""]
    rows += ["| model | setting | validation bpb |", "|---|---|---|"]
    for r in results["candidates"]["tied"]["runtime_depth"]:
        rows.append(f"| weight-tied | num_hidden_layers={r['num_hidden_layers']} | {r['bpb']:.4f} |")
    for r in results["candidates"]["deq"]["runtime_iterations"]:
        extra = f" (mean {r['deq_iterations']:.1f} iterations, {100 * r['deq_converged_fraction']:.0f}% converged)"
        rows.append(f"| DEQ | deq_max_iter={r['deq_max_iter']} | {r['bpb']:.4f}{extra} |")
    return "\n".join(rows) + "\n"


def write_docs(results: dict[str, Any], docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs / "infinite_depth_comparison.md", markdown_table(results))
    slim = json.loads(json.dumps(results))
    for rec in slim["candidates"].values():
        rec.pop("train_loss", None)
    atomic_write_json(docs / "infinite_depth_comparison.json", slim)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(results["candidates"])
    for name in names:
        rec = results["candidates"][name]
        steps, bpb = [c["step"] for c in rec["curve"]], [c["bpb"] for c in rec["curve"]]
        axes[0].plot(steps, bpb, marker="o", label=rec["label"])
    axes[0].set(xlabel="training step", ylabel="validation bits per byte", title="Validation bpb")
    axes[0].legend(fontsize=8)
    labels = [results["candidates"][n]["label"].split(" (")[0] for n in names]
    axes[1].bar(labels, [results["candidates"][n]["peak_activation_mb"] for n in names], color=["C0", "C1", "C2"])
    axes[1].set(ylabel="MB", title="Peak activation memory, one step")
    axes[2].bar(labels, [results["candidates"][n]["tokens_per_second"] for n in names], color=["C0", "C1", "C2"])
    axes[2].set(ylabel="tokens/s", title="Training throughput (interleaved)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(docs / "infinite_depth_comparison.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
