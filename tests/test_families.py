"""`make_reversible` on every supported decoder family (`conversion_families.SUPPORTED_FAMILIES`), by structure.

Tiny random models in float64 with randomised norm weights (a missing, swapped or misplaced norm cannot hide) and
every dropout the family has switched on. For each family: inference is the original model; the training-time
function *is* the original layers when the coupling's coefficient is 0 (so the structural description is right, not
only self-consistent); gradients equal the ordinary-autograd twin's; the checkpoint reloads with plain transformers;
a `Trainer` step updates the weights like the twin's. PEFT LoRA once per layer pattern. Refusals name what blocks a
layer.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from _tiny_hf import (
    ALL_FAMILIES,
    LOAD_WITHOUT_PACKAGE,
    MOE_FAMILIES,
    NO_LEFT_PADDING,
    VOCAB,
    family_model,
    lora_model,
    random_ids,
    twin_trainable_errors,
)
from torch import nn

from conftest import max_grad_rel_err, rel_err
from reformer_rev import is_reversible, make_reversible
from reformer_rev.conversion_families import SUPPORTED_FAMILIES, BranchSpec, FamilySpec, LayerSpec
from reformer_rev.couplings_twostep import HeavyBallCoupling


def batch(model_type: str):
    """Ids, mask and labels: right padding in row 2, left padding in row 1 except for Gemma (NaN in plain
    transformers, families.md finding 6)."""
    ids = random_ids(3, 20)
    mask = torch.ones_like(ids)
    if model_type not in NO_LEFT_PADDING:
        mask[1, :5] = 0
    mask[2, -4:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


_ATTN = BranchSpec("self_attn", "input_layernorm", takes_layer_kwargs=True)
_MLP = BranchSpec("mlp", "post_attention_layernorm")


class ZeroCoefficient(HeavyBallCoupling):
    """Heavy-ball with every coefficient 0: the plain residual update `x + b(x)` (in the int64 fixed-point streams).
    Not invertible, so only for the ordinary-autograd twin."""

    def start(self, num_steps, batch_size, device):
        return type(self)(self.gamma, torch.zeros(num_steps, batch_size, dtype=torch.long, device=device))


def training_logits_error(model_type: str, spec: FamilySpec | None = None, verify: bool = True) -> float:
    """Max abs difference of the training-mode logits (dropout on, same seed) between the original model and its
    conversion at coefficient 0: the structural description against the layers' own forward. `verify=False` skips
    the conversion's own check of the first layer (`ReversibleConversion._verify`)."""
    original = family_model(model_type, dropout=0.1).train()
    model = copy.deepcopy(original)
    if spec is not None:
        SUPPORTED_FAMILIES[model_type], saved = spec, SUPPORTED_FAMILIES[model_type]
    try:
        # 52 fractional bits: the fixed-point streams keep every bit of these small float64 hidden values.
        make_reversible(model, coupling=ZeroCoefficient(), reversible=False, fixed_point_bits=52)
        model._reversible_conversion.verified = not verify
    finally:
        if spec is not None:
            SUPPORTED_FAMILIES[model_type] = saved
    ids, mask, labels = batch(model_type)
    outs = []
    for m in (original, model):
        torch.manual_seed(3)
        outs.append(m(ids, attention_mask=mask, labels=labels).logits)
    assert outs[1].requires_grad  # the converted path ran
    valid = mask.bool()
    return (outs[0] - outs[1])[valid].abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# Every family
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_eval_logits_equal_the_original(model_type):
    original = family_model(model_type, dropout=0.1).eval()
    model = make_reversible(copy.deepcopy(original))
    assert is_reversible(model) and type(model) is type(original)
    ids, mask, _ = batch(model_type)
    out = model(ids, attention_mask=mask).logits
    assert torch.equal(out, original(ids, attention_mask=mask).logits)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_training_function_at_zero_coefficient_is_the_original(model_type):
    """Dropout on, the same seed: the converted stack run at coefficient 0 reproduces the original layers' training
    forward (bit for bit or to float64 rounding), so every norm, dropout, multiplier and per-layer mask/rotary table
    is where the description says."""
    assert training_logits_error(model_type) <= 1e-12


_WRONG_DESCRIPTIONS = {
    "granite": LayerSpec((_ATTN, _MLP)),  # without the residual multiplier
    "phi3": LayerSpec((_ATTN, _MLP)),  # without the branch dropouts
    "cohere2": LayerSpec((_ATTN, BranchSpec("mlp", "input_layernorm"))),  # a parallel layer read as sequential
}


@pytest.mark.parametrize("model_type", list(_WRONG_DESCRIPTIONS))
def test_a_wrong_description_is_caught(model_type):
    """Negative control: descriptions that pass the structure check (same sub-modules) but compute something else
    than the layer. The conversion's check of the first layer at the first training call refuses them, and so does
    the comparison of whole models with the check off (measured: 2.6e-2, 0.17, 9.9e-3)."""
    wrong = FamilySpec(_WRONG_DESCRIPTIONS[model_type], "wrong")
    with pytest.raises(RuntimeError, match="does not reproduce the layer's own forward"):
        training_logits_error(model_type, wrong)
    assert training_logits_error(model_type, wrong, verify=False) > 1e-3


def test_first_training_call_verifies_the_description_once():
    model = make_reversible(family_model("gemma3_text", dropout=0.1)).train()
    conversion = model._reversible_conversion
    ids = random_ids()
    model.eval()(ids)
    assert not conversion.verified  # inference runs the original layers: nothing to check
    model.train()(ids, labels=ids).loss.backward()
    assert conversion.verified
    # The check drew no random numbers of its own: the same seed gives the same loss with and without it.
    conversion.verified = False
    torch.manual_seed(0)
    first = model(ids, labels=ids).loss.item()
    torch.manual_seed(0)
    assert model(ids, labels=ids).loss.item() == first


def twin_gradient_errors(model_type: str, **options) -> tuple[float, float]:
    """(|loss difference|, largest relative parameter-gradient difference) between the reversible model and its
    ordinary-autograd twin: same weights, dropout 0.1 on, same seed, padded batch."""
    models = [make_reversible(family_model(model_type, dropout=0.1), reversible=r, **options).train()
              for r in (True, False)]
    return twin_trainable_errors(models, *batch(model_type), seed=11)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_float64_gradients_equal_the_twin_with_dropout(model_type):
    loss_diff, grad_err = twin_gradient_errors(model_type)
    assert loss_diff <= 1e-12 and grad_err <= 1e-6, (loss_diff, grad_err)


def test_moe_chunked_experts_gradients_equal_the_twin():
    """The MoE block is position-wise (per-token routing): recomputed 5 positions at a time, the same gradients."""
    loss_diff, grad_err = twin_gradient_errors("qwen3_moe", chunk_size_feed_forward=5)
    assert loss_diff <= 1e-12 and grad_err <= 1e-6, (loss_diff, grad_err)


@pytest.mark.parametrize("model_type", ["cohere2", "phi", "gptj", "gemma3_text"])
def test_bf16_autocast_matches_the_layer_and_the_twin(model_type):
    """Under bf16 autocast a parallel layer's branch sum is rounded as the layer rounds it (Cohere: into the float32
    stream one by one; Phi, GPT-J: in bf16 first), so the first-layer check sees only float32 rounding; gradients
    equal the twin's to float32 rounding."""
    models = [make_reversible(family_model(model_type, dropout=0.1, dtype=torch.float32), reversible=r).train()
              for r in (True, False)]
    ids = random_ids(3, 20)
    for m in models:
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
    assert models[0]._reversible_conversion.verification_error <= 1e-5
    err, name = max_grad_rel_err(*models)
    assert err <= 1e-5, (name, err)


def test_parallel_layers_pair_into_blocks():
    """Cohere2: one residual sub-layer per layer, two layers per engine block, an odd last layer with an empty `g`;
    the non-position-wise `g` is never chunked."""
    conversion = make_reversible(family_model("cohere2", depth=3))._reversible_conversion
    assert [s.name for s in conversion.sublayers] == ["attention+mlp"] * 3
    assert len(conversion.blocks) == 2 and conversion.blocks[1].g_step is None
    assert all(block.g_chunk_size == 0 for block in conversion.blocks)
    assert "3 reversible residual sub-layers (attention+mlp) and 1 empty one" in conversion.describe()


def test_saved_checkpoints_reload_without_reformer_rev(tmp_path):
    """Every family, after a reversible training step: `save_pretrained` writes a plain checkpoint of the original
    class holding the trained weights, which loads in one subprocess where `reformer_rev` cannot be imported and
    gives the logits of the same checkpoint loaded here. (The reference is a reload, not the trained model itself:
    GPT-J recomputes its non-persistent rotary table at load, 7e-8 off the one of a model built in float64.)"""
    from transformers import AutoModelForCausalLM

    paths, classes = [], []
    for model_type in ALL_FAMILIES:
        model = make_reversible(family_model(model_type, dropout=0.1)).train()
        ids = random_ids(2, 12)
        model(ids, labels=ids).loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        path = tmp_path / model_type
        model.eval().save_pretrained(path)
        # Not part of a checkpoint: the attention kernel (Gemma 3: eager, not the default sdpa) and the MoE experts
        # kernel (the default grouped_mm has no float64 on CPU).
        load_kwargs = {"attn_implementation": model.config._attn_implementation}
        if model_type in MOE_FAMILIES:
            load_kwargs["experts_implementation"] = "eager"
        (path / "load_kwargs.json").write_text(json.dumps(load_kwargs))
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **load_kwargs).eval()
        assert not is_reversible(reloaded)
        trained, loaded = model.state_dict(), reloaded.state_dict()
        assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
        torch.save(ids, path / "ids.pt")
        torch.save(reloaded(ids).logits, path / "logits.pt")
        config = json.loads((path / "config.json").read_text())
        assert "reformer" not in json.dumps(config).lower() and "auto_map" not in config
        assert not list(path.glob("*.py"))
        paths.append(str(path))
        classes.append(type(model).__name__)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, *paths], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert results == [{"class": c, "equal": True, "reformer_rev_importable": False} for c in classes]


# A Trainer costs ~2 s of set-up: three structurally different families in the fast suite, the rest marked slow.
FAST_TRAINER_FAMILIES = ("qwen3_moe", "gemma3_text", "cohere2")


@pytest.mark.parametrize(
    "model_type", [t if t in FAST_TRAINER_FAMILIES else pytest.param(t, marks=pytest.mark.slow) for t in ALL_FAMILIES]
)
def test_trainer_step_updates_like_the_twin(model_type, tmp_path):
    from transformers import Trainer, TrainingArguments

    rows = random_ids(8, 16, seed=4)
    data = [{"input_ids": r, "labels": r} for r in rows]
    initial = torch.cat([p.detach().flatten() for p in family_model(model_type, dropout=0.1).parameters()])
    updates = []
    for reversible in (True, False):
        model = make_reversible(family_model(model_type, dropout=0.1), reversible=reversible)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(reversible)), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=1, learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True, seed=0,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - initial)
    assert updates[0].norm() > 1e-4 * initial.norm()  # the step moved the weights
    assert rel_err(updates[0], updates[1]) <= 1e-6


# One family per layer pattern (conversion_families.py): pre-norm, MoE, sandwich, post-norm in branch, branch dropout,
# multiplier, parallel.
LORA_CASES = {
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "qwen3_moe": ["q_proj", "o_proj"],
    "gemma3_text": ["q_proj", "v_proj", "up_proj"],
    "olmo2": ["k_proj", "o_proj", "gate_proj"],
    "phi3": ["qkv_proj", "gate_up_proj"],
    "granite": ["q_proj", "down_proj"],
    "cohere2": ["q_proj", "v_proj", "down_proj"],
}


@pytest.mark.parametrize("model_type", list(LORA_CASES))
def test_lora_with_dropout_matches_the_twin(model_type):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=LORA_CASES[model_type])
    models = []
    for reversible in (True, False):
        peft_model = lora_model(family_model(model_type, dropout=0.1), lora)
        assert make_reversible(peft_model, reversible=reversible) is peft_model
        models.append(peft_model.train())
    loss_diff, grad_err = twin_trainable_errors(models, *batch(model_type))
    assert loss_diff <= 1e-12 and grad_err <= 1e-6, (loss_diff, grad_err)


# --------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------


def test_moe_router_logits_refused_in_reversible_training():
    """The routers' logits are recorded by hooks during a forward without graph: the load-balancing loss would give
    the routers no gradient. Refused in training, fine at inference."""
    model = make_reversible(family_model("qwen3_moe")).train()
    ids = random_ids()
    with pytest.raises(ValueError, match="output_router_logits"):
        model(ids, labels=ids, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="routers no gradient"):
        model(ids, labels=ids)
    model.eval()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and torch.isfinite(out.loss)


def _tiny(model_type: str, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "model_type,kwargs,match",
    [
        ("bert", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      is_decoder=True), "post-norm on the residual stream"),
        ("mamba", dict(hidden_size=16, num_hidden_layers=1, state_size=4), "state-space"),
        ("gpt_neox", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
         "not described"),
    ],
)
def test_unsupported_families_are_refused_with_the_reason(model_type, kwargs, match):
    model = _tiny(model_type, **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        make_reversible(model)
    assert "LlamaForCausalLM" in str(info.value) and "Cohere2ForCausalLM" in str(info.value)
    assert not is_reversible(model)


def test_other_class_of_a_supported_family_is_refused():
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(family_model("llama").config)
    with pytest.raises(ValueError, match="causal LM class of model_type 'llama' \\(LlamaForCausalLM\\)"):
        make_reversible(model)


def test_layer_with_more_than_its_description_is_refused():
    """A parameter outside the described branches (here an extra gate on one layer) would be silently dropped."""
    model = family_model("qwen3")
    model.model.layers[1].gate = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="parameters outside the residual branches.*gate.weight"):
        make_reversible(model)
    model = family_model("olmo2")
    del model.model.layers[0].post_feedforward_layernorm
    with pytest.raises(ValueError, match="no sub-module `post_feedforward_layernorm`"):
        make_reversible(model)
    assert not is_reversible(model)
