"""Two-step couplings: reversible residual stacks that *are* the original network at inference.

A standard pre-norm Transformer updates one hidden state with every residual sub-layer (attention or MLP):
`x_{k+1} = x_k + h_k(x_k)`. To make it reversible without changing its weights, training replaces that update by a
two-step one that also reads `x_{k-1}`:

    x_{k+1} = x_k + h_k(x_k) + gamma_k (x_{k-1} - x_k + c h_k(x_k))

with `gamma_k = +-gamma` drawn per sample and per sub-layer (mean 0), `gamma_0 = 0` for the first sub-layer (there is
no `x_{-1}`), and `gamma = 0` at inference: the original model. The update is invertible given `x_k`:

    x_{k-1} = x_k - c h_k(x_k) + (x_{k+1} - x_k - h_k(x_k)) / gamma_k

* `c = 1` is BDIA (Zhang, Lewis & Kleijn, "On Exact Bit-level Reversible Transformers Without Changing
  Architectures", ICML 2025), written there as `x_{k+1} = g x_{k-1} + (1 - g) x_k + (1 + g) h_k(x_k)`.
* `c = 0` is a heavy-ball step with a random-sign coefficient: `x_{k+1} = x_k + h_k + b_k (x_k - x_{k-1})`,
  `b_k = -gamma_k`. The training-time perturbation is `gamma_k` times the *previous* update `u_k = x_k - x_{k-1}`
  instead of `gamma_k (h_k - u_k)`. Consecutive residual branches of a trained Transformer are nearly uncorrelated
  (measured on the pretrained Llama of docs/pretrained.md: `<u_k, h_k> / |h_k|^2` between -0.02 and 0.09), so
  `|h_k - u_k|^2 ~ 2 |u_k|^2`: BDIA's perturbation carries about twice the power, for the same side bits.

Information: the map `(x_{k-1}, x_k) -> (x_k, x_{k+1})` must keep `x_{k-1}`; dividing by `gamma` loses
`log2(1/gamma)` bits per element, and for a zero-mean coefficient at 1 bit the perturbation power is at least
`E[gamma^2] = 1/4` of what it multiplies (Jensen: `E log2(1/|gamma|) <= 1` implies `E gamma^2 >= 1/4`), so
`gamma = +-1/2` is the least noisy 1-bit choice; only what it multiplies (the prediction error of `x_{k-1}` from
`x_k`) can be made smaller, which is what `c = 0` does.

Exactness: the streams are int64 fixed point (`ExactArith`). With `gamma = 2^-m` and `s = +-1` the sign, the update
is `x_{k+1} = b + q + floor(y / 2^m)` for the integer `y = s (a - b + c q)` (`(a, b) = (x_{k-1}, x_k)`, `q` the
rounded `h_k`): only the `m` low bits of `y` are dropped. They are kept, packed eight to a byte, in a `PackedBits`
stack, exactly `m` bits per element per sub-layer (1 bit for `gamma = 1/2`). The inverse rebuilds
`y = ((x_{k+1} - b - q) << m) | bits` and `a = s y + b - c q`, an integer identity: reversal is bit-exact at any depth,
in any compute dtype (given the bit-identical recompute of `h_k` the engine provides).

A coupling object holds the state of one stack call (its signs, the step counter and the side bits), so `start(...)`
makes a fresh one for every forward; the engine keeps it on the autograd context until the backward consumed it.
"""

from __future__ import annotations

import math

import torch

from .couplings import Coupling, DualArith

_STREAM_LIMIT = 1 << 60


# Eight 0/1 bytes read as one little-endian int64 times this constant put bit i of the result's top byte at byte i's
# value (the partial products never collide or carry, see _pack); the reverse spreads a byte over eight bytes.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # byte i keeps bit i (as a signed int64 literal)


def _pack(plane: torch.Tensor) -> torch.Tensor:
    """0/1 uint8 tensor (length a multiple of 8) -> uint8 tensor of 1/8 the length, element 8k+i in bit i of byte k.

    The term for byte i lands at bit 56 + 8i - 7i = 56 + i; the other terms at 56 + 8i - 7j, all distinct and outside
    56..63, so the top byte holds exactly the eight bits."""
    return ((plane.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    spread = (packed.to(torch.int64) * _SPREAD) & _SELECT
    return spread.view(torch.uint8).ne(0)


class PackedBits:
    """A stack of small non-negative integers per tensor element (`bits` of them, 1..8), packed to exactly `bits` bits
    per element (plus padding to whole bytes).

    Four bits at a time go into nibbles, two elements per byte; the remaining bits into bit planes, eight elements per
    byte (`_pack`). So 5 bits (the default `gamma = 1/32`) are one nibble plane and one bit plane: three int64 passes
    over the tensor instead of five, and 5/8 of a byte per element, unlike `InfoBuffer`'s 52-bit int64 limbs."""

    def __init__(self) -> None:
        self._entries: list[tuple[list[torch.Tensor], torch.Size, int]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for planes, _, _ in self._entries for p in planes)

    def push(self, r: torch.Tensor, bits: int) -> None:
        """Store `r` (integers in `[0, 2^bits)`; any integer dtype)."""
        if not 1 <= bits <= 8:
            raise ValueError(f"PackedBits stores 1..8 bits per element, got {bits}.")
        # All the bit work happens on one byte per element (8x less memory traffic than int64).
        flat = r.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        planes, shift = [], 0
        while bits - shift >= 4:
            nibble = ((flat >> shift) & 0xF if shift or bits > 4 else flat).view(torch.int16)
            # Byte pairs read as one little-endian int16 `lo + 256 hi`: its low byte after `| >> 4` is `lo | hi << 4`.
            planes.append((nibble | (nibble >> 4)).to(torch.uint8))
            shift += 4
        while shift < bits:
            plane = (flat >> shift) & 1 if shift or bits > 1 else flat
            planes.append(_pack(plane))
            shift += 1
        self._entries.append((planes, r.shape, bits))

    def pop(self) -> torch.Tensor:
        """The last pushed tensor, as uint8."""
        planes, shape, bits = self._entries.pop()
        numel = math.prod(shape)
        out: torch.Tensor | None = None
        shift = 0
        for packed in planes:
            if bits - shift >= 4:
                part = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)
                width = 4
            else:
                part = _unpack(packed).view(torch.uint8)
                width = 1
            out = part if out is None else out.bitwise_or_(part << shift)
            shift += width
        return out[:numel].view(shape)


# gamma = +-1/32 (5 side bits): the least that keeps a real LLM's training-mode loss within 0.5% of its own (SmolLM2,
# docs/pretrained.md: +0.05% English, +0.14% Spanish and code; gamma 1/16 gives +0.47% to +0.92%).
DEFAULT_GAMMA = 2.0**-5


def gamma_shift(gamma: object) -> int:
    """`m` for `gamma = 2^-m`, m in 1..8; a clear error for anything else (checked before any arithmetic)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"`gamma` must be a number 2^-m with m in 1..8 (0.5, 0.25, ..., 1/256), got {gamma!r}.")
    if not (math.isfinite(gamma) and 0 < gamma < 1):
        raise ValueError(f"`gamma` must be a power of two 2^-m with m in 1..8 (0.5, 0.25, ..., 1/256), got {gamma!r}.")
    m = -math.log2(gamma)
    if m != round(m) or not 1 <= m <= 8:
        raise ValueError(f"`gamma` must be a power of two 2^-m with m in 1..8 (0.5, 0.25, ..., 1/256), got {gamma!r}.")
    return round(m)


class TwoStepCoupling(Coupling):
    """`x_{k+1} = x_k + h_k + gamma_k (x_{k-1} - x_k + c h_k)`, `gamma_k = +-gamma` per sample per sub-step (see the
    module docstring). Subclasses fix `c` (`branch_coef`): `BDIACoupling` (1) and `HeavyBallCoupling` (0).

    Args:
        gamma: magnitude of the coefficient, `2^-m` for `m` in 1..8; costs `m` side bits per element per sub-step
            (default 1/32: 5 bits, see `DEFAULT_GAMMA`).
        signs: (num_steps, batch) integer tensor of `+1/-1` (and `0` where a sub-step is the plain residual update),
            for one stack call. Use `start()` to draw them.
    """

    branch_coef: int = 0
    coef = 1.0  # the engine's scalar output coefficient; the per-sample coefficients are applied in the combine

    def __init__(self, gamma: float = DEFAULT_GAMMA, signs: torch.Tensor | None = None) -> None:
        self.shift = gamma_shift(gamma)
        self.gamma = float(gamma)
        self.signs = signs
        self.step = 0
        self.bits = PackedBits()

    def start(self, num_steps: int, batch_size: int, device: torch.device | str) -> TwoStepCoupling:
        """A fresh coupling for one stack call: random signs for every sub-step but the first, whose `gamma` is 0.

        The signs come from the global generator (like dropout masks), so seeded runs, and a reversible model and its
        twin called in the same order, draw the same ones."""
        signs = torch.randint(0, 2, (num_steps, batch_size), device=device) * 2 - 1
        signs[0] = 0
        return type(self)(self.gamma, signs)

    # ---- per-sub-step coefficients -----------------------------------------------------------------------------

    def _sign(self, like: torch.Tensor) -> torch.Tensor:
        """This sub-step's signs, shaped to broadcast over a (batch, ...) stream."""
        if self.signs is None:
            raise RuntimeError(f"{type(self).__name__}: call `start()` to get a coupling for one stack call.")
        return self.signs[self.step].view(-1, *([1] * (like.dim() - 1))).to(like.device)

    def _gamma(self, like: torch.Tensor) -> torch.Tensor:
        return self._sign(like).to(like.dtype) * self.gamma

    def _active(self, s: torch.Tensor) -> bool:
        return self.step > 0 and bool(s.any())

    # ---- the Coupling interface ----------------------------------------------------------------------------------

    def init_streams(self, hidden):
        return hidden, hidden  # x_{-1} is a placeholder: gamma_0 = 0 never reads it

    def merge_streams(self, x1, x2):
        return x2

    def forward_input(self, a, b):
        return b

    def _check_range(self, t: torch.Tensor) -> None:
        # With |a|, |b| < 2^60 and |q| < 2^62 (ExactArith.round's own check) no intermediate of a step overflows
        # int64; checking every new stream value keeps that invariant.
        if not t.numel():
            return
        lo, hi = torch.aminmax(t)
        peak = max(-int(lo), int(hi))
        if peak >= _STREAM_LIMIT:
            raise OverflowError(
                f"{type(self).__name__} fixed-point stream overflow: a hidden value reached {peak:.3g} grid units "
                "(limit 2^60). Lower `fixed_point_bits`."
            )

    def _combine_int(self, a: torch.Tensor, b: torch.Tensor, q: torch.Tensor, store: bool) -> torch.Tensor:
        s = self._sign(b)
        if self.step == 0:
            self._check_range(b)
        new = b + q
        if self._active(s):
            y = a - b
            if self.branch_coef:
                y += q
            y *= s
            if store:
                self.bits.push(y & ((1 << self.shift) - 1), self.shift)
            y >>= self.shift  # arithmetic shift: floor division by 2^m
            new += y
        self._check_range(new)
        return new

    def forward_combine(self, ar, a, b, q):
        if not getattr(ar, "exact", False):
            raise ValueError(f"{type(self).__name__} needs the exact fixed-point arithmetic (`fixed_point_bits`).")
        if isinstance(ar, DualArith):
            # The twin: the float part carries the gradient of the float rule, the int part the exact value; nothing
            # is stored because plain autograd never inverts.
            d = a[0] - b[0] + q[0] if self.branch_coef else a[0] - b[0]
            new = ar.snap(b[0] + q[0] + self._gamma(b[0]) * d, self._combine_int(a[1], b[1], q[1], store=False))
        else:
            new = self._combine_int(a, b, q, store=True)
        self.step += 1
        return b, new

    def inverse_input(self, ar, a2, b2):
        # The first call of a sub-step in the backward (the engine needs the input to recompute h): step back here.
        self.step -= 1
        return a2

    def inverse_combine(self, ar, a2, b2, xin, q):
        s = self._sign(b2)
        if not self._active(s):
            return a2, a2  # gamma = 0 dropped x_{-1}; it was the placeholder copy of x_0
        y = b2 - a2
        y -= q
        y <<= self.shift
        y |= self.bits.pop()  # uint8, promoted
        y *= s
        y += a2
        if self.branch_coef:
            y -= q
        return y, a2

    def grad_out(self, da2, db2):
        return db2 * (1 + self._gamma(db2)) if self.branch_coef else db2

    def grad_inputs(self, da2, db2, g_in):
        g = self._gamma(db2)
        return db2 * g, torch.addcmul(da2 + g_in, db2, 1 - g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma})"


class HeavyBallCoupling(TwoStepCoupling):
    """`x_{k+1} = x_k + h_k(x_k) + gamma_k (x_{k-1} - x_k)`: a heavy-ball step with a random-sign coefficient. The
    default of `make_reversible`: half BDIA's training-time perturbation power at the same side bits."""

    name = "heavy_ball"
    branch_coef = 0


class BDIACoupling(TwoStepCoupling):
    """BDIA: `x_{k+1} = gamma_k x_{k-1} + (1 - gamma_k) x_k + (1 + gamma_k) h_k(x_k)` (Zhang et al., ICML 2025)."""

    name = "bdia"
    branch_coef = 1


__all__ = ["TwoStepCoupling", "HeavyBallCoupling", "BDIACoupling", "PackedBits", "DEFAULT_GAMMA", "gamma_shift"]
