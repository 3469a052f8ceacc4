"""Training throughput of reformer_rev against its twin, GPT-2 (+ activation checkpointing) and HF Reformer-local.

On a shared machine absolute tokens/s mean little, so all candidates of one shape are built in the same process and
their training steps are interleaved (the order rotates every round); each round gives one ratio
`tokens/s(reversible) / tokens/s(other)`, and the report lists min / median / max of those ratios over the rounds.
The recompute limit for the reversible/twin ratio is ~0.75: a step is forward + backward (~3 forward-equivalents)
and the reversible backward adds one forward.

Results go to `<output_dir>/speed.json` (rewritten after every round), `speed.md` and `speed_ratio.png`.

Example (the committed results, see docs/benchmarks/README.md):

    python -m eval.bench_speed --update_docs
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from reformer_rev.safe_io import atomic_write_json, atomic_write_text

from eval._bench_common import (
    CANDIDATES,
    DOCS_DIR,
    SCRATCH_DIR,
    LABELS,
    BenchShape,
    build_model,
    environment,
    fmt,
    make_batch,
    make_optimizer,
    make_step,
    markdown_table,
    parse_candidates,
    parse_int_list,
    results_dir,
    summary,
    warm_up,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, default=SCRATCH_DIR, help="where results go (a scratch folder)")
    p.add_argument("--update_docs", action="store_true", help=f"write to {DOCS_DIR} (the committed figures) instead")
    p.add_argument("--candidates", type=parse_candidates, default=list(CANDIDATES))
    p.add_argument("--baseline", default="reversible", help="the candidate whose throughput is the numerator")
    p.add_argument("--depths", type=parse_int_list, default=[12])
    p.add_argument("--seq_lens", type=parse_int_list, default=[4096])
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (one timed step per candidate each)")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed full-length steps per candidate first")
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--ffn_size", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--rev_intermediate_size", type=int, default=688)
    p.add_argument("--chunk_size_feed_forward", type=int, default=0)
    p.add_argument("--loss_chunk_size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results_name", default="speed")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument(
        "--report_only",
        action="store_true",
        help="measure nothing: rewrite the markdown and plot from the JSON already there (e.g. of an interrupted run)",
    )
    args = p.parse_args(argv)
    args.output_dir = results_dir(args)
    if args.baseline not in args.candidates:
        raise ValueError(f"`--baseline` ({args.baseline}) must be one of the candidates {args.candidates}.")
    if args.repeats < 1:
        raise ValueError(f"`--repeats` must be >= 1, got {args.repeats}.")
    return args


def bench_shape(args: argparse.Namespace, depth: int, seq_len: int, on_round) -> dict[str, Any]:
    """Interleaved timing of all candidates at one shape; `on_round(partial_result)` after every round."""
    from tqdm.auto import tqdm

    steps = {}
    for name in args.candidates:
        shape = BenchShape(
            candidate=name,
            num_layers=depth,
            seq_len=seq_len,
            hidden_size=args.hidden_size,
            num_heads=args.num_heads,
            ffn_size=args.ffn_size,
            vocab_size=args.vocab_size,
            rev_intermediate_size=args.rev_intermediate_size,
            chunk_size_feed_forward=args.chunk_size_feed_forward,
            loss_chunk_size=args.loss_chunk_size,
        )
        model = build_model(shape)
        optimizer = make_optimizer(model)
        warm_up(model, optimizer, shape)
        steps[name] = make_step(model, optimizer, make_batch(shape))
        for _ in range(args.warmup_steps):
            steps[name]()
    tokens = seq_len  # batch 1
    times: dict[str, list[float]] = {name: [] for name in args.candidates}
    cpu_times: dict[str, list[float]] = {name: [] for name in args.candidates}
    result: dict[str, Any] = {
        "depth": depth,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
    }
    names = list(args.candidates)
    for r in tqdm(range(args.repeats), desc=f"depth {depth} seq {seq_len}", unit="round"):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
        result.update(analyse(times, tokens, args.baseline))
        # CPU time of this process (all its threads): robust to other processes sharing the cores, but it also counts
        # OpenMP spin-waiting, so it is cleanest with --threads 1.
        result["cpu_ratios_vs_baseline"] = analyse(cpu_times, tokens, args.baseline)["ratios_vs_baseline"]
        on_round(result)
    del steps
    gc.collect()
    return result


def analyse(times: dict[str, list[float]], tokens: int, baseline: str) -> dict[str, Any]:
    """tokens/s per candidate and per-round throughput ratios baseline / other (= other's time / baseline's time)."""
    tps = {name: summary([tokens / t for t in ts]) for name, ts in times.items() if ts}
    n = min(len(ts) for ts in times.values())
    ratios = {
        name: summary([times[name][i] / times[baseline][i] for i in range(n)])
        for name in times
        if name != baseline and n > 0
    }
    return {"tokens_per_second": tps, "ratios_vs_baseline": ratios, "rounds": n}


def render_markdown(payload: dict[str, Any]) -> str:
    args, env = payload["args"], payload["environment"]
    base = args["baseline"]
    parts = [
        "# Speed benchmark\n\n",
        f"Training tokens/s, batch 1, fp32, CPU ({env['cpu_count']} cores, {args['threads']} threads), "
        f"d={args['hidden_size']}, {args['num_heads']} heads, FFN {args['ffn_size']} (reformer_rev gated, "
        f"intermediate_size={args['rev_intermediate_size']}), vocab {args['vocab_size']}; reformer_rev "
        f"chunk_size_feed_forward={args['chunk_size_feed_forward']}, loss_chunk_size={args['loss_chunk_size']}. "
        f"Steps interleaved, order rotated each round; ratio = tokens/s of {LABELS[base]} / tokens/s of the other, "
        f"one ratio per round. torch {env['torch']}, transformers {env['transformers']}.\n\n",
        f"Command: `{payload['command']}`\n",
    ]
    for res in payload["results"]:
        parts.append(f"\n## depth {res['depth']}, seq {res['seq_len']} ({res['rounds']} rounds)\n\n")
        rows = []
        for name in args["candidates"]:
            t = res["tokens_per_second"].get(name)
            r = res["ratios_vs_baseline"].get(name)
            ratio = f"{fmt(r['median'], 2)} ({fmt(r['min'], 2)} – {fmt(r['max'], 2)})" if r else "1 (baseline)"
            rc = res.get("cpu_ratios_vs_baseline", {}).get(name)
            if rc:
                cpu_ratio = f"{fmt(rc['median'], 2)} ({fmt(rc['min'], 2)} – {fmt(rc['max'], 2)})"
            else:
                cpu_ratio = "1 (baseline)" if name == base else "not recorded"
            rows.append(
                [LABELS[name], fmt(t["median"], 0), f"{fmt(t['min'], 0)} – {fmt(t['max'], 0)}", ratio, cpu_ratio]
            )
        parts.append(
            markdown_table(
                [
                    "candidate",
                    "tokens/s median",
                    "tokens/s min – max",
                    f"{base} / this, wall: median (min – max)",
                    "same, CPU time",
                ],
                rows,
            )
        )
    return "".join(parts)


def plot(payload: dict[str, Any], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = payload["args"]["baseline"]
    results = payload["results"]
    others = [c for c in payload["args"]["candidates"] if c != base]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / max(len(results), 1)
    for k, res in enumerate(results):
        med = [res["ratios_vs_baseline"][c]["median"] for c in others]
        lo = [m - res["ratios_vs_baseline"][c]["min"] for m, c in zip(med, others)]
        hi = [res["ratios_vs_baseline"][c]["max"] - m for m, c in zip(med, others)]
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(others))]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=f"depth {res['depth']}, seq {res['seq_len']}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.75, color="gray", ls="--", lw=0.8, label="0.75 (recompute limit vs twin)")
    ax.set_xticks(range(len(others)))
    ax.set_xticklabels([LABELS[c].replace(" (", "\n(") for c in others], fontsize=7)
    ax.set_ylabel(f"tokens/s ratio: {base} / candidate")
    ax.set_title("Training throughput ratio (median, min–max over rounds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / f"{args.results_name}.json"
    command = "python -m eval.bench_speed " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    payload: dict[str, Any] = {
        "environment": environment(),
        "command": command.strip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
    }
    if args.report_only:
        if not json_path.exists():
            raise ValueError(f"`--report_only` needs an existing {json_path}.")
        payload = json.loads(json_path.read_text())
        return write_reports(payload, args)
    start = time.time()
    for depth in args.depths:
        for seq_len in args.seq_lens:
            done = list(payload["results"])

            def on_round(partial: dict[str, Any], done=done) -> None:
                payload["results"] = done + [partial]
                atomic_write_json(json_path, payload)

            bench_shape(args, depth, seq_len, on_round)
    payload["wall_seconds"] = time.time() - start
    atomic_write_json(json_path, payload)
    return write_reports(payload, args)


def write_reports(payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    atomic_write_text(args.output_dir / f"{args.results_name}.md", render_markdown(payload))
    if not args.no_plots:
        payload["plots"] = [plot(payload, args.output_dir / f"{args.results_name}_ratio.png")]
    return payload


if __name__ == "__main__":
    main()
