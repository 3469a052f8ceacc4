"""Training throughput on short documents: packed rows vs one padded document per row (and the concatenated stream).

Documents are the English verses of the bundled translation corpus (byte tokenizer, each followed by `</s>`), in
corpus order, so a batch mixes short and long ones as a real data set does. Three ways to batch the same tokens:

* `padded`: one document per row, right-padded to the longest of the batch (`collate_padded`), attention mask;
* `packed`: the documents concatenated and cut into rows of `--block_size` with `position_ids` restarting at every
  document (`pack_documents`/`collate_packed`, `train_lm.py --packing`): no padding, no attention across documents;
* `concatenated`: the same rows without positions, attending across documents (`run_clm`, the train_lm default).

Each candidate runs training steps (forward, backward, AdamW) over the same number of real tokens, interleaved round
by round; tokens/s counts real (non-padding) tokens per second of process CPU time (1 thread).

    python -m eval.bench_packing                  # prints the table, writes a scratch folder
    python -m eval.bench_packing --docs           # also writes docs/benchmarks/packing.{md,json}
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import statistics
import sys
import time

import torch

from eval._bench_common import write_bench_outputs
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.training.corpus import bundled_translation_files
from reformer_rev.training.packing import collate_packed, collate_padded, pack_documents
from reformer_rev.training.tokenization import build_byte_tokenizer


def load_documents(n: int, tokenizer) -> list[list[int]]:
    with gzip.open(bundled_translation_files()["train"], "rt") as f:
        texts = [json.loads(line)["translation"]["en"] for line, _ in zip(f, range(n))]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def batches(documents: list[list[int]], block_size: int, batch_docs: int, pad_token_id: int) -> dict[str, list]:
    packed_rows = pack_documents(documents, block_size)
    rows = [dict(input_ids=i, position_ids=p) for i, p in zip(packed_rows["input_ids"], packed_rows["position_ids"])]
    rows_per_batch = max(1, round(sum(map(len, documents[:batch_docs])) / block_size))
    packed = [collate_packed(rows[i : i + rows_per_batch]) for i in range(0, len(rows), rows_per_batch)]
    concatenated = [{k: v for k, v in b.items() if k != "position_ids"} for b in packed]
    concatenated = [dict(b, labels=b["input_ids"]) for b in concatenated]
    used = sum(b["input_ids"].numel() for b in packed)  # the tokens the packed rows hold (the remainder is dropped)
    padded, count = [], 0
    for i in range(0, len(documents), batch_docs):
        if count >= used:
            break
        group = documents[i : i + batch_docs]
        padded.append(collate_padded([{"input_ids": d} for d in group], pad_token_id))
        count += sum(map(len, group))
    return {"padded": padded, "packed": packed, "concatenated": concatenated}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=768)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--batch_docs", type=int, default=16, help="documents per padded batch (packed: same tokens)")
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--docs", action="store_true", help="also write docs/benchmarks/packing.{md,json}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = build_byte_tokenizer()
    documents = load_documents(args.documents, tokenizer)
    data = batches(documents, args.block_size, args.batch_docs, tokenizer.pad_token_id)
    config = RevFormerConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=4, intermediate_size=688, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max(args.block_size, 4096),
    )
    torch.manual_seed(0)
    model = RevFormerForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

    def run(name: str) -> tuple[float, int, int]:
        real = total = 0
        start = time.process_time()
        for batch in data[name]:
            optimizer.zero_grad(set_to_none=False)
            model(**batch).loss.backward()
            optimizer.step()
            real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            total += batch["input_ids"].numel()
        return time.process_time() - start, real, total

    names = list(data)
    run(names[0])  # warm-up
    measured: dict[str, list[float]] = {n: [] for n in names}
    shapes: dict[str, dict] = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds, real, total = run(name)
            measured[name].append(real / seconds)
            shapes[name] = {"batches": len(data[name]), "real_tokens": real, "padded_tokens": total - real}
            print(f"round {r}: {name}: {real / seconds:.0f} tokens/s", flush=True)
    result = {
        "shape": dict(vars(args), output_dir=None, docs=None, vocab=len(tokenizer), dtype="float32",
                      reversible=True, attention="sdpa"),
        "tokens_per_second": {n: round(statistics.median(v)) for n, v in measured.items()},
        "rounds": {n: [round(x) for x in v] for n, v in measured.items()},
        "batches": shapes,
        "versions": {"torch": torch.__version__},
    }
    tps = result["tokens_per_second"]
    lines = [
        "# Packed vs padded training batches",
        f"{args.documents} English verses of the bundled corpus (byte tokens, {sum(map(len, documents))} in all), "
        f"`RevFormerForCausalLM` d={args.hidden_size}, {args.num_hidden_layers} reversible layers, fp32 sdpa, CPU "
        f"{args.threads} thread(s); AdamW steps, median over {args.rounds} interleaved rounds; real (non-padding) "
        "tokens per second of process CPU time.",
        "",
        "| batches | what a row holds | padding tokens | real tokens/s | vs padded |",
        "|---|---|---|---|---|",
        f"| padded | one document, padded to the longest of {args.batch_docs} | {shapes['padded']['padded_tokens']} | "
        f"{tps['padded']} | 1.00 |",
        f"| packed (`--packing`) | {args.block_size} tokens of whole documents, positions restarting, no "
        f"cross-document attention | 0 | {tps['packed']} | {tps['packed'] / tps['padded']:.2f} |",
        f"| concatenated (default) | the same {args.block_size} tokens attending across documents | 0 | "
        f"{tps['concatenated']} | {tps['concatenated'] / tps['padded']:.2f} |",
        "",
        f"Command: `python -m eval.bench_packing {' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}`",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    write_bench_outputs("packing", result, table, args.output_dir, args.docs)
    return result


if __name__ == "__main__":
    main()
