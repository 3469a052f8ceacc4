"""Smoke test of the conversion benchmark: pretrain tiny standard models, fine-tune them three ways, reload plainly."""

from __future__ import annotations

import json

import pytest

from eval import bench_convert, pretrain_small


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench_convert.parse_args(["--candidates", "rev,nope"])
    with pytest.raises(SystemExit):
        bench_convert.parse_args(["--candidates", "ckpt,rev"])  # no baseline
    with pytest.raises(SystemExit):
        bench_convert.parse_args(["--skip", "everything"])
    with pytest.raises(SystemExit):
        bench_convert.parse_args(["--model_name_or_path", "llama"])
    with pytest.raises(SystemExit):
        pretrain_small.parse_args(["--families", "llama,bert"])
    args = bench_convert.parse_args(["--model_name_or_path", "gpt2=org/name", "--families", "gpt2"])
    assert args.paths == {"gpt2": "org/name"}  # a Hub id goes to from_pretrained unchanged


@pytest.mark.slow
def test_pretrain_then_benchmark_end_to_end(tmp_path):
    pretrained = tmp_path / "pretrained"
    runs = pretrain_small.main([
        "--output_dir", str(pretrained), "--max_books", "2", "--vocab_size", "300", "--max_steps", "3",
        "--num_layers", "2", "--seq_len", "32", "--batch_size", "2", "--threads", "1",
    ])
    assert [r["class"] for r in runs] == ["LlamaForCausalLM", "GPT2LMHeadModel"]
    config = json.loads((pretrained / "llama" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    out = tmp_path / "bench"
    results = bench_convert.main([
        "--pretrained_dir", str(pretrained), "--steps", "3", "--seq_len", "32", "--batch_size", "2",
        "--valid_blocks", "4", "--fidelity_blocks", "2", "--max_train_verses", "300", "--memory_depths", "1,3", "--memory_batch_size", "1", "--output_dir", str(out),
    ])
    assert json.loads((out / "results.json").read_text())["families"].keys() == {"llama", "gpt2"}
    assert "(c) make_reversible" in (out / "results.md").read_text()
    for family, res in results["families"].items():
        cands = res["finetune"]["candidates"]
        assert {c["reloaded_class"] for c in cands.values()} == {runs[0]["class"] if family == "llama" else runs[1]["class"]}
        # Activation checkpointing replays the same computation: (b) ends where (a) does.
        assert cands["ckpt"]["validation_loss_vs_plain"] == pytest.approx(0.0, abs=1e-5)
        assert cands["rev"]["validation_loss_plain_reload"] > 0
        growth = res["memory"]["growth_mb_per_layer"]
        assert growth["rev"] < growth["plain"] / 10, growth
        for fid in res["fidelity"].values():  # English and Spanish
            assert fid["relative_change"]["original"] == 0.0 and set(fid["relative_change"]) >= {"heavy_ball", "bdia"}


def test_merge_results_joins_families_and_refuses_different_settings(tmp_path):
    settings = {"candidates": ["plain", "rev"], "steps": 150, "batch_size": 8, "seq_len": 256, "threads": 1}
    paths = []
    for family, seq_len in (("llama", 256), ("gpt2", 256), ("gpt2", 128)):
        path = tmp_path / f"{family}_{seq_len}.json"
        path.write_text(json.dumps({"settings": {**settings, "seq_len": seq_len, "families": [family]},
                                    "families": {family: {"path": f"pretrained/{family}"}}}))
        paths.append(str(path))
    merged = bench_convert.merge_results(paths[:2])
    assert merged["settings"]["families"] == ["llama", "gpt2"]
    assert merged["families"]["gpt2"] == {"path": "pretrained/gpt2"}
    with pytest.raises(ValueError, match="seq_len"):  # other blocks: not one table
        bench_convert.merge_results([paths[0], paths[2]])
