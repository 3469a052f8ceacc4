#!/usr/bin/env python3
"""Side-by-side table of translation runs: test scores, validation loss, speed, memory and machine load.

    python -m eval.translation_table --run outputs/mt_rev_s42 --run outputs/mt_twin_s42 --run outputs/mt_marian_s42 \\
        --output outputs/mt_table

Each `--run` folder is a `training/train_translation.py` output folder with `train_summary.json` and the test scores
of `python -m eval.eval_translation ... --output_dir RUN/test` in `RUN/test/scores.json` (`--test_subdir` names
another sub-folder). Runs that differ only in the seed (same model, shape, learning rate, budget and threads) are
averaged in a second table; a sweep over shapes is tabulated without means. Writes `OUTPUT.md` and `OUTPUT.json`;
every figure is read from those files.

Columns: the model, its shape (width, encoder+decoder layers, vocabulary), parameters and learning rate; the time
budget and the torch threads it ran with; test chrF/BLEU (greedy unless the scores say otherwise) and the
copy-the-source baseline on the same pairs; the validation chrF and loss of the final evaluation (loss in nats per
target token, no label smoothing: comparable only between runs with the same vocabulary); optimizer steps and target
tokens trained on; target tokens per second of training time (wall clock) and per processor-second (all threads: on
a shared machine the latter is what the run would get from idle cores); the peak memory of one training step on the
largest batch (profiler, activations and temporaries) and the process's peak RSS; the 5-minute load average at the
start and the end of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from reformer_rev.safe_io import atomic_write_json, atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, type=Path, help="A run's output folder (repeat).")
    p.add_argument("--test_subdir", default="test", help="Sub-folder of each run holding scores.json.")
    p.add_argument("--output", required=True, type=Path, help="Path prefix of the .md and .json written.")
    return p.parse_args(argv)


def row_of(run: Path, test_subdir: str) -> dict[str, Any]:
    summary = json.loads((run / "train_summary.json").read_text())
    scores_path = run / test_subdir / "scores.json"
    if not scores_path.is_file():
        raise FileNotFoundError(f"{scores_path} is missing: run `python -m eval.eval_translation "
                                f"--model_name_or_path {run}/final --output_dir {run}/{test_subdir} --num_beams 1`.")
    scores = json.loads(scores_path.read_text())
    last = summary["last_eval"]
    cpu = summary.get("cpu_seconds")
    a = summary["args"]
    return {
        "run": str(run), "model": summary.get("model", "reversible encoder-decoder"), "seed": a["seed"],
        "shape": f"d={a['hidden_size']}, {a['encoder_layers']}+{a['decoder_layers']}, vocab {summary['vocab_size']:,}",
        "learning_rate": a["learning_rate"], "budget_minutes": a.get("time_budget_minutes"),
        "threads": summary.get("torch_threads"), "val_chrf": last.get("val_chrf"),
        "parameters": summary["parameters"], "steps": summary["step"], "minutes": summary["minutes"],
        "test_chrf": scores["chrf"], "test_bleu": scores["bleu"], "num_beams": scores["num_beams"],
        "test_pairs": scores["num_pairs"], "copy_chrf": scores.get("copy_source_chrf"),
        "copy_bleu": scores.get("copy_source_bleu"), "chapter_chrf": scores.get("chapter_chrf"),
        "val_loss": last["val_loss"], "target_tokens": summary.get("target_tokens_seen"),
        "tokens_per_second": summary["tokens_per_second"],
        "tokens_per_cpu_second": summary["target_tokens_seen"] / cpu if cpu and summary.get("target_tokens_seen") else None,
        "cpu_minutes": cpu / 60 if cpu else None, "peak_step_memory_mb": summary.get("peak_step_memory_mb"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
        "load_start": (summary.get("load_average_start") or [None, None])[1],
        "load_end": (summary.get("load_average_end") or [None, None])[1],
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def same_recipe(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in ("model", "shape", "parameters", "learning_rate", "budget_minutes", "threads"))


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["model", "shape", "parameters", "learning rate", "budget (min × threads)", "seed", "test chrF",
              "test BLEU", "val chrF", "val loss", "steps", "target tokens", "tokens/s", "tokens/CPU-s", "peak step MB",
              "peak RSS MB", "load (5 min) start/end"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        budget = f"{fmt(r['budget_minutes'], 0)} × {fmt(r['threads'])}"
        cells = [r["model"], r["shape"], f"{r['parameters'] / 1e6:.2f}M", f"{r['learning_rate']:g}", budget,
                 str(r["seed"]), fmt(r["test_chrf"]), fmt(r["test_bleu"]), fmt(r["val_chrf"]), fmt(r["val_loss"], 3),
                 fmt(r["steps"]), fmt(r["target_tokens"]), fmt(r["tokens_per_second"], 0),
                 fmt(r["tokens_per_cpu_second"], 0), fmt(r["peak_step_memory_mb"]), fmt(r["peak_rss_mb"], 0),
                 f"{fmt(r['load_start'])}/{fmt(r['load_end'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    copy = {(r["copy_chrf"], r["copy_bleu"]) for r in rows}
    if len(copy) == 1 and None not in next(iter(copy)):
        chrf, bleu = next(iter(copy))
        lines.append(f"\nCopying the English source scores chrF {chrf:.1f} / BLEU {bleu:.2f} on the same "
                     f"{rows[0]['test_pairs']:,} test pairs.")
    # Only runs that differ in nothing but the seed are averaged (a sweep over shapes is not a set of seeds).
    means = []
    for key in dict.fromkeys(same_recipe(r) for r in rows):
        group = [r for r in rows if same_recipe(r) == key]
        if len(group) < 2:
            continue
        mean = {k: statistics.mean(r[k] for r in group) for k in ("test_chrf", "test_bleu", "val_loss")}
        first = group[0]
        means.append(f"| {first['model']} | {first['shape']} | {first['learning_rate']:g} | {len(group)} | "
                     f"{mean['test_chrf']:.1f} | {mean['test_bleu']:.1f} | {mean['val_loss']:.3f} |")
    if means:
        lines += ["", "| model | shape | learning rate | seeds | mean test chrF | mean test BLEU | mean val loss |",
                  "|---|---|---|---|---|---|---|", *means]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = [row_of(run, args.test_subdir) for run in args.run]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output.with_suffix(".json"), rows, indent=1)
    text = markdown(rows)
    atomic_write_text(args.output.with_suffix(".md"), text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
