"""Peak training memory of reformer_rev against what a user would pick instead, each configuration in a fresh process.

Measures, for every candidate of `_bench_common.CANDIDATES` (reversible, its plain-autograd twin, GPT-2 with and
without activation checkpointing, transformers' Reformer with local attention):

* the peak *activation* memory of one training step (torch profiler, `reformer_rev.profiling.peak_allocated_bytes`,
  after a warm-up step, AdamW with `foreach=False`, `zero_grad(set_to_none=False)`) over a depth sweep at a fixed
  length, with the least-squares slope in MB per layer, and over a length sweep at a fixed depth;
* the peak *process* memory (`ru_maxrss`) of the same steps, and of optional extra runs without the profiler
  (`--rss-runs reversible:65536:12`), and from it the longest sequence each candidate fits in `--budget-gb`.

Results go to `<output_dir>/memory.json` (rewritten after every configuration, so nothing is lost when a run dies;
`--resume` skips configurations already measured), `memory.md` and the plots `memory_vs_depth.png`,
`memory_vs_seq.png`.

Example (the committed results, see docs/benchmarks/README.md):

    python -m eval.bench_memory --update_docs
"""

from __future__ import annotations

import argparse
import dataclasses
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
    GB,
    LABELS,
    MB,
    BenchShape,
    environment,
    fmt,
    least_squares,
    markdown_table,
    parse_candidates,
    parse_int_list,
    results_dir,
    run_worker,
)


def parse_caps(text: str) -> dict[str, int]:
    """`gpt2=48,twin=48` -> {"gpt2": 48, "twin": 48}."""
    caps = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in CANDIDATES or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected candidate=int pairs, got {item!r}")
        caps[name] = int(value)
    return caps


def parse_rss_runs(text: str) -> list[tuple[str, int, int]]:
    """`reversible:65536:12,gpt2_ckpt:16384:12` -> [(candidate, seq_len, depth), ...]."""
    runs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in CANDIDATES or not (parts[1].isdigit() and parts[2].isdigit()):
            raise argparse.ArgumentTypeError(f"expected candidate:seq_len:depth, got {item!r}")
        runs.append((parts[0], int(parts[1]), int(parts[2])))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, default=SCRATCH_DIR, help="where results go (a scratch folder)")
    p.add_argument("--update_docs", action="store_true", help=f"write to {DOCS_DIR} (the committed figures) instead")
    p.add_argument("--candidates", type=parse_candidates, default=list(CANDIDATES))
    p.add_argument("--depths", type=parse_int_list, default=[2, 8, 24, 48, 96], help="depth sweep")
    p.add_argument("--depth_sweep_seq_len", type=int, default=4096)
    p.add_argument(
        "--max_depth",
        type=parse_caps,
        default=parse_caps("twin=48,gpt2=48,gpt2_ckpt=48"),
        help="per-candidate depth cap, e.g. 'gpt2=48' (the activations of plain autograd grow ~100 MB/layer)",
    )
    p.add_argument("--seq_lens", type=parse_int_list, default=[2048, 4096, 8192, 16384, 32768], help="length sweep")
    p.add_argument("--seq_sweep_depth", type=int, default=12)
    p.add_argument(
        "--max_seq_len",
        type=parse_caps,
        default=parse_caps("reversible=16384,twin=16384,gpt2=16384,gpt2_ckpt=16384"),
        help="per-candidate cap of the length sweep (full causal attention costs O(T^2) time on CPU)",
    )
    p.add_argument("--rss_runs", type=parse_rss_runs, default=[], help="extra peak-process-memory runs (no profiler)")
    p.add_argument("--budget_gb", type=float, default=8.0, help="memory budget for 'longest sequence that fits'")
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--ffn_size", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--rev_intermediate_size", type=int, default=688, help="gated FFN width of reformer_rev")
    p.add_argument("--chunk_size_feed_forward", type=int, default=0)
    p.add_argument("--loss_chunk_size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--rss_timeout", type=float, default=5400.0, help="seconds per --rss_runs configuration")
    p.add_argument(
        "--max_predicted_gb",
        type=float,
        default=9.0,
        help="skip a configuration whose peak process memory, extrapolated from the smaller ones, exceeds this",
    )
    p.add_argument("--memory_limit_gb", type=float, default=14.0, help="hard RLIMIT_DATA of each worker")
    p.add_argument("--sweeps", default="depth,seq", help="which sweeps to run: 'depth,seq', 'seq', 'none', ...")
    p.add_argument("--results_name", default="memory", help="basename of the .json/.md files written")
    p.add_argument(
        "--extra_results",
        type=Path,
        nargs="*",
        default=[],
        help="other memory JSON files whose records join the analysis (e.g. a long --rss_runs job run on its own)",
    )
    p.add_argument("--resume", action="store_true", help="keep results already in the JSON file, run only the rest")
    p.add_argument("--no_plots", action="store_true")
    args = p.parse_args(argv)
    args.output_dir = results_dir(args)
    return args


def shape_for(args: argparse.Namespace, candidate: str, depth: int, seq_len: int) -> BenchShape:
    return BenchShape(
        candidate=candidate,
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


def _key(rec: dict[str, Any]) -> tuple:
    s = rec["shape"]
    return (rec.get("sweep"), rec.get("mode", "profile"), s["candidate"], s["num_layers"], s["seq_len"])


def predicted_peak_rss(done: list[dict[str, Any]], x_name: str, x: int) -> float | None:
    """Linear extrapolation of the peak process memory from the (up to 3) largest measured points."""
    pts = sorted((r["shape"][x_name], r["peak_rss_bytes"]) for r in done if r["status"] == "ok")[-3:]
    if len(pts) < 2:
        return None
    slope, intercept = least_squares([p[0] for p in pts], [p[1] for p in pts])
    return slope * x + intercept


def run_sweep(
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    sweep: str,
    points: list[tuple[str, int, int]],
    save,
    mode: str = "profile",
) -> None:
    """Run `(candidate, depth, seq_len)` points in order; after a failure, skip that candidate's larger points."""
    from tqdm.auto import tqdm

    have = {_key(r): r for r in records}
    broken: set[str] = set()
    x_name = "num_layers" if sweep == "depth" else "seq_len"
    for candidate, depth, seq_len in tqdm(points, desc=f"{sweep} sweep", unit="config"):
        shape = shape_for(args, candidate, depth, seq_len)
        spec = {"shape": dataclasses.asdict(shape), "mode": mode, "threads": args.threads}
        key = (sweep, mode, candidate, depth, seq_len)
        if key in have and have[key]["status"] == "ok":
            continue
        done = [r for r in records if r.get("sweep") == sweep and r["shape"]["candidate"] == candidate]
        prediction = predicted_peak_rss(done, x_name, depth if x_name == "num_layers" else seq_len)
        if candidate in broken:
            rec = {"shape": spec["shape"], "mode": mode, "status": "skipped", "reason": "a smaller point failed"}
        elif sweep != "rss" and prediction is not None and prediction > args.max_predicted_gb * GB:
            rec = {
                "shape": spec["shape"],
                "mode": mode,
                "status": "skipped",
                "reason": f"predicted peak process memory {prediction / GB:.1f} GB > --max_predicted_gb",
            }
        else:
            timeout = args.rss_timeout if sweep == "rss" else args.timeout
            rec = run_worker(spec, timeout=timeout, memory_limit_bytes=int(args.memory_limit_gb * GB))
        rec["sweep"] = sweep
        if rec["status"] != "ok":
            broken.add(candidate)
        records[:] = [r for r in records if _key(r) != key] + [rec]
        save()
        tqdm.write(_describe(rec))


def _describe(rec: dict[str, Any]) -> str:
    s = rec["shape"]
    head = f"{rec.get('sweep')}: {s['candidate']} depth={s['num_layers']} seq={s['seq_len']}"
    if rec["status"] != "ok":
        return f"{head}: {rec['status']} {rec.get('reason', '')}{rec.get('stderr_tail', '')[-300:]}"
    act = rec.get("peak_activation_bytes")
    act_s = f"activations {act / MB:.1f} MB, " if act is not None else ""
    return f"{head}: {act_s}peak RSS {rec['peak_rss_bytes'] / MB:.0f} MB, step {rec['step_seconds']:.1f} s"


# --------------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------------


def ok_records(records: list[dict[str, Any]], sweep: str, candidate: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("sweep") == sweep and r["status"] == "ok" and r["shape"]["candidate"] == candidate]


def depth_fits(records: list[dict[str, Any]], candidates: list[str]) -> dict[str, dict[str, float]]:
    """Least-squares MB/layer and constant of the peak activation memory over the depth sweep."""
    fits = {}
    for c in candidates:
        recs = ok_records(records, "depth", c)
        if not recs:
            continue
        xs = [r["shape"]["num_layers"] for r in recs]
        ys = [r["peak_activation_bytes"] / MB for r in recs]
        slope, intercept = least_squares(xs, ys)
        fits[c] = {
            "slope_mb_per_layer": slope,
            "intercept_mb": intercept,
            "max_mb": max(ys),
            "depths": sorted(xs),
        }
    return fits


def budget_fits(records: list[dict[str, Any]], candidates: list[str], budget_gb: float) -> dict[str, dict[str, Any]]:
    """Longest sequence per candidate whose step's peak process memory stays under the budget.

    `measured`: the longest measured length (length sweep or `--rss_runs` at the length-sweep depth) under budget.
    `extrapolated`: where a line through the largest measured points of the length sweep crosses the budget
    (activations of all candidates are linear in length with SDPA / local attention); an estimate, labelled so.
    """
    out = {}
    budget = budget_gb * GB
    for c in candidates:
        recs = ok_records(records, "seq", c)
        rss_recs = ok_records(records, "rss", c)
        if not recs and not rss_recs:
            continue
        depth = (recs or rss_recs)[0]["shape"]["num_layers"]
        pts = sorted(
            (r["shape"]["seq_len"], r["peak_rss_bytes"]) for r in recs + rss_recs if r["shape"]["num_layers"] == depth
        )
        under = [s for s, b in pts if b <= budget]
        entry: dict[str, Any] = {"depth": depth, "measured_longest": max(under) if under else None}
        fit_pts = pts[-3:]
        if len(fit_pts) >= 2:
            slope, intercept = least_squares([p[0] for p in fit_pts], [p[1] for p in fit_pts])
            entry["bytes_per_token"] = slope
            entry["extrapolated_longest"] = int((budget - intercept) / slope) if slope > 0 else None
        out[c] = entry
    return out


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def render_markdown(payload: dict[str, Any]) -> str:
    args = payload["args"]
    records = payload["records"]
    candidates = args["candidates"]
    env = payload["environment"]
    parts = [
        "# Memory benchmark\n",
        f"Shape: d={args['hidden_size']}, {args['num_heads']} heads, FFN {args['ffn_size']} "
        f"(reformer_rev: gated, intermediate_size={args['rev_intermediate_size']}), vocab {args['vocab_size']}, "
        f"batch 1, fp32, CPU; reformer_rev chunk_size_feed_forward={args['chunk_size_feed_forward']}, "
        f"loss_chunk_size={args['loss_chunk_size']}. torch {env['torch']}, transformers {env['transformers']}.\n",
        "Commands (in order, later ones with `--resume`):\n\n",
        *[f"    {c}\n" for c in payload.get("commands", [payload["command"]])],
    ]
    fits = payload["depth_fits"]
    depths = sorted({r["shape"]["num_layers"] for r in records if r.get("sweep") == "depth"})
    if depths:
        seq = args["depth_sweep_seq_len"]
        header = ["candidate"] + [f"depth {d}" for d in depths] + ["MB / layer", "constant MB"]
        rows = []
        for c in candidates:
            by_depth = {r["shape"]["num_layers"]: r for r in records if r.get("sweep") == "depth" and r["shape"]["candidate"] == c}
            row = [LABELS[c]]
            for d in depths:
                r = by_depth.get(d)
                row.append(fmt(r["peak_activation_bytes"] / MB) if r and r["status"] == "ok" else (r["status"] if r else "–"))
            f = fits.get(c)
            row += [fmt(f["slope_mb_per_layer"], 2), fmt(f["intercept_mb"])] if f else ["–", "–"]
            rows.append(row)
        parts.append(f"\n## Peak activation memory of one training step (MB) vs depth, seq {seq}\n\n")
        parts.append(markdown_table(header, rows))
    seqs = sorted({r["shape"]["seq_len"] for r in records if r.get("sweep") == "seq"})
    if seqs:
        for title, field in (
            ("Peak activation memory (MB)", "peak_activation_bytes"),
            ("Peak process memory, ru_maxrss (MB)", "peak_rss_bytes"),
        ):
            header = ["candidate"] + [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqs]
            rows = []
            for c in candidates:
                by_seq = {r["shape"]["seq_len"]: r for r in records if r.get("sweep") == "seq" and r["shape"]["candidate"] == c}
                row = [LABELS[c]]
                for s in seqs:
                    r = by_seq.get(s)
                    row.append(fmt(r[field] / MB, 0) if r and r["status"] == "ok" else (r["status"] if r else "–"))
                rows.append(row)
            parts.append(f"\n## {title} vs sequence length, depth {args['seq_sweep_depth']}\n\n")
            parts.append(markdown_table(header, rows))
    rss = [r for r in records if r.get("sweep") == "rss"]
    if rss:
        rows = []
        for r in rss:
            s = r["shape"]
            ok = r["status"] == "ok"
            rows.append(
                [
                    LABELS[s["candidate"]],
                    s["num_layers"],
                    s["seq_len"],
                    fmt(r["peak_rss_bytes"] / GB, 2) if ok else r["status"],
                    fmt(r["step_seconds"], 0) if ok else "–",
                ]
            )
        parts.append("\n## Peak process memory of one training step without profiler (ru_maxrss)\n\n")
        parts.append(markdown_table(["candidate", "depth", "seq", "peak process memory (GB)", "step (s)"], rows))
    budget = payload.get("budget")
    if budget:
        rows = [
            [
                LABELS[c],
                b["depth"],
                b["measured_longest"] or "none measured",
                b.get("extrapolated_longest") or "–",
            ]
            for c, b in budget["per_candidate"].items()
        ]
        parts.append(f"\n## Longest sequence whose training step fits in {budget['budget_gb']:g} GB of process memory\n\n")
        parts.append(
            "`measured`: longest length actually run under the budget; `extrapolated`: a line through the largest "
            "measured lengths (an estimate).\n\n"
        )
        parts.append(markdown_table(["candidate", "depth", "measured", "extrapolated"], rows))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        parts.append("\n## Configurations not measured\n\n")
        for r in failed:
            s = r["shape"]
            why = r.get("reason") or r["status"]
            parts.append(f"- {r.get('sweep')}: {s['candidate']} depth {s['num_layers']} seq {s['seq_len']}: {why}\n")
    return "".join(parts)


def plot(payload: dict[str, Any], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, candidates, written = payload["records"], payload["args"]["candidates"], []
    for sweep, x_name, fname, xlabel in (
        ("depth", "num_layers", "memory_vs_depth.png", "depth (layers)"),
        ("seq", "seq_len", "memory_vs_seq.png", "sequence length (tokens)"),
    ):
        if not any(r.get("sweep") == sweep and r["status"] == "ok" for r in records):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for c in candidates:
            pts = sorted((r["shape"][x_name], r["peak_activation_bytes"] / MB) for r in ok_records(records, sweep, c))
            if pts:
                style = {"lw": 2.5, "marker": "s", "zorder": 5} if c == "reversible" else {"marker": "o"}
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=LABELS[c], **style)
        a = payload["args"]
        if sweep == "depth":
            ax.set_title(f"Peak activation memory per training step, seq {a['depth_sweep_seq_len']}")
            ax.set_yscale("log")  # the flat curves (~100 MB) and the linear ones (GBs) on one plot
        else:
            ax.set_title(f"Peak activation memory per training step, depth {a['seq_sweep_depth']}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MB")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.results_name}.json"
    records: list[dict[str, Any]] = []
    command = "python -m eval.bench_memory " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    commands = [command.strip()]
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        records = [r for r in previous["records"] if "source" not in r]
        commands = previous.get("commands", [previous.get("command", "")]) + commands
    serial_args = {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "extra_results" else v)
        for k, v in vars(args).items()
    }
    env = environment()

    extra: list[dict[str, Any]] = []
    for path in args.extra_results:
        for rec in json.loads(Path(path).read_text())["records"]:
            extra.append({**rec, "source": str(path)})

    def payload() -> dict[str, Any]:
        everything = records + [r for r in extra if _key(r) not in {_key(x) for x in records}]
        fits = depth_fits(everything, args.candidates)
        return {
            "environment": env,
            "command": command.strip(),
            "commands": commands,
            "args": serial_args,
            "depth_fits": fits,
            "budget": {
                "budget_gb": args.budget_gb,
                "per_candidate": budget_fits(everything, args.candidates, args.budget_gb),
            },
            "records": everything,
        }

    def save() -> None:
        atomic_write_json(json_path, payload())

    start = time.time()
    depth_points = [
        (c, d, args.depth_sweep_seq_len) for c in args.candidates for d in args.depths if d <= args.max_depth.get(c, 10**9)
    ]
    seq_points = [
        (c, args.seq_sweep_depth, s) for c in args.candidates for s in args.seq_lens if s <= args.max_seq_len.get(c, 10**9)
    ]
    sweeps = {s.strip() for s in args.sweeps.split(",")}
    if not sweeps <= {"depth", "seq", "none", ""}:
        raise ValueError(f"`--sweeps` takes 'depth', 'seq' or 'none', got {args.sweeps!r}.")
    if "depth" in sweeps:
        run_sweep(args, records, "depth", depth_points, save)
    if "seq" in sweeps:
        run_sweep(args, records, "seq", seq_points, save)
    if args.rss_runs:
        run_sweep(args, records, "rss", [(c, d, s) for c, s, d in args.rss_runs], save, mode="rss")
    final = payload()
    final["wall_seconds"] = time.time() - start
    atomic_write_json(json_path, final)
    atomic_write_text(out_dir / f"{args.results_name}.md", render_markdown(final))
    if not args.no_plots:
        final["plots"] = plot(final, out_dir)
    return final


if __name__ == "__main__":
    main()
