"""Central differential privacy: noise scale, a Rényi-DP accountant, the (epsilon, delta) spent."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhpc.core.errors import FedhpcError

# The grid of Google's dp-accounting (DEFAULT_RDP_ORDERS) and, bar order 11, of Opacus (DEFAULT_ALPHAS): dense near 1
# where small budgets are decided, sparse large orders for heavy noise or few rounds.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

# The fractional-order series stops once a term is below this fraction of the sum, which it then overstates by at most
# that much. Past the term budget (reached only for z in the thousands) a truncated sum is not trusted: the order falls
# back to its unsampled RDP, a valid upper bound.
_LOG_TOL = math.log(1e-12)
_MAX_TERMS_FRACTIONAL = 4**9
_JSON_VERSION = 1


class PrivacyError(FedhpcError, ValueError):
    """A privacy parameter is out of its domain."""


# ---------------------------------------------------------------- validation


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise PrivacyError(f"{name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise PrivacyError(f"{name} must be finite, got {value!r}")
    return x


def _check_noise_multiplier(z: object) -> float:
    x = _number("noise_multiplier", z)
    if x < 0:
        raise PrivacyError(f"noise_multiplier must be >= 0, got {z!r}")
    return x


def _check_sample_rate(q: object) -> float:
    x = _number("sample_rate", q)
    if not 0 < x <= 1:
        raise PrivacyError(f"sample_rate must be in (0, 1], got {q!r}")
    return x


def _check_delta(delta: object) -> float:
    x = _number("delta", delta)
    if not 0 < x < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    return x


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(_number("orders", a) for a in orders)
    except TypeError:
        raise PrivacyError(f"orders must be a sequence of numbers > 1, got {orders!r}") from None
    if not out:
        raise PrivacyError("orders must not be empty")
    bad = [a for a in out if a <= 1]
    if bad:
        raise PrivacyError(f"orders must all be > 1, got {bad[0]!r}")
    return out


# ---------------------------------------------------------------- log-space helpers


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)) elementwise, accurate far into the upper tail."""
    out = np.empty_like(x)
    near = x < 3.0
    out[near] = np.log([math.erfc(v) for v in x[near]])
    # Beyond 3 the continued fraction erfc(x) = exp(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...))))
    # at 60 levels matches math.erfc to rounding, never underflows, and runs vectorised over the long series tails.
    t = x[~near]
    k = t.copy()
    for level in range(60, 0, -1):
        k = t + (level / 2) / k
    out[~near] = -t * t - 0.5 * math.log(math.pi) - np.log(k)
    return out


def _log_a_int(q: float, z: float, alpha: int) -> float:
    """log A_alpha for integer alpha: the binomial expansion of Mironov, Talwar, Zhang 2019, Sec. 3.2."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_fact = np.array([math.lgamma(k + 1) for k in range(alpha + 1)])
    log_comb = log_fact[alpha] - log_fact - log_fact[::-1]
    terms = log_comb + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * z * z)
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def _log_a_frac(q: float, z: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: the two half-line integrals of Mironov, Talwar, Zhang 2019, Sec. 3.3.

    A_alpha = sum_i binom(alpha, i) (s0_i + s1_i) with s0_i, s1_i > 0. Past i = alpha + 1 the coefficients alternate
    in sign, and at moderate q the terms shrink only like i^-(alpha + 2). Summing magnitudes overstates A_alpha, and
    stopping after 1000 terms loses the low orders (dp-accounting 0.6.0 does both), which decide epsilon at high q.
    So the signed series is summed, vectorised, over as many terms as it takes; inf if that is over the budget.
    """
    z0 = z * z * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    n = 64
    while n <= _MAX_TERMS_FRACTIONAL:
        i = np.arange(n, dtype=np.float64)
        # binom(alpha, i) = prod_{k=1..i} (alpha - k + 1) / k, in log-magnitude and sign.
        factors = (alpha - i[1:] + 1) / i[1:]
        log_binom = np.concatenate(([0.0], np.cumsum(np.log(np.abs(factors)))))
        sign = np.concatenate(([1.0], np.cumprod(np.sign(factors))))
        j = alpha - i
        log_s0 = (
            log_binom + i * log_q + j * log_1mq + (i * i - i) / (2 * z * z) + _log_erfc((i - z0) / (math.sqrt(2) * z))
        )
        log_s1 = (
            log_binom + j * log_q + i * log_1mq + (j * j - j) / (2 * z * z) + _log_erfc((z0 - j) / (math.sqrt(2) * z))
        )
        # The factor 1/2 of both erfc terms, applied once.
        log_c = np.logaddexp(log_s0, log_s1) - math.log(2)
        top = float(log_c.max())
        total = float(np.dot(sign, np.exp(log_c - top)))
        tail = log_c[-8:]
        converged = n - 1 > alpha + 1 and (np.diff(tail) < 0).all()
        if total > 0 and converged and log_c[-1] < top + math.log(total) + _LOG_TOL:
            # In the alternating, shrinking tail the true sum lies within one term of the partial sum: add that term so
            # the result is an upper bound on A_alpha (an overstatement of the privacy loss, never an understatement).
            return float(np.logaddexp(top + math.log(total), log_c[-1]))
        n *= 4
    return math.inf


# A ledger re-evaluates every recorded (z, q) at every order on each epsilon() call; the cache makes that cheap.
@functools.lru_cache(maxsize=1 << 16)
def _rdp_one(z: float, q: float, alpha: float) -> float:
    if z == 0:
        return math.inf
    full = alpha / (2 * z * z)
    # Within 1e-12 of 1, log(1 - q) has lost its digits and the series with it; the unsampled value is then both an
    # upper bound and exact to ~1e-12.
    if q > 1 - 1e-12:
        return full
    log_a = _log_a_int(q, z, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, z, alpha)
    # A_alpha >= 1 in exact arithmetic, so a negative result is rounding of ~0. Sampling never costs privacy (Rényi
    # divergence is jointly quasi-convex), so the unsampled value also bounds any order whose series failed.
    return min(max(0.0, log_a / (alpha - 1)), full)


# ---------------------------------------------------------------- public API


def rdp_gaussian(noise_multiplier: float, sample_rate: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one step of the Poisson-sampled Gaussian mechanism at each order (Mironov, Talwar, Zhang 2019).

    sample_rate == 1 is the plain Gaussian mechanism, exactly alpha / (2 z^2); noise_multiplier == 0 is inf at every
    order. Integer orders use the binomial expansion, fractional ones the signed series of Sec. 3.3, as Opacus does,
    summed until it provably changes A_alpha by < 1e-12 relative and rounded up by that much. Every value is an upper
    bound on the true RDP: a fractional series that does not converge falls back to alpha / (2 z^2).
    """
    z = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    alphas = _check_orders(orders)
    return np.array([_rdp_one(z, q, a) for a in alphas], dtype=np.float64)


def rdp_to_epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) from RDP values, by the conversion of Balle et al. 2020 (Prop. 12) that Opacus uses.

    eps(alpha) = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha), minimised over the orders
    and floored at 0. If every order is inf, (inf, nan).
    """
    alphas = np.array(_check_orders(orders), dtype=np.float64)
    d = _check_delta(delta)
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != alphas.shape:
        raise PrivacyError(f"rdp must have one value per order ({alphas.size}), got shape {r.shape}")
    if np.isnan(r).any() or (r < 0).any():
        raise PrivacyError("rdp must be >= 0 at every order (inf allowed), got a negative or nan value")
    with np.errstate(invalid="ignore"):
        eps = r - (math.log(d) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isinf(eps).all():
        return math.inf, math.nan
    best = int(np.argmin(eps))
    # A bound below 0 only says (0, delta)-DP also holds; epsilon itself cannot be negative.
    return max(0.0, float(eps[best])), float(alphas[best])


def noise_std(noise_multiplier: float, clip_norm: float, weights: Sequence[float]) -> float:
    """Std of the Gaussian added to a weighted mean of clipped updates: z * C * max_i w_i.

    With the weights fixed (not renormalised when a site is absent), adding or removing site i moves the weighted sum
    by w_i * u_i, of norm at most w_i * C: that L2 sensitivity is what the Poisson-sampled Gaussian accountant assumes.
    weights must be >= 0 and sum to 1 (tolerance 1e-9).
    """
    z = _check_noise_multiplier(noise_multiplier)
    c = _number("clip_norm", clip_norm)
    if c <= 0:
        raise PrivacyError(f"clip_norm must be > 0, got {clip_norm!r}")
    try:
        w = [_number("weights", x) for x in weights]
    except TypeError:
        raise PrivacyError(f"weights must be a sequence of numbers, got {weights!r}") from None
    if not w:
        raise PrivacyError("weights must not be empty")
    if min(w) < 0:
        raise PrivacyError(f"weights must all be >= 0, got {min(w)!r}")
    if abs(math.fsum(w) - 1.0) > 1e-9:
        raise PrivacyError(f"weights must sum to 1 (tolerance 1e-9), got sum {math.fsum(w)!r}")
    return z * c * max(w)


@dataclass
class PrivacyLedger:
    """Per-round record [(noise_multiplier, sample_rate), ...] of the noised aggregations.

    JSON-serialisable via to_json()/from_json() so a restarted coordinator continues the accounting exactly: floats
    survive JSON unchanged, and epsilon is a function of the steps alone.
    """

    steps: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        given, self.steps = self.steps, []
        for z, q in given:
            self.record(z, q)

    def record(self, noise_multiplier: float, sample_rate: float) -> None:
        self.steps.append((_check_noise_multiplier(noise_multiplier), _check_sample_rate(sample_rate)))

    def epsilon(self, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
        """(epsilon, best order) spent by all recorded steps at this delta; no steps -> (0.0, nan)."""
        d = _check_delta(delta)
        alphas = _check_orders(orders)
        if not self.steps:
            return 0.0, math.nan
        total = np.zeros(len(alphas))
        # RDP composes by addition, so identical rounds are computed once and multiplied; sorted for a fixed sum order.
        for (z, q), n in sorted(Counter(self.steps).items()):
            total += n * rdp_gaussian(z, q, alphas)
        return rdp_to_epsilon(alphas, total, d)

    def to_json(self) -> dict:
        return {"version": _JSON_VERSION, "steps": [[z, q] for z, q in self.steps]}

    @classmethod
    def from_json(cls, d: dict) -> PrivacyLedger:
        if not isinstance(d, dict) or d.get("version") != _JSON_VERSION or not isinstance(d.get("steps"), list):
            raise PrivacyError(f"ledger must be a dict with version {_JSON_VERSION} and a list of steps, got {d!r}")
        ledger = cls()
        for step in d["steps"]:
            if not isinstance(step, list | tuple) or len(step) != 2:
                raise PrivacyError(f"ledger steps must be [noise_multiplier, sample_rate] pairs, got {step!r}")
            ledger.record(step[0], step[1])
        return ledger


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int, sample_rate: float = 1.0) -> float:
    """Smallest z (bisection, relative tolerance 1e-3) such that `rounds` steps stay within (target_epsilon, delta).

    The upper end of the final bracket is returned, so the budget is met, never exceeded by the tolerance.
    """
    target = _number("target_epsilon", target_epsilon)
    if target <= 0:
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    d = _check_delta(delta)
    if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1:
        raise PrivacyError(f"rounds must be an integer >= 1, got {rounds!r}")
    q = _check_sample_rate(sample_rate)
    # Even infinite noise leaves the conversion's own cost at delta (about 0.0035 at 1e-5 on DEFAULT_ORDERS).
    floor = rdp_to_epsilon(DEFAULT_ORDERS, np.zeros(len(DEFAULT_ORDERS)), d)[0]
    if target <= floor:
        raise PrivacyError(f"target_epsilon must exceed {floor:.4g}, the least any noise reaches at delta {delta!r}")

    def eps(z: float) -> float:
        return rdp_to_epsilon(DEFAULT_ORDERS, int(rounds) * rdp_gaussian(z, q, DEFAULT_ORDERS), d)[0]

    # Grow a bracket geometrically from 1: epsilon falls monotonically in z, so lo overspends and hi fits.
    lo, hi = 0.0, 1.0
    while eps(hi) > target:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise PrivacyError(f"target_epsilon {target_epsilon!r} is out of reach at delta {delta!r} within z <= 1e6")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi
