"""Deep-equilibrium (DEQ) layers, model-agnostic: fixed-point solvers and implicit/phantom gradients.

A DEQ layer replaces a stack of weight-tied layers `z_{k+1} = f(z_k, x)` by its fixed point `z* = f(z*, x)`, found
by a root solver in the forward, and differentiates through the fixed point *implicitly*:

    dL/dtheta = (df/dtheta)^T u,   u = dL/dz* + J_f(z*)^T u,

so the backward solves one more (adjoint, linear) fixed point with vector-Jacobian products of a single application of
`f`, and activation memory does not depend on how many solver iterations the forward took. As an alternative the
*phantom gradient* (Geng et al., 2021) back-propagates through `k` damped steps `z <- (1 - tau) z + tau f(z)` started
at the (detached) fixed point: cheaper and often more stable, at the price of an approximate gradient.

Design rules (docs/design.md §2):

* the solver state is kept in at least float32 (`promote_types(dtype, float32)`), and Anderson's small linear solve runs
  in float64: bf16 solves are inaccurate and `torch.linalg.solve` has no bf16 kernel on CPU;
* residuals are relative, per batch row: `||f(z) - z|| / ||f(z)||`, and a solve has converged when the largest row
  residual is `<= tol`. Non-convergence is recorded in `SolverStats.converged` (the caller decides how to report it);
* every parameter's gradient hook fires once per backward (DDP's default mode, ZeRO): the implicit backward
  accumulates parameter gradients with one `torch.autograd.backward` on one rebuilt application of `f`, which also
  carries the Jacobian penalty's gradient when the penalty is asked of `deq_fixed_point`; a phantom unroll whose `f`
  calls the reversible engine collects every step's parameter gradients in a `DeferredGradients` and delivers their
  sum once (the engine would otherwise deliver once per step);
* the Jacobian regulariser is Hutchinson's estimate `E_eps ||eps^T J_f||^2 / n` of the squared Frobenius norm per
  element (Bai et al., 2021), differentiable with `create_graph=True`.

Nothing here knows about Transformers: `f(z, *inputs)` is any function whose output has `z`'s shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .reversible import AutocastState, DeferredGradients, _graph_leaves

SUPPORTED_SOLVERS = ("fixed_point", "anderson")
SUPPORTED_BACKWARDS = ("implicit", "phantom")


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SolverStats:
    """What one fixed-point solve did: function evaluations, final relative/absolute residual, convergence."""

    solver: str
    iterations: int
    residual: float
    abs_residual: float
    converged: bool
    tol: float
    max_iter: int
    trace: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DEQStats:
    """Statistics of one DEQ layer call: the forward solve and, once backward has run, the adjoint solve."""

    forward: SolverStats
    backward_mode: str = "implicit"
    backward: SolverStats | None = None
    phantom_steps: int = 0
    jacobian_loss: float | None = None
    # The differentiable Jacobian penalty (`deq_fixed_point(jacobian_samples=...)`); not part of `to_dict`.
    jacobian_penalty: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def converged(self) -> bool:
        """Forward converged and (if it has run) the implicit backward converged."""
        return self.forward.converged and (self.backward is None or self.backward.converged)

    @property
    def iterations(self) -> int:
        return self.forward.iterations

    @property
    def residual(self) -> float:
        return self.forward.residual

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, jacobian_penalty=None))  # asdict would deep-copy a tensor with a graph
        del out["jacobian_penalty"]
        out["converged"] = self.converged
        return out


# --------------------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------------------


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solver state precision: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).norm(dim=1)


def _residuals(fz: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """(max over rows of the relative residual, max over rows of the absolute residual)."""
    fz, z = fz.detach(), z.detach()
    diff = _row_norms(fz - z)
    rel = diff / _row_norms(fz).clamp_min(1e-30)
    return float(rel.max()), float(diff.max())


def _check_solver_args(max_iter: int, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"`tol` must be a non-negative number, got {tol!r}.")


def fixed_point_iteration(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 40,
    tol: float = 1e-3,
    damping: float = 1.0,
) -> tuple[torch.Tensor, SolverStats]:
    """Damped Picard iteration `z <- (1 - damping) z + damping f(z)`; returns the best iterate and its stats.

    The returned `z` is the iterate whose residual `||f(z) - z|| / ||f(z)||` is reported (the lowest seen), so the
    statistics describe exactly the tensor handed back.
    """
    _check_solver_args(max_iter, tol)
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"`damping` must be in (0, 1], got {damping!r}.")
    z = z0
    best, best_res, best_abs, trace = z0, float("inf"), float("inf"), []
    for k in range(max_iter):
        fz = f(z)
        rel, absolute = _residuals(fz, z)
        trace.append(rel)
        if rel < best_res:
            best, best_res, best_abs = z, rel, absolute
        if rel <= tol:
            break
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
    stats = SolverStats("fixed_point", len(trace), best_res, best_abs, best_res <= tol, float(tol), max_iter, trace)
    return best, stats


def anderson_acceleration(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 40,
    tol: float = 1e-3,
    memory: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration (type II), batched over dim 0, with a history of `memory` iterates.

    Memory is `2 * memory` copies of the state, independent of `max_iter`. The `(m+1) x (m+1)` least-squares system is
    solved in float64 (it is tiny); the Gram matrix is normalised by its diagonal scale so `lam` is relative.
    """
    _check_solver_args(max_iter, tol)
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"`memory` must be a positive integer, got {memory!r}.")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta` must be in (0, 1], got {beta!r}.")
    bsz = z0.shape[0]
    shape = z0.shape
    X = z0.new_zeros((bsz, memory, z0[0].numel()))
    F = torch.zeros_like(X)
    trace: list[float] = []
    best, best_res, best_abs = z0, float("inf"), float("inf")

    def evaluate(k: int, z: torch.Tensor) -> bool:
        nonlocal best, best_res, best_abs
        fz = f(z)
        X[:, k % memory] = z.reshape(bsz, -1)
        F[:, k % memory] = fz.reshape(bsz, -1)
        rel, absolute = _residuals(fz, z)
        trace.append(rel)
        if rel < best_res:
            best, best_res, best_abs = z, rel, absolute
        return rel <= tol

    done = evaluate(0, z0)
    k = 1
    if not done and max_iter > 1:
        done = evaluate(1, F[:, 0].reshape(shape).clone())
        k = 2
    while not done and k < max_iter:
        n = min(k, memory)
        G = (F[:, :n] - X[:, :n]).double()
        gram = torch.bmm(G, G.transpose(1, 2))
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-300)[:, None, None]
        H = torch.zeros(bsz, n + 1, n + 1, dtype=torch.float64, device=z0.device)
        H[:, 0, 1:] = H[:, 1:, 0] = 1.0
        H[:, 1:, 1:] = gram / scale + lam * torch.eye(n, dtype=torch.float64, device=z0.device)
        rhs = torch.zeros(bsz, n + 1, 1, dtype=torch.float64, device=z0.device)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve(H, rhs)[:, 1:, 0].to(X.dtype)  # (bsz, n), sums to 1
        mixed = torch.bmm(alpha[:, None], F[:, :n])[:, 0]
        if beta != 1.0:
            mixed = beta * mixed + (1 - beta) * torch.bmm(alpha[:, None], X[:, :n])[:, 0]
        done = evaluate(k, mixed.reshape(shape))
        k += 1
    stats = SolverStats("anderson", len(trace), best_res, best_abs, best_res <= tol, float(tol), max_iter, trace)
    return best, stats


def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 40,
    tol: float = 1e-3,
    damping: float = 1.0,
    anderson_memory: int = 5,
) -> tuple[torch.Tensor, SolverStats]:
    """Find `z = f(z)` from `z0` with `solver` (one of `SUPPORTED_SOLVERS`) in at least float32, without grad.

    `f` is called with tensors of `z0`'s dtype; its output is promoted to the solver's state dtype.
    """
    if solver not in SUPPORTED_SOLVERS:
        raise ValueError(f"`solver` must be one of {SUPPORTED_SOLVERS}, got {solver!r}.")
    in_dtype = z0.dtype
    state_dtype = _state_dtype(in_dtype)

    def g(z: torch.Tensor) -> torch.Tensor:
        return f(z.to(in_dtype)).to(state_dtype)

    with torch.no_grad():
        z = z0.detach().to(state_dtype)
        if solver == "fixed_point":
            z, stats = fixed_point_iteration(g, z, max_iter=max_iter, tol=tol, damping=damping)
        else:
            z, stats = anderson_acceleration(g, z, max_iter=max_iter, tol=tol, memory=anderson_memory, beta=damping)
    return z.to(in_dtype), stats


# --------------------------------------------------------------------------------------------------------------
# Differentiating through the fixed point
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SolverOptions:
    solver: str = "anderson"
    max_iter: int = 40
    tol: float = 1e-3
    damping: float = 1.0
    anderson_memory: int = 5
    backward_max_iter: int | None = None
    backward_tol: float | None = None

    def forward_kwargs(self) -> dict[str, Any]:
        return dict(
            solver=self.solver, max_iter=self.max_iter, tol=self.tol, damping=self.damping,
            anderson_memory=self.anderson_memory,
        )

    def backward_kwargs(self) -> dict[str, Any]:
        kwargs = self.forward_kwargs()
        kwargs["max_iter"] = self.backward_max_iter or self.max_iter
        kwargs["tol"] = self.tol if self.backward_tol is None else self.backward_tol
        return kwargs


class _ImplicitFixedPoint(torch.autograd.Function):
    """Forward: solve `z* = f(z*, *inputs)` without a graph (and, if asked, evaluate the Jacobian penalty at `z*`).
    Backward: solve the adjoint fixed point, then back-propagate `u` -- and the penalty's gradient -- through one
    rebuilt application of `f` with a single `torch.autograd.backward`, so each parameter receives its gradient once.
    """

    @staticmethod
    def forward(ctx, f, z0, options, stats_box, on_backward, penalty, anchor, *inputs):  # type: ignore[override]
        z_star, fstats = solve(lambda z: f(z, *inputs), z0, **options.forward_kwargs())
        stats = DEQStats(fstats, backward_mode="implicit")
        stats_box.append(stats)
        ctx.f, ctx.options, ctx.stats_box, ctx.on_backward, ctx.penalty = f, options, stats_box, on_backward, penalty
        ctx.autocast = AutocastState.capture(z0.device.type)
        ctx.save_for_backward(z_star, *inputs)
        # Gradients that do not reach an output arrive as None: the backward skips the adjoint or the penalty.
        ctx.set_materialize_grads(False)
        if penalty is None:
            value = z_star.new_zeros(())
            ctx.mark_non_differentiable(value)
            return z_star, value
        # The penalty's value now; its graph is rebuilt in backward on the same application of f as the adjoint's.
        with torch.enable_grad():
            z = z_star.detach().requires_grad_(True)
            fz = penalty.f(z, *(x.detach() for x in inputs))
            ctx.eps = _draw_probes(fz, penalty.samples, penalty.generator)
            value = _hutchinson(fz, z, ctx.eps, create_graph=False).detach()
        stats.jacobian_loss = float(value)
        return z_star, value

    @staticmethod
    def backward(ctx, grad, grad_penalty):  # type: ignore[override]
        z_star, *inputs = ctx.saved_tensors
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        penalty = ctx.penalty if grad_penalty is not None else None
        roots, root_grads, bstats = [], [], None
        # f is rebuilt under the forward's autocast state (with the penalty's twice-differentiable f when the penalty
        # needs a gradient); the vector-Jacobian products run outside it, as plain autograd's backward does.
        with torch.enable_grad(), torch.autocast(ctx.autocast.device_type, enabled=False):
            z = z_star.detach().requires_grad_(True)
            with ctx.autocast.context():
                fz = (penalty.f if penalty is not None else ctx.f)(z, *leaves)
            if grad is not None:
                grad = grad.contiguous()

                def adjoint(u: torch.Tensor) -> torch.Tensor:
                    (vjp,) = torch.autograd.grad(fz, z, u.to(fz.dtype), retain_graph=True)
                    return vjp + grad

                u, bstats = _solve_adjoint(adjoint, grad, ctx.options)
                roots.append(fz)
                root_grads.append(u.to(fz.dtype))  # parameters and inputs get (df/d.)^T u
            if penalty is not None:
                roots.append(_hutchinson(fz, z, ctx.eps, create_graph=True))
                root_grads.append(grad_penalty)
            if roots:
                # One pass for both terms: a parameter's accumulation hook fires once (DDP's default mode, ZeRO).
                torch.autograd.backward(roots, root_grads)
        stats = ctx.stats_box[-1]
        stats.backward = bstats
        if ctx.on_backward is not None and bstats is not None:
            ctx.on_backward(stats)
        ctx.f = ctx.stats_box = ctx.on_backward = ctx.penalty = ctx.eps = None
        grads = tuple(leaf.grad if leaf.requires_grad else None for leaf in leaves)
        return (None, None, None, None, None, None, None, *grads)


class _DeferredJacobianPenalty(torch.autograd.Function):
    """The Jacobian penalty of a phantom unroll whose engine calls defer their parameter gradients: its parameter
    gradients join them in `deferred`, to be delivered once with theirs. `after` (the unroll's gated start) makes
    autograd differentiate the penalty before the gate delivers."""

    @staticmethod
    def forward(ctx, penalty, z, deferred, after, *inputs):  # type: ignore[override]
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        # The create_graph graph is kept until backward, as the penalty computed outside a Function would keep it.
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            fz = penalty.f(z, *leaves)
            total = _hutchinson(fz, z, _draw_probes(fz, penalty.samples, penalty.generator), create_graph=True)
        ctx.total, ctx.leaves, ctx.deferred, ctx.own = total, leaves, deferred, {id(z), *map(id, leaves)}
        return total.detach()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        leaves = [leaf for leaf in ctx.leaves if leaf.requires_grad]
        params = [leaf for leaf in _graph_leaves(ctx.total) if id(leaf) not in ctx.own]
        grads = torch.autograd.grad(ctx.total, [*leaves, *params], grad, allow_unused=True)
        for p, g in zip(params, grads[len(leaves) :]):
            ctx.deferred.add(p, g)
        by_leaf = dict(zip(map(id, leaves), grads[: len(leaves)]))
        input_grads = tuple(by_leaf.get(id(leaf)) for leaf in ctx.leaves)
        ctx.total = ctx.leaves = ctx.deferred = ctx.own = None
        return (None, None, None, None, *input_grads)


def _solve_adjoint(adjoint: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor, options: SolverOptions):
    """`u = J^T u + grad` with the configured solver; vector-Jacobian products need grad mode, so no `no_grad` here."""
    kwargs = options.backward_kwargs()
    in_dtype = grad.dtype
    state_dtype = _state_dtype(in_dtype)

    def g(u: torch.Tensor) -> torch.Tensor:
        return adjoint(u.to(in_dtype)).detach().to(state_dtype)

    u0 = grad.detach().to(state_dtype)
    if kwargs["solver"] == "fixed_point":
        u, stats = fixed_point_iteration(
            g, u0, max_iter=kwargs["max_iter"], tol=kwargs["tol"], damping=kwargs["damping"]
        )
    else:
        u, stats = anderson_acceleration(
            g, u0, max_iter=kwargs["max_iter"], tol=kwargs["tol"], memory=kwargs["anderson_memory"],
            beta=kwargs["damping"],
        )
    return u.to(in_dtype), stats


@dataclass(frozen=True)
class _Penalty:
    """The Jacobian penalty asked of one DEQ call: Hutchinson samples, the (twice-differentiable) f, the generator."""

    samples: int
    f: Callable[..., torch.Tensor]
    generator: torch.Generator | None


def deq_fixed_point(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    inputs: Sequence[torch.Tensor] = (),
    *,
    solver: str = "anderson",
    max_iter: int = 40,
    tol: float = 1e-3,
    damping: float = 1.0,
    anderson_memory: int = 5,
    backward: str = "implicit",
    phantom_steps: int = 5,
    backward_max_iter: int | None = None,
    backward_tol: float | None = None,
    on_backward: Callable[[DEQStats], None] | None = None,
    jacobian_samples: int = 0,
    jacobian_f: Callable[..., torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    deferred_gradients: DeferredGradients | None = None,
) -> tuple[torch.Tensor, DEQStats]:
    """The fixed point `z* = f(z*, *inputs)`, differentiable with respect to `inputs` and `f`'s parameters.

    Args:
        f: the layer; `f(z, *inputs)` returns a tensor shaped like `z`. Dim 0 of `z` is the batch (residuals and
            Anderson mixing are per row).
        z0: initial guess.
        inputs: tensors `f` depends on that may need a gradient (the input injection).
        solver / max_iter / tol / damping / anderson_memory: forward solver (`damping` is the Picard damping of
            `"fixed_point"` and the mixing `beta` of `"anderson"`; 1 = undamped).
        backward: `"implicit"` (adjoint fixed point, exact at convergence) or `"phantom"` (back-propagate through
            `phantom_steps` damped steps from the detached fixed point).
        backward_max_iter / backward_tol: adjoint solve limits (default: the forward's).
        on_backward: called with the stats once the implicit backward has run (e.g. to warn on non-convergence).
        jacobian_samples: if positive, also compute the Jacobian penalty (`jacobian_regularizer` with this many
            samples, drawn from `generator`) at the returned point, as the differentiable `stats.jacobian_penalty`
            (its value in `stats.jacobian_loss`). With the implicit backward it shares the backward's rebuilt
            application of `f`, and each parameter receives the gradient of both terms at once.
        jacobian_f: the function the penalty differentiates twice (default `f`), e.g. `f` with a double-differentiable
            attention kernel; it must compute the same values as `f`. The implicit backward rebuilds `f` with it when
            the penalty needs a gradient.
        deferred_gradients: for a phantom unroll whose `f` calls the reversible engine with these
            `deferred_gradients` (`reversible.run_reversible_stack`): the unroll's start passes through its gate, so
            every parameter's gradient -- summed over the steps and the penalty -- is delivered once.

    Returns `(z, stats)`; `stats.backward` is filled in by the implicit backward when it runs.
    """
    if backward not in SUPPORTED_BACKWARDS:
        raise ValueError(f"`backward` must be one of {SUPPORTED_BACKWARDS}, got {backward!r}.")
    if isinstance(phantom_steps, bool) or not isinstance(phantom_steps, int) or phantom_steps < 1:
        raise ValueError(f"`phantom_steps` must be a positive integer, got {phantom_steps!r}.")
    if isinstance(jacobian_samples, bool) or not isinstance(jacobian_samples, int) or jacobian_samples < 0:
        raise ValueError(f"`jacobian_samples` must be a non-negative integer, got {jacobian_samples!r}.")
    options = SolverOptions(solver, max_iter, tol, damping, anderson_memory, backward_max_iter, backward_tol)
    penalty = _Penalty(jacobian_samples, jacobian_f or f, generator) if jacobian_samples else None
    inputs = tuple(inputs)
    needs_grad = torch.is_grad_enabled() and (
        z0.requires_grad or any(x.requires_grad for x in inputs) or _closure_has_grad_params(f)
    )
    if not needs_grad:
        z, fstats = solve(lambda z: f(z, *inputs), z0, **options.forward_kwargs())
        return z, _with_penalty(DEQStats(fstats, backward_mode="none"), penalty, z, inputs)
    if backward == "implicit":
        box: list[DEQStats] = []
        # A leaf that requires grad keeps the Function on the graph when only f's parameters need gradients.
        anchor = torch.empty(0, device=z0.device, requires_grad=True)
        z, value = _ImplicitFixedPoint.apply(f, z0.detach(), options, box, on_backward, penalty, anchor, *inputs)
        stats = box[-1]
        if penalty is not None:
            stats.jacobian_penalty = value
        return z, stats
    z_star, fstats = solve(lambda z: f(z, *inputs), z0, **options.forward_kwargs())
    z = z_star.detach()
    if deferred_gradients is not None:
        (z,) = deferred_gradients.entry(z)
    start = z
    for _ in range(phantom_steps):
        fz = f(z, *inputs)
        z = fz if damping == 1.0 else torch.lerp(z, fz, damping)
    stats = DEQStats(fstats, backward_mode="phantom", phantom_steps=phantom_steps)
    if penalty is not None and deferred_gradients is not None:
        stats.jacobian_penalty = _DeferredJacobianPenalty.apply(penalty, z.detach(), deferred_gradients, start, *inputs)
        stats.jacobian_loss = float(stats.jacobian_penalty.detach())
        return z, stats
    return z, _with_penalty(stats, penalty, z, inputs)


def _with_penalty(stats: DEQStats, penalty: _Penalty | None, z: torch.Tensor, inputs: Sequence[torch.Tensor]):
    """`stats` with the Jacobian penalty at `z` computed by ordinary autograd (when asked for)."""
    if penalty is not None:
        stats.jacobian_penalty = jacobian_regularizer(penalty.f, z, inputs, penalty.samples, penalty.generator)
        stats.jacobian_loss = float(stats.jacobian_penalty.detach())
    return stats


def _closure_has_grad_params(f: Callable[..., torch.Tensor]) -> bool:
    """Whether `f` is (bound to) a module with trainable parameters; plain functions are assumed to have some."""
    module = f if isinstance(f, torch.nn.Module) else getattr(f, "__self__", None)
    if isinstance(module, torch.nn.Module):
        return any(p.requires_grad for p in module.parameters())
    return True


def _draw_probes(fz: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """The Hutchinson probe vectors `eps ~ N(0, I)`, shaped like `f`'s output."""
    return [
        torch.randn(fz.shape, dtype=fz.dtype, device=fz.device, generator=generator) for _ in range(num_samples)
    ]


def _hutchinson(fz: torch.Tensor, z: torch.Tensor, probes: Sequence[torch.Tensor], create_graph: bool) -> torch.Tensor:
    """`mean_eps ||eps^T J_f(z)||^2 / numel(z)` for `fz = f(z)` (graph kept: the probes' products share it)."""
    total = fz.new_zeros(())
    for eps in probes:
        (vjp,) = torch.autograd.grad(fz, z, eps, create_graph=create_graph, retain_graph=True)
        total = total + vjp.pow(2).sum()
    return total / (len(probes) * z.numel())


def jacobian_regularizer(
    f: Callable[..., torch.Tensor],
    z: torch.Tensor,
    inputs: Sequence[torch.Tensor] = (),
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hutchinson estimate of `||J_f(z)||_F^2 / numel(z)`, differentiable (for a loss term).

    `E_eps ||eps^T J||^2 = ||J||_F^2` for `eps ~ N(0, I)`. Penalising it keeps `f` contractive around its fixed point,
    which keeps the forward and adjoint solves short (Bai et al., "Stabilizing Equilibrium Models by Jacobian
    Regularization", 2021). Costs one application of `f` and one double-backward per sample. Inside a DEQ layer pass
    `jacobian_samples` to `deq_fixed_point` instead: its gradient then reaches each parameter together with the
    layer's own (once per backward, as DDP's default mode requires).
    """
    z = z.detach().requires_grad_(True)
    fz = f(z, *inputs)
    return _hutchinson(fz, z, _draw_probes(fz, num_samples, generator), create_graph=True)


__all__ = [
    "SUPPORTED_SOLVERS",
    "SUPPORTED_BACKWARDS",
    "SolverStats",
    "DEQStats",
    "fixed_point_iteration",
    "anderson_acceleration",
    "solve",
    "deq_fixed_point",
    "jacobian_regularizer",
]
