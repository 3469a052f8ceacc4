#!/usr/bin/env python
"""`make_reversible` on a real pretrained LLM (issue 20): fidelity, fine-tuning, memory and speed against what users
have -- ordinary fine-tuning and activation checkpointing.

The checkpoint is SmolLM2-135M-Instruct (30 layers, hidden 576, with the massive activations real LLMs have),
fetched once by `python -m eval.fetch_pretrained smollm2-135m` (the only network step; any other causal LM folder
works with `--model_name_or_path`). Sections (each can be skipped with `--skip`):

* `fidelity`: the training-mode loss (the function the gradients come from; dropout off, so only the coupling
  differs) against the original model's, per coupling variant, on English prose (the bundled English Bible), Spanish
  (the Spanish side of the translation corpus) and Python code (this repository's files held out from fine-tuning),
  in float32, bf16 autocast and bf16 weights; each the mean of `--fidelity_draws` sign draws (`fidelity_report`).
* `finetune`: ordinary fine-tuning (a) and `make_reversible` (c) in lockstep (same batches, same RNG), on Spanish and
  on code; every fine-tuned model saved and evaluated as a plain `transformers` model in a process where
  `reformer_rev` cannot be imported; the loss curves go to a PNG; tokens per CPU-second of each from the same run.
* `memory`: peak activation memory of one decoder training step (embeddings given, so the embedding's dense
  gradient, the same for all, is not counted; `reformer_rev.profiling`), each point in a fresh process, at every
  `--memory_seq_lens` in float32 and at `--memory_dtype_seq_lens` in bf16 autocast and bf16 weights: (a), (b)
  activation checkpointing (`gradient_checkpointing_enable()`, transformers' default non-reentrant) and (c).
* `speed`: tokens per CPU-second of a full training step (decoder, head and loss) at `--speed_seq_len`, (a), (b) and
  (c) interleaved round by round in one process.

    python -m eval.fetch_pretrained smollm2-135m
    python -m eval.bench_pretrained --output_dir outputs/bench_pretrained            # scratch results
    python -m eval.bench_pretrained ... --write_docs                                 # docs/benchmarks/pretrained.*

Targets (issue 20): training-mode loss within 0.5% of the original on the three texts in fp32 and bf16; fine-tuned
validation loss within 0.5% of ordinary fine-tuning; decoder activation memory <= 1/2 of activation checkpointing at
seq 1024 and 4096 in fp32 and bf16; tokens/s >= 0.7x activation checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

from eval._bench_common import environment, fmt, markdown_table
from eval.bench_convert import FIDELITY_VARIANTS, LABELS, plain_eval, prepare, train_in_lockstep
from eval.fetch_pretrained import cached_checkpoint
from eval.pretrain_small import english_books, spanish_verses
from reformer_rev.safe_io import atomic_write_json, atomic_write_text

RESULT_MARKER = "@@PRETRAINED_RESULT@@"
DTYPES = ("fp32", "autocast", "bf16")
DTYPE_LABELS = {"fp32": "float32", "autocast": "bf16 autocast (fp32 weights)", "bf16": "bf16 weights"}
SECTIONS = ("fidelity", "finetune", "memory", "speed")
# The options each section depends on: recorded with the section, so sections measured by separate runs (`--skip`,
# `--merge_from`) each keep the settings they ran with.
SECTION_OPTIONS = {
    "fidelity": ("fidelity_variants", "fidelity_dtypes", "fidelity_blocks", "fidelity_seq_len", "fidelity_draws",
                 "seed"),
    "finetune": ("finetune_domains", "candidates", "steps", "batch_size", "seq_len", "learning_rate", "warmup_steps",
                 "valid_blocks", "seed"),
    "memory": ("memory_candidates", "memory_dtypes", "memory_seq_lens", "memory_dtype_seq_lens",
               "memory_plain_max_seq_len"),
    "speed": ("speed_candidates", "speed_seq_len", "speed_rounds"),
}


# --------------------------------------------------------------------------------------------------------------
# Data: three domains, as token blocks
# --------------------------------------------------------------------------------------------------------------


def code_files(split: str) -> list[str]:
    """This repository's tracked Python files (Apache-2.0, present in every checkout; not the virtual environments,
    whose packages hold files in other encodings): every fifth file (sorted by path) is the validation split, the rest
    trains."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=False)
    if listed.returncode == 0 and listed.stdout.strip():
        files = sorted(REPO / name for name in listed.stdout.split())
    else:  # not a git checkout: the same files, found by walking the tree
        files = sorted(p for p in REPO.rglob("*.py")
                       if not any(part.startswith(".") or part == "outputs" for part in p.relative_to(REPO).parts))
    chosen = [p for i, p in enumerate(files) if (i % 5 == 4) == (split == "validation")]
    return [p.read_text(encoding="utf-8", errors="replace") for p in chosen]


def domain_texts(domain: str, split: str) -> list[str]:
    if domain == "english":
        return english_books(split)
    if domain == "spanish":
        return spanish_verses(split)
    if domain == "code":
        return code_files(split)
    raise ValueError(f"unknown domain {domain!r}")


def blocks_of(tokenizer, texts: list[str], seq_len: int, limit: int = 0) -> torch.Tensor:
    """The texts tokenized, each followed by the tokenizer's EOS, joined and cut into (n, seq_len) blocks."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
        if limit and len(ids) >= limit * seq_len:
            break
    n = len(ids) // seq_len if not limit else min(limit, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def load(path: str, dtype: str = "fp32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.config.use_cache = False  # training: no KV cache (and no warning about it from the converted stack)
    return model


def autocast_for(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast")


# --------------------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------------------


def fidelity(path: str, domains: dict[str, torch.Tensor], args, on_progress=None) -> dict[str, Any]:
    from reformer_rev import make_reversible
    from reformer_rev.conversion import fidelity_report

    out: dict[str, Any] = {}
    for dtype in args.fidelity_dtypes:
        original = load(path, dtype)
        out[dtype] = {}
        for domain, blocks in domains.items():
            row: dict[str, Any] = {"blocks": len(blocks), "variants": {}}
            for key in args.fidelity_variants:
                coupling, gamma, _ = FIDELITY_VARIANTS[key]
                model = make_reversible(copy.deepcopy(original), coupling=coupling, gamma=gamma)
                with autocast_for(dtype):
                    report = fidelity_report(model, blocks, draws=args.fidelity_draws, seed=args.seed)
                row["original_loss"] = report.original_loss
                row["variants"][key] = {"training_loss": report.training_loss,
                                        "relative_change": report.relative_change}
                del model
            out[dtype][domain] = row
            if on_progress is not None:
                on_progress(out)  # what is measured survives a run that is stopped later
            print(f"[fidelity] {dtype} {domain}: " + ", ".join(
                f"{k} {100 * v['relative_change']:+.3f}%" for k, v in row["variants"].items()), flush=True)
        del original
    return out


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning in lockstep
# --------------------------------------------------------------------------------------------------------------


def finetune(path: str, domain: str, train: torch.Tensor, valid: torch.Tensor, out_dir: Path, args) -> dict[str, Any]:
    models = {cand: prepare(load(path), cand) for cand in args.candidates}
    losses, cpu = train_in_lockstep(models, train, args, f"finetune {domain}", log_every=10)
    valid_file = out_dir / f"valid_{domain}.pt"
    torch.save(valid, valid_file)
    tokens = args.steps * args.batch_size * train.shape[1]
    results = {}
    for cand, model in models.items():
        saved = out_dir / "finetuned" / domain / cand
        model.save_pretrained(saved)
        evaluated = plain_eval(saved, valid_file, args.threads)
        probe = getattr(model, "_reversible_conversion", None)
        results[cand] = {
            "validation_loss_plain_reload": evaluated["loss"], "reloaded_class": evaluated["class"],
            "train_losses": losses[cand], "cpu_seconds": cpu[cand], "tokens_per_cpu_second": tokens / cpu[cand],
            **(probe.probe.state_dict() if probe is not None else {}),
        }
    base = results["plain"]
    for r in results.values():
        r["validation_loss_vs_plain"] = r["validation_loss_plain_reload"] / base["validation_loss_plain_reload"] - 1
        r["speed_vs_plain"] = r["tokens_per_cpu_second"] / base["tokens_per_cpu_second"]
    return {"steps": args.steps, "tokens": tokens, "valid_blocks": len(valid), "candidates": results}


def plot_curves(finetuned: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(finetuned), figsize=(5.5 * len(finetuned), 4), squeeze=False)
    for ax, (domain, res) in zip(axes[0], finetuned.items()):
        for cand, r in res["candidates"].items():
            curve = torch.tensor(r["train_losses"])
            window = max(1, len(curve) // 20)
            smooth = torch.nn.functional.avg_pool1d(curve.view(1, 1, -1), window, 1).flatten()
            ax.plot(range(window, len(curve) + 1), smooth.tolist(),
                    label=f"{LABELS[cand].split(' (')[0]}: val {r['validation_loss_plain_reload']:.4f}")
        ax.set_title(f"SmolLM2-135M fine-tuned on {domain}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving average)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# Memory (fresh process per point) and speed
# --------------------------------------------------------------------------------------------------------------


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from reformer_rev.profiling import peak_allocated_bytes

    torch.set_num_threads(spec["threads"])
    model = prepare(load(spec["path"], spec["dtype"]), spec["candidate"])
    decoder = model.get_decoder()
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-5, foreach=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, spec["seq_len"]), generator=g)
    with torch.no_grad():
        embeds = decoder.embed_tokens(ids)
    embeds.requires_grad_(True)  # the stack's input gradient is computed, as in full training
    readout = torch.randn(model.config.hidden_size, generator=g)

    def step() -> None:
        with autocast_for(spec["dtype"]):
            hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
        (hidden.float() @ readout).square().mean().backward()
        embeds.grad = None
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: only activations are measured

    step()  # warm-up: gradients and optimizer state exist before the measured step
    return {**spec, "peak_activation_bytes": peak_allocated_bytes(step)}


def measure_memory(path: str, args) -> dict[str, Any]:
    points = []
    plan = [(d, t) for d in args.memory_dtypes for t in (args.memory_seq_lens if d == "fp32" else args.memory_dtype_seq_lens)]
    for dtype, seq_len in plan:
        for cand in args.memory_candidates:
            if cand == "plain" and seq_len > args.memory_plain_max_seq_len:
                continue  # ordinary training keeps every layer's activations: GBs at long sequences
            spec = dict(path=path, candidate=cand, dtype=dtype, seq_len=seq_len, threads=args.threads)
            proc = subprocess.run([sys.executable, "-m", "eval.bench_pretrained", "--memory_worker", json.dumps(spec)],
                                  cwd=REPO, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_MARKER)), None)
            if line is None:
                raise RuntimeError(f"memory worker failed ({spec}):\n{proc.stderr[-3000:]}")
            mb = json.loads(line[len(RESULT_MARKER):])["peak_activation_bytes"] / 2**20
            points.append({"dtype": dtype, "seq_len": seq_len, "candidate": cand, "peak_mb": mb})
            print(f"[memory] {dtype} seq {seq_len} {cand}: {mb:.1f} MB", flush=True)
    return {"points": points}


def measure_speed(path: str, args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    models = {c: prepare(load(path), c) for c in args.speed_candidates}
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, models["plain"].config.vocab_size, (1, args.speed_seq_len), generator=g)
    cpu = {c: [] for c in models}
    for round_ in range(args.speed_rounds + 1):  # round 0 warms up
        for cand, model in models.items():
            start = time.process_time()
            model(input_ids=ids, labels=ids).loss.backward()
            elapsed = time.process_time() - start
            model.zero_grad(set_to_none=False)
            if round_:
                cpu[cand].append(elapsed)
        print(f"[speed] round {round_}: " + ", ".join(f"{c} {v[-1]:.1f}s" for c, v in cpu.items() if v), flush=True)
    per_step = {c: sorted(v)[len(v) // 2] for c, v in cpu.items()}
    tokens_per_s = {c: args.speed_seq_len / t for c, t in per_step.items()}
    return {"seq_len": args.speed_seq_len, "rounds": args.speed_rounds, "median_cpu_seconds": per_step,
            "tokens_per_cpu_second": tokens_per_s}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    env = results["environment"]
    by_section = results.get("section_settings", {})
    lines = [f"`make_reversible` on {results['checkpoint']['name']} ({results['checkpoint'].get('class', '?')}, "
             f"{results['checkpoint'].get('num_parameters', 0) / 1e6:.1f} M parameters); {env['date_utc']} UTC, "
             f"torch {env['torch']}, transformers {env['transformers']}, {results['settings']['threads']} thread(s).\n"]
    if "fidelity" in results:
        settings = by_section.get("fidelity", results["settings"])
        fid = results["fidelity"]
        lines.append(f"\n### Step-0 fidelity: training-mode loss vs the original (mean of {settings['fidelity_draws']} "
                     "sign draws, dropout off)\n")
        for dtype, per_domain in fid.items():
            domains = list(per_domain)
            rows = [["original model"] + [f"{per_domain[d]['original_loss']:.4f}" for d in domains]]
            for key in settings["fidelity_variants"]:
                rows.append([FIDELITY_VARIANTS[key][2]] + [
                    f"{per_domain[d]['variants'][key]['training_loss']:.4f} "
                    f"({100 * per_domain[d]['variants'][key]['relative_change']:+.2f}%)" for d in domains])
            sizes = ", ".join(f"{per_domain[d]['blocks']} x {settings['fidelity_seq_len']}" for d in domains)
            lines.append(f"\n{DTYPE_LABELS[dtype]} ({sizes} tokens):\n")
            lines.append(markdown_table(["function"] + domains, rows))
    if "finetune" in results:
        settings = by_section.get("finetune", results["settings"])
        lines.append(f"\n### Fine-tuning: {settings['steps']} steps x {settings['batch_size']} x {settings['seq_len']} "
                     f"tokens, AdamW {settings['learning_rate']:g} cosine, same batches and RNG; validation of the "
                     "plainly reloaded checkpoint\n")
        for domain, res in results["finetune"].items():
            rows = [[LABELS[c], f"{r['validation_loss_plain_reload']:.4f}", f"{100 * r['validation_loss_vs_plain']:+.2f}%",
                     f"{r['speed_vs_plain']:.2f}x", fmt(r.get("fidelity_mean_rel_change") and
                                                         100 * r["fidelity_mean_rel_change"], 2)]
                    for c, r in res["candidates"].items()]
            lines.append(f"\n{domain} ({res['valid_blocks']} validation blocks):\n")
            lines.append(markdown_table(["candidate", "val loss (plain reload)", "vs (a)", "tokens/s vs (a)",
                                         "probe: mean training-mode change %"], rows))
    if "memory" in results:
        settings = by_section.get("memory", results["settings"])
        pts = results["memory"]["points"]
        lines.append("\n### Peak activation memory of one decoder training step (MB, batch 1, real weights)\n")
        for dtype in DTYPES:
            mine = [p for p in pts if p["dtype"] == dtype]
            if not mine:
                continue
            seqs = sorted({p["seq_len"] for p in mine})
            value = {(p["candidate"], p["seq_len"]): p["peak_mb"] for p in mine}
            rows = [[LABELS[c]] + [fmt(value.get((c, t)), 1) for t in seqs] for c in settings["memory_candidates"]]
            if all(("ckpt", t) in value and ("rev", t) in value for t in seqs):
                rows.append(["(c) / (b)"] + [f"{value[('rev', t)] / value[('ckpt', t)]:.2f}" for t in seqs])
            lines.append(f"\n{DTYPE_LABELS[dtype]}:\n")
            lines.append(markdown_table(["candidate"] + [f"seq {t}" for t in seqs], rows))
    if "speed" in results:
        sp = results["speed"]
        tps = sp["tokens_per_cpu_second"]
        rows = [[LABELS[c], f"{v:.1f}", f"{v / tps['ckpt']:.2f}x" if "ckpt" in tps else "–"] for c, v in tps.items()]
        lines.append(f"\n### Training speed: full step at seq {sp['seq_len']}, batch 1, median of {sp['rounds']} "
                     "interleaved rounds (process CPU time)\n")
        lines.append(markdown_table(["candidate", "tokens per CPU-second", "vs (b)"], rows))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m", help="Name of a checkpoint of eval/fetch_pretrained.py.")
    p.add_argument("--model_name_or_path", default=None, help="Any causal LM folder or Hub id instead of --checkpoint.")
    p.add_argument("--skip", default="", help=f"Comma-separated sections to skip: {', '.join(SECTIONS)}.")
    p.add_argument("--fidelity_variants", default="heavy_ball,heavy_ball_16,heavy_ball_half,bdia",
                   help=f"Couplings measured at step 0, from {', '.join(FIDELITY_VARIANTS)}.")
    p.add_argument("--fidelity_dtypes", default="fp32,autocast,bf16", help=f"From {', '.join(DTYPES)}.")
    p.add_argument("--fidelity_blocks", type=int, default=4, help="Blocks per domain at step 0.")
    p.add_argument("--fidelity_seq_len", type=int, default=256)
    p.add_argument("--fidelity_draws", type=int, default=6, help="Sign draws averaged per measurement.")
    p.add_argument("--finetune_domains", default="spanish,code")
    p.add_argument("--candidates", default="plain,rev", help="Fine-tuned in lockstep; must include plain.")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--valid_blocks", type=int, default=64)
    p.add_argument("--memory_candidates", default="plain,ckpt,rev")
    p.add_argument("--memory_dtypes", default="fp32,autocast,bf16", help=f"From {', '.join(DTYPES)}.")
    p.add_argument("--memory_seq_lens", default="1024,2048,4096,8192", help="Sequence lengths measured in float32.")
    p.add_argument("--memory_dtype_seq_lens", default="1024,4096", help="Sequence lengths measured in the bf16 modes.")
    p.add_argument("--memory_plain_max_seq_len", type=int, default=2048,
                   help="Longest sequence measured for ordinary training (its activations grow with depth).")
    p.add_argument("--speed_candidates", default="plain,ckpt,rev")
    p.add_argument("--speed_seq_len", type=int, default=1024)
    p.add_argument("--speed_rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-time ratios are not skewed by load).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/bench_pretrained")
    p.add_argument("--write_docs", action="store_true", help="Also write docs/benchmarks/pretrained.{json,md,png}.")
    p.add_argument("--merge_from", default="",
                   help="Comma-separated output folders of earlier runs (e.g. sections run in parallel with --skip): "
                   "their sections are taken into this run's report; sections this run measures replace them.")
    args = p.parse_args(argv)
    for name in ("fidelity_variants", "fidelity_dtypes", "finetune_domains", "candidates", "memory_candidates",
                 "memory_dtypes", "speed_candidates"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    for name in ("memory_seq_lens", "memory_dtype_seq_lens"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",") if x])
    args.skip = {s for s in args.skip.split(",") if s}
    args.merge_from = [Path(d) for d in args.merge_from.split(",") if d]
    missing = [str(d) for d in args.merge_from if not (d / "results.json").is_file()]
    if missing:
        p.error(f"--merge_from: no results.json in {missing}")
    if args.skip - set(SECTIONS):
        p.error(f"--skip takes {', '.join(SECTIONS)}; got {sorted(args.skip)}")
    if "plain" not in args.candidates:
        p.error("--candidates must include 'plain' (the baseline of every ratio)")
    bad = [v for v in args.fidelity_variants if v not in FIDELITY_VARIANTS]
    bad += [d for d in args.fidelity_dtypes + args.memory_dtypes if d not in DTYPES]
    bad += [c for c in args.candidates + args.memory_candidates + args.speed_candidates if c not in LABELS]
    bad += [d for d in args.finetune_domains if d not in ("english", "spanish", "code")]
    if bad:
        p.error(f"unknown value(s) {bad}")
    if args.model_name_or_path is None:
        path = cached_checkpoint(args.checkpoint)
        if path is None:
            p.error(f"checkpoint {args.checkpoint!r} is not fetched: run `python -m eval.fetch_pretrained "
                    f"{args.checkpoint}` (or pass --model_name_or_path)")
        args.model_name_or_path = str(path)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = args.model_name_or_path
    record = Path(path) / "fetch.json"
    checkpoint = json.loads(record.read_text()) if record.is_file() else {"name": path}
    results: dict[str, Any] = {"environment": environment(), "checkpoint": checkpoint,
                               "settings": {k: v for k, v in vars(args).items() if k != "skip"}}
    results["settings"]["skip"] = sorted(args.skip)
    results["settings"]["merge_from"] = [str(d) for d in args.merge_from]
    tokenizer = AutoTokenizer.from_pretrained(path)
    for folder in args.merge_from:  # sections measured by earlier runs, with the settings they ran with
        earlier = json.loads((folder / "results.json").read_text())
        for section in SECTIONS:
            if section not in earlier:
                continue
            if section == "finetune":  # domains may come from separate runs
                results.setdefault("finetune", {}).update(earlier["finetune"])
            else:
                results[section] = earlier[section]
            results.setdefault("section_settings", {})[section] = earlier.get("section_settings", {}).get(
                section, {k: earlier["settings"].get(k) for k in SECTION_OPTIONS[section]})

    def save() -> None:
        atomic_write_json(out_dir / "results.json", results)

    def measured(section: str) -> None:
        results.setdefault("section_settings", {})[section] = {k: getattr(args, k) for k in SECTION_OPTIONS[section]}

    if "fidelity" not in args.skip:
        domains = {d: blocks_of(tokenizer, domain_texts(d, "validation"), args.fidelity_seq_len, args.fidelity_blocks)
                   for d in ("english", "spanish", "code")}
        results["fidelity"] = fidelity(path, domains, args, lambda partial: (results.update(fidelity=partial), save()))
        measured("fidelity")
        save()
    if "finetune" not in args.skip:
        results.setdefault("finetune", {})
        for domain in args.finetune_domains:
            train = blocks_of(tokenizer, domain_texts(domain, "train"), args.seq_len)
            valid = blocks_of(tokenizer, domain_texts(domain, "validation"), args.seq_len, args.valid_blocks)
            results["finetune"][domain] = finetune(path, domain, train, valid, out_dir, args)
            results["finetune"][domain]["settings"] = {k: getattr(args, k) for k in SECTION_OPTIONS["finetune"]}
            measured("finetune")
            save()
    if results.get("finetune"):
        plot = plot_curves(results["finetune"], out_dir / "pretrained_finetune.png")
        results["finetune_plot"] = str(plot) if plot else None
    if "memory" not in args.skip:
        results["memory"] = measure_memory(path, args)
        measured("memory")
        save()
    if "speed" not in args.skip:
        results["speed"] = measure_speed(path, args)
        measured("speed")
        save()
    text = report(results)
    atomic_write_text(out_dir / "results.md", text + "\n")
    save()
    if args.write_docs:
        docs = REPO / "docs" / "benchmarks"
        if results.get("finetune_plot"):
            (docs / "pretrained_finetune.png").write_bytes(Path(results["finetune_plot"]).read_bytes())
            results = {**results, "finetune_plot": "pretrained_finetune.png"}  # the copy next to the results
        atomic_write_json(docs / "pretrained.json", results)
        atomic_write_text(docs / "pretrained.md", text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory_worker":
        print(RESULT_MARKER + json.dumps(memory_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
