"""Activation memory and speed of one training step with the library defaults vs the previous defaults.

The previous defaults ran the feed-forward unchunked (`chunk_size_feed_forward=0`) and the loss in chunks of 1024;
the library now chooses both chunk sizes (`None`, see `reformer_rev.configuration_reformer_rev.resolve_chunk_size`).
Memory is the peak of the allocator's running sum over one step (docs/design.md §7: optimizer with foreach=False,
zero_grad(set_to_none=False), a warm-up step first); speed is a ratio of step times measured interleaved in the same
run. Everything else is `RevFormerConfig()`'s default, but `hidden_size`.

    python eval/bench_defaults.py                      # seq 4096, d=256, depth 2 and 8; results in a scratch folder
    python eval/bench_defaults.py --docs               # also write docs/benchmarks/defaults.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reformer_rev import RevFormerConfig, RevFormerForCausalLM, reversible
from reformer_rev.couplings import DriftMonitor
from reformer_rev.profiling import peak_allocated_bytes

CANDIDATES = {
    "previous defaults (FFN unchunked, loss chunks 1024)": dict(chunk_size_feed_forward=0, loss_chunk_size=1024),
    "library defaults (chunk sizes chosen)": {},
}


def make_step(seq_len: int, hidden_size: int, depth: int, overrides: dict):
    # The engine's process-wide drift monitor probes the first calls, then one in 16, and a probed step keeps one more
    # stream alive: a fresh monitor per configuration makes every measured step a probed one (the step with the
    # highest peak of a training run), whatever ran before in this process.
    reversible.default_drift_monitor = DriftMonitor()
    torch.manual_seed(0)
    config = RevFormerConfig(hidden_size=hidden_size, num_hidden_layers=depth, **overrides)
    model = RevFormerForCausalLM(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, config.vocab_size, (1, seq_len))

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    step()  # warm-up: gradient buffers and optimizer state exist before the measured step
    return step, config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 8])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds at the smallest depth")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output_dir", default=None, help="default: a fresh scratch folder")
    p.add_argument("--docs", action="store_true", help="also write docs/benchmarks/defaults.{md,json}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, resolved = {}, {}
    for name, overrides in CANDIDATES.items():
        for depth in args.depths:
            step, config = make_step(args.seq_len, args.hidden_size, depth, overrides)
            rows[(name, depth)] = peak_allocated_bytes(step) / 2**20
            block = RevFormerForCausalLM(config).model.layers[0]
            resolved[name] = {"ffn_chunk": block.g_chunk_size, "config": {k: getattr(config, k) for k in overrides}}
            print(f"{name}, depth {depth}: {rows[(name, depth)]:.1f} MB", flush=True)

    depth = min(args.depths)
    steps = {name: make_step(args.seq_len, args.hidden_size, depth, o)[0] for name, o in CANDIDATES.items()}
    names = list(CANDIDATES)
    ratios = []
    for r in range(args.rounds):
        times = {}
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order: no candidate always runs first
            start = time.perf_counter()
            steps[name]()
            times[name] = time.perf_counter() - start
        ratios.append(times[names[1]] / times[names[0]])

    result = {
        "shape": {"seq_len": args.seq_len, "hidden_size": args.hidden_size, "batch": 1, "dtype": "float32",
                  "threads": args.threads, "other_fields": "RevFormerConfig() defaults"},
        "peak_activation_mb": {f"{n} | depth {d}": round(v, 1) for (n, d), v in rows.items()},
        "step_time_ratio_new_over_previous": [round(x, 3) for x in ratios],
        "step_time_ratio_median": round(statistics.median(ratios), 3),
        "resolved": resolved,
        "versions": {"torch": torch.__version__},
    }
    header = "| defaults | " + " | ".join(f"depth {d}" for d in args.depths) + " |"
    lines = [
        "# Activation memory with the library defaults",
        f"One training step, batch 1, fp32, CPU, seq {args.seq_len}, hidden_size {args.hidden_size}, every other "
        "field at its `RevFormerConfig()` default; peak activation MB (docs/design.md §7).",
        "",
        header,
        "|" + "---|" * (len(args.depths) + 1),
        *(f"| {n} | " + " | ".join(f"{rows[(n, d)]:.1f}" for d in args.depths) + " |" for n in CANDIDATES),
        "",
        f"Step time, library / previous defaults, depth {depth}, interleaved: median "
        f"{result['step_time_ratio_median']:.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)}).",
        "",
        "Command: `python eval/bench_defaults.py --docs`",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="bench_defaults_"))
    targets = [out] + ([Path(__file__).resolve().parents[1] / "docs" / "benchmarks"] if args.docs else [])
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "defaults.json").write_text(json.dumps(result, indent=2) + "\n")
        (folder / "defaults.md").write_text(table)
        print(f"wrote {folder / 'defaults.md'}")
    return result


if __name__ == "__main__":
    main()
