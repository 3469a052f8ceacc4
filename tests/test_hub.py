"""Hub round trip through the real `huggingface_hub` client and a loopback Hub server (no network).

A tiny model is trained for a few steps, saved with a tokenizer and a model card built from its measured results,
pushed in one commit, then loaded in a fresh interpreter where `reformer_rev` cannot be imported (remote code only)
and, in the same interpreter, the way package users load it. Generations must equal those before the push. Bad pushes
(no token, invalid repository id, incomplete checkpoint) must fail clearly before the server sees any commit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_config
from hub_server import LoopbackHub
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.hub import CheckpointValidationError, main, push_checkpoint, validate_checkpoint
from reformer_rev.model_card import build_model_card, extract_metrics, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 48
SEQ2SEQ_MODULE = REPO_ROOT / "src" / "reformer_rev" / "modeling_reformer_rev_seq2seq.py"
# A pushed LM repo holds these, plus any further sibling module `save_pretrained` copies (the set grows with the
# package).
EXPECTED_LM_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "results.json", "configuration_reformer_rev.py", "modeling_reformer_rev.py",
    "reversible.py",
}
# Training leftovers that must never be uploaded.
JUNK = ("optimizer.pt", "training_args.bin", "trainer_state.json", "runs/events.out.tfevents",
        "checkpoint-5/model.safetensors")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(VOCAB - 4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def cyclic_batch(generator: torch.Generator, batch: int = 8, length: int = 24) -> torch.Tensor:
    """Sequences counting up modulo the word vocabulary from a random start: a pattern a few steps can pick up."""
    start = torch.randint(0, VOCAB - 4, (batch, 1), generator=generator)
    return 4 + (start + torch.arange(length)) % (VOCAB - 4)


def train_briefly(model: torch.nn.Module, make_batch, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend with the other test workers
    try:
        for _ in range(steps):
            loss = model(**make_batch()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback Hub, with this process's client pointed at it (the tests never reach the real Hub)."""
    server = LoopbackHub(tmp_path_factory.mktemp("hub_storage")).start()
    saved = (huggingface_hub.constants.ENDPOINT, huggingface_hub.constants.HF_HUB_DISABLE_XET)
    # Both are read once at import of huggingface_hub; subprocesses get HF_ENDPOINT / HF_HUB_DISABLE_XET instead.
    huggingface_hub.constants.ENDPOINT = server.url
    huggingface_hub.constants.HF_HUB_DISABLE_XET = True
    yield server
    huggingface_hub.constants.ENDPOINT, huggingface_hub.constants.HF_HUB_DISABLE_XET = saved
    server.stop()


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """A tiny LM trained a few steps, saved with tokenizer, results.json and a card from its measured figures."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(vocab_size=VOCAB, num_hidden_layers=2))
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = cyclic_batch(g)
        return {"input_ids": ids, "labels": ids}

    losses = train_briefly(model, batch)
    assert losses[-1] < 0.5 * losses[0], losses  # it did learn something: generations below are not noise
    model.eval()
    with torch.no_grad():
        held_out = cyclic_batch(torch.Generator().manual_seed(1))
        val_loss = model(input_ids=held_out, labels=held_out).loss.item()
        prompt = torch.tensor([[4 + 7, 4 + 8, 4 + 9]])
        generated = model.generate(prompt, max_new_tokens=10, do_sample=False)[0].tolist()
        logits = model(prompt).logits[0, -1].tolist()
    out = tmp_path_factory.mktemp("lm_ckpt")
    model.save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    results = {
        "model_name": "tiny-revformer-lm",
        "language": "en",
        "dataset": {"name": "synthetic counting sequences", "description": "Generated in the test."},
        "validation": {"loss": val_loss, "perplexity": math.exp(val_loss), "tokens": int(held_out.numel())},
        "train": {"steps": len(losses), "final_loss": losses[-1]},
        "args": {"learning_rate": 1e-2, "per_device_train_batch_size": 8, "block_size": 24},
    }
    (out / "results.json").write_text(json.dumps(results))
    write_model_card(out, results, "causal-lm")
    for name in JUNK:
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(b"not for the Hub")
    return {"dir": out, "prompt": prompt[0].tolist(), "generated": generated, "logits": logits, "results": results}


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["reformer_rev"] = None  # the package is not importable here: only the repository's code can load
    import torch
    import transformers
    from huggingface_hub import ModelCard

    repo_id, auto_class, prompt, gen_kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    cls = getattr(transformers, auto_class)
    ids = torch.tensor([prompt])
    out = {}
    try:
        import reformer_rev  # noqa: F401
        out["package_importable"] = True
    except ImportError:
        out["package_importable"] = False

    def run(model):
        model.eval()
        with torch.no_grad():
            generated = model.generate(ids, do_sample=False, **gen_kwargs)[0].tolist()
            if model.config.is_encoder_decoder:
                logits = model(input_ids=ids, decoder_input_ids=torch.tensor([generated[:3]])).logits[0, -1]
            else:
                logits = model(ids).logits[0, -1]
        return {"module": type(model).__module__, "generated": generated, "logits": logits.tolist()}

    out["remote"] = run(cls.from_pretrained(repo_id, trust_remote_code=True))
    tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
    out["tokenized"] = tokenizer("w7 w8 w9", add_special_tokens=False)["input_ids"]
    card = ModelCard.load(repo_id)
    out["card_data"] = card.data.to_dict()
    out["card_text"] = card.text

    # The other way: with the package installed, no remote code.
    del sys.modules["reformer_rev"]
    import reformer_rev  # noqa: F401
    out["package"] = run(cls.from_pretrained(repo_id))
    print("RESULT " + json.dumps(out))
    """
)


def load_in_fresh_process(hub: LoopbackHub, tmp_path: Path, repo_id: str, auto_class: str, prompt, gen_kwargs) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "PYTEST_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, repo_id, auto_class, json.dumps(prompt), json.dumps(gen_kwargs)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def model_index_metrics(card_data: dict) -> dict[tuple[str, str], float]:
    return {
        (result["dataset"]["split"], metric["type"]): metric["value"]
        for entry in card_data["model-index"]
        for result in entry["results"]
        for metric in result["metrics"]
    }


@pytest.mark.slow
def test_lm_round_trip_through_the_hub(hub, trained_lm, tmp_path):
    repo_id = "tester/tiny-revformer-lm"
    commits_before = len(hub.commits)
    url = push_checkpoint(str(trained_lm["dir"]), repo_id, token=hub.token, commit_message="tiny LM")

    # One commit holding exactly the checkpoint's user-facing files; the weights went through LFS.
    assert len(hub.commits) == commits_before + 1
    commit = hub.commits[-1]
    assert url.endswith(commit["oid"]) and commit["title"] == "tiny LM"
    copied_code = {p.name for p in trained_lm["dir"].glob("*.py")}
    assert EXPECTED_LM_FILES <= set(commit["files"]) == EXPECTED_LM_FILES | copied_code
    stored = hub.repo_files(repo_id)
    assert stored["model.safetensors"] == (trained_lm["dir"] / "model.safetensors").read_bytes()
    assert len(hub.lfs_uploads) >= 1
    assert not hub.unhandled, hub.unhandled

    out = load_in_fresh_process(hub, tmp_path, repo_id, "AutoModelForCausalLM", trained_lm["prompt"],
                                {"max_new_tokens": 10})
    assert out["package_importable"] is False
    assert out["remote"]["module"].startswith("transformers_modules.")
    assert out["package"]["module"] == "reformer_rev.modeling_reformer_rev"
    for way in ("remote", "package"):
        assert out[way]["generated"] == trained_lm["generated"], way
        torch.testing.assert_close(torch.tensor(out[way]["logits"]), torch.tensor(trained_lm["logits"]),
                                   rtol=0, atol=1e-6)
    assert out["tokenized"] == trained_lm["prompt"]

    # The card parses with huggingface_hub and carries the measured figures.
    data, results = out["card_data"], trained_lm["results"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"custom_code", "reversible"} <= set(data["tags"])
    assert data["language"] == ["en"] and data["license"] == "apache-2.0"
    assert set(data["metrics"]) == {"loss", "perplexity"}
    metrics = model_index_metrics(data)
    assert metrics == pytest.approx({("validation", "loss"): results["validation"]["loss"],
                                     ("validation", "perplexity"): results["validation"]["perplexity"]})
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in out["card_text"]
    assert "<your-namespace>" not in out["card_text"]
    # No package index serves reformer_rev: the card says how to load without it and how to install from source.
    assert "pip install reformer_rev" not in out["card_text"] and "pip install -e ." in out["card_text"]
    assert not hub.unhandled, hub.unhandled

    # Pushing the same checkpoint again is a no-op: no new commit, the current one is returned.
    assert push_checkpoint(str(trained_lm["dir"]), repo_id, token=hub.token).endswith(commit["oid"])
    assert len(hub.commits) == commits_before + 1


@pytest.mark.slow
@pytest.mark.skipif(
    not SEQ2SEQ_MODULE.exists(), reason="reformer_rev has no seq2seq model (modeling_reformer_rev_seq2seq.py)"
)
def test_seq2seq_round_trip_through_the_hub(hub, tmp_path):
    from reformer_rev import RevFormerForConditionalGeneration

    torch.manual_seed(0)
    config = RevFormerConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, encoder_layers=2, decoder_layers=2, max_position_embeddings=64,
                             is_encoder_decoder=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = RevFormerForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)

    def batch():  # learn to continue the source's count
        ids = cyclic_batch(g, length=12)
        return {"input_ids": ids[:, :6], "labels": ids[:, 6:]}

    losses = train_briefly(model, batch, steps=15)
    assert losses[-1] < losses[0]
    model.eval()
    prompt = [4 + 3, 4 + 4, 4 + 5, 4 + 6, 4 + 7, 4 + 8]
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, num_beams=2, do_sample=False)[0].tolist()
        logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([generated[:3]])).logits[0, -1]
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    make_tokenizer().save_pretrained(ckpt)
    results = {"source_lang": "en", "target_lang": "es", "dataset": "synthetic counting pairs",
               "test": {"bleu": 12.5, "chrf": 30.25}, "baselines": {"test": {"copy_source_bleu": 1.5}}}
    write_model_card(ckpt, results, "translation")

    repo_id = "tester/tiny-revformer-mt"
    push_checkpoint(str(ckpt), repo_id, token=hub.token)
    assert "modeling_reformer_rev_seq2seq.py" in hub.commits[-1]["files"]
    out = load_in_fresh_process(hub, tmp_path, repo_id, "AutoModelForSeq2SeqLM", prompt,
                                {"max_new_tokens": 6, "num_beams": 2})
    assert out["package_importable"] is False
    assert out["remote"]["module"].startswith("transformers_modules.")
    assert out["package"]["module"] == "reformer_rev.modeling_reformer_rev_seq2seq"
    for way in ("remote", "package"):
        assert out[way]["generated"] == generated, way
        torch.testing.assert_close(torch.tensor(out[way]["logits"]), logits, rtol=0, atol=1e-6)
    data = out["card_data"]
    assert data["pipeline_tag"] == "translation" and data["language"] == ["en", "es"]
    assert {"custom_code", "reversible"} <= set(data["tags"])
    assert model_index_metrics(data) == {("test", "bleu"): 12.5, ("test", "chrf"): 30.25}
    assert "AutoModelForSeq2SeqLM" in out["card_text"] and "copy_source_bleu" in out["card_text"]
    assert not hub.unhandled, hub.unhandled


def test_cli_push_with_results_and_private_repo(hub, trained_lm, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_lm["dir"], ckpt)
    (ckpt / "README.md").unlink()
    results = {"test_bits_per_byte": 1.25, "eval_loss": 0.75, "eval_runtime": 3.0, "train_loss": 0.5}
    results_file = tmp_path / "run_results.json"
    results_file.write_text(json.dumps(results))
    os.environ["HF_TOKEN"] = hub.token  # the CLI takes the token from the environment when --token is absent
    try:
        rc = main(["push", str(ckpt), "tester/private-lm", "--private", "--results", str(results_file)])
    finally:
        del os.environ["HF_TOKEN"]
    assert rc == 0
    card = ModelCard(hub.repo_files("tester/private-lm")["README.md"].decode())
    # Evaluation figures only (no runtime, no training loss), each in the model-index.
    assert model_index_metrics(card.data.to_dict()) == {("test", "bits_per_byte"): 1.25, ("validation", "loss"): 0.75}
    # The card written into the checkpoint is the one on the Hub, with this repository in its loading snippets.
    assert (ckpt / "README.md").read_text() == str(card)
    assert 'from_pretrained("tester/private-lm", trust_remote_code=True)' in card.text
    # Private: invisible without a token, visible with one.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info("tester/private-lm", token=False)
    assert HfApi(endpoint=hub.url, token=hub.token).model_info("tester/private-lm").private is True


def _no_token(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))


def test_push_without_token_fails_before_any_request(hub, trained_lm, monkeypatch, tmp_path):
    _no_token(monkeypatch, tmp_path)
    before = len(hub.requests)
    with pytest.raises(ValueError, match="No Hugging Face token"):
        push_checkpoint(str(trained_lm["dir"]), "tester/no-token")
    assert len(hub.requests) == before


@pytest.mark.parametrize("repo_id", ["tester/bad repo", "a/b/c", "tester/--double-dash", "", "tester/x.git"])
def test_push_with_invalid_repo_id_fails_before_any_request(hub, trained_lm, repo_id):
    before = len(hub.requests)
    with pytest.raises(ValueError, match="Invalid repository id"):
        push_checkpoint(str(trained_lm["dir"]), repo_id, token=hub.token)
    assert len(hub.requests) == before


def _break_auto_map(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["auto_map"]
    (ckpt / "config.json").write_text(json.dumps(config))


def _wrong_model_type(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(config))


def _absolute_import(ckpt: Path) -> None:
    path = ckpt / "reversible.py"
    path.write_text("from reformer_rev.profiling import peak_allocated_bytes\n" + path.read_text())


def _bin_weights_only(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")


BREAKAGES = {
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors"),
    "bin weights only": (_bin_weights_only, "safetensors"),
    "no config": (lambda c: (c / "config.json").unlink(), "config.json is missing"),
    "no auto_map": (_break_auto_map, "no auto_map"),
    "wrong model_type": (_wrong_model_type, "model_type 'gpt2'"),
    "no modeling file": (lambda c: (c / "modeling_reformer_rev.py").unlink(), "modeling_reformer_rev.py"),
    "no imported sibling": (lambda c: (c / "reversible.py").unlink(), "reversible.py"),
    "package import in remote code": (_absolute_import, "imports the `reformer_rev` package"),
    "no tokenizer vocabulary": (lambda c: (c / "tokenizer.json").unlink(), "tokenizer vocabulary"),
    "no tokenizer config": (lambda c: (c / "tokenizer_config.json").unlink(), "tokenizer_config.json"),
    "no generation config": (lambda c: (c / "generation_config.json").unlink(), "generation_config.json"),
    "bad card metadata": (lambda c: (c / "README.md").write_text("---\n- not: [a mapping\n---\n"), "README.md"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_incomplete_checkpoint_is_refused_before_any_request(hub, trained_lm, tmp_path, breakage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_lm["dir"], ckpt)
    validate_checkpoint(ckpt)  # complete before the breakage
    breakage_fn, expected = BREAKAGES[breakage]
    breakage_fn(ckpt)
    before = len(hub.requests)
    with pytest.raises(CheckpointValidationError, match="nothing was uploaded") as info:
        push_checkpoint(str(ckpt), "tester/broken", token=hub.token)
    assert expected in str(info.value)
    assert len(hub.requests) == before


def test_missing_directory_and_cli_errors(hub, tmp_path, capsys):
    before = len(hub.requests)
    with pytest.raises(CheckpointValidationError, match="does not exist"):
        push_checkpoint(str(tmp_path / "nope"), "tester/nope", token=hub.token)
    assert main(["push", str(tmp_path / "nope"), "tester/nope", "--token", hub.token]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nope"), "not a repo", "--token", hub.token]) == 2
    assert "Invalid repository id" in capsys.readouterr().err
    assert len(hub.requests) == before


def test_rejected_token_leaves_no_commit(hub, trained_lm):
    commits, uploads = len(hub.commits), len(hub.lfs_uploads)
    with pytest.raises(HfHubHTTPError) as info:
        push_checkpoint(str(trained_lm["dir"]), "tester/wrong-token", token="hf_not_a_valid_token")
    assert info.value.response.status_code == 401
    assert (len(hub.commits), len(hub.lfs_uploads)) == (commits, uploads)


def test_card_without_results_says_so_and_invents_nothing(trained_lm):
    card = build_model_card(trained_lm["dir"], None, "causal-lm")
    data = card.data.to_dict()
    assert "model-index" not in data and "metrics" not in data and "datasets" not in data
    assert "No evaluation results were recorded" in card.text
    assert "No memory figures were measured" in card.text
    assert "hyperparameters were not recorded" in card.text
    # The only numbers are read from the checkpoint itself (config and weights).
    n_params = sum(p.numel() for p in RevFormerForCausalLM.from_pretrained(trained_lm["dir"]).parameters())
    assert f"| parameters (stored) | {n_params:,} |" in card.text


def test_metrics_extraction_understands_the_training_scripts_results():
    results = {  # shape of training/train_lm.py's results.json
        "validation": {"loss": 1.1, "perplexity": 3.0, "bpb": 1.6, "tokens": 4096},
        "test": {"loss": 1.2, "perplexity": 3.3, "bpb": 1.7, "tokens": 4096},
        "train": {"steps": 10, "tokens_per_second": 900.0},
        "unigram_bpb": {"validation": 4.4, "test": 4.5},
        "eval_history": [{"step": 5, "loss": 2.0}],
    }
    assert extract_metrics(results) == {
        "validation": {"loss": 1.1, "perplexity": 3.0, "bits_per_byte": 1.6},
        "test": {"loss": 1.2, "perplexity": 3.3, "bits_per_byte": 1.7},
    }
    assert extract_metrics({"eval_bleu": float("nan"), "test_chrf": True}) == {}


def test_card_command_on_a_train_lm_style_results_file(trained_lm, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_lm["dir"], ckpt)
    results = {
        "validation": {"loss": 1.1, "perplexity": 3.0, "bpb": 1.6, "tokens": 4096},
        "unigram_bpb": {"validation": 4.4},
        "train": {"steps": 10, "tokens_per_second": 900.0},
        "args": {"dataset_name": None, "train_file": None, "learning_rate": 0.002, "output_dir": "outputs/x"},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["card", str(ckpt), "--results", str(tmp_path / "results.json"), "--repo_id", "me/lm"]) == 0
    card = ModelCard.load(ckpt / "README.md")
    data = card.data.to_dict()
    # No data argument: the script's bundled English corpus, named as such.
    assert data["language"] == ["en"] and data["model-index"][0]["results"][0]["dataset"]["type"] == "bible_lm"
    assert model_index_metrics(data) == {("validation", "loss"): 1.1, ("validation", "perplexity"): 3.0,
                                         ("validation", "bits_per_byte"): 1.6}
    assert "| unigram_bpb (validation) | 4.4 |" in card.text and "| learning_rate | 0.002 |" in card.text
    assert "output_dir" not in card.text and 'from_pretrained("me/lm")' in card.text
