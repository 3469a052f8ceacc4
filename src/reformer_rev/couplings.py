"""Coupling rules of reversible stacks, and the stream arithmetic that makes their reversal exact.

A reversible block applies two residual functions, `F` (e.g. attention) and `G` (e.g. feed-forward), one after the
other. Each application is a *sub-step* that updates the two streams `(a, b)` from `phi(one stream)`. The couplings
differ only in that update rule:

* `additive` (RevNet / Reformer): `(a, b) -> (b, a + phi(b))`. Two sub-steps give `y1 = x1 + F(x2)`,
  `y2 = x2 + G(y1)`.
* `leapfrog` (second-order network of Chang et al., "Reversible Architectures for Arbitrarily Deep Residual Neural
  Networks"): the streams hold two consecutive positions of `y'' = phi(y)`, and
  `(y_prev, y) -> (y, 2 y - y_prev + h^2 phi(y))`. Its reversal amplifies errors only polynomially with depth.
* `momentum` (Momentum ResNets, Sander et al. 2021): the streams are a position and a velocity,
  `v <- gamma v + (1 - gamma) phi(x)`, `x <- x + v`. Inverting divides by `gamma`, so floating-point errors grow
  like `gamma^-depth`: use the exact mode.

Two arithmetics run these rules:

* `FloatArith`: the streams are ordinary float tensors; reversal is exact only up to rounding, and the error grows
  with depth (see `docs/depth.md` for measurements).
* `ExactArith`: the streams are int64 fixed point (value = integer * 2^-bits). Every `phi` output is rounded onto
  that grid before it is added, so the update is an integer addition, undone exactly by an integer subtraction, in
  any compute dtype -- provided `phi` is recomputed bit-identically (same input, RNG and autocast state, which the
  engine replays). The momentum decay `v * gamma` is made exact with the information buffer of Maclaurin et al.
  ("Gradient-based Hyperparameter Optimization through Reversible Learning"): the bits that the multiplication
  by `gamma = n/d` destroys are pushed to a per-element big integer and popped back on reversal. That buffer grows by
  `log2(1/gamma)` bits per element and sub-step (0.15 bits for gamma = 0.9), the information-theoretic minimum.

Gradients are those of the float rule evaluated at the (exact) fixed-point values: the rounding is treated as the
identity in backward (straight-through estimator). `DualArith` implements exactly that for the ordinary-autograd twin,
so reversible and twin gradients can be compared in exact mode too.

Nothing here knows about attention: a coupling only sees tensors and the outputs of `phi`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

SUPPORTED_COUPLINGS = ("additive", "momentum", "leapfrog")


# --------------------------------------------------------------------------------------------------------------
# Stream arithmetics
# --------------------------------------------------------------------------------------------------------------


def _int_lin(a: Any, ca: int, b: Any, cb: int) -> Any:
    """`ca * a + cb * b` for small integer coefficients, skipping the multiplications by 0 and +-1."""

    def term(x: Any, c: int) -> Any:
        return x if c == 1 else (-x if c == -1 else x * c)

    if cb == 0:
        return term(a, ca)
    if ca == 0:
        return term(b, cb)
    if cb == 1:
        return term(a, ca) + b
    if cb == -1:
        return term(a, ca) - b
    return term(a, ca) + term(b, cb)


class FloatArith:
    """Streams are float tensors; reversal is exact only up to rounding."""

    exact = False

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def out(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def view(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def quant(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def sub(self, a: Any, b: Any) -> Any:
        return a - b

    def lin(self, a: Any, ca: int, b: Any, cb: int) -> Any:
        return _int_lin(a, ca, b, cb)

    def mul_gamma(self, s: torch.Tensor, gamma: Fraction) -> torch.Tensor:
        return s * float(gamma)

    def div_gamma(self, s: torch.Tensor, gamma: Fraction) -> torch.Tensor:
        return s / float(gamma)

    def check(self) -> None:
        pass


class InfoBuffer:
    """A non-negative big integer per tensor element, stored as int64 limbs of `LIMB_BITS` bits (least significant
    first). Holds the bits that an exact multiplication by `n/d < 1` would otherwise destroy."""

    LIMB_BITS = 52  # a limb times a factor <= 2^10 plus a carry stays below 2^63
    MAX_FACTOR = 1 << 10

    def __init__(self, limbs: list[torch.Tensor] | None = None) -> None:
        self.limbs = list(limbs or [])

    @property
    def bits(self) -> int:
        """Storage used, in bits per element (a whole limb counts once any element needs it)."""
        return self.LIMB_BITS * len(self.limbs)

    def push(self, r: torch.Tensor, d: int) -> None:
        """`buffer <- buffer * d + r` with `0 <= r < d`."""
        mask = (1 << self.LIMB_BITS) - 1
        carry = r
        for i, limb in enumerate(self.limbs):
            t = limb * d + carry
            self.limbs[i] = t & mask
            carry = t >> self.LIMB_BITS
        if bool((carry != 0).any()):
            self.limbs.append(carry)

    def pop(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """`r = buffer mod n; buffer <- buffer // n`; returns `r` (zeros for an empty buffer)."""
        rem = torch.zeros_like(like)
        for i in reversed(range(len(self.limbs))):
            t = (rem << self.LIMB_BITS) + self.limbs[i]
            q = torch.div(t, n, rounding_mode="floor")
            rem = t - q * n
            self.limbs[i] = q
        while self.limbs and not bool(self.limbs[-1].any()):
            self.limbs.pop()
        return rem


class ExactArith:
    """Streams are int64 fixed point with `bits` fractional bits; the float view has dtype `dtype`."""

    exact = True

    def __init__(self, bits: int, dtype: torch.dtype, buffer: InfoBuffer | None = None) -> None:
        self.bits = bits
        self.dtype = dtype
        self.scale = float(2**bits)
        self.inv_scale = float(2.0**-bits)
        self.buffer = buffer if buffer is not None else InfoBuffer()
        self._peak: torch.Tensor | None = None

    def round(self, t: torch.Tensor) -> torch.Tensor:
        """Round a float tensor onto the grid. Overflow or non-finite values raise instead of wrapping silently.

        On CPU the check is immediate; on CUDA the peak is accumulated on the device and checked once by `check()`
        (the engine calls it at the end of each forward and backward), so the stack does not synchronise with the
        host at every sub-step.
        """
        t = t.detach()
        if t.numel():
            peak = t.abs().amax().to(torch.float64) * self.scale
            if t.is_cuda:
                self._peak = peak if self._peak is None else torch.maximum(self._peak, peak)
            else:
                self._raise_if_overflow(peak.item())
        # Scaling by a power of two and rounding are exact in the tensor's own (at least float32) precision, so this
        # equals rounding in float64 -- and is ~20x faster on CPU, where float64 rounding is not vectorised.
        return torch.round(t.to(torch.promote_types(t.dtype, torch.float32)) * self.scale).to(torch.int64)

    def _raise_if_overflow(self, peak: float) -> None:
        if not peak < 2.0**62:
            raise OverflowError(
                f"Fixed-point stream overflow: a value of magnitude {peak * self.inv_scale:.3g} does not fit in "
                f"int64 with {self.bits} fractional bits (or is not finite). Lower the fractional bits: "
                "`fixed_point_bits` of `make_reversible`, `fixed_point_scale_bits` of `RevFormerConfig`."
            )

    def check(self) -> None:
        """Raise if any value rounded on a CUDA device so far overflowed (see `round`)."""
        if self._peak is not None:
            peak, self._peak = self._peak.item(), None
            self._raise_if_overflow(peak)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return self.round(x)

    def view(self, s: torch.Tensor) -> torch.Tensor:
        # Through float32 at least: int64 -> float16 would overflow; any fixed choice is fine as long as forward and
        # backward use the same one.
        return (s.to(torch.promote_types(self.dtype, torch.float32)) * self.inv_scale).to(self.dtype)

    out = view

    def quant(self, out: torch.Tensor) -> torch.Tensor:
        return self.round(out)

    add = FloatArith.add
    sub = FloatArith.sub
    lin = FloatArith.lin

    def mul_gamma(self, s: torch.Tensor, gamma: Fraction) -> torch.Tensor:
        """Exact `s * n/d`: push `s mod d`, divide by `d`, multiply by `n`, pop `n`-ary digit into the low part."""
        n, d = gamma.numerator, gamma.denominator
        q = torch.div(s, d, rounding_mode="floor")
        self.buffer.push(s - q * d, d)
        return q * n + self.buffer.pop(n, s)

    def div_gamma(self, s: torch.Tensor, gamma: Fraction) -> torch.Tensor:
        """Exact inverse of `mul_gamma`."""
        n, d = gamma.numerator, gamma.denominator
        q = torch.div(s, n, rounding_mode="floor")
        self.buffer.push(s - q * n, n)
        return q * d + self.buffer.pop(d, s)


class DualArith(ExactArith):
    """Exact mode under ordinary autograd (the twin): each stream is a pair `(float, int)` whose float part has the
    value of the integer and the gradient of the float rule (straight-through rounding)."""

    def snap(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t + (ExactArith.view(self, s) - t).detach(), s

    def enter(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.snap(x, self.round(x))

    def view(self, s: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return s[0]

    out = view

    def quant(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out, self.round(out)

    def add(self, a, b):
        return self.snap(a[0] + b[0], a[1] + b[1])

    def sub(self, a, b):
        return self.snap(a[0] - b[0], a[1] - b[1])

    def lin(self, a, ca, b, cb):
        return self.snap(_int_lin(a[0], ca, b[0], cb), _int_lin(a[1], ca, b[1], cb))

    def mul_gamma(self, s, gamma):
        return self.snap(s[0] * float(gamma), ExactArith.mul_gamma(self, s[1], gamma))

    def div_gamma(self, s, gamma):  # pragma: no cover - the twin never inverts
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------
# Couplings
# --------------------------------------------------------------------------------------------------------------


class Coupling:
    """One sub-step rule `(a, b) -> (a', b')` using `out = coef * phi(input)`; a block is an F then a G sub-step.

    Subclasses define, in terms of an arithmetic `ar`:

    * `forward_input(a, b)`: the stream `phi` reads; `forward_combine(ar, a, b, q)`: the new state, `q = ar.quant(out)`;
    * `inverse_input(ar, a2, b2)`: the same stream recovered from the outputs; `inverse_combine(ar, a2, b2, xin, q)`;
    * `grad_out(da2, db2)`: dL/d(out); `grad_inputs(da2, db2, g_in)`: (dL/da, dL/db) given `g_in` = dL/d(input) through
      `phi`. The float rule's derivatives: rounding is straight-through.
    """

    name: str = ""
    coef: float = 1.0

    def init_streams(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two streams from one hidden state (both a copy of it, by default)."""
        return hidden, hidden

    def merge_streams(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """One hidden state from the final streams."""
        return (x1 + x2) / 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SwapCoupling(Coupling):
    """`(a, b) -> (b, beta * a + alpha * b + coef * phi(b))` with integer `alpha` and `beta = +-1`, so the inverse
    `a = beta * (b' - alpha * b - coef * phi(b))` needs no division."""

    def __init__(self, alpha: int, beta: int, coef: float) -> None:
        if beta not in (1, -1):
            raise ValueError(f"`beta` must be +1 or -1 for an exact inverse, got {beta!r}.")
        self.alpha, self.beta, self.coef = int(alpha), int(beta), float(coef)

    def forward_input(self, a, b):
        return b

    def forward_combine(self, ar, a, b, q):
        return b, ar.add(ar.lin(a, self.beta, b, self.alpha), q)

    def inverse_input(self, ar, a2, b2):
        return a2

    def inverse_combine(self, ar, a2, b2, xin, q):
        rest = ar.lin(b2, self.beta, a2, -self.beta * self.alpha)
        return (ar.sub(rest, q) if self.beta == 1 else ar.add(rest, q)), a2

    def grad_out(self, da2, db2):
        return db2

    def grad_inputs(self, da2, db2, g_in):
        da = db2 if self.beta == 1 else -db2
        db = da2 + g_in if self.alpha == 0 else da2 + self.alpha * db2 + g_in
        return da, db


class AdditiveCoupling(SwapCoupling):
    """`y1 = x1 + F(x2)`, `y2 = x2 + G(y1)` (RevNet, Reformer)."""

    name = "additive"

    def __init__(self) -> None:
        super().__init__(alpha=0, beta=1, coef=1.0)


class LeapfrogCoupling(SwapCoupling):
    """Second-order (leapfrog) network of Chang et al.: `y_{j+1} = 2 y_j - y_{j-1} + h^2 phi(y_j)`.

    The streams hold `(y_{j-1}, y_j)`; they start equal (zero initial velocity) and the output is their mean.
    """

    name = "leapfrog"

    def __init__(self, step_size: float = 1.0) -> None:
        self.step_size = float(step_size)
        super().__init__(alpha=2, beta=-1, coef=self.step_size**2)

    def __repr__(self) -> str:
        return f"LeapfrogCoupling(step_size={self.step_size})"


class MomentumCoupling(Coupling):
    """Momentum ResNet: streams `(x, v)`, `v <- gamma v + (1 - gamma) phi(x)`, `x <- x + v`.

    `gamma` is used as the fraction `n/d` (denominator <= 1024) closest to the given value, in every mode, so the
    float, exact and twin paths compute the same function. The velocity starts at zero and the output is `x`.
    """

    name = "momentum"

    def __init__(self, gamma: float = 0.9) -> None:
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"`momentum_gamma` must be in (0, 1), got {gamma!r}.")
        self.gamma = Fraction(gamma).limit_denominator(InfoBuffer.MAX_FACTOR)
        if self.gamma <= 0 or self.gamma >= 1:
            raise ValueError(f"`momentum_gamma`={gamma!r} is too close to 0 or 1 for a fraction n/d with d <= 1024.")
        self.coef = float(1 - self.gamma)

    def init_streams(self, hidden):
        return hidden, torch.zeros_like(hidden)

    def merge_streams(self, x1, x2):
        return x1

    def forward_input(self, a, b):
        return a

    def forward_combine(self, ar, x, v, q):
        v = ar.add(ar.mul_gamma(v, self.gamma), q)
        return ar.add(x, v), v

    def inverse_input(self, ar, x2, v2):
        return ar.sub(x2, v2)

    def inverse_combine(self, ar, x2, v2, x, q):
        return x, ar.div_gamma(ar.sub(v2, q), self.gamma)

    def grad_out(self, dx2, dv2):
        return dv2 + dx2

    def grad_inputs(self, dx2, dv2, g_in):
        return dx2 + g_in, (dv2 + dx2) * float(self.gamma)

    def __repr__(self) -> str:
        return f"MomentumCoupling(gamma={self.gamma})"


def make_coupling(name: str | Coupling | None = "additive", *, step_size: float = 1.0, gamma: float = 0.9) -> Coupling:
    """A coupling from its name (`SUPPORTED_COUPLINGS`); a `Coupling` instance is returned as is."""
    if isinstance(name, Coupling):
        return name
    if name is None or name == "additive":
        return AdditiveCoupling()
    if name == "leapfrog":
        return LeapfrogCoupling(step_size)
    if name == "momentum":
        return MomentumCoupling(gamma)
    raise ValueError(f"`coupling` must be one of {SUPPORTED_COUPLINGS}, got {name!r}.")


# --------------------------------------------------------------------------------------------------------------
# Drift reporting
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BlockDrift:
    """Reconstruction error of one block's inputs: max abs and relative (Frobenius) error of the float views."""

    index: int
    abs_err: float
    rel_err: float
    bit_exact: bool


@dataclass
class DriftReport:
    """Filled during the recomputing backward.

    `blocks`: with `per_block=True` (debug: the forward keeps a copy of every block's inputs, so memory grows with
    depth), the error of every reconstructed block input, by block index. `checkpoints`: the error found at each
    exact stream checkpoint (`checkpoint_every`) just before it replaced the reconstruction.
    """

    per_block: bool = True
    blocks: list[BlockDrift] = field(default_factory=list)
    checkpoints: list[BlockDrift] = field(default_factory=list)

    def max_rel_err(self) -> float:
        errs = [b.rel_err for b in self.blocks + self.checkpoints]
        return max(errs) if errs else 0.0

    def all_bit_exact(self) -> bool:
        entries = self.blocks + self.checkpoints
        return bool(entries) and all(b.bit_exact for b in entries)

    def summary(self) -> str:
        n = len(self.blocks) or len(self.checkpoints)
        exact = sum(b.bit_exact for b in (self.blocks or self.checkpoints))
        return f"reversal drift over {n} blocks: max rel err {self.max_rel_err():.3e}, {exact}/{n} bit-exact"


class DriftMonitor:
    """A cheap, always-on check that the recomputing backward reconstructs what the forward saw.

    On probed calls the engine keeps a reference to the stack's input streams (no copy: one stream for the additive
    coupling, whose two streams start as the same tensor) and, once the backward has reconstructed them, records
    the relative error `||x_reconstructed - x|| / ||x||`. That is the drift of the whole stack (or, with stream
    checkpoints, of the blocks since the last checkpoint) -- the error every gradient below the top block inherits.
    Exact fixed-point streams must give 0 (a non-zero value there means the recompute was not deterministic).

    The first `warmup` calls are probed, then one call in `every`; the first error above `threshold` logs a warning
    naming the measured value and the fixes. `last`, `worst` and `probes` are for training logs.
    """

    def __init__(self, threshold: float = 1e-2, every: int = 16, warmup: int = 4, name: str = "reversible stack"):
        self.threshold, self.every, self.warmup, self.name = float(threshold), int(every), int(warmup), name
        self.calls = 0
        self.probes = 0
        self.last: float | None = None
        self.worst = 0.0
        self.warned = False

    def should_probe(self) -> bool:
        self.calls += 1
        return self.calls <= self.warmup or self.calls % self.every == 0

    def record(self, rel_err: float, exact: bool) -> None:
        self.probes += 1
        self.last = rel_err
        self.worst = max(self.worst, rel_err)
        if self.warned or not (rel_err > self.threshold or (exact and rel_err > 0)):
            return
        self.warned = True
        if exact:
            advice = (
                "The streams are exact fixed point, so the recompute of f/g was not bit-identical to the forward "
                "(a non-deterministic kernel, or state changed between forward and backward)."
            )
        else:
            advice = (
                "Gradients below the top block are wrong by a similar amount. Use exact fixed-point streams "
                "(`exact_reversal=True`; the default under autocast and half precision), keep the compute in fp32, "
                "or bound the drift with `stream_checkpoint_every`."
            )
        warnings.warn(
            f"{self.name}: the backward reconstructed the stack input with relative error {rel_err:.3g} "
            f"(threshold {self.threshold:g}). {advice}",
            RuntimeWarning,
            stacklevel=2,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "probes": self.probes, "last": self.last, "worst": self.worst}


def measure_drift(ar: Any, index: int, est: tuple[Any, Any], ref: tuple[Any, Any]) -> BlockDrift:
    """Compare reconstructed streams `est` with the forward's `ref` (same arithmetic)."""
    bit_exact = all(torch.equal(e, r) for e, r in zip(est, ref))
    if bit_exact:
        return BlockDrift(index, 0.0, 0.0, True)
    with torch.no_grad():
        e = torch.cat([ar.view(t).detach().double().flatten() for t in est])
        r = torch.cat([ar.view(t).detach().double().flatten() for t in ref])
        diff = (e - r).abs()
        abs_err = diff.max().item() if diff.numel() else 0.0
        rel_err = (diff.norm() / r.norm().clamp_min(1e-300)).item()
    if math.isnan(abs_err):
        rel_err = abs_err = math.inf
    return BlockDrift(index, abs_err, rel_err, False)


__all__ = [
    "SUPPORTED_COUPLINGS",
    "Coupling",
    "SwapCoupling",
    "AdditiveCoupling",
    "LeapfrogCoupling",
    "MomentumCoupling",
    "make_coupling",
    "FloatArith",
    "ExactArith",
    "DualArith",
    "InfoBuffer",
    "BlockDrift",
    "DriftReport",
    "DriftMonitor",
    "measure_drift",
]
