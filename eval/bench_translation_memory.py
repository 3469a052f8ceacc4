"""Peak training memory against document length for the translation models, each configuration in a fresh process.

Document-level translation is where the reversible encoder-decoder's memory matters: a chapter is thousands of tokens
on both sides. For each candidate and each length L (source and target both L tokens, batch 1) this measures one
training forward + backward of the model `training/train_translation.py` builds from the same arguments, with the
same loss (label smoothing included), after a warm-up pass at 64 tokens:

* `reversible`: the default `reformer_rev` encoder-decoder (recomputing backward, chunked loss);
* `twin`: the same modules under plain autograd (`--no_reversible`);
* `marian`: the standard baseline, `MarianMTModel` at equal parameters (`--architecture marian`).

Memory is the profiler's peak of the running sum of allocations (`reformer_rev.profiling.peak_allocated_bytes`,
docs/design.md §7): activations and temporaries, not the weights, gradients or optimizer state (the same for all
lengths). Also reported: the process's peak RSS and, with `--time_steps`, processor seconds of one more step without
the profiler (one thread).

    python -m eval.bench_translation_memory                        # writes outputs/benchmarks/translation_memory.*
    python -m eval.bench_translation_memory --update_docs          # the committed figures (docs/benchmarks/)
    python -m eval.bench_translation_memory --train_args "--encoder_layers 6 --decoder_layers 6"

Results: `translation_memory.json` (rewritten after every configuration), `translation_memory.md` and
`translation_memory.png`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from eval._bench_common import (
    DOCS_DIR,
    GB,
    MB,
    RESULT_MARKER,
    SCRATCH_DIR,
    environment,
    fmt,
    markdown_table,
    parse_int_list,
    results_dir,
    run_worker,
)

CANDIDATES = {
    "reversible": ("reformer_rev (reversible)", []),
    "twin": ("reformer_rev twin (plain autograd)", ["--no_reversible"]),
    "marian": ("MarianMTModel (standard)", ["--architecture", "marian"]),
}
WARMUP_TOKENS = 64
RESULTS_NAME = "translation_memory"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=parse_int_list, default=[1024, 2048, 4096, 8192],
                   help="Source (= target) lengths in tokens, comma-separated.")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help=f"Comma-separated subset of {', '.join(CANDIDATES)}.")
    p.add_argument("--train_args", default="",
                   help="Extra arguments of training/train_translation.py that shape the model (quoted).")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker.")
    p.add_argument("--time_steps", action="store_true",
                   help="Also time one more step without the profiler (processor seconds; doubles the cost).")
    p.add_argument("--timeout", type=float, default=1800.0, help="Seconds per configuration.")
    p.add_argument("--memory_limit_gb", type=float, default=8.0, help="Data-segment cap of each worker.")
    p.add_argument("--output_dir", type=Path, default=SCRATCH_DIR)
    p.add_argument("--update_docs", action="store_true", help=f"Write to {DOCS_DIR} (the committed figures).")
    args = p.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown or not args.candidates:
        raise ValueError(f"`--candidates`: unknown {unknown}; choose from {', '.join(CANDIDATES)}.")
    args.output_dir = results_dir(args)
    return args


# --------------------------------------------------------------------------------------------------------------
# Worker (a fresh process per configuration)
# --------------------------------------------------------------------------------------------------------------


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    from reformer_rev.training.translation import peak_step_bytes, seq2seq_loss, trainable_parameters
    from training import train_translation

    torch.set_num_threads(spec["threads"])
    length = spec["length"]
    args = train_translation.parse_args(
        ["--output_dir", "unused", "--document_level", "--max_document_tokens", str(length), *spec["train_args"]]
    )
    torch.manual_seed(args.seed)
    vocab = args.bpe_vocab_size
    model = train_translation.build_translation_model(args, vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    g = torch.Generator().manual_seed(args.seed)

    def batch(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(4, vocab, (1, n), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(4, vocab, (1, n), generator=g)}

    start = time.process_time()
    peak = peak_step_bytes(model, batch(length), args.label_smoothing, warmup_batch=batch(WARMUP_TOKENS))
    step_seconds = None
    if spec.get("time_steps"):  # the measured pass runs under the profiler; time one more pass without it
        timed = batch(length)
        model.train()
        step_start = time.process_time()
        seq2seq_loss(model, timed, args.label_smoothing).backward()
        step_seconds = time.process_time() - step_start
    return {
        "candidate": spec["candidate"], "length": length, "status": "ok",
        "parameters": trainable_parameters(model), "peak_activation_bytes": peak["peak_bytes"],
        "step_cpu_seconds": step_seconds, "worker_cpu_seconds": time.process_time() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "label_smoothing": args.label_smoothing, "model_type": model.config.model_type,
    }


# --------------------------------------------------------------------------------------------------------------
# Parent: run, tabulate, plot
# --------------------------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any]) -> str:
    rows = []
    by_key = {(r["candidate"], r["length"]): r for r in results["records"]}
    for length in results["lengths"]:
        row = [f"{length:,}"]
        for name in results["candidates"]:
            r = by_key.get((name, length))
            row.append(fmt(r["peak_activation_bytes"] / MB, 1) if r and r["status"] == "ok" else (r or {}).get("status", "–"))
        rev, std = by_key.get(("reversible", length)), by_key.get(("marian", length))
        ok = rev and std and rev["status"] == std["status"] == "ok"
        row.append(fmt(std["peak_activation_bytes"] / rev["peak_activation_bytes"], 1) + "×" if ok else "–")
        rows.append(row)
    header = ["source = target tokens"] + [f"{CANDIDATES[c][0]} MB" for c in results["candidates"]]
    header.append("standard / reversible")
    speed_rows = []
    for length in results["lengths"]:
        row = [f"{length:,}"]
        for name in results["candidates"]:
            r = by_key.get((name, length))
            timed = r and r["status"] == "ok" and r.get("step_cpu_seconds")
            row.append(fmt(2 * length / r["step_cpu_seconds"], 0) if timed else "–")
        speed_rows.append(row)
    params = {r["candidate"]: r["parameters"] for r in results["records"] if r["status"] == "ok"}
    lines = [
        "Peak activation memory of one training step (forward + backward, batch 1, source and target of the given "
        "length), MB, torch profiler:",
        "",
        markdown_table(header, rows),
        *(["Training throughput of the same step, source + target tokens per processor-second (one thread, no "
           "profiler):", "", markdown_table(["source = target tokens"] + [CANDIDATES[c][0] for c in
                                             results["candidates"]], speed_rows)] if results.get("time_steps") else []),
        "Parameters: " + ", ".join(f"{CANDIDATES[c][0]} {params[c]:,}" for c in results["candidates"] if c in params)
        + f". Model arguments: `{results['train_args'] or '(training/train_translation.py defaults)'}`.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plots are optional
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in results["candidates"]:
        pts = [(r["length"], r["peak_activation_bytes"] / MB) for r in results["records"]
               if r["candidate"] == name and r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=CANDIDATES[name][0])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("source = target length (tokens)")
    ax.set_ylabel("peak activation memory of a training step (MB)")
    ax.set_title("Document-level translation: memory vs length")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from reformer_rev.safe_io import atomic_write_json, atomic_write_text

    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_args = shlex.split(args.train_args)
    results = {"lengths": args.lengths, "candidates": args.candidates, "train_args": args.train_args,
               "time_steps": args.time_steps, "environment": environment(), "records": []}
    for length in args.lengths:
        for name in args.candidates:
            spec = {"candidate": name, "length": length, "threads": args.threads, "time_steps": args.time_steps,
                    "train_args": [*CANDIDATES[name][1], *train_args]}
            record = run_worker(spec, timeout=args.timeout, memory_limit_bytes=int(args.memory_limit_gb * GB),
                                module="eval.bench_translation_memory")
            record.setdefault("candidate", name)
            record.setdefault("length", length)
            results["records"].append(record)
            shown = fmt(record["peak_activation_bytes"] / MB, 1) + " MB" if record["status"] == "ok" else record["status"]
            print(f"{CANDIDATES[name][0]:40s} L={length:6d}: {shown}", flush=True)
            atomic_write_json(out / f"{RESULTS_NAME}.json", results, indent=1)
    atomic_write_text(out / f"{RESULTS_NAME}.md", render_markdown(results))
    plot(results, out / f"{RESULTS_NAME}.png")
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    if "--worker" in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        print(RESULT_MARKER + json.dumps(worker_main(spec)), flush=True)
    else:
        main()
