"""The README's examples run as written (placeholders such as `org/name-or-local-dir` or `my.txt` replaced by local
files), its numbers agree with the measured results in docs/, and `make setup` says what it is doing.

Every fenced code block of the README is listed in BLOCKS, either run or skipped with the reason, so a new example
fails this test until it is classified.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# A distinctive piece of each block -> None to run it, or why it is not run here.
BLOCKS = {
    "make train   # set up .venv": "the main job and the whole suite themselves (minutes)",
    "AutoConfig.for_model(": None,
    "reformer_rev.safe_io.save_pretrained_safely(model, \"out/final\")": None,
    "make train        # = python training/train_lm.py": "the main job itself (9 minutes)",
    "accelerate launch --config_file training/configs/ddp.yaml": "GPU launchers and the 9-minute main job; the CPU "
                                                                  "torchrun path is tests/test_distributed.py",
    "--model_name_or_path path/to/llama": None,
    "python -m reformer_rev.hub push": "needs a Hub token and network (tests/test_hub.py runs the client against a "
                                       "loopback Hub server)",
    'from_pretrained("you/revformer-lm")': None,
    "python training/train_translation.py --output_dir outputs/mt_rev": "a 30-minute run "
                                                                         "(tests/test_translation_scripts.py runs it "
                                                                         "on a tiny slice)",
    "num_unique_layers=2)": None,
    "num_hidden_layers=1024": None,
}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block."""
    return re.findall(r"```(\w+)\n(.*?)```", README.read_text(), flags=re.S)


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    blocks = readme_blocks()
    for _, code in blocks:
        keys = [k for k in BLOCKS if k in code]
        assert len(keys) == 1, f"classify this README block in BLOCKS (run it, or say why not):\n{code[:300]}"
    assert len(blocks) == len(BLOCKS)


def _block(key: str) -> tuple[str, str]:
    return next((lang, code) for lang, code in readme_blocks() if key in code)


@pytest.fixture(scope="module")
def local_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with its tokenizer (for `org/name-or-local-dir`, `path/to/llama`), a text file (`my.txt`), and a
    saved reformer_rev LM (`you/revformer-lm`)."""
    import gzip

    from transformers import LlamaConfig, LlamaForCausalLM

    from reformer_rev import RevFormerConfig, RevFormerForCausalLM
    from reformer_rev.training.corpus import bundled_lm_files
    from reformer_rev.training.tokenization import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("readme")
    with gzip.open(bundled_lm_files()["train"], "rt") as fh:
        text = json.loads(fh.readline())["text"][:60000]
    (root / "my.txt").write_text(text)
    tokenizer = train_bpe_tokenizer([text], vocab_size=400)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    RevFormerForCausalLM(RevFormerConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64)).save_pretrained(root / "revformer-lm")
    return {"root": root, "llama": root / "llama", "text": root / "my.txt", "revformer": root / "revformer-lm"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k, v in BLOCKS.items() if v is None])
def test_readme_example_runs_as_written(key, local_files, tmp_path):
    lang, code = _block(key)
    substitutions = {
        "org/name-or-local-dir": str(local_files["llama"]), "path/to/llama": str(local_files["llama"]),
        "my.txt": str(local_files["text"]), "you/revformer-lm": str(local_files["revformer"]),
        "training/train_lm.py": str(REPO / "training" / "train_lm.py"),  # the README runs from the repository root
    }
    for placeholder, value in substitutions.items():
        code = code.replace(placeholder, value)
    if lang == "python":
        done = _run([sys.executable, "-c", code], tmp_path)
    else:
        done = _run(["bash", "-c", code.replace("python ", f"{sys.executable} ", 1)], tmp_path)
    assert done.returncode == 0, f"{code}\n---\n{done.stderr[-4000:]}"


def test_readme_numbers_agree_with_the_measured_defaults():
    """The README quoted 27.3 MB for the defaults where docs/benchmarks/defaults.md (and a fresh run) said 31.3; the
    README's figures must be the ones in docs/benchmarks/defaults.json."""
    measured = json.loads((REPO / "docs" / "benchmarks" / "defaults.json").read_text())
    peak = measured["peak_activation_mb"]
    text = " ".join(README.read_text().split())
    m = re.search(r"needs ([\d.]+) MB of activations at depth 2 and at depth 8, half the ([\d.]+) MB of the previous "
                  r"defaults \(FFN unchunked\), for a step-time ratio of ([\d.]+) \(median of (\d+)", text)
    assert m, "the README sentence about the defaults' memory changed: update this test with it"
    new, old, ratio, rounds = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    assert new == peak["library defaults (chunk sizes chosen) | depth 2"] == peak["library defaults (chunk sizes chosen) | depth 8"]
    assert old == peak["previous defaults (FFN unchunked, loss chunks 1024) | depth 2"]
    assert ratio == round(measured["step_time_ratio_median"], 2) and rounds == len(measured["step_time_ratio_new_over_previous"])


def test_make_setup_says_what_it_is_doing(tmp_path):
    """Setup printed nothing for minutes (pip -q): every step now announces itself and its duration."""
    done = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for step in ("creating the virtual environment", "upgrading pip", "installing torch", "installing reformer_rev"):
        assert f"[setup] {step}" in done.stdout, done.stdout
    assert f"[setup] {tmp_path / 'venv'} is ready" in done.stdout
    assert done.stdout.count("done in") >= 4
