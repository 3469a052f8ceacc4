"""`torch.compile` with the native causal LM: training steps and decoding, with and without compile.

* training: `torch.compile(model)` (default mode) vs eager, the reversible model, AdamW steps; the gradients of the
  first step are compared with eager's, and `fullgraph=True` is tried and its outcome recorded;
* decoding: greedy `generate()` through a static cache (`cache_implementation="static"`), with the forward compiled
  (`model.forward = torch.compile(model.forward)`) vs eager; the tokens must be the same.

Throughput is tokens per second of process CPU time after warm-up (compilation excluded and reported separately),
candidates interleaved round by round.

    python -m eval.bench_compile                  # prints the table, writes a scratch folder
    python -m eval.bench_compile --docs           # also writes docs/benchmarks/compile.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time

import torch

from eval._bench_common import write_bench_outputs
from reformer_rev import RevFormerConfig, RevFormerForCausalLM


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench_training(config: RevFormerConfig, batch: int, seq_len: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    eager = RevFormerForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    # fullgraph first, on a fresh Dynamo cache: after a default compile of the same code it would reuse those graphs
    # and not trace again (measured: it then "succeeds").
    torch._dynamo.reset()
    fullgraph = "compiles"
    try:
        torch.compile(copy.deepcopy(eager), fullgraph=True)(ids, labels=ids).loss.backward()
    except Exception as err:  # the outcome is what is measured
        fullgraph = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    # First step's gradients, compiled vs eager (fp32, dropout 0).
    eager(ids, labels=ids).loss.backward()
    start = time.perf_counter()
    compiled(ids, labels=ids).loss.backward()
    compile_seconds = time.perf_counter() - start
    worst = max(
        ((p.grad - q.grad).norm() / q.grad.norm()).item()
        for p, q in zip(compiled_model.parameters(), eager.parameters())
    )
    runs = {"eager": eager, "compiled": compiled}
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=False) for n, m in runs.items()}

    def train(name: str) -> None:
        for _ in range(steps):
            optimizers[name].zero_grad(set_to_none=False)
            runs[name](ids, labels=ids).loss.backward()
            optimizers[name].step()

    for name in runs:
        train(name)  # warm-up: optimizer state, recompiles for the optimizer's in-place updates
    tps = {n: [] for n in runs}
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            tps[name].append(steps * ids.numel() / _cpu_seconds(lambda: train(name)))
    return {
        "tokens_per_second": {n: round(statistics.median(v)) for n, v in tps.items()},
        "rounds": {n: [round(x) for x in v] for n, v in tps.items()},
        "first_step_grad_rel_err": worst,
        "compile_seconds": round(compile_seconds, 1),
        "fullgraph": fullgraph,
    }


def bench_decoding(config: RevFormerConfig, prompt: int, new_tokens: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = RevFormerForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        eager_forward = model.forward
        compiled_forward = torch.compile(model.forward)
        model.forward = compiled_forward
        start = time.perf_counter()
        same = torch.equal(model.generate(ids, **kwargs), expected)
        same = same and torch.equal(model.generate(ids, **kwargs), expected)  # shapes seen once: compiled graphs
        compile_seconds = time.perf_counter() - start
        forwards = {"eager": eager_forward, "compiled": compiled_forward}
        tps = {n: [] for n in forwards}
        for r in range(rounds):
            for name in list(forwards) if r % 2 == 0 else list(forwards)[::-1]:
                model.forward = forwards[name]
                tps[name].append(new_tokens / _cpu_seconds(lambda: model.generate(ids, **kwargs)))
    return {
        "tokens_per_second": {n: round(statistics.median(v), 1) for n, v in tps.items()},
        "rounds": {n: [round(x, 1) for x in v] for n, v in tps.items()},
        "same_tokens": same,
        "compile_seconds": round(compile_seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--docs", action="store_true", help="also write docs/benchmarks/compile.{md,json}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = RevFormerConfig(vocab_size=260, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                             num_attention_heads=4, intermediate_size=688, max_position_embeddings=4096,
                             eos_token_id=None)
    training = bench_training(config, args.batch, args.seq_len, args.steps, args.rounds)
    print(json.dumps(training), flush=True)
    decoding = bench_decoding(config, args.prompt, args.new_tokens, args.rounds)
    print(json.dumps(decoding), flush=True)
    result = {"shape": dict(vars(args), output_dir=None, docs=None, dtype="float32", reversible=True,
                            attention="sdpa"),
              "training": training, "decoding": decoding, "versions": {"torch": torch.__version__}}
    t, d = training["tokens_per_second"], decoding["tokens_per_second"]
    lines = [
        "# torch.compile: training and decoding",
        f"`RevFormerForCausalLM` d={args.hidden_size}, {args.num_hidden_layers} reversible layers, fp32 sdpa, CPU "
        f"{args.threads} thread(s); tokens per second of process CPU time after warm-up, median of {args.rounds} "
        "interleaved rounds.",
        "",
        "| | eager | `torch.compile` | speed-up | compile time (s) | check |",
        "|---|---|---|---|---|---|",
        f"| training step (batch {args.batch} x {args.seq_len}, AdamW) | {t['eager']} | {t['compiled']} | "
        f"{t['compiled'] / t['eager']:.2f} | {training['compile_seconds']} | first-step gradients vs eager: "
        f"{training['first_step_grad_rel_err']:.1e} |",
        f"| greedy decoding, static cache (prompt {args.prompt}, {args.new_tokens} new tokens) | {d['eager']} | "
        f"{d['compiled']} | {d['compiled'] / d['eager']:.2f} | {decoding['compile_seconds']} | same tokens: "
        f"{decoding['same_tokens']} |",
        "",
        f"`torch.compile(model, fullgraph=True)` training step: {training['fullgraph']}",
        "",
        f"Command: `python -m eval.bench_compile {' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}`",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    write_bench_outputs("compile", result, table, args.output_dir, args.docs)
    return result


if __name__ == "__main__":
    main()
