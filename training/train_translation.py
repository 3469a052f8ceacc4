#!/usr/bin/env python3
"""Train a reversible encoder-decoder (`RevFormerForConditionalGeneration`) for translation with `accelerate`.

Defaults: the bundled English->Spanish Bible corpus (split by book), a joint byte-level BPE learnt on its training
split, a small model that trains on a CPU in minutes. Any hub translation dataset works through the same code path:

    python training/train_translation.py --output_dir outputs/mt                      # bundled en->es
    python training/train_translation.py --dataset_name wmt14 --dataset_config_name de-en \\
        --source_lang en --target_lang de --output_dir outputs/wmt14

Every `--eval_steps` the validation loss is computed on the whole validation split and BLEU/chrF (sacrebleu, through
`evaluate`) on its first `--val_bleu_samples` pairs; the best-BLEU model is kept in `output_dir/best`. The run state
(model, optimizer, scheduler, RNG, data position) is saved every `--checkpointing_steps` into `output_dir/checkpoint`
and on exit (also on Ctrl-C or `--max_train_minutes`); `--resume_from_checkpoint` continues exactly where it stopped.
`--no_reversible` trains the non-reversible twin (same modules, plain autograd) for comparisons.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from translation_utils import (  # noqa: E402
    collate,
    length_grouped_batches,
    load_translation_data,
    pairs,
    tokenize_pairs,
    train_joint_tokenizer,
    translate,
    translation_scores,
)

from reformer_rev import RevFormerConfig, RevFormerForConditionalGeneration  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", default=None, help="Hub translation dataset (default: bundled Bible en-es).")
    d.add_argument("--dataset_config_name", default=None)
    d.add_argument("--train_file", default=None, help="json/jsonl(.gz) in the HF translation format.")
    d.add_argument("--validation_file", default=None)
    d.add_argument("--test_file", default=None)
    d.add_argument("--source_lang", default="en")
    d.add_argument("--target_lang", default="es")
    d.add_argument("--max_source_length", type=int, default=128)
    d.add_argument("--max_target_length", type=int, default=128)
    d.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training pairs (debugging).")
    d.add_argument("--max_eval_samples", type=int, default=None, help="Use the first N validation pairs for the loss.")
    d.add_argument("--val_bleu_samples", type=int, default=300, help="Validation pairs decoded for BLEU/chrF.")
    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer_name", default=None, help="Existing tokenizer path; default: learn a joint BPE.")
    t.add_argument("--bpe_vocab_size", type=int, default=8000)
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", default=None, help="Fine-tune this checkpoint instead of a new model.")
    m.add_argument("--hidden_size", type=int, default=256)
    m.add_argument("--encoder_layers", type=int, default=3)
    m.add_argument("--decoder_layers", type=int, default=3)
    m.add_argument("--num_attention_heads", type=int, default=4)
    m.add_argument("--intermediate_size", type=int, default=768)
    m.add_argument("--hidden_dropout", type=float, default=0.1)
    m.add_argument("--attention_dropout", type=float, default=0.0)
    m.add_argument("--no_tie_word_embeddings", action="store_true", help="Separate LM head from the embedding.")
    m.add_argument("--no_reversible", action="store_true", help="Train the non-reversible twin (plain autograd).")
    m.add_argument("--chunk_size_feed_forward", type=int, default=0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--per_device_train_batch_size", type=int, default=48)
    o.add_argument("--per_device_eval_batch_size", type=int, default=64)
    o.add_argument("--learning_rate", type=float, default=1.5e-3)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--max_grad_norm", type=float, default=1.0)
    o.add_argument("--num_train_epochs", type=int, default=20)
    o.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    o.add_argument("--max_train_minutes", type=float, default=None, help="Stop (and save) after this wall time.")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1)
    o.add_argument("--lr_scheduler_type", default="inverse_sqrt", help="Any `transformers.get_scheduler` name.")
    o.add_argument("--num_warmup_steps", type=int, default=300)
    o.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    o.add_argument("--seed", type=int, default=42)
    o.add_argument("--num_threads", type=int, default=None, help="torch intra-op threads (CPU).")
    r = p.add_argument_group("evaluation and checkpoints")
    r.add_argument("--output_dir", required=True)
    r.add_argument("--eval_steps", type=int, default=500)
    r.add_argument("--extra_eval_steps", type=int, nargs="*", default=[], help="Also validate at these steps.")
    r.add_argument("--checkpointing_steps", type=int, default=500)
    r.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint dir, or 'latest'.")
    r.add_argument("--num_beams", type=int, default=1, help="Beams for the validation BLEU decode.")
    r.add_argument("--max_new_tokens", type=int, default=160)
    r.add_argument("--logging_steps", type=int, default=50)
    args = p.parse_args(argv)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "eval_steps", "checkpointing_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"`--{name}` must be positive, got {getattr(args, name)}.")
    return args


def build_tokenizer(args: argparse.Namespace, train_src: list[str], train_tgt: list[str]) -> PreTrainedTokenizerFast:
    if args.tokenizer_name:
        return PreTrainedTokenizerFast.from_pretrained(args.tokenizer_name)
    if args.model_name_or_path:
        return PreTrainedTokenizerFast.from_pretrained(args.model_name_or_path)
    return train_joint_tokenizer(train_src + train_tgt, vocab_size=args.bpe_vocab_size)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> RevFormerForConditionalGeneration:
    if args.model_name_or_path:
        model = RevFormerForConditionalGeneration.from_pretrained(args.model_name_or_path)
        model.config.reversible = not args.no_reversible
        return model
    config = RevFormerConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.decoder_layers,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=max(args.max_source_length, args.max_target_length + args.max_new_tokens, 512),
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        tie_word_embeddings=not args.no_tie_word_embeddings,
        is_encoder_decoder=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        reversible=not args.no_reversible,
        chunk_size_feed_forward=args.chunk_size_feed_forward,
    )
    return RevFormerForConditionalGeneration(config)


@torch.no_grad()
def validation_loss(model, examples, batch_size: int, pad_id: int, accelerator: Accelerator) -> float:
    """Token-weighted mean cross-entropy over `examples` (teacher forcing, eval mode)."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["labels"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        with accelerator.autocast():
            total += model(**batch).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    # The reversible backward calls autograd.backward on each rebuilt block: DDP must not look for unused parameters.
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    set_seed(args.seed)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            accelerator.print(json.dumps(record))

    raw = load_translation_data(
        args.dataset_name, args.dataset_config_name, args.train_file, args.validation_file, args.test_file
    )
    if "train" not in raw or "validation" not in raw:
        raise ValueError(f"Need `train` and `validation` splits, got {list(raw)}.")
    train_src, train_tgt = pairs(raw["train"], args.source_lang, args.target_lang)
    val_src, val_tgt = pairs(raw["validation"], args.source_lang, args.target_lang)
    if args.max_train_samples:
        train_src, train_tgt = train_src[: args.max_train_samples], train_tgt[: args.max_train_samples]
    if args.max_eval_samples:
        val_src, val_tgt = val_src[: args.max_eval_samples], val_tgt[: args.max_eval_samples]

    resume_dir = None
    if args.resume_from_checkpoint:
        resume_dir = out_dir / "checkpoint" if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if not (resume_dir / "trainer_state.json").is_file():
            raise ValueError(f"`--resume_from_checkpoint`: no trainer_state.json in {resume_dir}.")
    if resume_dir is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(resume_dir / "tokenizer")
    else:
        tokenizer = build_tokenizer(args, train_src, train_tgt)
    train_examples = tokenize_pairs(tokenizer, train_src, train_tgt, args.max_source_length, args.max_target_length)
    val_examples = tokenize_pairs(tokenizer, val_src, val_tgt, args.max_source_length, args.max_target_length)
    lengths = [len(e["input_ids"]) + len(e["labels"]) for e in train_examples]

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    no_decay = ("bias", "norm")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-8)
    batches_per_epoch = math.ceil(len(train_examples) / args.per_device_train_batch_size / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler_kwargs = {}
    if args.lr_scheduler_type == "inverse_sqrt":
        scheduler_kwargs = {"scheduler_specific_kwargs": {"timescale": args.num_warmup_steps}}
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
        num_training_steps=max_steps, **scheduler_kwargs,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": None, "best_step": None, "evals": []}
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        state = json.loads((resume_dir / "trainer_state.json").read_text())
        log({"event": "resumed", "from": str(resume_dir), "step": state["step"]})

    def save_checkpoint() -> None:
        ckpt = out_dir / "checkpoint"
        accelerator.wait_for_everyone()
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(ckpt / "tokenizer")
            (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=1))

    def save_model(name: str) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(out_dir / name)
            tokenizer.save_pretrained(out_dir / name)

    def evaluate_now() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        t0 = time.time()
        loss = validation_loss(unwrapped, val_examples, args.per_device_eval_batch_size, tokenizer.pad_token_id,
                               accelerator)
        record = {"step": state["step"], "val_loss": round(loss, 5)}
        if args.val_bleu_samples > 0:
            k = min(args.val_bleu_samples, len(val_src))
            hyps = translate(unwrapped, tokenizer, val_src[:k], batch_size=args.per_device_eval_batch_size,
                             num_beams=args.num_beams, max_source_length=args.max_source_length,
                             max_new_tokens=args.max_new_tokens)
            record.update({f"val_{k2}": v for k2, v in translation_scores(hyps, val_tgt[:k]).items()})
            record["val_example"] = {"source": val_src[0], "prediction": hyps[0], "reference": val_tgt[0]}
        record["eval_seconds"] = round(time.time() - t0, 1)
        state["evals"].append({k2: v for k2, v in record.items() if k2 != "val_example"})
        # Best model: highest validation BLEU (lowest loss when BLEU is not computed).
        score = record.get("val_bleu", -loss)
        if state["best_score"] is None or score > state["best_score"]:
            state["best_score"], state["best_step"] = score, state["step"]
            save_model("best")
        log(record)
        return record

    log({"event": "start", "parameters": n_params, "train_pairs": len(train_examples), "val_pairs": len(val_examples),
         "vocab_size": len(tokenizer), "max_steps": max_steps, "reversible": not args.no_reversible,
         "args": vars(args)})
    progress = tqdm(total=max_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                    desc="train")
    start_time = time.time()
    stop_reason = "max_steps"
    eval_at = set(args.extra_eval_steps)
    model.train()
    window_loss, window_tokens, window_start = 0.0, 0, time.time()
    try:
        while state["step"] < max_steps:
            batches = length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed + state["epoch"])
            batches = batches[accelerator.process_index :: accelerator.num_processes][:batches_per_epoch]
            while state["batch_in_epoch"] < len(batches) and state["step"] < max_steps:
                idx = batches[state["batch_in_epoch"]]
                batch = collate([train_examples[i] for i in idx], tokenizer.pad_token_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                state["batch_in_epoch"] += 1
                n_tok = int((batch["labels"] != -100).sum())
                window_loss += loss.item() * n_tok
                window_tokens += n_tok
                if not accelerator.sync_gradients:
                    continue
                state["step"] += 1
                progress.update(1)
                step = state["step"]
                if step % args.logging_steps == 0:
                    elapsed = time.time() - window_start
                    log({"step": step, "epoch": state["epoch"], "train_loss": round(window_loss / max(window_tokens, 1), 5),
                         "lr": lr_scheduler.get_last_lr()[0], "tgt_tokens_per_s": round(window_tokens / elapsed, 1),
                         "minutes": round((time.time() - start_time) / 60, 2)})
                    progress.set_postfix(loss=f"{window_loss / max(window_tokens, 1):.3f}")
                    window_loss, window_tokens, window_start = 0.0, 0, time.time()
                if step % args.eval_steps == 0 or step in eval_at:
                    evaluate_now()
                if step % args.checkpointing_steps == 0:
                    save_checkpoint()
                if args.max_train_minutes and (time.time() - start_time) / 60 >= args.max_train_minutes:
                    stop_reason = "max_train_minutes"
                    break
            if stop_reason != "max_steps":
                break
            if state["batch_in_epoch"] >= len(batches):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        # Nothing is lost when a run dies: the state at the last finished step is written.
        save_checkpoint()
    progress.close()
    if not state["evals"] or state["evals"][-1]["step"] != state["step"]:
        evaluate_now()
    save_model("final")
    summary = {"event": "end", "stop_reason": stop_reason, "step": state["step"],
               "minutes": round((time.time() - start_time) / 60, 2), "best_step": state["best_step"],
               "best_score": state["best_score"], "last_eval": state["evals"][-1]}
    log(summary)
    if accelerator.is_main_process:
        (out_dir / "train_summary.json").write_text(json.dumps({**summary, "evals": state["evals"]}, indent=1))
    return summary


if __name__ == "__main__":
    # SIGTERM (and SIGINT, which background jobs ignore) end the run like Ctrl-C: the state is saved first.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_keyboard_interrupt)
    main()
