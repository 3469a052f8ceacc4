"""The training script's pieces (tokenizers, long-block grouping, metrics, checkpoints) and short end-to-end runs."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import cut_bundled_corpus
from reformer_rev.training.checkpointing import CheckpointError, list_checkpoints
from reformer_rev.training.loop import TrainLog
from reformer_rev.training.tokenization import (
    build_byte_tokenizer,
    is_byte_tokenizer,
    token_byte_counts,
    token_byte_lengths,
    train_bpe_tokenizer,
)
from training import train_lm

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "In the beginning God created the heaven and the earth. Ünïcödé — 😀 tabs\tand\r\nnewlines.\n"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    """Small jsonl splits cut from the bundled corpus (real English, several documents)."""
    return cut_bundled_corpus(tmp_path_factory.mktemp("corpus"), {"train": (4, 6000), "validation": (2, 1500), "test": (2, 1500)})


def tiny_args(corpus_files, output_dir, *extra: str) -> list[str]:
    return [
        "--train_file", str(corpus_files["train"]), "--validation_file", str(corpus_files["validation"]),
        "--test_file", str(corpus_files["test"]), "--output_dir", str(output_dir),
        "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8",
        "--max_train_steps", "12", "--num_warmup_steps", "2", "--learning_rate", "1e-2", "--eval_steps", "6",
        "--eval_subset_blocks", "4", "--logging_steps", "2", "--time_budget_minutes", "0", "--cpu", *extra,
    ]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids_are_utf8_bytes_and_round_trip(tmp_path):
    tok = build_byte_tokenizer()
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert len(tok) == 260 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (256, 257, 258, 259)
    assert is_byte_tokenizer(tok)
    assert (token_byte_lengths(tok) == 1).all()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(SAMPLE, add_special_tokens=False)["input_ids"] == ids
    assert loaded.eos_token_id == 258


def test_bpe_tokenizer_byte_accounting():
    texts = [SAMPLE * 20, "the heaven and the earth " * 50]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert not is_byte_tokenizer(tok)
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(SAMPLE.encode())  # merges were learnt
    assert tok.decode(ids) == SAMPLE
    # bits-per-byte denominator: the bytes the tokens stand for are exactly the text's UTF-8 bytes
    assert token_byte_lengths(tok)[ids].sum() == len(SAMPLE.encode())
    counts = token_byte_counts(tok)[ids].sum(0)
    assert (counts[:256] == np.bincount(np.frombuffer(SAMPLE.encode(), np.uint8), minlength=256)).all()
    with pytest.raises(ValueError, match="bpe_vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=200)


# ---------------------------------------------------------------------------------------------------------------
# Data and metrics
# ---------------------------------------------------------------------------------------------------------------


def test_grouping_into_65536_token_blocks():
    from accelerate import Accelerator

    g = np.random.default_rng(0)
    docs = ["".join(g.choice(list("abcdefgh \n"), size=n)) for n in (70000, 50000, 20000)]
    raw = DatasetDict({"train": Dataset.from_dict({"text": docs}), "validation": Dataset.from_dict({"text": docs[:2]})})
    args = argparse.Namespace(
        text_column_name="text", block_size=65536, preprocessing_num_workers=None, overwrite_cache=True
    )
    tok = build_byte_tokenizer()
    lm = train_lm.tokenize_and_group(raw, tok, args, Accelerator(cpu=True))
    stream = [b for d in docs for b in list(d.encode()) + [tok.eos_token_id]]
    assert lm["train"].num_rows == len(stream) // 65536 == 2
    rows = lm["train"]["input_ids"]
    assert all(len(r) == 65536 for r in rows)
    assert rows[0] + rows[1] == stream[: 2 * 65536]  # documents concatenated in order, separated by </s>
    assert lm["validation"].num_rows == 1
    batch = train_lm.collate_blocks([lm["train"][0]])
    assert batch["input_ids"].shape == (1, 65536) and torch.equal(batch["labels"], batch["input_ids"])
    args.block_size = 200000
    with pytest.raises(ValueError, match="fewer than `--block_size`"):
        train_lm.tokenize_and_group(raw, tok, args, Accelerator(cpu=True))


def test_packing_keeps_the_blocks_and_restarts_positions_at_documents():
    """`--packing`: the train split's blocks are those of the concatenated stream (same tokens, no padding), with
    positions restarting at every document and every block start; validation blocks are unchanged."""
    from accelerate import Accelerator

    docs = ["a" * 50, "bcd" * 30, "e" * 45, "f" * 70]
    raw = DatasetDict({"train": Dataset.from_dict({"text": docs}), "validation": Dataset.from_dict({"text": docs})})
    args = argparse.Namespace(
        text_column_name="text", block_size=64, preprocessing_num_workers=None, overwrite_cache=True, packing=True
    )
    tok = build_byte_tokenizer()
    packed = train_lm.tokenize_and_group(raw, tok, args, Accelerator(cpu=True))
    args.packing = False
    plain = train_lm.tokenize_and_group(raw, tok, args, Accelerator(cpu=True))
    assert packed["train"]["input_ids"] == plain["train"]["input_ids"]
    assert packed["validation"].column_names == ["input_ids"]
    assert packed["validation"]["input_ids"] == plain["validation"]["input_ids"]
    lengths = [len(d) + 1 for d in docs]  # each document followed by </s>
    expected = [p for n in lengths for p in range(n)][: 4 * 64]
    rows = packed["train"]["position_ids"]
    assert len(rows) == 4 and all(len(r) == 64 for r in rows)
    for r, row in enumerate(rows):
        stream = expected[r * 64 : (r + 1) * 64]
        assert row == [p - stream[0] if all(q != 0 for q in stream[: i + 1]) else p for i, p in enumerate(stream)]
    batch = train_lm.collate_blocks([packed["train"][0], packed["train"][1]])
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert torch.equal(batch["labels"] == -100, batch["position_ids"] == 0)


def test_unigram_baseline_is_the_entropy_of_the_evaluated_bytes():
    tok = build_byte_tokenizer()
    counts = token_byte_counts(tok)
    # targets (positions 1..) of these blocks: 'a' x 6, 'b' x 2 -> H(0.75, 0.25)
    blocks = Dataset.from_dict({"input_ids": [[ord("z"), 97, 97, 97, 98], [ord("z"), 97, 97, 97, 98]]})
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert train_lm.unigram_baseline_bpb(blocks, counts) == pytest.approx(expected, rel=1e-12)


def test_evaluate_bits_per_byte_matches_loss_over_ln2():
    from accelerate import Accelerator

    from reformer_rev import RevFormerConfig, RevFormerForCausalLM

    torch.manual_seed(0)
    model = RevFormerForCausalLM(RevFormerConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    data = [{"input_ids": torch.randint(0, 256, (33,)).tolist()} for _ in range(5)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=train_lm.collate_blocks)
    acc = Accelerator(cpu=True)
    metrics = train_lm.evaluate(model, loader, acc, torch.ones(260, dtype=torch.long))
    with torch.no_grad():
        ids = torch.tensor([d["input_ids"] for d in data])
        ref = model(ids, labels=ids).loss.item()  # mean over the same 5 x 32 targets
    assert metrics["tokens"] == metrics["bytes"] == 5 * 32
    assert metrics["loss"] == pytest.approx(ref, rel=1e-5)
    assert metrics["bpb"] == pytest.approx(ref / math.log(2), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--block_size", "0"], "block_size"),
        (["--push_to_hub"], "hub_model_id"),
        (["--train_file", "/nonexistent.txt"], "does not exist"),
        (["--validation_file", str(REPO / "data" / "bible_lm" / "validation.jsonl.gz")], "need a `--train_file`"),
        (["--time_budget_minutes", "-1"], "time_budget_minutes"),
    ],
)
def test_bad_arguments_fail_early(argv, match):
    with pytest.raises(ValueError, match=match):
        train_lm.parse_args(argv)


def test_push_without_hub_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reformer_rev.hub", None)
    with pytest.raises(RuntimeError, match="push_checkpoint"):
        train_lm._get_push_function()


# ---------------------------------------------------------------------------------------------------------------
# End to end: train, evaluate, checkpoint, resume, save
# ---------------------------------------------------------------------------------------------------------------


def test_short_run_saves_everything(corpus_files, tmp_path):
    out = tmp_path / "run"
    results = train_lm.main(tiny_args(corpus_files, out, "--checkpointing_steps", "4", "--checkpoints_total_limit", "2"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["train"]["steps"] == 12 and saved["num_processes"] == 1
    # The drift monitor in every line of the per-step log, the worst value in the results: fp32 float streams drift
    # by rounding only.
    log = TrainLog.read(out)
    assert all(r["drift_probes"] >= 1 and 0 <= r["drift_worst_rel_err"] < 1e-4 for r in log)
    drift = saved["train"]["reversal_drift"]
    assert drift["worst_rel_err"] == max(r["drift_worst_rel_err"] for r in log) and drift["exceeded_threshold"] is False
    for split in ("validation", "test"):
        m = saved[split]
        assert m["bpb"] == pytest.approx(m["loss"] / math.log(2), rel=1e-9)  # byte tokenizer
        assert m["tokens"] > 0 and 0 < saved["unigram_bpb"][split] < 8
    # learning happened: final validation loss below the first periodic evaluation and below ln(vocab)
    assert saved["eval_history"][0]["step"] == 6
    assert results["validation"]["loss"] < math.log(260)
    # rotation kept the newest two complete checkpoints, no temp folders left
    assert [p.name for p in list_checkpoints(out)] == ["step_8", "step_12"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # save_pretrained output loads with the Auto classes, model card carries the measured numbers
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "RevFormerForCausalLM" and len(tok) == model.config.vocab_size == 260
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    metrics = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics[("validation", "bits_per_byte")] == pytest.approx(saved["validation"]["bpb"], rel=1e-9)
    assert metrics[("test", "bits_per_byte")] == pytest.approx(saved["test"]["bpb"], rel=1e-9)
    assert "custom_code" in card.data.tags and card.data.library_name == "transformers"
    # Named by the output folder, not by the temp folder of the atomic save it was written in (issue 24).
    assert card.data.model_name == "run" and card.text.lstrip().startswith("# run\n"), card.text[:80]
    assert f"{saved['unigram_bpb']['validation']:.6g}" in card.text  # the baseline is reported next to the model
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


def test_packed_run_trains(corpus_files, tmp_path):
    out = tmp_path / "packed"
    results = train_lm.main(tiny_args(corpus_files, out, "--packing"))
    assert results["train"]["steps"] == 12 and results["validation"]["loss"] < math.log(260)
    assert results["eval_history"][-1]["loss"] < results["eval_history"][0]["loss"] + 1e-9


def test_bf16_run_logs_exact_reversal(corpus_files, tmp_path):
    """Under bf16 autocast the streams are exact fixed point by default: the monitor reads 0.0 at every probe."""
    out = tmp_path / "bf16"
    results = train_lm.main(tiny_args(corpus_files, out, "--mixed_precision", "bf16", "--max_train_steps", "4",
                                      "--eval_steps", "0", "--sample_tokens", "0"))
    assert results["mixed_precision"] == "bf16"
    drift = results["train"]["reversal_drift"]
    assert drift["probes"] == 4 and drift["worst_rel_err"] == 0.0 and drift["last_rel_err"] == 0.0
    assert [r["drift_worst_rel_err"] for r in TrainLog.read(out)] == [0.0] * 4


def test_resume_continues_with_the_same_data_order(corpus_files, tmp_path):
    """Resuming from step 4 (dropout on) ends with exactly the weights of the uninterrupted run."""
    extra = ("--checkpointing_steps", "4", "--checkpoints_total_limit", "5", "--hidden_dropout", "0.1", "--eval_steps", "0")
    full = tmp_path / "full"
    train_lm.main(tiny_args(corpus_files, full, *extra))
    # an interrupted save must never be picked up as "latest"
    (full / "checkpoints" / ".tmp-step_99").mkdir()
    assert list_checkpoints(full)[-1].name == "step_12"
    keep = tmp_path / "step_4"
    shutil.copytree(full / "checkpoints" / "step_4", keep)
    for d in (full / "checkpoints").iterdir():
        if d.name != "step_12":
            shutil.rmtree(d)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(keep, resumed / "checkpoints" / "step_4")
    results = train_lm.main(tiny_args(corpus_files, resumed, *extra, "--resume_from_checkpoint", "latest"))
    assert results["train"]["steps"] == 12
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, worst
    # an explicit folder that is no checkpoint fails clearly (no fallback)
    with pytest.raises(CheckpointError, match=r"manifest.json: missing"):
        train_lm.main(tiny_args(corpus_files, tmp_path / "other", *extra, "--resume_from_checkpoint", str(tmp_path)))
