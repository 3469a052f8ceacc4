"""Coupling variants, exact fixed-point reversal, drift guard and branch scaling (docs/depth.md)."""

from __future__ import annotations

import functools
import math
import random
from fractions import Fraction

import pytest
import torch

from conftest import make_pair, max_grad_rel_err, model_with_random_gates, rel_err, tiny_config
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.couplings import DriftReport, ExactArith, InfoBuffer, make_coupling
from reformer_rev.model_inputs import rotary_tables
from reformer_rev.modeling_reformer_rev import RevFormerBlock
from reformer_rev.reversible import run_reversible_stack

COUPLINGS = ("additive", "momentum", "leapfrog")
DEEP = dict(num_hidden_layers=8, hidden_dropout=0.1, attention_dropout=0.1, chunk_size_feed_forward=16, loss_chunk_size=13)


# ------------------------------------------------------------------------------------------------------------------
# Gradient parity with the twin, every coupling, float and exact streams
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True], ids=["float", "exact"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_float64_parity_every_coupling(padded_batch, coupling, exact):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(coupling=coupling, coupling_step_size=0.7, exact_reversal=exact, **DEEP)
    rev.train(), twin.train()
    losses = []
    for model in (rev, twin):
        torch.manual_seed(7)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert math.isfinite(losses[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-6, (err, name)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_couplings_compute_different_functions(padded_batch, coupling):
    """Same weights, another coupling: another loss (the option really reaches the engine)."""
    ids, mask, labels = padded_batch
    torch.manual_seed(0)
    base = RevFormerForCausalLM(tiny_config(num_hidden_layers=4)).double()
    other = RevFormerForCausalLM(tiny_config(num_hidden_layers=4, coupling=coupling, coupling_step_size=0.5)).double()
    other.load_state_dict(base.state_dict())
    with torch.no_grad():
        a = base(ids, attention_mask=mask, labels=labels).loss.item()
        b = other(ids, attention_mask=mask, labels=labels).loss.item()
    assert (a == b) == (coupling == "additive")


def test_exact_mode_forward_on_grid_and_close_to_float(padded_batch):
    """Exact streams differ from float ones only by the rounding (2^-bits per sub-step)."""
    ids, mask, _ = padded_batch
    torch.manual_seed(0)
    flt = RevFormerForCausalLM(tiny_config(num_hidden_layers=6)).double().eval()
    ex = RevFormerForCausalLM(tiny_config(num_hidden_layers=6, exact_reversal=True, fixed_point_scale_bits=20)).double()
    ex.load_state_dict(flt.state_dict())
    ex.eval()
    with torch.no_grad():
        a = flt.model(ids, attention_mask=mask).last_hidden_state
        b = ex.model(ids, attention_mask=mask).last_hidden_state
    assert 0 < rel_err(b, a) < 1e-4


# ------------------------------------------------------------------------------------------------------------------
# Bit-exact reversal at depth 1,024 (fp32 and bf16 autocast), and float drift for contrast
# ------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _deep_blocks(depth: int) -> tuple[torch.nn.ModuleList, dict]:
    """Real attention/feed-forward blocks at tiny width (hidden 16, seq 8) with dropout; built once per worker."""
    config = RevFormerConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=depth,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(RevFormerBlock(config, i) for i in range(depth)).train()
    rotary = rotary_tables(torch.arange(8)[None], config.head_dim, 1e4, torch.float32)
    return blocks, {"position_embeddings": rotary, "is_causal": True}


def _run(blocks, static, coupling, bits, bf16, checkpoint_every=0, seed=0):
    c = make_coupling(coupling, step_size=0.5)
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    report = DriftReport(per_block=checkpoint_every == 0)
    torch.manual_seed(seed)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y1, y2 = run_reversible_stack(
            blocks, *c.init_streams(x), coupling=c, fixed_point_bits=bits, static_kwargs=static,
            checkpoint_every=checkpoint_every, drift_report=report,
        )
    c.merge_streams(y1, y2).square().sum().backward()
    return report, x.grad


@pytest.mark.slow  # ~4 s each on an idle core, 25-50 s on the shared machine
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_exact_reversal_bit_for_bit_at_depth_1024(coupling, bf16):
    blocks, static = _deep_blocks(1024)
    report, grad = _run(blocks, static, coupling, bits=32, bf16=bf16)
    assert [b.index for b in report.blocks] == list(range(1024))
    assert report.all_bit_exact(), report.summary()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_float_drift_is_real_and_checkpoints_bound_it():
    """The bit-exact check fails without exact mode (bf16, 128 blocks); exact stream checkpoints every 16 blocks
    bound the drift to what 16 blocks accumulate."""
    blocks, static = _deep_blocks(128)
    report, _ = _run(blocks, static, "additive", bits=None, bf16=True, seed=1)
    assert not report.all_bit_exact()
    assert report.max_rel_err() > 1e-8  # fp32 rounding of y - f(x) at least; bf16 flips make it jumpy (7.5e-4 here)
    guarded, grad = _run(blocks, static, "additive", bits=None, bf16=True, checkpoint_every=16, seed=1)
    assert [c.index for c in guarded.checkpoints] == list(range(0, 128, 16))
    assert guarded.blocks == []  # per-block debug off: only the checkpoints are measured
    assert max(c.rel_err for c in guarded.checkpoints) < 1e-5
    assert max(c.rel_err for c in guarded.checkpoints) <= report.max_rel_err()
    assert torch.isfinite(grad).all()


def test_momentum_float_reversal_diverges_exact_does_not():
    """Float momentum divides by gamma at every sub-step: error x (1/gamma)^(2 depth)."""
    blocks, static = _deep_blocks(64)
    report, _ = _run(blocks, static, "momentum", bits=None, bf16=False)
    assert report.blocks[0].rel_err > 1e2 * report.blocks[-1].rel_err
    exact, grad = _run(blocks, static, "momentum", bits=32, bf16=False)
    assert exact.all_bit_exact() and torch.isfinite(grad).all()


def test_model_debug_drift_report(padded_batch):
    ids, mask, labels = padded_batch
    for exact in (False, True):
        model = RevFormerForCausalLM(tiny_config(num_hidden_layers=5, debug_reversal_drift=True, exact_reversal=exact))
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        report = model.model.last_drift_report
        assert [b.index for b in report.blocks] == list(range(5))
        assert report.all_bit_exact() == exact
        assert "5 blocks" in report.summary()
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=5))
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert model.model.last_drift_report is None  # no report, no stored inputs, by default


# ------------------------------------------------------------------------------------------------------------------
# Exact arithmetic units
# ------------------------------------------------------------------------------------------------------------------


def test_info_buffer_matches_python_big_integers():
    rng = random.Random(0)
    buf, ref = InfoBuffer(), [0] * 6
    like = torch.zeros(6, dtype=torch.int64)
    for _ in range(400):
        if rng.random() < 0.6:
            d = rng.randint(2, 1024)
            r = [rng.randrange(d) for _ in ref]
            buf.push(torch.tensor(r), d)
            ref = [b * d + x for b, x in zip(ref, r)]
        else:
            n = rng.randint(2, 1024)
            got = buf.pop(n, like).tolist()
            assert got == [b % n for b in ref]
            ref = [b // n for b in ref]
    value = [sum(int(limb[i]) << (InfoBuffer.LIMB_BITS * k) for k, limb in enumerate(buf.limbs)) for i in range(6)]
    assert value == ref and max(ref) > 2**200  # really beyond int64


def test_exact_gamma_multiplication_round_trips_and_costs_log2_bits():
    ar = ExactArith(bits=16, dtype=torch.float32)
    gamma = Fraction(9, 10)
    v0 = torch.randint(-(2**40), 2**40, (1000,), generator=torch.Generator().manual_seed(1))
    v = v0
    steps = 300
    for _ in range(steps):
        v = ar.mul_gamma(v, gamma)
    # the value decays like gamma^steps and the buffer holds about log2(1/gamma) bits per step (+ one limb of slack)
    assert v.abs().max() <= 2**40 * 0.9**steps + gamma.numerator
    assert ar.buffer.bits <= steps * math.log2(10 / 9) + 2 * InfoBuffer.LIMB_BITS
    for _ in range(steps):
        v = ar.div_gamma(v, gamma)
    assert torch.equal(v, v0)
    assert ar.buffer.limbs == []


def test_fixed_point_overflow_raises():
    ar = ExactArith(bits=56, dtype=torch.float32)
    with pytest.raises(OverflowError, match="fixed_point_scale_bits"):
        ar.round(torch.tensor([200.0]))
    with pytest.raises(OverflowError):
        ar.round(torch.tensor([float("nan")]))


def test_inference_equals_training_forward_exact(padded_batch):
    """Without grad the stack runs once in the same fixed-point arithmetic: same hidden states as with grad."""
    ids, mask, _ = padded_batch
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=4, coupling="momentum", exact_reversal=True)).eval()
    with torch.no_grad():
        a = model.model(ids, attention_mask=mask).last_hidden_state
    b = model.model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------------------
# Branch scaling
# ------------------------------------------------------------------------------------------------------------------


def test_learnable_gates_start_at_zero_and_train(padded_batch):
    ids, mask, labels = padded_batch
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=32, branch_scale="learnable_gate"))
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate")]
    assert len(gates) == 64 and all(g.item() == 0.0 for g in gates)
    # At initialisation every block is the identity: the hidden state is the normed embedding.
    with torch.no_grad():
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        expected = model.model.norm(model.model.embed_tokens(ids))
    torch.testing.assert_close(hidden, expected, rtol=1e-6, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(g.item() != 0.0 for g in gates)


def test_inv_sqrt_depth_scales_branches(padded_batch):
    ids, mask, _ = padded_batch
    torch.manual_seed(0)
    plain = RevFormerForCausalLM(tiny_config(num_hidden_layers=16)).double()
    scaled = RevFormerForCausalLM(tiny_config(num_hidden_layers=16, branch_scale="inv_sqrt_depth")).double()
    scaled.load_state_dict(plain.state_dict())
    block_p, block_s = plain.model.layers[0], scaled.model.layers[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(block_s.g(x), block_p.g(x) / 4)


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------


def test_config_defaults_unchanged_and_round_trip(tmp_path):
    config = RevFormerConfig()
    # exact_reversal="auto": exact streams only under half precision (issue 17, tests/test_precision.py)
    assert (config.coupling, config.exact_reversal, config.branch_scale, config.stream_checkpoint_every) == (
        "additive", "auto", None, 0,
    )
    assert config.debug_reversal_drift is False
    custom = tiny_config(coupling="leapfrog", coupling_step_size=0.25, exact_reversal=True, fixed_point_scale_bits=24,
                         stream_checkpoint_every=4, branch_scale="learnable_gate", momentum_gamma=0.8)
    custom.save_pretrained(tmp_path)
    loaded = RevFormerConfig.from_pretrained(tmp_path)
    for name in ("coupling", "coupling_step_size", "exact_reversal", "fixed_point_scale_bits",
                 "stream_checkpoint_every", "branch_scale", "momentum_gamma"):
        assert getattr(loaded, name) == getattr(custom, name), name


@pytest.mark.parametrize(
    "field,value",
    [
        ("coupling", "hamiltonian"),
        ("coupling_step_size", 0.0),
        ("coupling_step_size", float("inf")),
        ("momentum_gamma", 1.0),
        ("momentum_gamma", 0.0),
        ("exact_reversal", "yes"),
        ("fixed_point_scale_bits", 60),
        ("fixed_point_scale_bits", 4),
        ("stream_checkpoint_every", -1),
        ("branch_scale", "rezero"),
        ("debug_reversal_drift", 1),
    ],
)
def test_config_rejects_bad_depth_options(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_engine_rejects_bad_options():
    blocks, static = _deep_blocks(2)
    x = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="coupling"):
        run_reversible_stack(blocks, x, x, coupling="midpoint", static_kwargs=static)
    with pytest.raises(ValueError, match="fixed_point_bits"):
        run_reversible_stack(blocks, x, x, fixed_point_bits=70, static_kwargs=static)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_reversible_stack(blocks, x, x, checkpoint_every=-2, static_kwargs=static)


def test_learnable_gates_are_one_dimensional_and_old_scalar_state_dicts_load(padded_batch):
    """FSDP2 and DeepSpeed refuse 0-dim parameters, so the gates are shape (1,); a state dict saved when they were 0-dim
    scalars still loads (`RevFormerBlock._load_from_state_dict`) and gives the same outputs."""
    ids, mask, labels = padded_batch
    model = model_with_random_gates().double()
    gates = {n: p for n, p in model.named_parameters() if n.endswith("_gate")}
    assert len(gates) == 6 and all(p.shape == (1,) for p in gates.values())
    old = {k: (v.reshape(()) if k.endswith("_gate") else v).clone() for k, v in model.state_dict().items()}
    assert old["model.layers.0.attn_gate"].dim() == 0
    torch.manual_seed(1)
    fresh = RevFormerForCausalLM(tiny_config(branch_scale="learnable_gate")).double()
    fresh.load_state_dict(old)  # strict: every key present, every shape accepted
    assert all(p.shape == (1,) for n, p in fresh.named_parameters() if n.endswith("_gate"))
    with torch.no_grad():
        expected, got = (m(ids, attention_mask=mask).logits for m in (model, fresh))
        losses = [m(ids, attention_mask=mask, labels=labels).loss.item() for m in (model, fresh)]
    assert torch.equal(got, expected) and losses[0] == losses[1]
