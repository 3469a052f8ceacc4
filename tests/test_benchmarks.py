"""Smoke tests of the benchmarks in eval/: each runs at a tiny size and writes its JSON, markdown and plots.

No timing assertions (the CI machine is shared); memory assertions only where the ordering is structural.
"""

from __future__ import annotations

import json

import pytest

from eval import _bench_common, bench_memory, bench_speed

TINY = ["--hidden_size", "32", "--num_heads", "4", "--ffn_size", "64", "--rev_intermediate_size", "43", "--vocab_size", "64"]


def test_least_squares_and_summary():
    slope, intercept = _bench_common.least_squares([2, 8, 24], [10.0, 22.0, 54.0])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(6.0)
    assert _bench_common.least_squares([4], [3.0]) == (0.0, 3.0)
    s = _bench_common.summary([3.0, 1.0, 2.0, 10.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.5, 10.0, 4)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="candidate"):
        _bench_common.BenchShape(candidate="gpt3")
    with pytest.raises(ValueError, match="local_chunk_length"):
        _bench_common.BenchShape(candidate="hf_reformer_local", seq_len=100)
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--candidates", "reversible,nope"])
    with pytest.raises(ValueError, match="baseline"):
        bench_speed.parse_args(["--candidates", "twin,gpt2"])


def test_every_candidate_builds_and_trains_at_equal_shape():
    """All candidates accept the same tiny shape and take a finite training step (what the benchmarks time)."""
    import torch

    counts = {}
    for name in _bench_common.CANDIDATES:
        shape = _bench_common.BenchShape(
            candidate=name, num_layers=2, seq_len=64, hidden_size=32, ffn_size=64, rev_intermediate_size=43,
            vocab_size=64, local_chunk_length=16,
        )
        model = _bench_common.build_model(shape)
        opt = _bench_common.make_optimizer(model)
        _bench_common.warm_up(model, opt, shape)
        loss = _bench_common.make_step(model, opt, _bench_common.make_batch(shape))()
        assert torch.isfinite(torch.tensor(loss)), name
        counts[name] = sum(p.numel() for p in model.parameters())
    # The reversible model and its twin are the same modules.
    assert counts["reversible"] == counts["twin"]


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path):
    """Fresh-process depth sweep: files written; reversible memory flat in depth and below its twin's."""
    out = bench_memory.main(
        ["--output_dir", str(tmp_path), "--candidates", "reversible,twin", "--depths", "1,4", "--max_depth", "twin=1",
         "--depth_sweep_seq_len", "256", "--sweeps", "depth", "--threads", "1", "--timeout", "120", *TINY]
    )
    for name in ("memory.json", "memory.md", "memory_vs_depth.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "memory.json").read_text())
    assert [r["status"] for r in data["records"]] == ["ok"] * 3, data["records"]
    peak = {(r["shape"]["candidate"], r["shape"]["num_layers"]): r["peak_activation_bytes"] for r in data["records"]}
    fit = out["depth_fits"]["reversible"]
    # Flat in depth: 3 more layers add < 5% of the constant (a stored activation per layer would add ~1 twin layer).
    assert abs(fit["slope_mb_per_layer"]) * 3 < 0.05 * fit["intercept_mb"]
    assert peak[("twin", 1)] > peak[("reversible", 1)]
    assert "MB / layer" in (tmp_path / "memory.md").read_text()


def test_worker_process_memory_mode():
    """The `--rss_runs` path (no profiler): the step runs and the peak RSS covers at least the start RSS."""
    shape = dict(candidate="reversible", num_layers=1, seq_len=64, hidden_size=32, ffn_size=64, rev_intermediate_size=43,
                 vocab_size=64)
    rec = _bench_common.worker_main({"shape": shape, "mode": "rss", "threads": 1})
    assert rec["status"] == "ok" and "peak_activation_bytes" not in rec
    # torch alone keeps > 100 MB resident; the RSS figures are process-wide (in pytest they include other tests).
    assert rec["peak_rss_bytes"] > 100 * 2**20 and rec["rss_at_start_bytes"] > 100 * 2**20
    assert rec["step_seconds"] > 0 and rec["num_parameters"] > 0
    with pytest.raises(ValueError, match="mode"):
        _bench_common.worker_main({"shape": shape, "mode": "bogus"})


def test_bench_speed_smoke(tmp_path):
    bench_speed.main(
        ["--output_dir", str(tmp_path), "--candidates", "reversible,twin", "--depths", "2", "--seq_lens", "64",
         "--repeats", "2", "--warmup_steps", "0", "--threads", "1", *TINY]
    )
    data = json.loads((tmp_path / "speed.json").read_text())
    res = data["results"][0]
    assert res["rounds"] == 2 and len(res["step_seconds"]["twin"]) == 2
    ratio = res["ratios_vs_baseline"]["twin"]
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    assert (tmp_path / "speed_ratio.png").stat().st_size > 0
    assert "tokens/s" in (tmp_path / "speed.md").read_text()


def test_bench_packing_smoke(tmp_path):
    """Packed, padded and concatenated batches hold the same real tokens; only the padded ones carry padding."""
    from eval import bench_packing

    result = bench_packing.main(["--documents", "24", "--block_size", "128", "--batch_docs", "4", "--hidden_size", "32",
                                 "--num_hidden_layers", "1", "--rounds", "1", "--output_dir", str(tmp_path)])
    batches = result["batches"]
    assert batches["packed"]["padded_tokens"] == batches["concatenated"]["padded_tokens"] == 0
    assert batches["padded"]["padded_tokens"] > 0
    assert batches["packed"]["real_tokens"] == batches["concatenated"]["real_tokens"]
    assert abs(batches["padded"]["real_tokens"] - batches["packed"]["real_tokens"]) < 0.5 * batches["packed"]["real_tokens"]
    assert all(v > 0 for v in result["tokens_per_second"].values())
    assert json.loads((tmp_path / "packing.json").read_text())["tokens_per_second"] == result["tokens_per_second"]
    assert "--documents 24" in (tmp_path / "packing.md").read_text()
