"""Arbitrary depth: reconstruction drift vs depth for every coupling, and a 1,024-layer model in the memory of 2.

Three parts (`--part`), each writing JSON as it goes (nothing is lost if a run dies) and a markdown table:

* `drift`: relative reconstruction error of the stack's input after reversing `depth` blocks (32 ... 1,024), for every
  coupling, fp32 and bf16 autocast, float and exact (int64 fixed point) streams, plus the float drift guard
  (`checkpoint_every`). Real RevFormer blocks (attention + gated FFN, dropout 0.1) at PyTorch's default
  initialisation, whose branch outputs are O(1): a stress case, trained models behave alike.
* `memory`: profiler peak activation memory of one training step (docs/design.md §7: warm-up step first,
  `foreach=False`, `zero_grad(set_to_none=False)`) at depth 2 and depth 1,024, same width and batch.
* `train`: a 1,024-layer small-width byte-level LM trained on the bundled Bible corpus (`data/bible_lm`), loss on a
  fixed validation batch before and after.

    python -m eval.bench_depth --part all --output_dir outputs/depth
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.couplings import SUPPORTED_COUPLINGS, DriftReport, make_coupling
from reformer_rev.model_inputs import rotary_tables
from reformer_rev.modeling_reformer_rev import RevFormerBlock
from reformer_rev.profiling import peak_allocated_bytes
from reformer_rev.reversible import run_reversible_stack
from reformer_rev.safe_io import atomic_write_json, atomic_write_text
from reformer_rev.training.cli import config_from_args
from reformer_rev.training.corpus import load_corpus_bytes

ROOT = Path(__file__).resolve().parents[1]
# RevFormerConfig fields of the trained / memory-measured models that come from the command line.
TRAIN_CONFIG_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "coupling_step_size", "momentum_gamma",
                       "fixed_point_scale_bits", "branch_scale")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("drift", "memory", "train", "all"), default="all")
    p.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "depth")
    p.add_argument("--couplings", nargs="+", default=list(SUPPORTED_COUPLINGS), choices=SUPPORTED_COUPLINGS)
    p.add_argument("--depths", nargs="+", type=int, default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--drift_hidden_size", type=int, default=32)
    p.add_argument("--drift_seq_len", type=int, default=32)
    p.add_argument("--checkpoint_every", type=int, default=16, help="drift guard interval measured at the top depth")
    p.add_argument("--coupling_step_size", type=float, default=1.0)
    p.add_argument("--momentum_gamma", type=float, default=0.9)
    p.add_argument("--fixed_point_scale_bits", type=int, default=32)
    p.add_argument("--train_depth", type=int, default=1024)
    p.add_argument("--hidden_size", type=int, default=32)
    p.add_argument("--num_attention_heads", type=int, default=2)
    p.add_argument("--intermediate_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=40)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--train_coupling", default="additive", choices=SUPPORTED_COUPLINGS)
    p.add_argument("--train_exact", action="store_true", default=True)
    p.add_argument("--train_float", dest="train_exact", action="store_false")
    p.add_argument("--branch_scale", default="learnable_gate", choices=("none", "inv_sqrt_depth", "learnable_gate"))
    p.add_argument("--profiler_max_depth", type=int, default=16, help="deepest stack measured with the profiler")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; >1 on a shared machine can be 100x slower")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc)
    except ImportError:  # pragma: no cover
        return iterable


# --------------------------------------------------------------------------------------------------------------
# Drift vs depth
# --------------------------------------------------------------------------------------------------------------


def drift_one(blocks, static, coupling, bits, bf16, checkpoint_every, hidden, seq, seed) -> dict[str, Any]:
    c = make_coupling(coupling, step_size=bench_args.coupling_step_size, gamma=bench_args.momentum_gamma)
    x = torch.randn(1, seq, hidden, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    report = DriftReport(per_block=checkpoint_every == 0)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y1, y2 = run_reversible_stack(
            blocks, *c.init_streams(x), coupling=c, fixed_point_bits=bits, static_kwargs=static,
            checkpoint_every=checkpoint_every, drift_report=report,
        )
    out_norm = c.merge_streams(y1, y2).detach().norm().item()
    c.merge_streams(y1, y2).square().mean().backward()
    entries = report.blocks or report.checkpoints
    return {
        "input_rel_err": entries[0].rel_err,  # block 0: reconstructed through every block
        "max_rel_err": report.max_rel_err(),
        "bit_exact": report.all_bit_exact(),
        "output_norm_ratio": out_norm / x.norm().item(),
        "seconds": time.perf_counter() - start,
    }


def run_drift(args: argparse.Namespace) -> dict[str, Any]:
    depth_max = max(args.depths)
    config = RevFormerConfig(
        vocab_size=32, hidden_size=args.drift_hidden_size, num_hidden_layers=depth_max, num_attention_heads=4,
        intermediate_size=2 * args.drift_hidden_size, hidden_dropout=0.1, attention_dropout=0.1,
    )
    torch.manual_seed(args.seed)
    blocks = torch.nn.ModuleList(RevFormerBlock(config, i) for i in range(depth_max)).train()
    pos = torch.arange(args.drift_seq_len)[None]
    static = {
        "position_embeddings": rotary_tables(pos, config.head_dim, config.rope_theta, torch.float32), "is_causal": True
    }
    jobs = []
    for coupling in args.couplings:
        for dtype in ("fp32", "bf16"):
            for mode in ("float", "exact"):
                jobs += [(coupling, dtype, mode, depth, 0) for depth in sorted(args.depths)]
            jobs.append((coupling, dtype, f"float+ckpt{args.checkpoint_every}", depth_max, args.checkpoint_every))
    path = args.output_dir / "drift.json"
    payload = {"config": {k: str(v) for k, v in vars(args).items()}, "results": []}
    for coupling, dtype, mode, depth, k in _progress(jobs, len(jobs), "drift"):
        bits = args.fixed_point_scale_bits if mode == "exact" else None
        rec = drift_one(
            blocks[:depth], static, coupling, bits, dtype == "bf16", k, args.drift_hidden_size, args.drift_seq_len,
            args.seed,
        )
        payload["results"].append({"coupling": coupling, "dtype": dtype, "mode": mode, "depth": depth, **rec})
        atomic_write_json(path, payload)
    atomic_write_text(args.output_dir / "drift.md", drift_markdown(payload, args))
    return payload


def _fmt(err: float, exact: bool) -> str:
    if exact:
        return "**0 (bit-exact)**"
    if not math.isfinite(err):
        return "overflow (inf)"
    return f"{err:.1e}"


def drift_markdown(payload: dict[str, Any], args: argparse.Namespace) -> str:
    depths = sorted(args.depths)
    lines = [
        "| coupling | dtype | streams | " + " | ".join(str(d) for d in depths) + " |",
        "|---|---|---|" + "---|" * len(depths),
    ]
    rows: dict[tuple, dict[int, str]] = {}
    for r in payload["results"]:
        rows.setdefault((r["coupling"], r["dtype"], r["mode"]), {})[r["depth"]] = _fmt(r["input_rel_err"], r["bit_exact"])
    for (coupling, dtype, mode), cells in rows.items():
        lines.append(f"| {coupling} | {dtype} | {mode} | " + " | ".join(cells.get(d, "") for d in depths) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Training a 1,024-layer model, and its activation memory
# --------------------------------------------------------------------------------------------------------------


def batches(data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=g)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def build_model(args: argparse.Namespace, depth: int, coupling: str, exact: bool) -> RevFormerForCausalLM:
    config = config_from_args(
        args, TRAIN_CONFIG_FIELDS, vocab_size=260, num_hidden_layers=depth, max_position_embeddings=args.seq_len,
        coupling=coupling, exact_reversal=exact, loss_chunk_size=0, use_cache=False,
    )
    torch.manual_seed(args.seed)
    return RevFormerForCausalLM(config).train()


class LiveTensorBytes:
    """Peak of the bytes held by tensor storages created while it is active (a `TorchDispatchMode`).

    Same quantity as the profiler method (allocations minus frees during the step, so pre-existing weights, gradient
    buffers and optimizer state do not count), but O(1) memory per live storage instead of a log of every allocator
    event, so it scales to depth 1,024 on a small machine. Storage lifetimes are followed with weak references, as
    torch's own `MemTracker` does.
    """

    def __init__(self) -> None:
        self.current = self.peak = 0
        self.live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # In-place ops and views return a storage they were given (weights, gradient buffers, optimizer
                # state updated in place): not a new allocation.
                given = {
                    a.untyped_storage().data_ptr()
                    for a in tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor) and a.device.type != "meta"
                }
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key in meter.live or key in given or st.nbytes() == 0:
                            continue
                        meter.live[key] = st.nbytes()
                        meter.current += st.nbytes()
                        meter.peak = max(meter.peak, meter.current)
                        weakref.finalize(st, meter._free, key)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def activation_memory(args: argparse.Namespace, depth: int, coupling: str, exact: bool, ids: torch.Tensor) -> dict:
    """Peak activation memory of one training step, after a warm-up step (docs/design.md §7).

    Two meters: the profiler method (`peak_allocated_bytes`), which keeps every allocator event and needs several GB of
    host memory at depth 1,024 (so it runs only up to `--profiler_max_depth`), and `LiveTensorBytes`, which follows
    the tensor storages created during the step and scales to any depth.
    """
    model = build_model(args, depth, coupling, exact)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, foreach=False)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    start = time.perf_counter()
    step()  # warm-up: gradient buffers and optimizer state exist before the measured step
    warm = time.perf_counter() - start
    profiler_mb = peak_allocated_bytes(step) / 2**20 if depth <= args.profiler_max_depth else None
    with LiveTensorBytes() as meter:
        step()
    del model, opt
    return {
        "depth": depth, "coupling": coupling, "exact": exact, "profiler_peak_mb": profiler_mb,
        "tracker_act_mb": meter.peak / 2**20,
        "stream_mb": ids.numel() * args.hidden_size * 4 / 2**20, "step_seconds": warm,
    }


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    ids = next(batches(load_corpus_bytes("train"), args.batch_size, args.seq_len, args.seed))
    path = args.output_dir / "memory.json"
    payload = {"config": {k: str(v) for k, v in vars(args).items()}, "results": []}
    cases = [("additive", False)] + [(c, True) for c in args.couplings]
    depths = (2, args.profiler_max_depth, args.train_depth)
    for coupling, exact in _progress(cases, len(cases), "memory"):
        for depth in depths:
            payload["results"].append(activation_memory(args, depth, coupling, exact, ids))
            atomic_write_json(path, payload)
    lines = [
        f"| coupling | streams | profiler, depth 2 / {depths[1]} (MB) | live tensor bytes, depth 2 / {depths[1]} / "
        f"{depths[2]} (MB) | ratio {depths[2]} : 2 |",
        "|---|---|---|---|---|",
    ]
    res = payload["results"]
    for a, b, c in zip(res[::3], res[1::3], res[2::3]):
        lines.append(
            f"| {a['coupling']} | {'exact' if a['exact'] else 'float'} | {a['profiler_peak_mb']:.3f} / "
            f"{b['profiler_peak_mb']:.3f} | {a['tracker_act_mb']:.3f} / {b['tracker_act_mb']:.3f} / "
            f"{c['tracker_act_mb']:.3f} | {c['tracker_act_mb'] / a['tracker_act_mb']:.3f} |"
        )
    atomic_write_text(args.output_dir / "memory.md", "\n".join(lines) + "\n")
    return payload


@torch.no_grad()
def eval_loss(model: RevFormerForCausalLM, ids: torch.Tensor) -> float:
    model.eval()
    loss = model(ids, labels=ids).loss.item()
    model.train()
    return loss


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    train, valid = load_corpus_bytes("train"), load_corpus_bytes("validation")
    model = build_model(args, args.train_depth, args.train_coupling, args.train_exact)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, foreach=False)
    val_ids = next(batches(valid, 16, args.seq_len, args.seed + 1))
    path = args.output_dir / "train.json"
    payload = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss_start": eval_loss(model, val_ids),
        "losses": [],
    }
    stream = batches(train, args.batch_size, args.seq_len, args.seed)
    start = time.perf_counter()
    for step in _progress(range(args.train_steps), args.train_steps, f"train depth {args.train_depth}"):
        ids = next(stream)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        payload["losses"].append(loss.item())
        payload["seconds"] = time.perf_counter() - start
        if not math.isfinite(loss.item()):
            break
        atomic_write_json(path, payload)
    payload["val_loss_end"] = eval_loss(model, val_ids)
    atomic_write_json(path, payload)
    return payload


bench_args: argparse.Namespace


def main(argv: list[str] | None = None) -> None:
    global bench_args
    args = bench_args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("drift", "all"):
        run_drift(args)
        print((args.output_dir / "drift.md").read_text())
    if args.part in ("memory", "all"):
        run_memory(args)
        print((args.output_dir / "memory.md").read_text())
    if args.part in ("train", "all"):
        out = run_train(args)
        first = sum(out["losses"][:5]) / max(1, len(out["losses"][:5]))
        last = sum(out["losses"][-5:]) / max(1, len(out["losses"][-5:]))
        print(
            f"depth {args.train_depth}: train loss {first:.3f} -> {last:.3f} (mean of first/last 5 steps), "
            f"validation {out['val_loss_start']:.3f} -> {out['val_loss_end']:.3f}, {out['seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()
