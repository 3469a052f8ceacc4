"""Deep-equilibrium mode: solvers, implicit/phantom gradients, memory, and the DEQ model end to end."""

from __future__ import annotations

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from conftest import rel_err, tiny_config
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.deq import (
    anderson_acceleration,
    deq_fixed_point,
    fixed_point_iteration,
    jacobian_regularizer,
    solve,
)
from reformer_rev.profiling import peak_allocated_bytes

DEQ = dict(depth_mode="deq", num_unique_layers=1)


class Contractive(torch.nn.Module):
    """`f(z, x) = tanh(W z + U x + b)` with `||W||_2 = rho < 1`: a contraction with a unique fixed point."""

    def __init__(self, dim: int = 12, rho: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter(rho * w / torch.linalg.matrix_norm(w, 2))
        self.U = torch.nn.Parameter(0.5 * torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(0.1 * torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _grads(module: torch.nn.Module, x: torch.Tensor, loss: torch.Tensor) -> list[torch.Tensor]:
    for t in (*module.parameters(), x):
        t.grad = None
    loss.backward()
    return [t.grad.clone() for t in (*module.parameters(), x)]


def _loss(z: torch.Tensor) -> torch.Tensor:
    return (z.pow(2) + torch.sin(3 * z)).sum()


# --------------------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_fixed_point_satisfies_its_tolerance(solver, tol):
    f = Contractive(rho=0.9)
    x = torch.randn(5, 12, dtype=torch.float64)
    z, stats = solve(lambda z: f(z, x), torch.zeros_like(x), solver=solver, tol=tol, max_iter=500)
    with torch.no_grad():
        fz = f(z, x)
    residual = ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item()
    assert stats.converged and residual <= tol
    assert residual == pytest.approx(stats.residual, rel=1e-9)  # the stats describe the returned tensor
    assert stats.iterations == len(stats.trace) <= 500
    assert not z.requires_grad


def test_anderson_beats_picard_on_a_slow_contraction():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-0.97, 0.97, 12, dtype=torch.float64)) @ q.T  # spectral radius 0.97
    c = torch.randn(3, 12, generator=g, dtype=torch.float64)

    def f(z):
        return z @ a.T + c

    _, picard = fixed_point_iteration(f, torch.zeros_like(c), tol=1e-10, max_iter=2000)
    _, anderson = anderson_acceleration(f, torch.zeros_like(c), tol=1e-10, max_iter=2000)
    assert picard.converged and anderson.converged
    assert anderson.iterations * 5 < picard.iterations, (anderson.iterations, picard.iterations)


def test_non_convergence_is_flagged():
    f = Contractive(rho=0.95)
    x = torch.randn(2, 12, dtype=torch.float64)
    _, stats = solve(lambda z: f(z, x), torch.zeros_like(x), solver="fixed_point", tol=1e-12, max_iter=3)
    assert not stats.converged and stats.residual > 1e-12 and stats.iterations == 3


def test_solver_state_is_at_least_float32():
    seen = []

    def f(z):
        seen.append(z.dtype)
        return 0.5 * z + 1

    z, stats = solve(f, torch.zeros(2, 4, dtype=torch.bfloat16), solver="anderson", tol=1e-6, max_iter=50)
    assert z.dtype == torch.bfloat16 and stats.converged
    assert stats.residual <= 1e-6  # measured on the float32 state: bf16 arithmetic could not get below ~4e-3
    assert set(seen) == {torch.bfloat16}  # f itself is called in the caller's dtype


@pytest.mark.parametrize("bad", [dict(solver="broyden"), dict(max_iter=0), dict(tol=-1.0), dict(damping=0.0)])
def test_solver_argument_errors(bad):
    kwargs = dict(solver="fixed_point", max_iter=5, tol=1e-3, damping=1.0) | bad
    with pytest.raises(ValueError):
        solve(lambda z: z, torch.zeros(1, 2), **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Gradients through the fixed point
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_implicit_gradient_equals_long_unrolled_forward_float64(solver):
    f = Contractive(rho=0.7)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(4, 12, dtype=torch.float64)
    for _ in range(300):  # 0.7^300 ~ 1e-47: the unrolled map is at its fixed point to machine precision
        z = f(z, x)
    reference = _grads(f, x, _loss(z))
    z_star, stats = deq_fixed_point(f, torch.zeros_like(x), (x,), solver=solver, tol=1e-14, max_iter=300)
    implicit = _grads(f, x, _loss(z_star))
    assert stats.forward.converged and stats.backward is not None and stats.backward.converged
    errors = [rel_err(a, b) for a, b in zip(implicit, reference)]
    assert max(errors) <= 1e-11, errors


def test_phantom_gradient_approximates_and_converges_to_implicit():
    f = Contractive(rho=0.7)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    kwargs = dict(solver="anderson", tol=1e-14, max_iter=300)
    implicit = _grads(f, x, _loss(deq_fixed_point(f, torch.zeros_like(x), (x,), **kwargs)[0]))
    errors = {}
    for k in (1, 60):
        z, stats = deq_fixed_point(f, torch.zeros_like(x), (x,), backward="phantom", phantom_steps=k, **kwargs)
        assert stats.backward_mode == "phantom" and stats.phantom_steps == k
        errors[k] = max(rel_err(a, b) for a, b in zip(_grads(f, x, _loss(z)), implicit))
    assert errors[1] > 1e-3  # one step is a rough approximation ...
    assert errors[60] <= 1e-8, errors  # ... and k steps converge to the implicit gradient


def test_parameter_only_dependency_still_gets_gradients():
    """No input needs a gradient: the Function must stay on the graph for the parameters."""
    f = Contractive()
    x = torch.randn(2, 12, dtype=torch.float64)
    z, _ = deq_fixed_point(f, torch.zeros_like(x), (x,), tol=1e-10, max_iter=100)
    _loss(z).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())


def test_jacobian_regularizer_matches_exact_frobenius_norm():
    f = Contractive(dim=6)
    x = torch.randn(3, 6, dtype=torch.float64)
    z = torch.randn(3, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: f(v, x), z)  # (3, 6, 3, 6), block diagonal
    exact = jac.pow(2).sum().item() / z.numel()
    g = torch.Generator().manual_seed(0)
    estimate = jacobian_regularizer(f, z, (x,), num_samples=4000, generator=g)
    assert estimate.item() == pytest.approx(exact, rel=0.05)
    estimate = jacobian_regularizer(f, z, (x,), num_samples=2)
    estimate.backward()
    assert f.W.grad is not None and f.W.grad.abs().sum() > 0  # differentiable: usable as a loss term


def _count_deliveries(module: torch.nn.Module) -> dict[str, int]:
    """Per parameter, how often its gradient is accumulated (what DDP's default mode and ZeRO listen to)."""
    counts = {name: 0 for name, _ in module.named_parameters()}
    for name, p in module.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, _n=name: counts.__setitem__(_n, counts[_n] + 1))
    return counts


def test_jacobian_penalty_rides_the_implicit_backward_once_and_equals_the_separate_regulariser():
    """`deq_fixed_point(jacobian_samples=...)`: the penalty's gradient reaches the parameters in the implicit backward's
    single `torch.autograd.backward` (each hook fires once), and equals the ordinary-autograd regulariser's gradient
    added to the implicit one (float64)."""
    f = Contractive(rho=0.7)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    kwargs = dict(solver="anderson", tol=1e-14, max_iter=300)
    z_ref, _ = deq_fixed_point(f, torch.zeros_like(x), (x,), **kwargs)
    penalty = jacobian_regularizer(f, z_ref, (x,), num_samples=2, generator=torch.Generator().manual_seed(3))
    reference = _grads(f, x, _loss(z_ref) + 0.5 * penalty)
    counts = _count_deliveries(f)
    gen = torch.Generator().manual_seed(3)
    z, stats = deq_fixed_point(f, torch.zeros_like(x), (x,), jacobian_samples=2, generator=gen, **kwargs)
    assert stats.jacobian_loss == pytest.approx(penalty.item(), rel=1e-12)
    assert "jacobian_penalty" not in stats.to_dict()
    fused = _grads(f, x, _loss(z) + 0.5 * stats.jacobian_penalty)
    assert set(counts.values()) == {1}, counts
    errors = [rel_err(a, b) for a, b in zip(fused, reference)]
    assert max(errors) <= 1e-12, errors
    # The penalty alone (the fixed point's own gradient unused) goes through the same backward.
    z, stats = deq_fixed_point(f, torch.zeros_like(x), (x,), jacobian_samples=2, generator=gen.manual_seed(3), **kwargs)
    alone = _grads(f, x, stats.jacobian_penalty)
    expected = _grads(f, x, jacobian_regularizer(f, z_ref, (x,), 2, torch.Generator().manual_seed(3)))
    assert max(rel_err(a, b) for a, b in zip(alone, expected)) <= 1e-12


@pytest.mark.parametrize("reg", [0.0, 0.1], ids=["phantom", "phantom_jacobian_reg"])
def test_model_phantom_unroll_through_the_engine_delivers_once_and_matches_ordinary_autograd(reg):
    """The phantom unroll runs the reversible engine once per step: with `DeferredGradients` each block parameter's
    gradient -- summed over the steps and the Jacobian penalty -- is delivered once, and equals the twin's
    (`reversible=False`, ordinary autograd through every step), float64 with dropout."""
    ids = torch.randint(3, 48, (2, 16), generator=torch.Generator().manual_seed(5))
    config = dict(deq_backward="phantom", deq_phantom_steps=3, deq_jacobian_reg=reg, chunk_size_feed_forward=4,
                  hidden_dropout=0.1, attention_dropout=0.1, deq_max_iter=20)
    grads, counts = [], None
    for reversible in (True, False):
        model = _deq_model(reversible=reversible, **config).train()
        deliveries = _count_deliveries(model)
        torch.manual_seed(4)
        out = model(ids, labels=ids)
        assert (out.jacobian_loss is not None) == (reg > 0)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        counts = counts or deliveries
    assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c != 1}
    errors = {n: rel_err(grads[0][n], grads[1][n]) for n in grads[1]}
    assert max(errors.values()) <= 1e-12, max(errors.items(), key=lambda kv: kv[1])


def test_model_implicit_jacobian_reg_matches_unrolled_phantom_with_ordinary_autograd_penalty():
    """Implicit backward with the fused penalty vs the twin's phantom unroll of 30 steps with the penalty computed by
    ordinary autograd at its end (the same point to 1e-13): the same total gradient (float64, dropout on)."""
    ids = torch.randint(3, 48, (2, 24), generator=torch.Generator().manual_seed(5))
    tight = dict(deq_tol=1e-13, deq_max_iter=60, hidden_dropout=0.1, attention_dropout=0.1, deq_jacobian_reg=0.5)
    grads, penalties = [], []
    for backward, reversible in (("implicit", True), ("phantom", False)):
        model = _deq_model(deq_backward=backward, deq_phantom_steps=30, reversible=reversible, **tight).train()
        torch.manual_seed(4)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        penalties.append(out.jacobian_loss.item())
    assert penalties[0] == pytest.approx(penalties[1], rel=1e-9)
    errors = {n: rel_err(grads[0][n], grads[1][n]) for n in grads[1]}
    assert max(errors.values()) <= 1e-8, max(errors.items(), key=lambda kv: kv[1])


# --------------------------------------------------------------------------------------------------------------
# The DEQ model
# --------------------------------------------------------------------------------------------------------------


def _deq_model(seed: int = 0, dtype=torch.float64, **overrides) -> RevFormerForCausalLM:
    torch.manual_seed(seed)
    return RevFormerForCausalLM(tiny_config(**{**DEQ, **overrides})).to(dtype)


def test_model_implicit_gradient_matches_unrolled_phantom_with_dropout():
    """Model level: implicit gradient == back-prop through 30 undamped steps from the fixed point (float64).

    Dropout is on: every application of f within a forward must draw the same masks, in the solver, the adjoint
    and the unrolled steps alike, or the two gradients would disagree. (Padding slows the contraction: zero pad
    embeddings sit where RMSNorm's Jacobian is large, so the unrolled reference would need ~60 steps there.)
    """
    ids = torch.randint(3, 48, (2, 24), generator=torch.Generator().manual_seed(5))
    mask, labels = None, ids
    tight = dict(deq_tol=1e-13, deq_max_iter=60, hidden_dropout=0.1, attention_dropout=0.1)
    grads, losses = [], []
    for backward in ("implicit", "phantom"):
        model = _deq_model(deq_backward=backward, deq_phantom_steps=30, **tight).train()
        torch.manual_seed(4)
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert out.deq_stats.forward.converged, out.deq_stats.forward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    errors = {n: rel_err(grads[0][n], grads[1][n]) for n in grads[1]}
    assert max(errors.values()) <= 1e-8, max(errors.items(), key=lambda kv: kv[1])
    # dropout was active: eval mode gives another loss
    model.eval()
    with torch.no_grad():
        assert abs(model(ids, attention_mask=mask, labels=labels).loss.item() - losses[1]) > 1e-6


def test_model_returns_solver_stats_and_reports_non_convergence():
    ids = torch.randint(3, 48, (2, 12))
    model = _deq_model(dtype=torch.float32, deq_solver="fixed_point", deq_tol=1e-9, deq_max_iter=2).train()
    logger = logging.get_logger("reformer_rev")
    with CaptureLogger(logger) as cl:
        out = model(ids, labels=ids)
        out.loss.backward()
    stats = out.deq_stats
    assert stats.forward.iterations == 2 and not stats.forward.converged and not stats.converged
    assert stats.backward is not None and stats.backward.iterations == 2
    assert "did not converge" in cl.out and "deq_tol" in cl.out
    assert model.model.deq_nonconverged >= 1
    # a converging solve: no warning, stats flag set
    model = _deq_model(dtype=torch.float32, deq_tol=1e-3).eval()
    with CaptureLogger(logger) as cl, torch.no_grad():
        out = model(ids)
    assert out.deq_stats.converged and out.deq_stats.forward.residual <= 1e-3 and "did not converge" not in cl.out
    assert out.deq_stats.to_dict()["forward"]["iterations"] == out.deq_stats.forward.iterations


def _deq_step_peak_mb(max_iter: int, solver: str = "anderson") -> float:
    torch.manual_seed(0)
    config = RevFormerConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, loss_chunk_size=128, depth_mode="deq", num_unique_layers=1,
        deq_solver=solver, deq_tol=1e-12, deq_max_iter=max_iter,  # unreachable tol: always max_iter iterations
    )
    model = RevFormerForCausalLM(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
    ids = torch.randint(0, 256, (1, 256))
    iterations = []

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        iterations.append((out.deq_stats.forward.iterations, out.deq_stats.backward.iterations))

    logging.set_verbosity_error()
    try:
        step()
        peak = peak_allocated_bytes(step) / 2**20
    finally:
        logging.set_verbosity_warning()
    assert iterations[-1] == (max_iter, max_iter)
    return peak


@pytest.mark.parametrize("solver,few", [("fixed_point", 3), ("anderson", 12)])
def test_training_step_memory_does_not_grow_with_solver_iterations(solver, few):
    """One application of the group is held, whatever the number of forward and adjoint iterations.

    Anderson's solver state is preallocated, but its least-squares temporaries (float64 differences of the stored
    iterates) grow with the number of iterates in its history until that is full (5 iterates): its peak grows over
    the first ~10 iterations (3.7 MB at 2, 6.2 MB from 12 on, measured) and is flat after that. So `few` is past that
    point; the fixed-point solver keeps no history and is flat from its first iterations (2.5 MB at 3 and at 24).
    """
    few_mb, many_mb = _deq_step_peak_mb(few, solver), _deq_step_peak_mb(4 * few, solver)
    assert many_mb <= 1.02 * few_mb, (few_mb, many_mb)


def test_save_load_and_generate_in_deq_mode(tmp_path):
    model = _deq_model(deq_tol=1e-10, deq_max_iter=100).eval()
    ids = torch.randint(3, 48, (2, 7))
    model.save_pretrained(tmp_path)
    loaded = RevFormerForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.depth_mode == "deq" and loaded.config.deq_tol == 1e-10 and len(loaded.model.layers) == 1
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert b.deq_stats.converged
    cached = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)  # the cache stores the keys/values of each token's fixed point
    with torch.no_grad():  # and the cached last-token logits match a full recompute
        full = loaded(cached).logits[:, -1]
        out = loaded(cached[:, :-1], use_cache=True)
        step = loaded(cached[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert rel_err(step, full) <= 1e-7


def test_jacobian_regularisation_is_added_to_the_loss():
    ids = torch.randint(3, 48, (2, 10))
    losses = {}
    for reg in (0.0, 0.5):
        model = _deq_model(deq_jacobian_reg=reg).train()
        torch.manual_seed(1)
        out = model(ids, labels=ids)
        losses[reg] = out
    assert losses[0.0].jacobian_loss is None
    jac = losses[0.5].jacobian_loss
    assert jac is not None and jac.item() > 0 and losses[0.5].deq_stats.jacobian_loss == pytest.approx(jac.item())
    assert losses[0.5].loss.item() == pytest.approx(losses[0.0].loss.item() + 0.5 * jac.item(), rel=1e-6, abs=1e-5)
    losses[0.5].loss.backward()


def test_bf16_autocast_training_step_is_finite():
    ids = torch.randint(3, 48, (2, 16))
    model = _deq_model(dtype=torch.float32).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert out.deq_stats.backward is not None


@pytest.mark.parametrize(
    "field, value",
    [
        ("depth_mode", "ode"),
        ("deq_solver", "broyden"),
        ("deq_backward", "unrolled"),
        ("deq_max_iter", 0),
        ("deq_tol", 0.0),
        ("deq_phantom_steps", 0),
        ("deq_damping", 1.5),
        ("deq_jacobian_reg", -1.0),
        ("num_unique_layers", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})
