#!/usr/bin/env python
"""Pretrain small *standard* causal LMs (Llama and GPT-2) on the bundled English text, as ordinary checkpoints.

No pretrained weights can be downloaded here, so `bench_convert.py` fine-tunes these instead: a `LlamaForCausalLM`
and a `GPT2LMHeadModel` (dropout on, as GPT-2 has it), trained for a few CPU minutes on the KJV + WEB books of
`data/bible_lm` with a byte-level BPE learned on the same text. Each is saved with `save_pretrained` (model +
tokenizer + `pretrain.json` with the run's numbers) under `--output_dir` (a scratch folder: never commit it).

    python -m eval.pretrain_small --output_dir outputs/pretrained --minutes 4
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import torch

from reformer_rev.training.corpus import bundled_lm_files, bundled_translation_files
from reformer_rev.training.tokenization import EOS_TOKEN, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]

FAMILIES = ("llama", "gpt2")


# --------------------------------------------------------------------------------------------------------------
# Data (shared with bench_convert.py)
# --------------------------------------------------------------------------------------------------------------


def english_books(split: str) -> list[str]:
    with gzip.open(bundled_lm_files()[split], "rt") as f:
        return [json.loads(line)["text"] for line in f]


def spanish_verses(split: str) -> list[str]:
    """The Spanish (Reina-Valera 1909) side of the translation corpus, one verse per entry, in book order."""
    with gzip.open(bundled_translation_files()[split], "rt") as f:
        return [json.loads(line)["translation"]["es"] for line in f]


def token_blocks(tokenizer, texts: list[str], seq_len: int, separator: str = "") -> torch.Tensor:
    """Tokenize the texts, join them (each followed by EOS, or joined by `separator`), cut into `seq_len` blocks."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids: list[int] = []
    if separator:
        texts = [separator.join(texts)]
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def model_config(family: str, vocab_size: int, num_layers: int, hidden: int = 256, heads: int = 4, positions: int = 1024):
    """A small standard config: Llama (gated MLP 688 wide, RoPE, tied embeddings) or GPT-2 (MLP 4x, dropout 0.1)."""
    from transformers import GPT2Config, LlamaConfig

    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=688, num_hidden_layers=num_layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
            tie_word_embeddings=True, **special,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=positions, **special
        )
    raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss over `blocks` in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        n = batch[:, 1:].numel()
        total += model(input_ids=batch, labels=batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(family: str, tokenizer, train: torch.Tensor, valid: torch.Tensor, args) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(model_config(family, len(tokenizer), args.num_layers)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)
    start, step, seen = time.perf_counter(), 0, 0
    while step < args.max_steps and time.perf_counter() - start < 60 * args.minutes:
        idx = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(train)]
        batch = train[idx]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.max_steps, args.learning_rate, warmup=20)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + batch.numel()
        if step % 50 == 0:
            print(f"[{family}] step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    seconds = time.perf_counter() - start
    out = Path(args.output_dir) / family
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {
        "family": family, "class": type(model).__name__, "steps": step, "tokens": seen, "seconds": round(seconds, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()), "num_layers": args.num_layers,
        "seq_len": args.seq_len, "batch_size": args.batch_size,
        "validation_loss_english": mean_loss(model, valid, args.batch_size), "path": str(out),
    }
    (out / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/pretrained", help="Scratch folder for the checkpoints.")
    p.add_argument("--families", default="llama,gpt2", help=f"Comma-separated subset of {FAMILIES}.")
    p.add_argument("--minutes", type=float, default=4.0, help="Wall-clock budget per model.")
    p.add_argument("--max_steps", type=int, default=1500, help="Schedule length (stops earlier at --minutes).")
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary learned on the English train split.")
    p.add_argument("--max_books", type=int, default=0, help="Use only the first N train books (0 = all; tests).")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in FAMILIES for f in families):
        p.error(f"--families must be a comma-separated subset of {FAMILIES}, got {args.families!r}")
    args.families = families
    for name in ("minutes", "max_steps", "num_layers", "seq_len", "batch_size", "vocab_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    books = english_books("train")
    if args.max_books:
        books = books[: args.max_books]
    tokenizer = train_bpe_tokenizer(books, vocab_size=args.vocab_size)
    train = token_blocks(tokenizer, books, args.seq_len)
    valid_books = english_books("validation")
    valid = token_blocks(tokenizer, valid_books[: args.max_books or len(valid_books)], args.seq_len)[:64]
    print(f"tokenizer {len(tokenizer)} tokens; {len(train)} train blocks of {args.seq_len}", flush=True)
    return [pretrain(family, tokenizer, train, valid, args) for family in args.families]


if __name__ == "__main__":
    main()
