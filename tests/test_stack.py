"""One stack for every model class: every depth option the config accepts works in the causal LM, the sequence
classifier and both stacks of the encoder-decoder (gradients equal the twin's, caches equal recomputation), or the
config refuses it naming the field. Also: the CPU attention fast path and remote-code export of every class."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_pair, max_grad_rel_err, rel_err, tiny_config
from test_seq2seq import seq2seq_config

from reformer_rev import (
    RevFormerConfig,
    RevFormerForCausalLM,
    RevFormerForConditionalGeneration,
    RevFormerForQuestionAnswering,
    RevFormerForSequenceClassification,
    RevFormerForTokenClassification,
    RevFormerModel,
)

DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)
DEQ = dict(depth_mode="deq", num_unique_layers=1, deq_tol=1e-11, deq_max_iter=80)
# Every depth / coupling option the config accepts, each applied to every model class below.
COMBINATIONS = {
    "plain": {},
    "weight_tied": dict(num_unique_layers=2),
    "deq_implicit": DEQ,
    "deq_phantom": dict(DEQ, deq_backward="phantom", deq_phantom_steps=4),
    "deq_jacobian_reg": dict(DEQ, deq_jacobian_reg=0.1),
    "momentum_exact": dict(coupling="momentum", exact_reversal=True),
    "leapfrog": dict(coupling="leapfrog", coupling_step_size=0.7),
    "drift_guard": dict(stream_checkpoint_every=2),
    "debug_drift": dict(debug_reversal_drift=True),
    "learnable_gate": dict(branch_scale="learnable_gate"),
    "inv_sqrt_depth": dict(branch_scale="inv_sqrt_depth"),
    "chunked": dict(chunk_size_feed_forward=3, loss_chunk_size=5),
}
CLASSES = {
    "causal_lm": (RevFormerForCausalLM, lambda **kw: tiny_config(num_hidden_layers=3, **kw)),
    "classifier": (
        RevFormerForSequenceClassification, lambda **kw: tiny_config(num_hidden_layers=3, num_labels=3, **kw)
    ),
    "seq2seq": (
        RevFormerForConditionalGeneration, lambda **kw: seq2seq_config(encoder_layers=3, decoder_layers=3, **kw)
    ),
}


def _batch(model_class):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 48, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    if model_class is RevFormerForSequenceClassification:
        return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, 0]))
    if model_class is RevFormerForConditionalGeneration:
        labels = torch.randint(3, 48, (2, 6), generator=g)
        labels[1, -2:] = -100
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("combo", list(COMBINATIONS))
@pytest.mark.parametrize("kind", list(CLASSES))
def test_every_accepted_combination_trains_like_its_twin(kind, combo):
    model_class, config_fn = CLASSES[kind]
    rev, twin = make_pair(model_class=model_class, config_fn=config_fn, **DROPOUT, **COMBINATIONS[combo])
    rev.train(), twin.train()
    batch = _batch(model_class)
    outs = []
    for model in (rev, twin):
        torch.manual_seed(5)
        out = model(**batch)
        out.loss.backward()
        outs.append(out)
    assert torch.isfinite(outs[0].loss)
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-10)
    err, name = max_grad_rel_err(rev, twin)  # every parameter has a gradient
    assert err <= 1e-6, (err, name)
    if "deq" in combo:  # the DEQ mode really ran, in every stack of the model
        stats = [outs[0].encoder_deq_stats, outs[0].decoder_deq_stats] if kind == "seq2seq" else [outs[0].deq_stats]
        implicit = COMBINATIONS[combo].get("deq_backward", "implicit") == "implicit"
        for s in stats:
            assert s is not None and s.forward.converged, s
            assert (s.backward is not None) == implicit  # the adjoint solve ran in backward
        assert (outs[0].jacobian_loss is not None) == ("jacobian" in combo)
    if "deq" in combo or combo == "weight_tied":  # only the distinct blocks were built
        stacks = [rev.model.encoder.layers, rev.model.decoder.layers] if kind == "seq2seq" else [rev.model.layers]
        assert all(len(s) == rev.config.num_unique_layers for s in stacks)


@pytest.mark.parametrize("combo", ["plain", "weight_tied", "deq_implicit", "momentum_exact"])
@pytest.mark.parametrize("kind", ["causal_lm", "seq2seq"])
def test_every_accepted_combination_generates_with_a_cache(kind, combo):
    """Cached greedy decoding == recomputing everything at every step (every block application has its cache)."""
    model_class, config_fn = CLASSES[kind]
    torch.manual_seed(1)
    model = model_class(config_fn(**COMBINATIONS[combo])).double().eval()
    batch = _batch(model_class)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
              min_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = model.generate(**kw, use_cache=True)
    assert torch.equal(cached, model.generate(**kw, use_cache=False))


def test_seq2seq_weight_tied_equals_untied_with_copied_blocks():
    """The decoder and encoder of a tied seq2seq model are the untied ones with layer i = block i % k (float64)."""
    torch.manual_seed(0)
    tied = RevFormerForConditionalGeneration(seq2seq_config(encoder_layers=3, decoder_layers=5, num_unique_layers=2,
                                                            **DROPOUT)).double().train()
    untied = RevFormerForConditionalGeneration(seq2seq_config(encoder_layers=3, decoder_layers=5, **DROPOUT))
    untied = untied.double().train()
    state = {k: v for k, v in tied.state_dict().items() if ".layers." not in k}
    for stack, depth in (("encoder", 3), ("decoder", 5)):
        blocks = getattr(tied.model, stack).layers
        for i in range(depth):
            for k, v in blocks[i % 2].state_dict().items():
                state[f"model.{stack}.layers.{i}.{k}"] = v
    untied.load_state_dict(state)
    batch = _batch(RevFormerForConditionalGeneration)
    losses = []
    for model in (tied, untied):
        torch.manual_seed(3)
        losses.append(model(**batch).loss)
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-12)
    for j in range(2):
        for name, p in tied.model.decoder.layers[j].named_parameters():
            summed = sum(untied.model.decoder.layers[i].get_parameter(name).grad for i in range(j, 5, 2))
            assert rel_err(p.grad, summed) <= 1e-10, (j, name)


def test_seq2seq_deq_encoder_gradient_is_implicit():
    """The encoder output is an input of the decoder's fixed point: its gradient equals a long unrolled reference."""
    torch.manual_seed(0)
    grads = []
    for backward in ("implicit", "phantom"):
        torch.manual_seed(0)
        model = RevFormerForConditionalGeneration(
            seq2seq_config(**dict(DEQ, deq_tol=1e-13, deq_max_iter=100), deq_backward=backward, deq_phantom_steps=60)
        ).double().eval()
        batch = _batch(RevFormerForConditionalGeneration)
        with torch.no_grad():
            enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        e = enc.last_hidden_state.clone().requires_grad_(True)
        model(encoder_outputs=(e,), attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        grads.append(e.grad)
    assert grads[0].abs().sum() > 0
    assert rel_err(grads[0], grads[1]) <= 1e-7


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(DEQ, exact_reversal=True), "exact_reversal"),
        (dict(DEQ, stream_checkpoint_every=2), "stream_checkpoint_every"),
        (dict(DEQ, debug_reversal_drift=True), "debug_reversal_drift"),
    ],
)
def test_deq_refuses_options_of_the_reversible_backward(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`.*depth_mode='deq'"):
        tiny_config(**overrides)


def test_weight_tying_is_checked_against_both_seq2seq_stacks():
    with pytest.raises(ValueError, match=r"`num_unique_layers` \(3\).*`encoder_layers`=2"):
        seq2seq_config(encoder_layers=2, decoder_layers=4, num_unique_layers=3)
    assert seq2seq_config(encoder_layers=3, decoder_layers=4, num_unique_layers=3).num_unique_layers == 3


# --------------------------------------------------------------------------------------------------------------
# Config validation table
# --------------------------------------------------------------------------------------------------------------


def test_allowed_value_lists_come_from_where_they_are_defined():
    from reformer_rev import configuration_reformer_rev as cfg
    from reformer_rev import couplings, deq, stack

    rules = cfg.FIELD_RULES
    for field, values in (
        ("coupling", couplings.SUPPORTED_COUPLINGS),
        ("deq_solver", deq.SUPPORTED_SOLVERS),
        ("deq_backward", deq.SUPPORTED_BACKWARDS),
        ("depth_mode", stack.SUPPORTED_DEPTH_MODES),
    ):
        assert all(rules[field].ok(v) for v in values) and str(values) in rules[field].allowed
        assert not rules[field].ok("not-a-" + field)


@pytest.mark.parametrize("field", sorted(__import__("reformer_rev.configuration_reformer_rev",
                                                    fromlist=["FIELD_RULES"]).FIELD_RULES))
def test_every_field_rule_names_the_field_and_what_is_allowed(field):
    from reformer_rev.configuration_reformer_rev import FIELD_RULES

    with pytest.raises(ValueError) as err:
        tiny_config(**{field: "bad value"})
    assert f"`{field}` must be {FIELD_RULES[field].allowed}, got 'bad value'." in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# Attention: the CPU fast path and the implementations of transformers' attention interface
# --------------------------------------------------------------------------------------------------------------


def _record_sdpa(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal, q.shape[-2], k.shape[-2]))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_causal_attention_without_padding_takes_the_is_causal_fast_path(monkeypatch):
    """docs/design.md §7: `is_causal=True` and no materialised mask (2x faster on CPU), in training and inference."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=2)).train()
    calls = _record_sdpa(monkeypatch)
    ids = torch.randint(3, 48, (2, 12))
    model(ids, labels=ids).loss.backward()  # forward + recomputing backward
    assert len(calls) == 2 * 2 and all(mask is None and causal for mask, causal, _, _ in calls)
    calls.clear()
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is no padding
    assert calls and all(mask is None and causal for mask, causal, _, _ in calls)
    calls.clear()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls and all(m is not None and m.dtype == torch.bool and not c for m, c, _, _ in calls)


def test_left_padding_gives_no_nan_and_equals_the_unpadded_row():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=2)).double().eval()
    row = torch.randint(3, 48, (1, 7))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(padded, attention_mask=mask).logits
        b = model(row).logits
    assert torch.isfinite(a).all()
    assert (a[:, 4:] - b).abs().max().item() <= 1e-12


def test_attention_implementation_can_be_switched_and_loaded(tmp_path):
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=2)).double().eval()
    ids = torch.randint(3, 48, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        # (eager's softmax runs in float32, as Llama's: float64 models agree to ~1e-8, not 1e-15)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path)
    # A loading choice, as in transformers: not stored in config.json, chosen by `from_pretrained`.
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    eager = RevFormerForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert RevFormerForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@pytest.mark.slow  # compiles the flex kernel: ~30 s
def test_flex_attention_matches_sdpa():
    """A third implementation from transformers' interface runs through the same modules (its own mask builder)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    sdpa = RevFormerForCausalLM(tiny_config(num_hidden_layers=2, num_key_value_heads=4)).eval()
    try:
        flex = RevFormerForCausalLM(tiny_config(num_hidden_layers=2, num_key_value_heads=4,
                                                attn_implementation="flex_attention")).eval()
    except (ImportError, ValueError) as err:
        pytest.skip(f"flex attention unavailable here: {err}")
    flex.load_state_dict(sdpa.state_dict())
    ids = torch.randint(3, 48, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        a = sdpa(ids, attention_mask=mask).logits
        b = flex(ids, attention_mask=mask).logits
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b[1, 5:], a[1, 5:], rtol=1e-4, atol=1e-4)  # real tokens (pad rows differ by design)


# --------------------------------------------------------------------------------------------------------------
# Remote-code export of every class
# --------------------------------------------------------------------------------------------------------------


def _relative_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


@pytest.mark.parametrize(
    "model_class, config_fn",
    [
        (RevFormerModel, tiny_config),
        (RevFormerForCausalLM, tiny_config),
        (RevFormerForSequenceClassification, tiny_config),
        (RevFormerForTokenClassification, tiny_config),
        (RevFormerForQuestionAnswering, tiny_config),
        (RevFormerForConditionalGeneration, seq2seq_config),
    ],
)
def test_save_pretrained_copies_every_module_the_code_imports(tmp_path, model_class, config_fn):
    model_class(config_fn()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    entry = saved["auto_map"].get("AutoModel")
    assert entry and (tmp_path / f"{entry.split('.')[0]}.py").exists()
    copied = {p.stem: p for p in tmp_path.glob("*.py")}
    for name, path in copied.items():
        missing = _relative_imports(path) - set(copied)
        assert not missing, f"{name}.py imports {missing}, which save_pretrained did not copy"


CLASSIFIER_REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["reformer_rev"] = None  # the package must not be importable: everything comes from the checkpoint
    import torch
    from transformers import AutoModelForSequenceClassification
    path, ids = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    with torch.no_grad():
        print(json.dumps(model(torch.tensor(ids)).logits.tolist()))
    """
)


@pytest.mark.slow
def test_sequence_classifier_loads_as_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = RevFormerForSequenceClassification(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSequenceClassification"].endswith("RevFormerForSequenceClassification")
    ids = [[5, 9, 11, 3, 0, 0], [7, 8, 9, 10, 11, 12]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CLASSIFIER_REMOTE, str(tmp_path), json.dumps(ids)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_config_round_trip_keeps_every_field(tmp_path):
    config = RevFormerConfig(vocab_size=40, hidden_size=32, num_attention_heads=4, num_unique_layers=2,
                             num_hidden_layers=5, coupling="leapfrog", branch_scale="inv_sqrt_depth")
    config.save_pretrained(tmp_path)
    loaded = RevFormerConfig.from_pretrained(tmp_path)
    assert loaded.to_diff_dict() == config.to_diff_dict()
