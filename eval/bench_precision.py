"""Mixed precision without drift: gradients of the reversible stack under bf16 vs the float64 truth.

For each depth, a byte-level reversible LM (hidden 64) is trained for a few AdamW steps under bf16 autocast on the
bundled English text (trained weights drift far more than random ones: block 0's input is the small embedding,
recovered by subtracting large branch outputs). Then, at those weights and on a fresh batch, the gradients of one
training step are compared with the float64 truth (the plain-autograd twin in float64), for:

* `reversible (default)`: the library default (`exact_reversal="auto"`: exact fixed-point streams under half
  precision);
* `reversible (float streams)`: `exact_reversal=False`, the previous default;
* `twin (plain autograd)`: the same modules under ordinary autograd with float streams -- the reference error of bf16
  itself.

Both under bf16 autocast with fp32 weights and with the whole model cast to bf16 (`model.to(torch.bfloat16)`).
The same is measured for standard `transformers` models made reversible with `reformer_rev.make_reversible`
(`LlamaForCausalLM`, `GPT2LMHeadModel`): the plain model is trained the same way (a stand-in for a pretrained
checkpoint), then converted; the truth is `make_reversible(model, reversible=False)` in float64 with the same
training-time coupling signs (seeded), and the twin is that conversion in bf16. Converted stacks are always exact
(fixed point, `fixed_point_bits=40`), so they have no float-streams column.

The cost part measures one training step's activation memory (profiler) and tokens/s of the exact default against
float streams, interleaved in the same run; the monitor part records what the drift monitor says on the float path.

    python -m eval.bench_precision                      # writes outputs/precision/
    python -m eval.bench_precision --update_docs        # also docs/precision.json and docs/precision_table.md
    python -m eval.bench_precision --models llama gpt2 --resume   # add rows to an existing outputs/precision run
    python -m eval.bench_precision --models --resume --include other/precision.json --update_docs  # merge runs
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from reformer_rev import RevFormerConfig, RevFormerForCausalLM, RevFormerForConditionalGeneration, make_reversible
from reformer_rev.profiling import peak_allocated_bytes
from reformer_rev.safe_io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "bible_lm" / "validation.jsonl.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--depths", nargs="+", type=int, default=[12, 48, 96])
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--train_steps", type=int, default=30)
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--cost_depth", type=int, default=48)
    p.add_argument("--cost_seq_len", type=int, default=512)
    p.add_argument("--cost_rounds", type=int, default=7)
    p.add_argument("--skip_cost", action="store_true", help="skip the cost and drift-monitor parts")
    p.add_argument("--resume", action="store_true",
                   help="start from output_dir/precision.json: keep its results, measure only what is missing")
    p.add_argument("--include", nargs="*", type=Path, default=[],
                   help="results files of other runs (e.g. run in parallel) whose measurements are added to this one")
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "precision")
    p.add_argument("--update_docs", action="store_true",
                   help="also write docs/precision.json and docs/precision_table.md")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------


def corpus_batches(batch_size: int, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    """`n` batches `(batch, seq)` of byte ids cut at random offsets from the bundled English validation text."""
    with gzip.open(CORPUS, "rt") as f:
        text = "".join(json.loads(line)["text"] for line, _ in zip(f, range(200)))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (n, batch_size), generator=g)
    return torch.stack([torch.stack([data[s : s + seq_len] for s in row]) for row in starts])


def lm_config(depth: int, hidden: int, **overrides: Any) -> RevFormerConfig:
    kwargs = dict(
        vocab_size=256, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=4,
        intermediate_size=2 * hidden, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
    )
    kwargs.update(overrides)
    return RevFormerConfig(**kwargs)


def seq2seq_config(depth: int, hidden: int, **overrides: Any) -> RevFormerConfig:
    return lm_config(depth, hidden, is_encoder_decoder=True, encoder_layers=depth // 2, decoder_layers=depth // 2,
                     decoder_start_token_id=1, **overrides)


def llama_config(depth: int, hidden: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=depth,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attention_dropout=0.0, use_cache=False,
    )


def gpt2_config(depth: int, hidden: int) -> GPT2Config:
    # Untied head: the embedding's gradient then comes only through the stack (a tied one would be dominated by the
    # head's own gradient, which the reversal never touches). Dropout off, as for the other models.
    return GPT2Config(
        vocab_size=256, n_embd=hidden, n_layer=depth, n_head=4, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, use_cache=False,
    )


@dataclass(frozen=True)
class Family:
    """One model family of the table: how to build it and which gradients to compare.

    A *variant* is a dict: for RevFormer models, config overrides (`reversible`, `exact_reversal`); for standard
    `transformers` models (`converted=True`), the keyword arguments of `make_reversible`, or `None` for the plain,
    unconverted model (what a pretrained checkpoint is trained as).
    """

    name: str
    model_class: type
    make_config: Callable[..., Any]
    groups: dict[str, str]
    converted: bool = False

    def build(self, depth: int, hidden: int, variant: dict[str, Any] | None) -> torch.nn.Module:
        if not self.converted:
            return self.model_class(self.make_config(depth, hidden, **(variant or {})))
        model = self.model_class(self.make_config(depth, hidden))
        return model if variant is None else make_reversible(model, **variant)

    @property
    def train_variant(self) -> dict[str, Any] | None:
        """The model the weights are trained as: the plain twin, or the unconverted standard model."""
        return None if self.converted else dict(reversible=False, exact_reversal=False)

    @property
    def truth_variant(self) -> dict[str, Any]:
        """Run in float64: the plain-autograd twin of the very function the candidates compute."""
        return dict(reversible=False) if self.converted else dict(reversible=False, exact_reversal=False)

    @property
    def candidates(self) -> dict[str, tuple[dict[str, Any], torch.dtype, bool]]:
        """`name -> (variant, weight dtype, bf16 autocast)`."""
        if self.converted:  # a converted stack is always exact: no float-streams candidate
            return {
                "reversible (default), bf16 autocast": (dict(reversible=True), torch.float32, True),
                "twin (plain autograd), bf16 autocast": (dict(reversible=False), torch.float32, True),
                "reversible (default), bf16 weights": (dict(reversible=True), torch.bfloat16, False),
                "twin (plain autograd), bf16 weights": (dict(reversible=False), torch.bfloat16, False),
            }
        return {
            "reversible (default), bf16 autocast": (dict(reversible=True), torch.float32, True),
            "reversible (float streams), bf16 autocast": (dict(reversible=True, exact_reversal=False), torch.float32, True),
            "twin (plain autograd), bf16 autocast": (dict(reversible=False, exact_reversal=False), torch.float32, True),
            "reversible (default), bf16 weights": (dict(reversible=True), torch.bfloat16, False),
            "twin (plain autograd), bf16 weights": (dict(reversible=False, exact_reversal=False), torch.bfloat16, False),
        }


LM_GROUPS = {"input embedding": "model.embed_tokens.", "layer 0": "model.layers.0."}
S2S_GROUPS = {"shared embedding": "model.encoder.embed_tokens.", "encoder layer 0": "model.encoder.layers.0.",
              "decoder layer 0": "model.decoder.layers.0."}
GPT2_GROUPS = {"input embedding": "transformer.wte.", "layer 0": "transformer.h.0."}

FAMILIES = {
    "causal_lm": Family("causal LM", RevFormerForCausalLM, lm_config, LM_GROUPS),
    "encoder_decoder": Family("encoder-decoder", RevFormerForConditionalGeneration, seq2seq_config, S2S_GROUPS),
    "llama": Family("Llama + make_reversible", LlamaForCausalLM, llama_config, LM_GROUPS, converted=True),
    "gpt2": Family("GPT-2 + make_reversible", GPT2LMHeadModel, gpt2_config, GPT2_GROUPS, converted=True),
}
CANDIDATE_ORDER = list(FAMILIES["causal_lm"].candidates)


def _step_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, labels=ids.flip(1)).loss
    return model(ids, labels=ids).loss


def trained_state(family: Family, depth: int, hidden: int, batches: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """Weights after `len(batches)` AdamW steps under bf16 autocast, trained as `family.train_variant` (plain
    autograd: the error is measured later)."""
    torch.manual_seed(0)
    model = family.build(depth, hidden, family.train_variant)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _step_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def gradients(family: Family, depth: int, hidden: int, variant: dict[str, Any] | None, state, ids, *,
              dtype=torch.float32, autocast=False, seed=7) -> dict[str, torch.Tensor]:
    """Gradients of one training step (dropout off: the comparison is about arithmetic, not sampling; the seed fixes
    the training-time signs of a converted model's coupling, the same in every candidate)."""
    model = family.build(depth, hidden, variant)
    model.load_state_dict(state)
    model.to(dtype).train()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = _step_loss(model, ids)
    loss.backward()
    return {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(grads: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], groups: dict[str, str]) -> dict[str, float]:
    """Relative error `||g - g*|| / ||g*||` of each group of parameters (name prefix), concatenated."""
    out = {}
    for label, prefix in groups.items():
        names = [n for n in truth if n.startswith(prefix)]
        g = torch.cat([grads[n].flatten() for n in names])
        t = torch.cat([truth[n].flatten() for n in names])
        out[label] = ((g - t).norm() / t.norm()).item()
    return out


def precision_table(family: Family, depth: int, args: argparse.Namespace) -> dict:
    """Errors vs the float64 truth for every candidate at one depth."""
    batches = corpus_batches(args.batch_size, args.seq_len, args.train_steps + 1)
    state = trained_state(family, depth, args.hidden_size, batches[:-1], args.learning_rate)
    ids = batches[-1]
    truth = gradients(family, depth, args.hidden_size, family.truth_variant, state, ids, dtype=torch.float64)
    rows = {}
    for name, (variant, dtype, autocast) in family.candidates.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the float path's drift warning: measured separately
            grads = gradients(family, depth, args.hidden_size, variant, state, ids, dtype=dtype, autocast=autocast)
        rows[name] = grad_errors(grads, truth, family.groups)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Cost of the exact default, and the monitor
# --------------------------------------------------------------------------------------------------------------


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Activation memory and tokens/s of a bf16-autocast training step: exact default vs float streams."""
    ids = corpus_batches(args.batch_size, args.cost_seq_len, 1)[0]
    models = {}
    for name, exact in (("exact (default)", "auto"), ("float streams", False)):
        torch.manual_seed(0)
        model = RevFormerForCausalLM(lm_config(args.cost_depth, args.hidden_size, exact_reversal=exact,
                                               chunk_size_feed_forward=128, loss_chunk_size=256))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        models[name] = (model, opt)

    def step(model, opt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    out: dict[str, Any] = {"depth": args.cost_depth, "seq_len": args.cost_seq_len, "batch_size": args.batch_size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, (model, opt) in models.items():
            step(model, opt)  # warm-up: optimizer state and gradient buffers exist before measuring
            out.setdefault("peak_activation_mb", {})[name] = peak_allocated_bytes(lambda: step(model, opt)) / 2**20
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.cost_rounds):  # interleaved: both candidates see the same machine load
            for name, (model, opt) in models.items():
                t0 = time.process_time()
                step(model, opt)
                times[name].append(time.process_time() - t0)
    tokens = ids.numel()
    # Fastest round of each: on a shared machine load only ever adds time, so the minimum is the least noisy.
    out["tokens_per_cpu_second"] = {name: tokens / min(t) for name, t in times.items()}
    out["speed_ratio_exact_vs_float"] = (
        out["tokens_per_cpu_second"]["exact (default)"] / out["tokens_per_cpu_second"]["float streams"]
    )
    stream_mb = 2 * ids.numel() * args.hidden_size * 8 / 2**20
    out["int64_stream_storage_mb"] = stream_mb
    return out


def monitor_demo(args: argparse.Namespace, depth: int = 48) -> dict[str, Any]:
    """What the drift monitor says on a deliberately drifting configuration (float streams, bf16, trained)."""
    batches = corpus_batches(args.batch_size, args.seq_len, args.train_steps + 1)
    family = FAMILIES["causal_lm"]
    state = trained_state(family, depth, args.hidden_size, batches[:-1], args.learning_rate)
    from reformer_rev.reversible import default_drift_monitor

    default_drift_monitor.__init__()  # a fresh monitor: its first calls are always probed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradients(family, depth, args.hidden_size, dict(exact_reversal=False), state, batches[-1], autocast=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return {"depth": depth, "rel_err": default_drift_monitor.last, "warning": messages[0] if messages else None}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def target_misses(results: dict[str, Any], min_depth: int = 48, factor: float = 2.0) -> list[str]:
    """Rows where the default's error exceeds `factor` times the twin's (same precision setting), at depth >=
    `min_depth` (issue 17's target)."""
    misses = []
    for model_name, by_depth in results["errors"].items():
        for depth, rows in by_depth.items():
            if int(depth) < min_depth:
                continue
            for setting in ("bf16 autocast", "bf16 weights"):
                default, twin = rows[f"reversible (default), {setting}"], rows[f"twin (plain autograd), {setting}"]
                for group, err in default.items():
                    if err > factor * twin[group]:
                        misses.append(f"{model_name}, depth {depth}, {setting}, {group}: "
                                      f"{100 * err:.2f}% vs twin {100 * twin[group]:.2f}%")
    return misses


def render_markdown(results: dict[str, Any]) -> str:
    candidates = [c for c in CANDIDATE_ORDER if c in results["candidates"]]
    lines = ["| model | depth | gradient of | " + " | ".join(candidates) + " |",
             "|---|---|---|" + "---|" * len(candidates)]
    order = [f.name for f in FAMILIES.values()]
    for model_name in sorted(results["errors"], key=lambda n: order.index(n) if n in order else len(order)):
        by_depth = results["errors"][model_name]
        for depth in sorted(by_depth, key=int):
            rows = by_depth[depth]
            groups = next(iter(rows.values())).keys()
            for group in groups:
                cells = [f"{100 * rows[c][group]:.2f}%" if c in rows else "n/a" for c in candidates]
                lines.append(f"| {model_name} | {depth} | {group} | " + " | ".join(cells) + " |")
    misses = target_misses(results)
    lines += ["", "Target (default error <= 2x the twin's at depth >= 48): "
              + ("met in every row." if not misses else "missed in " + "; ".join(misses) + ".")]
    c = results.get("cost")
    if c:
        lines += ["", f"Cost at depth {c['depth']}, seq {c['seq_len']}, batch {c['batch_size']}, bf16 autocast "
                  "(one training step, profiler peak; tokens per CPU-second, fastest of interleaved rounds):", "",
                  "| streams | peak activation MB | tokens/CPU-s |", "|---|---|---|"]
        for name in c["peak_activation_mb"]:
            lines.append(f"| {name} | {c['peak_activation_mb'][name]:.1f} | {c['tokens_per_cpu_second'][name]:.0f} |")
        lines.append(f"\nexact / float speed ratio: {c['speed_ratio_exact_vs_float']:.2f}")
    m = results.get("monitor")
    if m:
        lines += ["", f"Drift monitor on float streams, depth {m['depth']}, bf16 autocast, trained weights: "
                  f"relative reconstruction error {m['rel_err']:.3g}.", "", f"> {m['warning']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "precision.json"
    results: dict[str, Any] = {"errors": {}, "candidates": []}
    if args.resume and path.exists():
        results.update(json.loads(path.read_text()))
    for other in map(json.loads, (f.read_text() for f in args.include)):
        for model_name, by_depth in other.get("errors", {}).items():
            for depth, rows in by_depth.items():
                results["errors"].setdefault(model_name, {}).setdefault(depth, rows)
        results["candidates"] = [c for c in CANDIDATE_ORDER if c in {*results["candidates"], *other.get("candidates", [])}]
        for part in ("cost", "monitor"):
            if part in other:
                results.setdefault(part, other[part])
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    for key in args.models:
        family = FAMILIES[key]
        done = results["errors"].setdefault(family.name, {})
        for depth in args.depths:
            if str(depth) in done:  # --resume: measured already (JSON keys are strings)
                continue
            t0 = time.time()
            rows = precision_table(family, depth, args)
            done[str(depth)] = rows
            results["candidates"] = [c for c in CANDIDATE_ORDER if c in {*results["candidates"], *rows}]
            print(f"{family.name} depth {depth} ({time.time() - t0:.0f} s):", flush=True)
            for cand, errs in rows.items():
                print("  " + cand + ": " + ", ".join(f"{g} {100 * e:.2f}%" for g, e in errs.items()), flush=True)
            atomic_write_json(path, results)
    if not args.skip_cost:
        if "cost" not in results:
            results["cost"] = cost(args)
            atomic_write_json(path, results)
        if "monitor" not in results:
            results["monitor"] = monitor_demo(args)
    text = render_markdown(results)
    print(text)
    atomic_write_json(path, results)
    atomic_write_text(args.output_dir / "precision.md", text)
    if args.update_docs:
        atomic_write_json(ROOT / "docs" / "precision.json", results)
        atomic_write_text(ROOT / "docs" / "precision_table.md", text)
    return results


if __name__ == "__main__":
    main()
