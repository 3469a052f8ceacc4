#!/usr/bin/env python
"""Fine-tune a pretrained standard model with `make_reversible` vs ordinary fine-tuning (issue 14's benchmark).

Candidates, on the checkpoints of `eval/pretrain_small.py` (English) fine-tuned on a shifted domain, the Spanish side
of `data/bible_mt` (Reina-Valera 1909), at equal steps and data order:

* `plain`: ordinary full fine-tuning (a);
* `ckpt`: the same with activation checkpointing (b);
* `rev`: `make_reversible(model)`, the default: heavy-ball coupling with gamma = +-1/32, five side bits (c);
* `rev_half`: `make_reversible(model, gamma=0.5)`, one side bit (the default before issue 20);
* `rev_quarter`: `make_reversible(model, gamma=0.25)`: heavy-ball with gamma = +-1/4, two side bits;
* optional: `bdia` (`coupling="bdia"`, gamma = +-1/32), `momentum` (`coupling="momentum"`, gamma = 1/2).

These are small models pretrained here (fast, no download). Real pretrained LLMs, with the massive activations the
small ones lack, are benchmarked by `eval/bench_pretrained.py` (SmolLM2-135M: fidelity in three domains and two
precisions, fine-tuning, memory against activation checkpointing by sequence length, tokens/s).

Reported per candidate:

* validation loss after fine-tuning, evaluated as a **plain transformers model**: every fine-tuned model is saved
  with `save_pretrained` and reloaded with `AutoModelForCausalLM` in a subprocess where `reformer_rev` cannot be
  imported;
* the step-0 training-mode loss vs the original's: how far the coupling moves the function (dropout switched off for
  this measurement so only the coupling differs, averaged over the validation blocks);
* tokens/s: the candidates train in lockstep (step i of each in turn, RNG state restored so they see the same dropout
  masks), each step timed in process CPU time, so the ratios come from the same run, interleaved;
* peak activation memory of one training step at depth 4 / 16 / 32 (random weights of the same widths, each in a
  fresh process, `reformer_rev.profiling`), its growth per layer and the depth-32 figure.

    python -m eval.pretrain_small --output_dir outputs/pretrained        # once, a few CPU minutes per model
    python -m eval.bench_convert --pretrained_dir outputs/pretrained     # results in outputs/bench_convert/
    python -m eval.bench_convert ... --write_docs                        # also docs/benchmarks/convert.{json,md}

Targets (issue 14): (c)'s validation loss within 1% of (a)'s; (c)'s memory growth per layer <= 1/10 of (a)'s and
(c) below (b) at depth 32; (c)'s tokens/s >= 0.75x (a)'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

from eval._bench_common import environment, fmt, least_squares, markdown_table
from eval.pretrain_small import cosine_lr, english_books, spanish_verses, token_blocks
from reformer_rev.safe_io import atomic_write_json, atomic_write_text

CANDIDATES = ("plain", "ckpt", "rev", "rev_half", "rev_quarter", "bdia", "momentum")
LABELS = {
    "plain": "(a) ordinary fine-tuning",
    "ckpt": "(b) ordinary + activation checkpointing",
    "rev": "(c) make_reversible(model), the default (heavy-ball, gamma +-1/32, 5 bits)",
    "rev_half": "make_reversible(gamma=0.5) (heavy-ball, 1 bit; the default before issue 20)",
    "rev_quarter": "make_reversible(gamma=0.25) (heavy-ball, 2 bits)",
    "bdia": "make_reversible(coupling='bdia'), gamma +-1/32",
    "momentum": "make_reversible(coupling='momentum'), gamma 1/2",
}
# Step-0 fidelity of more couplings than are fine-tuned: key -> (coupling, gamma, label).
FIDELITY_VARIANTS = {
    "heavy_ball": ("heavy_ball", 2.0**-5, "heavy-ball gamma=+-1/32 (5 bits), the default"),
    "heavy_ball_16": ("heavy_ball", 2.0**-4, "heavy-ball gamma=+-1/16 (4 bits)"),
    "heavy_ball_quarter": ("heavy_ball", 0.25, "heavy-ball gamma=+-1/4 (2 bits)"),
    "heavy_ball_half": ("heavy_ball", 0.5, "heavy-ball gamma=+-1/2 (1 bit), the default before issue 20"),
    "bdia": ("bdia", 2.0**-5, "BDIA gamma=+-1/32 (5 bits)"),
    "momentum": ("momentum", 0.5, "momentum gamma=1/2 (1.23 bits), deterministic"),
}
RESULT_MARKER = "@@CONVERT_RESULT@@"


# --------------------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------------------


def prepare(model, candidate: str):
    """Turn a loaded model into one candidate (same object)."""
    from reformer_rev import make_reversible

    if candidate == "ckpt":
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers 5.x name; `gradient_checkpointing_enable` is its deprecated alias
            enable({"use_reentrant": False})
        else:  # pragma: no cover - older releases
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif candidate == "rev":
        make_reversible(model)
    elif candidate == "rev_half":
        make_reversible(model, gamma=0.5)
    elif candidate == "rev_quarter":
        make_reversible(model, gamma=0.25)
    elif candidate == "bdia":
        make_reversible(model, coupling="bdia")
    elif candidate == "momentum":
        make_reversible(model, coupling="momentum", gamma=0.5)
    elif candidate != "plain":
        raise ValueError(f"unknown candidate {candidate!r}; choose from {CANDIDATES}")
    return model.train()


def without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout",):  # Llama-family attention applies a float, not a module
        for module in model.modules():
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def train_mode_loss(model, blocks: torch.Tensor, batch_size: int, seed: int) -> float:
    """Mean loss in training mode with gradients enabled (the converted stack runs its coupling), no backward."""
    model.train()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    with torch.enable_grad():
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            total += model(input_ids=batch, labels=batch).loss.item() * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    return total / count


def step0_fidelity(path: str, domains: dict[str, torch.Tensor], batch_size: int, seed: int) -> dict[str, Any]:
    """Training-mode loss of the pretrained model with each coupling vs the original's, per domain (dropout off)."""
    from transformers import AutoModelForCausalLM

    from eval.pretrain_small import mean_loss
    from reformer_rev import make_reversible

    original = without_dropout(AutoModelForCausalLM.from_pretrained(path))
    variants = {"original": original}
    for key, (coupling, gamma, _) in FIDELITY_VARIANTS.items():
        variants[key] = make_reversible(copy.deepcopy(original), coupling=coupling, gamma=gamma)
    out = {}
    for domain, blocks in domains.items():
        losses = {key: train_mode_loss(model, blocks, batch_size, seed) for key, model in variants.items()}
        out[domain] = {
            "blocks": len(blocks),
            "eval_loss": mean_loss(original, blocks, batch_size),
            "train_mode_loss": losses,
            "relative_change": {k: v / losses["original"] - 1 for k, v in losses.items()},
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning in lockstep
# --------------------------------------------------------------------------------------------------------------

_PLAIN_EVAL = textwrap.dedent(
    """
    import json, sys
    sys.modules["reformer_rev"] = None  # the checkpoint must load with stock transformers alone
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(int(sys.argv[3]))
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    blocks = torch.load(sys.argv[2])
    total = count = 0
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            b = blocks[i : i + 8]
            total += model(input_ids=b, labels=b).loss.item() * b[:, 1:].numel()
            count += b[:, 1:].numel()
    print(json.dumps({"class": type(model).__name__, "loss": total / count}))
    """
)


def plain_eval(checkpoint: Path, blocks_file: Path, threads: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _PLAIN_EVAL, str(checkpoint), str(blocks_file), str(threads)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"plain evaluation of {checkpoint} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_in_lockstep(
    models: dict[str, torch.nn.Module], train: torch.Tensor, args, label: str, log_every: int = 25
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`args.steps` AdamW steps of every candidate on the same batches, each step from the same RNG state (so the same
    dropout masks), cosine schedule. Returns the per-step training losses and the process CPU seconds per candidate."""
    # foreach=False: the same update arithmetic for every candidate, no depth-scaled temporaries.
    opts = {c: torch.optim.AdamW(m.parameters(), lr=args.learning_rate, weight_decay=0.0, foreach=False)
            for c, m in models.items()}
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)
    cpu = {c: 0.0 for c in models}
    losses: dict[str, list[float]] = {c: [] for c in models}
    torch.manual_seed(args.seed)
    for step in range(args.steps):
        idx = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(train)]
        batch = train[idx]
        lr = cosine_lr(step, args.steps, args.learning_rate, warmup=args.warmup_steps)
        state = torch.get_rng_state()
        for cand, model in models.items():
            torch.set_rng_state(state)  # every candidate starts the step from the same RNG state
            for group in opts[cand].param_groups:
                group["lr"] = lr
            start = time.process_time()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[cand].step()
            opts[cand].zero_grad(set_to_none=True)
            cpu[cand] += time.process_time() - start
            losses[cand].append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"[{label}] step {step + 1}/{args.steps}: " + ", ".join(f"{c} {losses[c][-1]:.3f}" for c in models),
                  flush=True)
    return losses, cpu


def finetune(family: str, path: str, train: torch.Tensor, valid_file: Path, args) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    models = {cand: prepare(AutoModelForCausalLM.from_pretrained(path), cand) for cand in args.candidates}
    losses, cpu = train_in_lockstep(models, train, args, family)
    tokens = args.steps * args.batch_size * train.shape[1]
    results = {}
    for cand, model in models.items():
        out = Path(args.output_dir) / "finetuned" / family / cand
        model.save_pretrained(out)
        evaluated = plain_eval(out, valid_file, args.threads)
        results[cand] = {
            "validation_loss_plain_reload": evaluated["loss"],
            "reloaded_class": evaluated["class"],
            "first_train_loss": losses[cand][0],
            "last_train_loss_mean10": sum(losses[cand][-10:]) / len(losses[cand][-10:]),
            "cpu_seconds": cpu[cand],
            "tokens_per_cpu_second": tokens / cpu[cand],
            "checkpoint": str(out),
        }
    base = results["plain"]
    for r in results.values():
        r["validation_loss_vs_plain"] = r["validation_loss_plain_reload"] / base["validation_loss_plain_reload"] - 1
        r["speed_vs_plain"] = r["tokens_per_cpu_second"] / base["tokens_per_cpu_second"]
    return {"steps": args.steps, "tokens": tokens, "candidates": results}


# --------------------------------------------------------------------------------------------------------------
# Activation memory (fresh process per point)
# --------------------------------------------------------------------------------------------------------------


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from reformer_rev.profiling import peak_allocated_bytes

    torch.set_num_threads(spec["threads"])
    config = AutoConfig.from_pretrained(spec["path"])
    config.num_hidden_layers = spec["depth"]
    torch.manual_seed(0)
    model = prepare(AutoModelForCausalLM.from_config(config), spec["candidate"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=g)

    def step() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: only activations are measured

    step()  # warm-up: gradients and optimizer state exist before the measured step
    return {**spec, "peak_activation_bytes": peak_allocated_bytes(step)}


def measure_memory(family: str, path: str, args) -> dict[str, Any]:
    points: dict[str, dict[int, float]] = {}
    for cand in args.memory_candidates:
        points[cand] = {}
        for depth in args.memory_depths:
            spec = dict(path=path, candidate=cand, depth=depth, batch_size=args.memory_batch_size,
                        seq_len=args.seq_len, threads=args.threads)
            proc = subprocess.run([sys.executable, "-m", "eval.bench_convert", "--memory_worker", json.dumps(spec)], cwd=REPO,
                                  capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_MARKER)), None)
            if line is None:
                raise RuntimeError(f"memory worker failed ({family}, {cand}, depth {depth}):\n{proc.stderr[-3000:]}")
            mb = json.loads(line[len(RESULT_MARKER) :])["peak_activation_bytes"] / 2**20
            points[cand][depth] = mb
            print(f"[{family}] memory {cand} depth {depth}: {mb:.1f} MB", flush=True)
    slopes = {c: least_squares(list(p), list(p.values()))[0] for c, p in points.items()}
    return {
        "batch_size": args.memory_batch_size, "seq_len": args.seq_len,
        "peak_activation_mb": {c: {str(d): v for d, v in p.items()} for c, p in points.items()},
        "growth_mb_per_layer": slopes,
    }


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    lines = [f"Fine-tuning on Spanish (RV1909) from English checkpoints; {results['environment']['date_utc']} UTC, "
             f"torch {results['environment']['torch']}, transformers {results['environment']['transformers']}, "
             f"{results['settings']['threads']} thread(s).\n"]
    for family, res in results["families"].items():
        pre = res.get("pretrain", {})
        lines.append(f"\n### {family} ({pre.get('class', '?')}, {pre.get('num_parameters', 0) / 1e6:.1f} M parameters, "
                     f"{pre.get('num_layers', '?')} layers, pretrained {pre.get('seconds', 0) / 60:.1f} min on "
                     f"{pre.get('tokens', 0) / 1e6:.2f} M English tokens)\n")
        if "finetune" in res:
            ft = res["finetune"]
            mem = res.get("memory", {})
            rows = []
            for cand, r in ft["candidates"].items():
                slope = mem.get("growth_mb_per_layer", {}).get(cand)
                at32 = mem.get("peak_activation_mb", {}).get(cand, {}).get("32")
                rows.append([
                    LABELS[cand], f"{r['validation_loss_plain_reload']:.4f}", f"{100 * r['validation_loss_vs_plain']:+.2f}%",
                    f"{r['first_train_loss']:.4f}", fmt(slope, 2), fmt(at32, 1), f"{r['speed_vs_plain']:.2f}x",
                ])
            lines.append(f"{ft['steps']} steps x {results['settings']['batch_size']} x {results['settings']['seq_len']} "
                         f"tokens, same data order and dropout masks; validation: plain reload, "
                         f"{results['settings']['valid_blocks']} Spanish validation blocks.\n")
            lines.append(markdown_table(
                ["candidate", "val loss (plain reload)", "vs (a)", "step-0 train loss", "act. MB / layer",
                 "act. MB @ depth 32", "tokens/s vs (a)"], rows))
        if "memory" in res:
            mem = res["memory"]
            depths = sorted({int(d) for p in mem["peak_activation_mb"].values() for d in p})
            rows = [[LABELS[c]] + [fmt(p.get(str(d)), 1) for d in depths] + [fmt(mem["growth_mb_per_layer"][c], 3)]
                    for c, p in mem["peak_activation_mb"].items()]
            lines.append(f"\nPeak activation memory of one training step (MB), batch {mem['batch_size']} x "
                         f"{mem['seq_len']}, random weights:\n")
            lines.append(markdown_table(["candidate"] + [f"depth {d}" for d in depths] + ["MB / layer"], rows))
        if "fidelity" in res:
            fid = res["fidelity"]
            domains = list(fid)
            rows = [["original, eval mode"] + sum(([f"{fid[d]['eval_loss']:.4f}", "–"] for d in domains), [])]
            rows.append(["original, training mode"] + sum(
                ([f"{fid[d]['train_mode_loss']['original']:.4f}", "0"] for d in domains), []))
            for key, (_, _, label) in FIDELITY_VARIANTS.items():
                rows.append([label] + sum(([f"{fid[d]['train_mode_loss'][key]:.4f}",
                                            f"{100 * fid[d]['relative_change'][key]:+.2f}%"] for d in domains), []))
            sizes = ", ".join(f"{fid[d]['blocks']} {d} validation blocks" for d in domains)
            lines.append("\nStep-0 training-mode loss of the pretrained model (dropout off, so only the coupling "
                         f"differs; {sizes}):\n")
            lines.append(markdown_table(["function"] + sum(([f"{d} loss", "vs original"] for d in domains), []), rows))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_dir", default="outputs/pretrained",
                   help="Folder with one checkpoint per family (eval/pretrain_small.py).")
    p.add_argument("--model_name_or_path", action="append", default=[], metavar="FAMILY=PATH_OR_HUB_ID",
                   help="Override one family's checkpoint (a local folder or a Hub id).")
    p.add_argument("--families", default="llama,gpt2")
    p.add_argument("--candidates", default="plain,ckpt,rev", help=f"Fine-tuned candidates, from {CANDIDATES}.")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--valid_blocks", type=int, default=256, help="Spanish validation blocks evaluated (0 = all).")
    p.add_argument("--fidelity_blocks", type=int, default=64, help="Validation blocks per domain for step 0.")
    p.add_argument("--max_train_verses", type=int, default=0, help="Use only the first N Spanish verses (0 = all).")
    p.add_argument("--memory_depths", default="4,16,32")
    p.add_argument("--memory_batch_size", type=int, default=4)
    p.add_argument("--memory_candidates", default="plain,ckpt,rev")
    p.add_argument("--skip", default="", help="Comma-separated sections to skip: fidelity, finetune, memory.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-time ratios are not skewed by load).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/bench_convert")
    p.add_argument("--write_docs", action="store_true", help="Also write docs/benchmarks/convert.{json,md}.")
    p.add_argument("--merge_results", default="", metavar="RESULTS_JSON,...",
                   help="Run nothing: join the families of earlier runs' results.json files (e.g. one process per "
                        "family, run side by side) into one report under --output_dir (and docs with --write_docs).")
    args = p.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.candidates = [c for c in args.candidates.split(",") if c]
    args.memory_candidates = [c for c in args.memory_candidates.split(",") if c]
    for name in ("candidates", "memory_candidates"):
        bad = [c for c in getattr(args, name) if c not in CANDIDATES]
        if bad or not getattr(args, name):
            p.error(f"--{name} must be a comma-separated subset of {CANDIDATES}, got {bad}")
    if "plain" not in args.candidates:
        p.error("--candidates must include 'plain' (the baseline of every ratio)")
    args.memory_depths = [int(d) for d in args.memory_depths.split(",") if d]
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - {"fidelity", "finetune", "memory"}:
        p.error(f"--skip takes fidelity, finetune, memory; got {sorted(args.skip)}")
    paths = {f: str(Path(args.pretrained_dir) / f) for f in args.families}
    for item in args.model_name_or_path:
        family, _, where = item.partition("=")
        if not where:
            p.error(f"--model_name_or_path takes FAMILY=PATH_OR_HUB_ID, got {item!r}")
        paths[family] = where
    args.paths = paths
    return args


def merge_results(paths: list[str]) -> dict[str, Any]:
    """One results dict with the families of several runs.

    The batch, schedule and memory settings must agree; the number of steps and the candidates may differ per family
    (each family's `finetune` records its own steps, and every ratio is within one family's run)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    compared = ("batch_size", "seq_len", "learning_rate", "warmup_steps", "memory_depths", "memory_batch_size",
                "threads", "seed")
    for path, run in zip(paths[1:], runs[1:]):
        differ = [k for k in compared if run["settings"].get(k) != runs[0]["settings"].get(k)]
        if differ:
            raise ValueError(f"--merge_results: {path} differs from {paths[0]} in {differ}")
    merged = copy.deepcopy(runs[0])
    merged["settings"]["merged_from"] = list(paths)
    for run in runs[1:]:
        merged["families"].update(run["families"])
    merged["settings"]["families"] = list(merged["families"])
    return merged


def write_report(results: dict[str, Any], out_dir: Path, write_docs: bool) -> str:
    text = report(results)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", text + "\n")
    if write_docs:
        atomic_write_json(REPO / "docs" / "benchmarks" / "convert.json", results)
        atomic_write_text(REPO / "docs" / "benchmarks" / "convert.md", text + "\n")
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge_results:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = merge_results([x for x in args.merge_results.split(",") if x])
        print(write_report(results, out_dir, args.write_docs))
        return results
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(), "settings": {
        k: v for k, v in vars(args).items() if k not in ("skip",) and not callable(v)}, "families": {}}
    results["settings"]["skip"] = sorted(args.skip)
    train_text, valid_text = spanish_verses("train"), spanish_verses("validation")
    if args.max_train_verses:
        train_text = train_text[: args.max_train_verses]
    for family in args.families:
        path = args.paths[family]
        tokenizer = AutoTokenizer.from_pretrained(path)
        train = token_blocks(tokenizer, train_text, args.seq_len, separator=" ")
        valid = token_blocks(tokenizer, valid_text, args.seq_len, separator=" ")
        valid = valid[: args.valid_blocks] if args.valid_blocks else valid
        results["settings"]["valid_blocks"] = len(valid)
        valid_file = out_dir / f"valid_blocks_{family}.pt"
        torch.save(valid, valid_file)
        res: dict[str, Any] = {"path": path}
        pre = Path(path) / "pretrain.json"
        if pre.is_file():
            res["pretrain"] = json.loads(pre.read_text())
        if "fidelity" not in args.skip:
            # In the pretraining domain (where the model is good, so perturbations show) and in the target domain.
            english = token_blocks(tokenizer, english_books("validation"), args.seq_len)
            domains = {"English": english[: args.fidelity_blocks], "Spanish": valid[: args.fidelity_blocks]}
            res["fidelity"] = step0_fidelity(path, domains, args.batch_size, args.seed)
            print(f"[{family}] step-0 fidelity: {json.dumps(res['fidelity'])}", flush=True)
        if "finetune" not in args.skip:
            res["finetune"] = finetune(family, path, train, valid_file, args)
        if "memory" not in args.skip:
            res["memory"] = measure_memory(family, path, args)
        results["families"][family] = res
        atomic_write_json(out_dir / "results.json", results)
    print(write_report(results, out_dir, args.write_docs))
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory_worker":
        print(RESULT_MARKER + json.dumps(memory_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
