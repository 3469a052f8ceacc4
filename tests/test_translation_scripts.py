"""The translation scripts end to end on a tiny slice of the bundled corpus, and their building blocks."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

from reformer_rev.training.checkpointing import list_checkpoints
from reformer_rev.training.loop import TrainLog
from reformer_rev.training.translation import (
    ChrFScore,
    SacreBleuScore,
    build_marian,
    collate,
    document_ids,
    group_into_documents,
    length_grouped_batches,
    load_translation_data,
    pairs,
    peak_step_bytes,
    seq2seq_loss,
    token_budget_batches,
    train_joint_tokenizer,
    trainable_parameters,
    translation_scores,
)


TEXTS = ["In the beginning God created the heavens and the earth.", "En el principio crió Dios los cielos y la tierra."]


def test_joint_tokenizer_round_trip_and_eos():
    tok = train_joint_tokenizer(TEXTS * 20, vocab_size=300, min_frequency=1)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    for text in TEXTS + ["¿Quién subirá? — ñandú 123"]:  # unseen characters are still bytes of the alphabet
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
    assert tok(text_target=TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]


def test_unigram_tokenizer_with_byte_fallback_round_trip():
    tok = train_joint_tokenizer(TEXTS * 20, vocab_size=400, model="unigram")
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    vocab = tok.get_vocab()
    assert all(f"<0x{b:02X}>" in vocab for b in range(256))
    for text in TEXTS + ["¿Quién subirá? — ñandú 123 漢字"]:  # unseen characters are spelt in UTF-8 bytes
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert "<0xE6>" in tok.convert_ids_to_tokens(tok("漢")["input_ids"])  # really byte fallback, not <unk>
    with pytest.raises(ValueError, match="tokenizer_model"):
        train_joint_tokenizer(TEXTS, vocab_size=400, model="wordpiece")


def test_token_budget_batches_respect_the_budget_and_are_deterministic():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 60, (500,), generator=g).tolist()
    tgt = torch.randint(3, 60, (500,), generator=g).tolist()
    src[7], tgt[7] = 300, 280  # longer than the budget: a batch of its own
    batches = token_budget_batches(src, tgt, max_tokens=400, seed=1, max_pairs=12)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        padded = len(b) * (max(src[i] for i in b) + max(tgt[i] for i in b))
        assert (padded <= 400 or len(b) == 1) and len(b) <= 12
    assert [7] in batches
    assert batches == token_budget_batches(src, tgt, max_tokens=400, seed=1, max_pairs=12)
    assert batches != token_budget_batches(src, tgt, max_tokens=400, seed=2, max_pairs=12)
    # Sorting within pools keeps batches full: on average most of the budget is used.
    assert sum(len(b) * (max(src[i] for i in b) + max(tgt[i] for i in b)) for b in batches) / len(batches) > 300
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(src, tgt, max_tokens=0, seed=1)


def test_documents_join_consecutive_verses_of_a_chapter():
    raw = load_translation_data()
    split = raw["validation"].select(range(120))
    docs = document_ids(split)
    assert docs[0] == "Judges 1" and docs[-1].startswith("Judges ")
    src, tgt = pairs(split, "en", "es")

    def words(texts):
        return [len(t.split()) for t in texts]

    joined_src, joined_tgt, groups = group_into_documents(src, tgt, docs)
    assert [i for g in groups for i in g] == list(range(120))  # every verse once, in order
    assert len(groups) == len(set(docs)) and all(len({docs[i] for i in g}) == 1 for g in groups)
    assert joined_src[0] == " ".join(src[i] for i in groups[0]) and joined_tgt[0].startswith(tgt[0])
    assert len(groups[0]) == 36  # Judges 1 has 36 verses
    # A token limit cuts chapters between verses into pieces that fit (count + </s> <= limit).
    _, cut_tgt, pieces = group_into_documents(src, tgt, docs, words, max_tokens=200)
    assert [i for g in pieces for i in g] == list(range(120)) and len(pieces) > len(groups)
    for g, text in zip(pieces, cut_tgt):
        assert len({docs[i] for i in g}) == 1
        assert len(g) == 1 or max(sum(words([src[i] for i in g])), len(text.split())) < 200
    with pytest.raises(ValueError, match="ref"):
        document_ids(split.remove_columns("ref"))
    with pytest.raises(ValueError, match="verse reference"):
        document_ids(split.select(range(2)).map(lambda r: {"ref": "Judges"}))


def test_marian_baseline_has_equal_parameters_and_generates():
    from reformer_rev import RevFormerConfig, RevFormerForConditionalGeneration

    config = RevFormerConfig(vocab_size=300, hidden_size=64, encoder_layers=2, decoder_layers=3, num_hidden_layers=3,
                             num_attention_heads=4, intermediate_size=160, is_encoder_decoder=True, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, tie_word_embeddings=True)
    reference = trainable_parameters(RevFormerForConditionalGeneration(config))
    marian = build_marian(reference, vocab_size=300, hidden_size=64, encoder_layers=2, decoder_layers=3,
                          num_attention_heads=4, dropout=0.1, attention_dropout=0.0, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=2, decoder_start_token_id=1)
    assert type(marian).__name__ == "MarianMTModel"
    assert abs(trainable_parameters(marian) / reference - 1) < 0.02
    assert marian.config.d_model == 64 and marian.config.encoder_layers == 2 and marian.config.decoder_layers == 3
    # Shared embeddings and output layer, as the reformer_rev model ties them.
    assert marian.get_output_embeddings().weight is marian.get_input_embeddings().weight
    marian.eval()
    src = torch.randint(4, 300, (2, 9))
    out = marian.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=5, num_beams=1)
    assert out.shape[1] <= 6 and (out[:, 0] == 1).all()  # starts with decoder_start_token_id, nothing forced


def test_label_smoothed_loss_and_peak_step_memory():
    from reformer_rev import RevFormerConfig, RevFormerForConditionalGeneration

    config = RevFormerConfig(vocab_size=50, hidden_size=32, encoder_layers=1, decoder_layers=2, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64, is_encoder_decoder=True, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, hidden_dropout=0.1)
    torch.manual_seed(0)
    model = RevFormerForConditionalGeneration(config).double()
    src = torch.randint(3, 50, (3, 7))
    labels = torch.randint(3, 50, (3, 6))
    labels[1, 4:] = -100
    batch = {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": labels}
    model.eval()
    assert seq2seq_loss(model, batch, 0.0).item() == pytest.approx(model(**batch).loss.item(), rel=1e-12)
    logits = model(**batch, return_logits=True).logits
    keep = labels != -100
    logp = logits.log_softmax(-1)[keep]
    manual = -(0.9 * logp.gather(-1, labels[keep][:, None]).squeeze(-1) + 0.1 * logp.mean(-1)).mean()
    assert seq2seq_loss(model, batch, 0.1).item() == pytest.approx(manual.item(), rel=1e-10)
    # The memory probe trains on the batch without touching the global RNG and leaves no gradient behind.
    model.train()
    state = torch.get_rng_state()
    measured = peak_step_bytes(model, batch, 0.1)
    assert measured["peak_bytes"] > 0 and measured["target_tokens"] == labels.numel()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def test_length_grouped_batches_partition_and_determinism():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = length_grouped_batches(lengths, 16, seed=3, pool=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert batches == length_grouped_batches(lengths, 16, seed=3, pool=4)
    assert batches != length_grouped_batches(lengths, 16, seed=4, pool=4)
    # grouping keeps padding low: mean within-batch spread far below the global spread
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30


def test_collate_pads_inputs_and_ignores_label_padding():
    batch = collate([{"input_ids": [5, 6, 2], "labels": [7, 2]}, {"input_ids": [5, 2], "labels": [8, 9, 2]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [5, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 2, -100], [8, 9, 2]]


def test_metrics_match_sacrebleu():
    hyps = ["el principio crió Dios los cielos", "y la tierra estaba vacía"]
    refs = ["En el principio crió Dios los cielos y la tierra.", "Y la tierra estaba desordenada y vacía."]
    scores = translation_scores(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-3)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-3)
    assert 0 < scores["bleu"] < 100
    assert SacreBleuScore().compute(predictions=refs, references=[[r] for r in refs])["score"] == pytest.approx(100)
    assert ChrFScore().compute(predictions=refs, references=[[r] for r in refs])["score"] == pytest.approx(100)


def test_bundled_corpus_pairs_and_language_errors():
    raw = load_translation_data()
    assert {"train", "validation", "test"} <= set(raw)
    src, tgt = pairs(raw["test"], "en", "es")
    assert len(src) == len(tgt) > 1000 and all(src[:50]) and all(tgt[:50])
    with pytest.raises(ValueError, match="--target_lang"):
        pairs(raw["test"], "en", "de")


TINY = [
    "--max_train_samples", "48", "--max_eval_samples", "12", "--val_bleu_samples", "4", "--bpe_vocab_size", "320",
    "--hidden_size", "32", "--intermediate_size", "64", "--encoder_layers", "1", "--decoder_layers", "2",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_new_tokens", "6",
    "--learning_rate", "3e-3", "--num_warmup_steps", "1", "--lr_scheduler_type", "constant_with_warmup",
    "--logging_steps", "1", "--num_threads", "1", "--max_source_length", "48", "--max_target_length", "48",
]


@pytest.mark.slow
def test_train_resume_and_eval_end_to_end(tmp_path, fresh_accelerate_state):
    from eval import eval_translation
    from training import train_translation

    straight = tmp_path / "straight"
    summary = train_translation.main(TINY + ["--output_dir", str(straight), "--max_train_steps", "8",
                                             "--eval_steps", "4", "--checkpointing_steps", "4"])
    assert summary["step"] == 8 and summary["stop_reason"] == "max_steps"
    log = TrainLog.read(straight)
    evals = json.loads((straight / "train_summary.json").read_text())["evals"]
    assert [r["step"] for r in log] == list(range(1, 9)) and all(math.isfinite(r["loss"]) for r in log)
    # The engine's drift monitor in every log line and its worst value in the summary (fp32 float streams: probed,
    # small, not exact).
    drift = summary["reversal_drift"]
    assert drift["probes"] >= 1 and log[0]["drift_probes"] >= 1
    assert drift["worst_rel_err"] == max(r["drift_worst_rel_err"] for r in log) and 0 <= drift["worst_rel_err"] < 1e-3
    assert [r["step"] for r in evals] == [4, 8] and all(0 <= r["val_bleu"] <= 100 for r in evals)
    assert evals[-1]["val_loss"] < math.log(320)  # learnt something beyond a uniform guess over the vocabulary
    for name in ("best", "final"):
        assert (straight / name / "model.safetensors").is_file() and (straight / name / "tokenizer.json").is_file()
        assert (straight / name / "modeling_reformer_rev_seq2seq.py").is_file()
    assert (straight / "loss_curve.png").stat().st_size > 0
    assert [p.name for p in list_checkpoints(straight)] == ["step_4", "step_8"]

    # Stop after 4 steps, resume to 8: the same weights and per-step losses as the straight run (data order, RNG,
    # optimizer and schedule restored from the pickle-free checkpoint).
    resumed = tmp_path / "resumed"
    train_translation.main(TINY + ["--output_dir", str(resumed), "--max_train_steps", "4", "--eval_steps", "100",
                                   "--checkpointing_steps", "100"])
    summary = train_translation.main(TINY + ["--output_dir", str(resumed), "--max_train_steps", "8", "--eval_steps",
                                             "100", "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest"])
    assert summary["step"] == 8
    assert [r["loss"] for r in TrainLog.read(resumed)] == [r["loss"] for r in log]
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0

    out = tmp_path / "test_eval"
    scores = eval_translation.main(["--model_name_or_path", str(straight / "final"), "--output_dir", str(out),
                                    "--max_samples", "6", "--num_beams", "2", "--max_new_tokens", "6",
                                    "--batch_size", "4", "--trust_remote_code"])
    assert scores["num_pairs"] == 6 and 0 <= scores["bleu"] <= 100 and 0 <= scores["chrf"] <= 100
    assert scores["copy_source_chrf"] > 0
    assert scores["num_chapters"] == 1 and 0 <= scores["chapter_chrf"] <= 100  # the 6 verses joined as Judges 1
    assert len((out / "predictions.txt").read_text().splitlines()) == 6
    assert json.loads((out / "scores.json").read_text())["bleu"] == scores["bleu"]


@pytest.mark.slow
def test_marian_baseline_run_with_token_batches_and_spread_evaluations(tmp_path, fresh_accelerate_state):
    from training import train_translation

    out = tmp_path / "marian"
    summary = train_translation.main(TINY + [
        "--output_dir", str(out), "--architecture", "marian", "--max_train_steps", "6", "--num_evaluations", "3",
        "--max_tokens_per_batch", "600", "--label_smoothing", "0.1", "--num_sample_translations", "2",
        "--checkpointing_steps", "100"])
    assert summary["model"] == "MarianMTModel (standard)" and summary["step"] == 6
    evals = json.loads((out / "train_summary.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [2, 4, 6]  # evenly spread over the run, the last one the final evaluation
    for e in evals:
        assert e["copy_source_chrf"] > 0 and e["minutes"] > 0 and e["cpu_minutes"] > 0 and "samples" not in e
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4, 6] and all(len(s["samples"]) == 2 for s in samples)
    assert set(samples[0]["samples"][0]) == {"source", "prediction", "reference"}
    for key in ("peak_step_memory_mb", "peak_rss_mb", "cpu_seconds", "tokens_per_second", "target_tokens_seen"):
        assert summary[key] > 0, key
    assert len(summary["load_average_start"]) == 3
    # Token batches: no step trained on more than the budget (the largest batch is what the memory probe used).
    batch = summary["peak_step_batch"]
    assert batch["source_tokens"] + batch["target_tokens"] <= 600
    assert (out / "translation_curve.png").stat().st_size > 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "marian" and config["forced_eos_token_id"] is None

    # The same arguments with the reformer_rev architecture: the parameter counts match within 3% (at this tiny
    # width one step of the 16-aligned feed-forward width is 2.5% of the model; 0.3% at the recipe's size).
    rev = train_translation.main(TINY + ["--output_dir", str(tmp_path / "rev"), "--max_train_steps", "1",
                                         "--checkpointing_steps", "100", "--val_bleu_samples", "0"])
    assert abs(summary["parameters"] / rev["parameters"] - 1) < 0.03
    with pytest.raises(ValueError, match="no_reversible"):
        train_translation.parse_args(TINY + ["--output_dir", "x", "--architecture", "marian", "--no_reversible"])


@pytest.mark.slow
def test_document_level_run_trains_and_translates_chapters(tmp_path, fresh_accelerate_state):
    from eval import eval_translation
    from training import train_translation

    out = tmp_path / "docs"
    summary = train_translation.main(TINY + [
        "--output_dir", str(out), "--max_train_samples", "120", "--max_eval_samples", "60", "--document_level",
        "--max_document_tokens", "1200", "--max_train_steps", "2", "--eval_steps", "2", "--checkpointing_steps",
        "100", "--per_device_train_batch_size", "2", "--max_new_tokens", "8"])
    # Genesis 1-5 (120 verses) become a few multi-verse documents, each within the token limit.
    assert summary["train_verses"] == 120 and 4 <= summary["train_pairs"] < 120 // 10
    assert summary["args"]["max_source_length"] >= 1200 and summary["peak_step_batch"]["source_tokens"] > 200
    samples = json.loads((out / "eval_samples.jsonl").read_text().splitlines()[0])["samples"]
    assert samples[0]["source"].startswith("After the death of Joshua") and samples[0]["source"].count(".") > 5

    scores = eval_translation.main(["--model_name_or_path", str(out / "final"), "--output_dir", str(tmp_path / "t"),
                                    "--max_samples", "60", "--num_beams", "1", "--max_new_tokens", "8",
                                    "--document_level", "--max_document_tokens", "1200"])
    assert scores["document_level"] and scores["num_verses"] == 60 and scores["num_pairs"] < 10
    lines = (tmp_path / "t" / "sources.txt").read_text().splitlines()
    assert len(lines) == scores["num_pairs"] and lines[0].startswith("Now King David was old")  # 1 Kings 1


@pytest.mark.slow
def test_memory_benchmark_reversible_below_twin_and_marian(tmp_path):
    from eval import bench_translation_memory

    results = bench_translation_memory.main([
        "--lengths", "192", "--output_dir", str(tmp_path), "--train_args",
        "--hidden_size 32 --intermediate_size 64 --encoder_layers 3 --decoder_layers 3 --bpe_vocab_size 400"])
    records = {r["candidate"]: r for r in results["records"]}
    assert all(r["status"] == "ok" for r in records.values()), records
    peak = {name: r["peak_activation_bytes"] for name, r in records.items()}
    # Three blocks per stack: the reversible model keeps one block's activations, the others all of them.
    assert peak["reversible"] < 0.8 * peak["twin"] and peak["reversible"] < 0.8 * peak["marian"]
    assert records["marian"]["model_type"] == "marian"
    assert abs(records["marian"]["parameters"] / records["reversible"]["parameters"] - 1) < 0.03
    assert (tmp_path / "translation_memory.md").read_text().count("| 192 |") == 1


def test_translation_table_averages_seeds_but_not_a_sweep_over_shapes(tmp_path):
    from eval import translation_table

    def run(name, seed, hidden, chrf, val_loss):
        folder = tmp_path / name
        (folder / "test").mkdir(parents=True)
        summary = {
            "model": "reversible encoder-decoder", "parameters": hidden * 1000, "step": 10, "minutes": 1.0,
            "vocab_size": 4000, "tokens_per_second": 100.0, "target_tokens_seen": 1000, "cpu_seconds": 60.0,
            "torch_threads": 1, "last_eval": {"val_loss": val_loss, "val_chrf": chrf - 1},
            "args": {"seed": seed, "hidden_size": hidden, "encoder_layers": 3, "decoder_layers": 3,
                     "learning_rate": 3e-3, "time_budget_minutes": 20.0},
        }
        (folder / "train_summary.json").write_text(json.dumps(summary))
        scores = {"chrf": chrf, "bleu": chrf / 4, "num_beams": 1, "num_pairs": 5, "copy_source_chrf": 17.0,
                  "copy_source_bleu": 0.1}
        (folder / "test" / "scores.json").write_text(json.dumps(scores))
        return folder

    runs = [run("a", 1, 96, 30.0, 3.0), run("b", 2, 96, 34.0, 2.0), run("c", 1, 256, 12.0, 4.5)]
    rows = translation_table.main([*(f"--run={r}" for r in runs), "--output", str(tmp_path / "table")])
    assert [r["shape"] for r in rows] == ["d=96, 3+3, vocab 4,000"] * 2 + ["d=256, 3+3, vocab 4,000"]
    text = (tmp_path / "table.md").read_text()
    means = text.split("mean test chrF")[1].strip().splitlines()[2:]
    # The two seeds of d=96 are averaged (chrF 32.0, loss 2.500); the d=256 run has no partner and no mean row.
    assert means == ["| reversible encoder-decoder | d=96, 3+3, vocab 4,000 | 0.003 | 2 | 32.0 | 8.0 | 2.500 |"]
    assert json.loads((tmp_path / "table.json").read_text())[2]["val_chrf"] == 11.0
    assert "Copying the English source scores chrF 17.0" in text
