#!/usr/bin/env python3
"""Translate a split with beam search from a checkpoint and score it with BLEU and chrF (sacrebleu via `evaluate`).

    python -m eval.eval_translation --model_name_or_path outputs/mt_rev/best --output_dir outputs/mt_rev/test

Writes `predictions.txt`, `references.txt`, `sources.txt` (one line per pair, in split order) and `scores.json`
with BLEU/chrF of the model and of the copy-the-source baseline on the same pairs (`--no_copy_baseline` skips it).
When the split has verse references (`ref`, as the bundled corpus), the verse translations are also scored joined
into chapters (`chapter_bleu`/`chapter_chrf`), the unit a `--document_level` model translates: with
`--document_level` the model translates whole chapters (at most `--max_document_tokens` tokens, cut between verses
like in training) and one line per chapter piece is written.
The checkpoint is loaded through `AutoModelForSeq2SeqLM` (add `--trust_remote_code` to use the code saved with it
instead of the installed package) and its tokenizer through `AutoTokenizer`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reformer_rev.safe_io import atomic_write_json, atomic_write_text
from reformer_rev.training.translation import (
    document_ids,
    group_into_documents,
    load_translation_data,
    pairs,
    translate,
    translation_scores,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--dataset_name", default=None, help="Hub translation dataset (default: bundled Bible en-es).")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--test_file", default=None, help="json/jsonl(.gz) in the HF translation format.")
    p.add_argument("--split", default="test")
    p.add_argument("--source_lang", default="en")
    p.add_argument("--target_lang", default="es")
    p.add_argument("--max_samples", type=int, default=None, help="Only the first N pairs (debugging).")
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--no_repeat_ngram_size", type=int, default=0, help="Forbid repeating n-grams (0: off).")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_source_length", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="Longest translation (default: 160, or --max_document_tokens with --document_level).")
    p.add_argument("--max_length_ratio", type=float, default=2.0,
                   help="Stop after this times the source length + 10 new tokens (at most --max_new_tokens).")
    p.add_argument("--document_level", action="store_true",
                   help="Translate whole chapters (verses of a chapter joined; needs the `ref` column).")
    p.add_argument("--max_document_tokens", type=int, default=4096,
                   help="With --document_level: the longest document in tokens (also the default --max_new_tokens; "
                   "--max_source_length is raised to it).")
    p.add_argument("--no_copy_baseline", action="store_true")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    if args.num_beams < 1 or args.batch_size < 1:
        raise ValueError("`--num_beams` and `--batch_size` must be positive.")
    if args.max_length_ratio <= 0 or args.max_document_tokens <= 0:
        raise ValueError("`--max_length_ratio` and `--max_document_tokens` must be positive.")
    if args.document_level:
        args.max_source_length = max(args.max_source_length, args.max_document_tokens)
    if args.max_new_tokens is None:
        args.max_new_tokens = args.max_document_tokens if args.document_level else 160
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not args.trust_remote_code:
        import reformer_rev  # noqa: F401  (registers the model type with the Auto classes)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    model.eval()

    if args.test_file:
        raw = load_translation_data(test_file=args.test_file)
    else:
        raw = load_translation_data(args.dataset_name, args.dataset_config_name)
    if args.split not in raw:
        raise ValueError(f"`--split {args.split}` not found; available: {list(raw)}.")
    split = raw[args.split]
    if args.max_samples:
        split = split.select(range(min(args.max_samples, len(split))))
    sources, references = pairs(split, args.source_lang, args.target_lang)
    has_refs = "ref" in split.column_names
    documents = document_ids(split) if args.document_level or has_refs else None
    verses = len(sources)
    if args.document_level:
        def count(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

        sources, references, groups = group_into_documents(sources, references, documents, count,
                                                           args.max_document_tokens)

    t0 = time.time()
    predictions = translate(
        model, tokenizer, sources, batch_size=args.batch_size, num_beams=args.num_beams,
        max_source_length=args.max_source_length, max_new_tokens=args.max_new_tokens,
        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size, progress=True,
        max_length_ratio=args.max_length_ratio,
    )
    seconds = time.time() - t0
    scores = {
        "model": str(args.model_name_or_path),
        "split": args.split,
        "source_lang": args.source_lang,
        "target_lang": args.target_lang,
        "num_pairs": len(sources),
        "num_verses": verses,
        "document_level": args.document_level,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "decode_seconds": round(seconds, 1),
        **translation_scores(predictions, references),
    }
    if documents is not None and not args.document_level:
        # The same verse translations scored as chapters: comparable with a --document_level model's scores.
        chapter_preds, chapter_refs, _ = group_into_documents(predictions, references, documents)
        chapter = translation_scores(chapter_preds, chapter_refs)
        scores.update(chapter_bleu=chapter["bleu"], chapter_chrf=chapter["chrf"], num_chapters=len(chapter_preds))
    if not args.no_copy_baseline:
        copy = translation_scores(sources, references)
        scores["copy_source_bleu"], scores["copy_source_chrf"] = copy["bleu"], copy["chrf"]

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in (("predictions", predictions), ("references", references), ("sources", sources)):
        atomic_write_text(out / f"{name}.txt", "".join(line.replace("\n", " ") + "\n" for line in lines))
    atomic_write_json(out / "scores.json", scores, indent=1)
    print(json.dumps(scores, indent=1))
    return scores


if __name__ == "__main__":
    main()
