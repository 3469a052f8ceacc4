#!/usr/bin/env python3
"""Collect the measured numbers of a translation run into one results JSON (the model card's input).

    python eval/translation_results.py --run_dir outputs/mt_rev --test_scores outputs/mt_rev/test/scores.json \\
        --twin_run_dir outputs/mt_twin --output model_cards/translation_results.json

Reads `train_summary.json` of the reversible run (and, if given, of the twin run trained with the same seed and
arguments but `--no_reversible`), and the `scores.json` written by `eval/eval_translation.py`. Nothing is typed in by
hand: every figure comes from those files. The output follows the keys `reformer_rev.model_card` recognises.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _device(summary: dict) -> str:
    """Where the run trained, as its summary recorded it (threads, processor time and the machine's load)."""
    threads = summary.get("torch_threads")
    text = f"CPU ({threads} torch thread{'s' if threads != 1 else ''})" if threads else "CPU"
    if summary.get("cpu_seconds") is not None and summary.get("load_average_start"):
        load = summary["load_average_start"][1], summary["load_average_end"][1]
        text += (f", {summary['cpu_seconds'] / 60:.1f} processor-minutes in {summary['minutes']:.1f} minutes, "
                 f"5-minute load average {load[0]:.1f} -> {load[1]:.1f}")
    return text


def _eval_at(summary: dict, step: int) -> dict | None:
    return next((e for e in summary["evals"] if e["step"] == step), None)


def collect(run_dir: Path, test_scores: Path, twin_run_dir: Path | None = None) -> dict:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    start = summary  # counts and arguments of the run are in its summary
    args = start["args"]
    scores = json.loads(test_scores.read_text())
    # The validation figures of the checkpoint that was evaluated on the test split (`final` or `best`).
    evaluated_step = summary["step"] if Path(scores["model"]).name == "final" else summary["best_step"]
    best = _eval_at(summary, evaluated_step) or summary["last_eval"]
    results = {
        "model_name": "revformer-bible-en-es",
        "task": "translation",
        "source_lang": scores["source_lang"],
        "target_lang": scores["target_lang"],
        "language": [scores["source_lang"], scores["target_lang"]],
        "dataset": {
            "name": "Bundled English (WEB) - Spanish (Reina-Valera 1909) Bible verses, split by book",
            "type": "bible_mt",
            "description": (
                f"{start['train_pairs']} training pairs; validation and test are whole held-out books "
                f"({start['val_pairs']} and {scores['num_pairs']} pairs). Built by scripts/build_corpus.py from "
                "public-domain SWORD modules."
            ),
        },
        "metrics": {
            # Validation BLEU/chrF during training use greedy decoding on a subset (see `validation_curve`); only the
            # loss is comparable with the test figures' setup, so only it goes into the card's results table.
            "validation": {"loss": best["val_loss"]},
            "test": {"bleu": scores["bleu"], "chrf": scores["chrf"]},
        },
        "baselines": {"test": {"copy_source_bleu": scores["copy_source_bleu"],
                               "copy_source_chrf": scores["copy_source_chrf"]}},
        "evaluation": {
            "checkpoint": scores["model"],
            "checkpoint_step": evaluated_step,
            "split": scores["split"],
            "num_pairs": scores["num_pairs"],
            "num_beams": scores["num_beams"],
            "length_penalty": scores["length_penalty"],
            "no_repeat_ngram_size": scores.get("no_repeat_ngram_size", 0),
            "validation_bleu_pairs": args["val_bleu_samples"],
            "validation_bleu_num_beams": args["num_beams"],
        },
        "hyperparameters": {k: v for k, v in args.items() if v is not None},
        "training": {
            "steps": summary["step"],
            "train_time_s": round(summary["minutes"] * 60, 1),
            "stop_reason": summary["stop_reason"],
            "parameters": start["parameters"],
            "vocab_size": start["vocab_size"],
            "target_tokens_per_second": round(summary["tokens_per_second"], 1),
            "device": _device(summary),
        },
        "validation_curve": summary["evals"],
    }
    if twin_run_dir is not None:
        twin = json.loads((twin_run_dir / "train_summary.json").read_text())
        step = twin["step"]
        rev_eval = _eval_at(summary, step)
        twin_eval = _eval_at(twin, step)
        if rev_eval is None or twin_eval is None:
            raise ValueError(f"Both runs need a validation loss at step {step} (use --extra_eval_steps {step}).")
        rel = abs(rev_eval["val_loss"] - twin_eval["val_loss"]) / twin_eval["val_loss"]
        results["reversible_vs_twin"] = {
            "step": step,
            "reversible_val_loss": rev_eval["val_loss"],
            "twin_val_loss": twin_eval["val_loss"],
            "relative_difference": rel,
            "logged_decimals": 5,
            "note": "same seed, data order and arguments; the twin runs the same modules under plain autograd",
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, type=Path)
    p.add_argument("--test_scores", required=True, type=Path)
    p.add_argument("--twin_run_dir", type=Path, default=None)
    p.add_argument("--notes", default=None)
    p.add_argument("--output", required=True, type=Path)
    args = p.parse_args(argv)
    results = collect(args.run_dir, args.test_scores, args.twin_run_dir)
    if args.notes:
        results["notes"] = args.notes
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("metrics", "baselines")}, indent=1))
    return results


if __name__ == "__main__":
    main()
