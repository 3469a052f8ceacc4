"""`training/train_lm.py --model_name_or_path` on ordinary pretrained checkpoints (Llama, GPT-2) made reversible.

The checkpoints are tiny random models saved with `save_pretrained` into local folders: the Hub-id path goes through
the same `from_pretrained` calls. Checked end to end: training runs through `make_reversible` (exact streams: the
drift monitor reads 0.0), a resume from a checkpoint reproduces the uninterrupted run's per-step losses and final
weights bit for bit (GPT-2 with dropout on), and the output is a plain checkpoint of the original class that stock
`transformers` loads without `reformer_rev`, with the same logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import cut_bundled_corpus
from reformer_rev import is_reversible
from reformer_rev.training.loop import TrainLog
from reformer_rev.training.tokenization import build_byte_tokenizer
from training import train_lm

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, Path]:
    return cut_bundled_corpus(tmp_path_factory.mktemp("corpus"), {"train": (3, 4000), "validation": (2, 1200)})


def save_tiny_pretrained(folder: Path, family: str, with_tokenizer: bool) -> Path:
    """A random 2-layer model sized for the byte tokenizer, saved like any Hub checkpoint (optionally with it)."""
    tokenizer = build_byte_tokenizer()
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **special)
        model = LlamaForCausalLM(config)
    else:  # dropout on everywhere GPT-2 has it: the resume must replay it exactly
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.1, attn_pdrop=0.1,
                            embd_pdrop=0.1, **special)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


def run_args(corpus_files, model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--train_file", str(corpus_files["train"]),
        "--validation_file", str(corpus_files["validation"]), "--output_dir", str(output_dir),
        "--block_size", "32", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8",
        "--max_train_steps", "6", "--num_warmup_steps", "1", "--learning_rate", "3e-3", "--eval_steps", "0",
        "--max_eval_blocks", "8", "--logging_steps", "1", "--sample_tokens", "8", "--time_budget_minutes", "0",
        "--checkpointing_steps", "3", "--checkpoints_total_limit", "5", "--cpu", *extra,
    ]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in TrainLog.read(output_dir)]


@pytest.mark.parametrize(
    "family, with_tokenizer, extra",
    [("llama", True, ()), ("gpt2", False, ("--tokenizer_type", "byte", "--gradient_accumulation_steps", "2"))],
    ids=["llama", "gpt2-dropout-accumulation"],
)
def test_pretrained_checkpoint_finetunes_reversibly_resumes_exactly_and_saves_plain(
    corpus_files, tmp_path, family, with_tokenizer, extra
):
    model_dir = save_tiny_pretrained(tmp_path / f"pretrained-{family}", family, with_tokenizer)
    full = tmp_path / "full"
    results = train_lm.main(run_args(corpus_files, model_dir, full, *extra))
    architecture = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert results["model"]["architecture"] == architecture
    assert results["model"]["reversible"] is True and results["base_model"] == str(model_dir)
    assert results["train"]["steps"] == 6 and results["tokenizer"] == "byte"
    # Through the reversible engine, with exact fixed-point streams: probed, and the reconstruction is exact.
    drift = results["train"]["reversal_drift"]
    assert drift["probes"] >= 1 and drift["worst_rel_err"] == 0.0, drift
    log = TrainLog.read(full)
    assert all(r["drift_probes"] >= 1 and r["drift_worst_rel_err"] == 0.0 for r in log)
    # make_reversible's fidelity probe: the first training forward is probed (then one in 50), and the log says by how
    # much the training-time coupling moved that batch's loss.
    assert all(r["fidelity_probes"] == 1 for r in log)
    assert 0 < abs(log[0]["fidelity_last_rel_change"]) < 0.01, log[0]

    # Resume from step 3 (a fresh folder holding only that checkpoint): same per-step losses, same final weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    train_lm.main(run_args(corpus_files, model_dir, resumed, *extra, "--resume_from_checkpoint", "latest"))
    full_losses, resumed_losses = losses(full), losses(resumed)
    # (the fresh folder has no log of steps 1-3: its log starts at the checkpoint)
    assert len(full_losses) == 6 and resumed_losses == full_losses[3:]
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A plain checkpoint of the original class: no remote code, no reformer_rev model type.
    config = json.loads((full / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert not list(full.glob("*.py"))
    card = ModelCard.load(full / "README.md")
    assert "custom_code" not in card.data.tags and "reversible-fine-tuning" in card.data.tags
    assert card.data.base_model is None  # a local folder is no Hub id; the text names it
    assert "fine-tuned **reversibly**" in card.text and str(model_dir) in card.text

    # Stock transformers, without reformer_rev importable, loads it as the original class with the same logits.
    model = AutoModelForCausalLM.from_pretrained(full).eval()
    assert not is_reversible(model)
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["reformer_rev"] = None  # `import reformer_rev` would raise: only transformers loads this
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(full)!r}).eval()
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            diff = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
        print(type(model).__name__, diff)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, diff = out.stdout.split()[-2:]
    assert name == architecture and float(diff) == 0.0


def test_no_reversible_finetunes_the_model_as_it_is(corpus_files, tmp_path):
    model_dir = save_tiny_pretrained(tmp_path / "pretrained", "llama", with_tokenizer=True)
    results = train_lm.main(run_args(corpus_files, model_dir, tmp_path / "out", "--no_reversible",
                                     "--max_train_steps", "2", "--checkpointing_steps", "2"))
    assert results["model"]["reversible"] is False and results["train"]["steps"] == 2
    # Plain autograd: the engine never ran, so the drift monitor has nothing to say.
    assert results["train"]["reversal_drift"]["probes"] == 0
    assert results["train"]["reversal_drift"]["worst_rel_err"] is None
    assert "ordinary autograd" in (tmp_path / "out" / "README.md").read_text()


def test_pretrained_checkpoint_without_tokenizer_is_refused_clearly(corpus_files, tmp_path):
    model_dir = save_tiny_pretrained(tmp_path / "pretrained", "gpt2", with_tokenizer=False)
    with pytest.raises(ValueError, match=r"has no tokenizer.*--tokenizer_name"):
        train_lm.main(run_args(corpus_files, model_dir, tmp_path / "out"))


def test_a_translation_run_cannot_start_from_a_causal_lm(tmp_path):
    from reformer_rev.training.models import load_pretrained

    model_dir = save_tiny_pretrained(tmp_path / "pretrained", "llama", with_tokenizer=False)
    with pytest.raises(ValueError, match=r"train_lm\.py"):
        load_pretrained(str(model_dir), "translation", None)
