"""`make_reversible`: pretrained transformers causal LMs fine-tuned through the reversible engine (two-step couplings).

For every supported family with tiny random weights: inference is the original model, float64 gradients equal the
ordinary-autograd twin's (dropout on), activation memory grows with depth by the side bits only, the saved checkpoint
is a plain one of the original class, and PEFT LoRA (with adapter dropout) and the Trainer work on top.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from _tiny_hf import FAMILIES, LOAD_WITHOUT_PACKAGE, VOCAB, lora_model, random_ids, tiny_model, twin_trainable_errors

from conftest import max_grad_rel_err, rel_err
from reformer_rev import is_reversible, make_reversible, revert_reversible, run_reversible_stack
from reformer_rev.conversion import fidelity_report
from reformer_rev.couplings_twostep import DEFAULT_GAMMA, BDIACoupling, HeavyBallCoupling, PackedBits, gamma_shift
from reformer_rev.couplings import DriftReport
from reformer_rev.model_inputs import CACHE_FIELD, output_cache
from reformer_rev.profiling import peak_allocated_bytes


def converted_pair(family: str, dropout: float = 0.1, depth: int = 3, **options):
    """The same random model converted twice: reversible, and its ordinary-autograd twin."""
    model = tiny_model(family, depth=depth, dropout=dropout)
    twin = copy.deepcopy(model)
    return make_reversible(model, **options), make_reversible(twin, reversible=False, **options)


def padded_batch(batch: int = 3, length: int = 20):
    ids = random_ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return ids, mask, ids.masked_fill(mask == 0, -100)


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


# --------------------------------------------------------------------------------------------------------------
# Inference is the original model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_same_object_class_and_state_dict(family):
    model = tiny_model(family)
    keys = list(model.state_dict())
    cls = type(model)
    assert make_reversible(model) is model
    assert type(model) is cls and list(model.state_dict()) == keys
    assert is_reversible(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_no_grad_logits_equal_the_original(family):
    original = tiny_model(family, dropout=0.1)
    model = make_reversible(copy.deepcopy(original))
    ids, mask, _ = padded_batch()
    assert torch.equal(model.eval()(ids, attention_mask=mask).logits, original.eval()(ids, attention_mask=mask).logits)
    # Training mode without gradients: the original layers too (same dropout masks from the same seed).
    model.train(), original.train()
    with torch.no_grad():
        torch.manual_seed(7)
        out = model(ids, attention_mask=mask).logits
        torch.manual_seed(7)
        ref = original(ids, attention_mask=mask).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_kv_cache_equal_the_original(family):
    original = tiny_model(family).eval()
    model = make_reversible(copy.deepcopy(original)).train()  # generate() runs under no_grad, even in train mode
    original.train()
    prompt = random_ids(2, 5)
    common = dict(max_new_tokens=6, pad_token_id=0)
    for mode in (dict(do_sample=False), dict(do_sample=True, top_k=8), dict(num_beams=3, do_sample=False)):
        torch.manual_seed(3)
        ref = original.generate(prompt, **common, **mode)
        torch.manual_seed(3)
        out = model.generate(prompt, **common, **mode)
        assert torch.equal(out, ref), mode
    # The KV cache is the original one: incremental decoding with it reproduces the full forward.
    model.eval()
    full = model(prompt).logits
    first = model(prompt[:, :-1], use_cache=True)
    # Under the installed release's name (`cache` from transformers 5.24 on, `past_key_values` before).
    step = model(prompt[:, -1:], **{CACHE_FIELD: output_cache(first)}).logits
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Training: the reversible stack and its twin
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coupling", ["heavy_ball", "bdia"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_gradients_equal_the_twin_with_dropout(family, coupling):
    model, twin = converted_pair(family, dropout=0.1, coupling=coupling)
    model.train(), twin.train()
    ids, mask, labels = padded_batch()
    losses = []
    for m in (model, twin):
        torch.manual_seed(11)
        # Two forwards before one backward: each call replays its own dropout masks and its own coupling signs.
        loss = m(ids, attention_mask=mask, labels=labels).loss + m(ids[:2], labels=ids[:2]).loss
        loss.backward()
        losses.append(loss)
    assert "_ReversibleStackFunctionBackward" in graph_nodes(losses[0])
    assert "_ReversibleStackFunctionBackward" not in graph_nodes(losses[1])
    assert abs(losses[0].item() - losses[1].item()) <= 1e-12
    err, name = max_grad_rel_err(model, twin)
    assert err <= 1e-6, (name, err)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_mlp_gradients_equal_the_twin_and_hooks_run_once(family):
    """The MLP recomputed in chunks of 5 positions (20 positions: 4 chunks): partial parameter gradients go straight into
    `.grad` and the last one through autograd, so gradients equal the twin's and every accumulation hook runs once per
    backward, seeing the total (what DDP and ZeRO require)."""
    model, twin = converted_pair(family, dropout=0.1, chunk_size_feed_forward=5)
    model.train(), twin.train()
    ids, mask, labels = padded_batch()
    fired: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.setdefault(name, []).append(p.grad.clone()))
    for m in (model, twin):
        torch.manual_seed(11)
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    err, name = max_grad_rel_err(model, twin)
    assert err <= 1e-6, (name, err)
    assert len(fired) == len(list(model.parameters())) and {len(v) for v in fired.values()} == {1}
    for name, p in model.named_parameters():
        assert torch.equal(fired[name][0], p.grad), name  # the hook saw the total, not the last chunk


def test_fidelity_probe_measures_without_changing_training():
    """The probe reruns a probed batch through the original layers: it records the change, warns once beyond its
    threshold, and leaves the training losses and gradients exactly as without it (RNG forked, no gradient)."""
    ids = random_ids(2, 16)
    results = []
    for every in (1, 0):
        model = make_reversible(tiny_model("llama", dropout=0.1)).train()
        probe = model._reversible_conversion.probe
        probe.every, probe.threshold = every, 0.0
        torch.manual_seed(3)
        losses = [model(ids, labels=ids).loss for _ in range(3)]
        sum(losses).backward()
        results.append((torch.stack([l.detach() for l in losses]), [p.grad.clone() for p in model.parameters()]))
        if every:
            assert probe.probes == 3 and probe.warned and probe.last is not None
            assert probe.state_dict()["fidelity_mean_rel_change"] == pytest.approx(probe.mean)
            with torch.no_grad():
                original = model.eval()(ids, labels=ids).loss.item()
            # Dropout differs between the probe (training mode) and this eval call: only the order of magnitude.
            assert abs(probe.last) < 0.5 and abs(losses[-1].item() / original - 1) < 0.5
        else:
            assert probe.probes == 0
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_fidelity_report_measures_the_coupling():
    model = make_reversible(tiny_model("llama", depth=3, dropout=0.1), gamma=0.5)
    ids = random_ids(2, 16)
    with torch.no_grad():
        original = model.eval()(ids, labels=ids).loss.item()
    model.train()
    report = fidelity_report(model, ids, draws=3)
    assert report.original_loss == pytest.approx(original, rel=1e-12)
    assert report.relative_change != 0  # gamma 1/2 moves the function
    assert [r["branch"] for r in report.sublayers] == ["attention", "mlp"] * 3
    assert report.sublayers[0]["side_bits"] == 0 and all(r["side_bits"] == 1 for r in report.sublayers[1:])
    assert all(r["perturbation"] > 0 for r in report.sublayers[1:])
    assert model.training and "3 reversible" not in report.summary() and "6 reversible sub-layers" in report.summary()
    # The twin computes the same function: the same signs give the same training-mode loss.
    twin = make_reversible(copy.deepcopy(model), reversible=False)
    assert fidelity_report(twin, ids, draws=3).training_loss == pytest.approx(report.training_loss, rel=1e-9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_function_is_the_coupling_not_the_original(family):
    """In training the coupling perturbs the function (gamma = +-1/32), and the perturbation has mean ~0: averaged
    over sign draws the training-mode logits approach the original's."""
    original = tiny_model(family).train()
    model = make_reversible(copy.deepcopy(original)).train()
    ids = random_ids(1, 16)
    ref = original(ids).logits
    draws = torch.stack([model(ids).logits.detach() for _ in range(64)])
    single = rel_err(draws[0], ref)
    mean = rel_err(draws.mean(0), ref)
    assert single > 1e-6  # the coupling is active
    assert mean < single / 2, (mean, single)


@pytest.mark.parametrize("coupling_class", [HeavyBallCoupling, BDIACoupling])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_two_step_reversal_is_bit_exact_at_depth_48(dtype, coupling_class):
    """Engine-level: a deep two-step stack reconstructs every block input bit-exactly, in bf16 compute too; in float64
    its gradients equal the twin's (bf16 gradients differ by the twin's own bf16 rounding, not by the reversal)."""

    class Block(torch.nn.Module):
        g_chunk_size = 0

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def f(self, x):
            return torch.tanh(self.a(x))

        def g(self, x):
            return torch.nn.functional.dropout(torch.tanh(self.b(x)), 0.1, self.training)

    torch.manual_seed(0)
    blocks = [Block().to(dtype) for _ in range(48)]
    x = torch.randn(4, 8, 16, dtype=dtype, requires_grad=True)
    grads = []
    for reversible in (True, False):
        report = DriftReport(per_block=True) if reversible else None
        torch.manual_seed(1)  # the same signs and dropout masks for both
        coupling = coupling_class().start(96, 4, "cpu")
        x1, x2 = coupling.init_streams(x)
        y1, y2 = run_reversible_stack(
            blocks, x1, x2, reversible=reversible, coupling=coupling, fixed_point_bits=30, drift_report=report
        )
        coupling.merge_streams(y1, y2).float().square().sum().backward()
        grads.append(torch.cat([x.grad.flatten()] + [p.grad.flatten() for b in blocks for p in b.parameters()]))
        x.grad = None
        for b in blocks:
            b.zero_grad(set_to_none=True)
        if reversible:
            assert report.all_bit_exact() and len(report.blocks) == 48, report.summary()
            assert len(coupling.bits) == 0  # every side bit was consumed
    if dtype == torch.float64:
        assert rel_err(grads[0], grads[1]) <= 1e-6


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_packed_bits_round_trip_and_size(bits):
    stack = PackedBits()
    values = [torch.randint(0, 2**bits, shape) for shape in [(3, 5, 7), (2, 8), (1,)]]
    for v in values:
        stack.push(v, bits)
    assert stack.nbytes == sum(bits * -(-v.numel() // 8) for v in values)  # `bits` bits per element, byte-padded
    for v in reversed(values):
        assert torch.equal(stack.pop(), v)


# --------------------------------------------------------------------------------------------------------------
# Activation memory: side bits only
# --------------------------------------------------------------------------------------------------------------


def step_peak_bytes(family: str, depth: int, reversible: bool, dropout: float, seq: int = 512) -> int:
    positions = {"n_positions": seq} if family == "gpt2" else {"max_position_embeddings": seq}
    model = tiny_model(family, depth=depth, dropout=dropout, dtype=torch.float32, **positions)
    if reversible:
        make_reversible(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
    ids = torch.randint(3, VOCAB, (1, seq))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()

    step()  # warm-up: gradient buffers exist before the measured step
    return peak_allocated_bytes(step)


@pytest.mark.parametrize("family,dropout", [("llama", 0.0), ("qwen2", 0.1), ("mistral", 0.0), ("gpt2", 0.1)])
def test_activation_memory_grows_by_the_side_bits_only(family, dropout):
    seq, hidden = 256, 32
    per_layer = (step_peak_bytes(family, 16, True, dropout, seq) - step_peak_bytes(family, 2, True, dropout, seq)) / 14
    # Budget per layer: the default coupling's side bits (5 for gamma = 1/32) per element of the hidden state per
    # sub-layer (2 sub-layers), plus, where the layer draws random numbers (dropout), the engine's CPU generator state
    # recorded before each sub-layer.
    rng_bytes = torch.get_rng_state().numel() if dropout else 0
    budget = 2 * gamma_shift(DEFAULT_GAMMA) * (seq * hidden / 8) + 2 * rng_bytes
    print(f"{family}: {per_layer:.0f} B per layer, budget {budget:.0f} B")
    assert per_layer <= budget + 512, (per_layer, budget)
    plain = (step_peak_bytes(family, 4, False, dropout, seq) - step_peak_bytes(family, 2, False, dropout, seq)) / 2
    assert plain > 20 * budget, (plain, budget)  # what an ordinary layer keeps for backward


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, PEFT, Trainer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_is_plain_original_class(family, tmp_path):
    model = make_reversible(tiny_model(family, dropout=0.1)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = random_ids(2, 12)
    model(ids, labels=ids).loss.backward()  # a reversible training step changes the weights
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model(ids).logits, tmp_path / "logits.pt")
    config_text = (tmp_path / "config.json").read_text()
    assert "reformer" not in config_text.lower() and "auto_map" not in json.loads(config_text)
    assert not list(tmp_path.glob("*.py"))  # no remote code
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"class": type(model).__name__, "equal": True, "reformer_rev_importable": False}


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
@pytest.mark.parametrize("convert_first", [True, False])
def test_lora_with_dropout_matches_the_twin(family, targets, convert_first):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=targets, fan_in_fan_out=family == "gpt2")
    models = []
    for reversible in (True, False):
        base = tiny_model(family, dropout=0.1)
        if convert_first:
            make_reversible(base, reversible=reversible)
        peft_model = lora_model(base, lora)
        if not convert_first:
            assert make_reversible(peft_model, reversible=reversible) is peft_model
        models.append(peft_model.train())
    loss_diff, grad_err = twin_trainable_errors(models, *padded_batch())
    assert loss_diff <= 1e-12 and grad_err <= 1e-6, (loss_diff, grad_err)


def test_trainer_trains_converted_model_like_its_twin(tmp_path):
    from transformers import Trainer, TrainingArguments

    rows = random_ids(16, 24, seed=4)
    data = [{"input_ids": r, "labels": r} for r in rows]
    params = []
    for reversible in (True, False):
        model = make_reversible(tiny_model("gpt2", dropout=0.1), reversible=reversible)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(reversible)), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=3, learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True, seed=0,
            disable_tqdm=True, logging_steps=1,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    initial = torch.cat([p.detach().flatten() for p in tiny_model("gpt2", dropout=0.1).parameters()])
    assert rel_err(params[0] - initial, params[1] - initial) <= 1e-6  # the same updates
    assert (params[0] - initial).norm() > 1e-3 * initial.norm()  # and they moved the weights


# --------------------------------------------------------------------------------------------------------------
# Options, undo and errors
# --------------------------------------------------------------------------------------------------------------


def test_reconfigure_and_revert():
    model = tiny_model("llama").train()
    layer = model.model.layers[0]
    make_reversible(model, gamma=0.25, chunk_size_feed_forward=8)
    make_reversible(model, reversible=False)  # options change, no second patch; the others are kept
    conversion = model._reversible_conversion
    assert conversion.coupling.gamma == 0.25 and conversion.blocks[0].g_chunk_size == 8 and not conversion.reversible
    make_reversible(model, coupling="bdia")  # a new coupling name takes its default gamma
    assert conversion.coupling.name == "bdia" and conversion.coupling.gamma == 2.0**-5
    ids = random_ids()
    assert "_ReversibleStackFunctionBackward" not in graph_nodes(model(ids, labels=ids).loss)
    make_reversible(model, reversible=True)
    assert "_ReversibleStackFunctionBackward" in graph_nodes(model(ids, labels=ids).loss)
    assert revert_reversible(model) is model and not is_reversible(model)
    assert "forward" not in vars(layer) and not model.model._forward_pre_hooks and not model._forward_hooks
    assert "_ReversibleStackFunctionBackward" not in graph_nodes(model(ids, labels=ids).loss)
    with pytest.raises(ValueError, match="not converted"):
        revert_reversible(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_momentum_coupling_gradients_equal_the_twin(family):
    model, twin = converted_pair(family, dropout=0.1, coupling="momentum", gamma=0.5)
    ids, mask, labels = padded_batch()
    for m in (model.train(), twin.train()):
        torch.manual_seed(2)
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    err, name = max_grad_rel_err(model, twin)
    assert err <= 1e-6, (name, err)


def test_unsupported_model_raises_naming_supported_classes():
    from reformer_rev import RevFormerConfig, RevFormerForCausalLM

    model = RevFormerForCausalLM(RevFormerConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel"):
        make_reversible(model)
    with pytest.raises(ValueError, match="supports the transformers classes"):
        make_reversible(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(coupling="additive"), ValueError, "original residual update at inference"),
        (dict(gamma=0.3), ValueError, "power of two"),
        # Each of these crashed inside the check before (`cannot convert float NaN to integer`, ...).
        (dict(gamma=0), ValueError, "power of two"),
        (dict(gamma=-0.5), ValueError, "power of two"),
        (dict(gamma=float("nan")), ValueError, "power of two"),
        (dict(gamma=float("inf")), ValueError, "power of two"),
        (dict(gamma=2.0**-9), ValueError, "power of two"),
        (dict(gamma="0.5"), TypeError, "gamma"),
        (dict(gamma=True), TypeError, "gamma"),
        (dict(coupling="momentum", gamma=1.5), ValueError, "gamma` of the momentum coupling"),
        (dict(coupling="momentum", gamma=float("nan")), ValueError, "gamma` of the momentum coupling"),
        (dict(coupling="momentum", gamma="0.5"), ValueError, "gamma` of the momentum coupling"),
        (dict(fixed_point_bits=70), ValueError, "fixed_point_bits"),
        (dict(reversible="yes"), TypeError, "reversible"),
        (dict(chunk_size_feed_forward=-1), ValueError, "chunk_size_feed_forward"),
    ],
)
def test_bad_options_raise(options, error, match):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        make_reversible(model, **options)
    assert not is_reversible(model)  # nothing was installed


def test_bad_options_leave_a_converted_model_as_it_was():
    model = make_reversible(tiny_model("llama"), gamma=0.25)
    with pytest.raises(ValueError, match="power of two"):
        make_reversible(model, gamma=float("nan"), chunk_size_feed_forward=64)
    conversion = model._reversible_conversion
    assert conversion.coupling.gamma == 0.25 and conversion.blocks[0].g_chunk_size == 256


def test_unsupported_calls_in_reversible_training_raise():
    model = make_reversible(tiny_model("llama")).train()
    ids = random_ids()
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(ids, output_hidden_states=True)
    assert len(model.eval()(ids, output_hidden_states=True).hidden_states) == 4  # fine at inference
    model.train()
    # A hook that changes a layer's output would be silently skipped by the stack: refused instead.
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: out * 1.0)
    with pytest.raises(RuntimeError, match="hidden state changed"):
        model(ids, labels=ids)
    handle.remove()
    # A non-empty cache (prefix tuning) would be updated twice by the recompute.
    with torch.no_grad():
        cache = output_cache(model(ids[:, :4], use_cache=True))
    with pytest.raises(ValueError, match="non-empty"):
        model(ids[:, 4:], **{CACHE_FIELD: cache})


def test_gpt2_cross_attention_raises():
    model = make_reversible(tiny_model("gpt2", add_cross_attention=True)).train()
    ids = random_ids()
    enc = torch.randn(2, 5, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="cross-attention"):
        model(ids, encoder_hidden_states=enc)


def test_stream_overflow_raises():
    # 52 fractional bits leave the two-step streams 2^8 = 256 in value (the grid itself 2^10): hidden states ~500 must
    # raise, not wrap around later.
    model = make_reversible(tiny_model("llama"), fixed_point_bits=52).train()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6e3)  # max |x| ~ 500: enters the grid, fails the 2^60 check
    ids = random_ids()
    with pytest.raises(OverflowError, match="HeavyBallCoupling fixed-point stream overflow.*Lower `fixed_point_bits`"):
        model(ids, labels=ids)


@pytest.mark.slow
def test_accelerate_ddp_two_processes_match_the_twin(tmp_path):
    from test_distributed import run_worker

    for run in run_worker("ddp_conversion.py", tmp_path)["runs"]:
        assert run["num_processes"] == 2 and run["ddp_wrapped"] == "DistributedDataParallel", run
        assert run["distributed_type"].endswith("MULTI_CPU")
        assert run["max_abs_diff_across_ranks"] == 0.0  # the all-reduce saw every gradient
        assert run["update_to_param_norm"] > 1e-2, run
        assert run["max_loss_diff"] <= 1e-12, run
        assert run["param_rel_err"] <= 1e-6 and run["update_rel_err"] <= 1e-6, run


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_autocast_gradients_equal_the_twin(family):
    """Accelerate's bf16 mixed precision wraps the forward in autocast: the engine's recompute must replay it for the
    forward ops only (backward ops under autocast differ from plain autograd's: 5e-3 in SDPA-with-dropout gradients
    when the whole recompute ran under autocast). Measured: 1.4e-7 for both families.

    Without padding the two agree to fp32 rounding. (With a left-padded batch, fp32 gradients summed in a different
    order flip a few bf16 roundings of the attention-output gradient: ~1e-3 relative, equally valid both ways.)"""
    model, twin = converted_pair(family, dropout=0.1)
    model.float().train(), twin.float().train()
    ids = random_ids(3, 20)
    for m in (model, twin):
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
    err, name = max_grad_rel_err(model, twin)
    assert err <= 1e-5, (name, err)
