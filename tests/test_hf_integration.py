"""`transformers` integration: Auto classes, save/load, remote code, generation with a cache, input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import model_with_random_gates, tiny_config
from reformer_rev import RevFormerConfig, RevFormerForCausalLM, RevFormerModel


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=2, eos_token_id=None))
    return m.eval()


def test_auto_classes_resolve_to_our_classes():
    config = AutoConfig.for_model("reformer_rev", vocab_size=32, hidden_size=16, num_attention_heads=2)
    assert isinstance(config, RevFormerConfig)
    assert type(AutoModel.from_config(config)) is RevFormerModel
    assert type(AutoModelForCausalLM.from_config(config)) is RevFormerForCausalLM
    for cls in (RevFormerConfig, RevFormerModel, RevFormerForCausalLM):
        assert "reformer" not in cls.__name__.lower()  # transformers refuses DynamicCache for such names


def test_save_and_load_with_auto_classes(model, tmp_path):
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "reformer_rev"
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(saved["auto_map"])
    assert (tmp_path / "modeling_reformer_rev.py").exists() and (tmp_path / "reversible.py").exists()
    ids = torch.randint(3, 48, (2, 12))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_hidden = model.model(ids).last_hidden_state
        lm = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        base = AutoModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(lm(ids).logits, ref_logits, rtol=0, atol=0)
        torch.testing.assert_close(base(ids).last_hidden_state, ref_hidden, rtol=0, atol=0)


def test_from_pretrained_loads_old_zero_dim_branch_gates(tmp_path):
    """Learnable branch gates were 0-dim before FSDP2/ZeRO forced shape (1,). transformers' loader skips module load
    hooks, so `from_pretrained` reshapes them through the registered `BranchGateToOneDim` conversion; saving again
    writes the (1,) shape."""
    from safetensors.torch import load_file, save_file

    model = model_with_random_gates().eval()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    gate_keys = [k for k in state if k.endswith("_gate")]
    assert len(gate_keys) == 2 * model.config.num_hidden_layers
    save_file({k: v.reshape(()) if k in gate_keys else v for k, v in state.items()}, weights, metadata={"format": "pt"})
    assert all(load_file(weights)[k].dim() == 0 for k in gate_keys)
    (tmp_path / "checksums.sha256").unlink()  # as saved by the old version, which recorded no checksums

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # raised "size mismatch" before the conversion
    gates = {n: p for n, p in loaded.named_parameters() if n.endswith("_gate")}
    assert sorted(gates) == sorted(gate_keys) and all(p.shape == (1,) for p in gates.values())
    ids = torch.randint(3, 48, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    assert all(v.shape == (1,) for k, v in load_file(resaved / "model.safetensors").items() if k in gate_keys)


def test_tied_embeddings_share_storage():
    m = RevFormerForCausalLM(tiny_config(tie_word_embeddings=True))
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    untied = RevFormerForCausalLM(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["reformer_rev"] = None  # the package must not be importable: everything comes from the checkpoint
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    path, prompt = sys.argv[1], json.loads(sys.argv[2])
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert "reformer_rev" not in type(lm).__module__.split(".")[0], type(lm).__module__
    out = lm.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False)
    # Trainer label smoothing shifts the targets of the remote class too (docs/design.md §8)
    from transformers import Trainer, TrainingArguments
    ids = torch.tensor(prompt * 2)
    args = TrainingArguments(output_dir=path + "/trainer", label_smoothing_factor=0.1, report_to="none", use_cpu=True)
    with torch.no_grad():
        loss = Trainer(model=lm, args=args).compute_loss(lm, {"input_ids": ids, "labels": ids}).item()
        lp = lm(ids).logits[:, :-1].double().log_softmax(-1)
    y = ids[:, 1:]
    ref = (0.9 * -lp.gather(-1, y[..., None]).mean() + 0.1 * -lp.mean()).item()
    print(json.dumps({"tokens": out.tolist(), "cls": type(lm).__name__, "base": type(base).__name__,
                      "smoothing_err": abs(loss - ref) / ref}))
    """
)


@pytest.mark.slow
def test_trust_remote_code_without_package(model, tmp_path):
    model.save_pretrained(tmp_path)
    prompt = [[5, 9, 11, 3]]
    expected = model.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False).tolist()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path), json.dumps(prompt)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cls"] == "RevFormerForCausalLM" and result["base"] == "RevFormerModel"
    assert result["tokens"] == expected
    assert result["smoothing_err"] <= 1e-5


def test_incremental_decoding_matches_full_forward(model):
    ids = torch.randint(3, 48, (2, 16))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(9, 16):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        # several tokens at once on top of a cache (causal mask offset by the cache length)
        out2 = model(ids[:, :5], use_cache=True)
        chunk = model(ids[:, 5:16], past_key_values=out2.past_key_values, use_cache=True).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_left_padded_batched_greedy_equals_per_example(model):
    prompts = [[7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33]]
    width = max(map(len, prompts))
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    for i, p in enumerate(prompts):
        single = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert batched[i, width:].tolist() == single[0, len(p) :].tolist()


def test_left_padded_training_batch_has_finite_gradients():
    torch.manual_seed(0)
    m = RevFormerForCausalLM(tiny_config(num_hidden_layers=2, attn_implementation="sdpa")).train()
    ids = torch.randint(3, 48, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    loss = m(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_sampling_and_beam_search_run(model):
    ids = torch.tensor([[4, 5, 6]])
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=10)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert sampled.shape == (1, 9) and beams.shape == (2, 9)
    assert int(sampled.max()) < model.config.vocab_size


def test_eager_and_sdpa_agree():
    torch.manual_seed(0)
    sdpa = RevFormerForCausalLM(tiny_config(attn_implementation="sdpa")).eval()
    eager = RevFormerForCausalLM(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(3, 48, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(sdpa(ids, **kwargs).logits, eager(ids, **kwargs).logits, rtol=1e-4, atol=1e-4)


def test_chunked_loss_equals_full_logits_loss():
    torch.manual_seed(0)
    chunked = RevFormerForCausalLM(tiny_config(loss_chunk_size=5)).double()
    ids = torch.randint(3, 48, (2, 23))
    labels = ids.clone()
    labels[0, :4] = -100
    out = chunked(ids, labels=labels, return_logits=True)
    logits = out.logits[:, :-1].reshape(-1, 48)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert chunked(ids, labels=labels).logits is None  # not materialised unless asked


def test_output_hidden_states_shapes(model):
    ids = torch.randint(3, 48, (1, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], model.model(ids).last_hidden_state)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input_ids=torch.tensor([[1, 2, 48]])), ValueError, r"token id 48.*\[0, 48\)"),
        (dict(input_ids=torch.tensor([[1, -3, 2]])), ValueError, r"token id -3"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, r"integer tensor"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, r"empty"),
        (dict(input_ids=torch.ones(1, 300, dtype=torch.long)), ValueError, r"max_position_embeddings"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)), ValueError, r"attention_mask"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long)), ValueError, r"labels"),
        (dict(inputs_embeds=torch.ones(1, 5, 31)), ValueError, r"inputs_embeds.*hidden_size=32"),
        (dict(), ValueError, r"exactly one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(**kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_act="swish2"), "hidden_act"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(attn_implementation="flash_attention_9"), "attn_implementation"),
        (dict(pad_token_id=48), "pad_token_id"),
        (dict(eos_token_id=[2, 48]), "eos_token_id"),
    ],
)
def test_invalid_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)
