"""The recomputing backward gives the gradients of ordinary autograd on the same modules (the twin)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_pair, max_grad_rel_err, rel_err

DEEP = dict(num_hidden_layers=16, hidden_dropout=0.1, attention_dropout=0.1, chunk_size_feed_forward=16, loss_chunk_size=13)


def _loss(model, ids, mask, labels, seed):
    torch.manual_seed(seed)
    return model(ids, attention_mask=mask, labels=labels).loss


def test_float64_parity_deep_dropout_padded(padded_batch):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**DEEP)
    rev.train(), twin.train()
    l_rev, l_twin = _loss(rev, ids, mask, labels, 7), _loss(twin, ids, mask, labels, 7)
    assert torch.isfinite(l_rev)
    assert abs(l_rev.item() - l_twin.item()) <= 1e-12 * abs(l_twin.item())
    l_rev.backward(), l_twin.backward()
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-6, (err, name)
    # dropout really was active: the same model in eval mode gives another loss
    rev.eval()
    with torch.no_grad():
        assert abs(rev(ids, attention_mask=mask, labels=labels).loss.item() - l_rev.item()) > 1e-6


def test_float64_parity_input_embedding_gradient(padded_batch):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**DEEP)
    rev.train(), twin.train()
    embeds = rev.get_input_embeddings()(ids).detach()
    e_rev, e_twin = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    torch.manual_seed(3)
    rev(inputs_embeds=e_rev, attention_mask=mask, labels=labels).loss.backward()
    torch.manual_seed(3)
    twin(inputs_embeds=e_twin, attention_mask=mask, labels=labels).loss.backward()
    assert rel_err(e_rev.grad, e_twin.grad) <= 1e-6
    assert max_grad_rel_err(rev, twin, skip=("model.embed_tokens.weight",))[0] <= 1e-6


def test_bf16_autocast_parity(padded_batch):
    """Reversible vs twin, both under bf16 autocast with fp32 weights (exact streams: the `"auto"` default).

    The recompute replays autocast around f/g only, so f/g see the same bf16 casts as in the forward and their
    gradients are computed outside autocast, as plain autograd computes them. The streams are exact, so the recompute
    sees bit-identical inputs. What remains is the order in which fp32 gradient contributions are summed, which can
    flip the bf16 rounding of a few elements of a later bf16 matmul's gradient: ~2.5e-3 relative (measured; a bf16 ulp
    is 3.9e-3). Running the gradients under autocast too gave 9.4e-3, a missing autocast replay O(1): 5e-3 separates
    both from what remains.
    """
    ids, mask, labels = padded_batch
    rev, twin = make_pair(dtype=torch.float32, **{**DEEP, "num_hidden_layers": 8})
    rev.train(), twin.train()
    losses = []
    for model in (rev, twin):
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 5e-3, (err, name)


def test_two_forwards_then_one_backward(padded_batch):
    """RNG is captured per forward call: a second forward before backward must not corrupt the first's dropout."""
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**{**DEEP, "num_hidden_layers": 6})
    rev.train(), twin.train()
    for model in (rev, twin):
        torch.manual_seed(5)
        a = model(ids, attention_mask=mask, labels=labels).loss
        b = model(ids.flip(0), attention_mask=mask.flip(0), labels=labels.flip(0)).loss
        (a + 0.5 * b).backward()
    assert max_grad_rel_err(rev, twin)[0] <= 1e-6


def test_gradient_accumulation_two_micro_batches(padded_batch):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**{**DEEP, "num_hidden_layers": 6})
    rev.train(), twin.train()
    for model in (rev, twin):
        torch.manual_seed(9)
        for sl in (slice(0, 2), slice(2, 3)):
            (model(ids[sl], attention_mask=mask[sl], labels=labels[sl]).loss / 2).backward()
    assert max_grad_rel_err(rev, twin)[0] <= 1e-6


def test_eval_mode_backward(padded_batch):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**DEEP)
    rev.eval(), twin.eval()
    rev(ids, attention_mask=mask, labels=labels).loss.backward()
    twin(ids, attention_mask=mask, labels=labels).loss.backward()
    assert max_grad_rel_err(rev, twin)[0] <= 1e-6


def test_global_rng_not_reseeded(padded_batch):
    """After a training step the global generator is where the twin leaves it (the recompute forks, never seeds)."""
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**{**DEEP, "num_hidden_layers": 4})
    rev.train(), twin.train()
    draws = []
    for model in (rev, twin):
        torch.manual_seed(21)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_same_seed_same_loss_twice(padded_batch):
    ids, mask, labels = padded_batch
    rev, _ = make_pair(**{**DEEP, "num_hidden_layers": 4})
    rev.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(4)
        loss = rev(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]


def test_no_recompute_without_grad(padded_batch, monkeypatch):
    """Under torch.no_grad() the stack runs once, with no autograd Function and no RNG capture."""
    ids, mask, _ = padded_batch
    rev, _ = make_pair(num_hidden_layers=4)
    calls = {"f": 0}
    block = rev.model.layers[0]
    original = block.f

    def counting_f(x, **kw):
        calls["f"] += 1
        return original(x, **kw)

    monkeypatch.setattr(block, "f", counting_f)
    from reformer_rev import reversible

    monkeypatch.setattr(reversible._ReversibleStackFunction, "apply", None)  # would raise if used
    with torch.no_grad():
        rev(ids, attention_mask=mask)
    assert calls["f"] == 1


def test_recompute_calls_each_function_once_in_backward(padded_batch, monkeypatch):
    """The backward evaluates f and g once per block: one extra forward, the recompute minimum."""
    ids, mask, labels = padded_batch
    rev, _ = make_pair(num_hidden_layers=3, chunk_size_feed_forward=0)
    block = rev.model.layers[1]
    calls = {"f": 0, "g": 0}
    for name in ("f", "g"):
        original = getattr(block, name)

        def counting(x, _orig=original, _name=name, **kw):
            calls[_name] += 1
            return _orig(x, **kw)

        monkeypatch.setattr(block, name, counting)
    loss = rev(ids, attention_mask=mask, labels=labels).loss
    assert calls == {"f": 1, "g": 1}
    loss.backward()
    assert calls == {"f": 2, "g": 2}


def test_frozen_parameters_and_partial_requires_grad(padded_batch):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(num_hidden_layers=4)
    for model in (rev, twin):
        model.model.layers[1].requires_grad_(False)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        assert model.model.layers[1].mlp.up_proj.weight.grad is None
    for (n, p1), (_, p2) in zip(rev.named_parameters(), twin.named_parameters()):
        if p1.grad is not None:
            assert rel_err(p1.grad, p2.grad) <= 1e-6, n


def test_recompute_replays_autocast(padded_batch):
    """Inside the custom backward autocast is off unless the engine re-enters it: the recomputed projections must
    run in bf16 exactly like the forward did (otherwise the gradients belong to an fp32 function)."""
    ids, mask, labels = padded_batch
    rev, _ = make_pair(dtype=torch.float32, num_hidden_layers=3)
    dtypes = []
    for block in rev.model.layers:
        block.self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        block.mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rev(ids, attention_mask=mask, labels=labels).loss
    n_forward = len(dtypes)
    loss.backward()
    assert len(dtypes) == 2 * n_forward  # recompute happened
    assert set(dtypes) == {torch.bfloat16}
    # and the streams stayed fp32
    assert all(p.grad.dtype == torch.float32 for p in rev.parameters())
