"""Loading a broken or foreign checkpoint fails with an error that names the problem, never random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import tiny_config
from reformer_rev import RevFormerForCausalLM, RevFormerModel


@pytest.fixture
def checkpoint(tmp_path):
    RevFormerForCausalLM(tiny_config(num_hidden_layers=1)).save_pretrained(tmp_path)
    return tmp_path


def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize("recorded", [True, False], ids=["checksums recorded", "no checksums (earlier versions)"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights_file(checkpoint, damage, recorded):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    if not recorded:
        (checkpoint / "checksums.sha256").unlink()
    expected = (f"{path}: its SHA-256 .* differs from .* its save recorded" if recorded
                else f"weights of {checkpoint}.*truncated or corrupted")
    with pytest.raises(OSError, match=expected):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_config_of_another_model_type(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'.*expects 'reformer_rev'"):
        RevFormerForCausalLM.from_pretrained(tmp_path)


def test_missing_parameters_are_not_silently_random(tmp_path):
    RevFormerModel(tiny_config(num_hidden_layers=1)).save_pretrained(tmp_path)  # no lm_head in this checkpoint
    with pytest.raises(ValueError, match="lm_head.weight.*allow_missing_weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, allow_missing_weights=True)
    assert isinstance(model, RevFormerForCausalLM)


def test_tied_head_may_be_absent(tmp_path):
    RevFormerForCausalLM(tiny_config(num_hidden_layers=1, tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_generation_longer_than_positions_fails_early():
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=1, max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings`=16.*at most 12"):
        model.generate(torch.tensor([[3, 4, 5, 6]]), max_new_tokens=20)
