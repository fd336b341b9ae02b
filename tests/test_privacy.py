"""The RDP accountant against closed forms, quadrature, Opacus and dp-accounting; monotonicity; ledger; bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhpc.aggregation.privacy import (
    DEFAULT_ORDERS,
    PrivacyError,
    PrivacyLedger,
    noise_multiplier_for,
    noise_std,
    rdp_gaussian,
    rdp_to_epsilon,
)
from fedhpc.core.errors import FedhpcError


def epsilon_after(z: float, q: float, rounds: int, delta: float) -> float:
    return rdp_to_epsilon(DEFAULT_ORDERS, rounds * rdp_gaussian(z, q, DEFAULT_ORDERS), delta)[0]


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("z", [0.5, 1.0, 3.7])
def test_full_participation_is_the_plain_gaussian_mechanism(z):
    assert rdp_gaussian(z, 1.0, DEFAULT_ORDERS).tolist() == [a / (2 * z * z) for a in DEFAULT_ORDERS]


def test_epsilon_of_one_gaussian_step_is_the_closed_form_minimised_over_orders():
    # eps(a) = a/(2 z^2) - (log delta + log a)/(a - 1) + log((a - 1)/a) for z = 1, one step, written out by hand.
    delta = 1e-5
    by_order = {a: a / 2 - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in DEFAULT_ORDERS}
    best = min(by_order, key=by_order.__getitem__)
    eps, order = PrivacyLedger(steps=[(1.0, 1.0)]).epsilon(delta)
    assert order == best == 5.4
    assert eps == pytest.approx(by_order[best], rel=1e-12)
    assert eps == pytest.approx(4.7285, abs=1e-4)
    # The grid costs almost nothing against the optimum over all real orders > 1.
    fine = min(
        a / 2 - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in np.arange(1.01, 60, 1e-3)
    )
    assert fine <= eps < fine * 1.001


@pytest.mark.parametrize("z, q", [(1.0, 0.01), (2.0, 0.3), (0.7, 0.9)])
def test_subsampled_integer_orders_match_the_binomial_expansion_by_hand(z, q):
    # A_a = E_{i ~ Bin(a, q)} exp((i^2 - i) / (2 z^2)) and RDP = log(A_a) / (a - 1) (Mironov, Talwar, Zhang 2019).
    e1, e3 = math.exp(1 / z**2), math.exp(3 / z**2)
    a2 = (1 - q) ** 2 + 2 * q * (1 - q) + q**2 * e1
    a3 = (1 - q) ** 3 + 3 * q * (1 - q) ** 2 + 3 * q**2 * (1 - q) * e1 + q**3 * e3
    got = rdp_gaussian(z, q, [2, 3])
    assert got[0] == pytest.approx(math.log(a2), rel=1e-12)
    assert got[1] == pytest.approx(math.log(a3) / 2, rel=1e-12)


@pytest.mark.parametrize("z, q", [(1.0, 0.01), (0.8, 0.2), (3.0, 0.5), (0.5, 0.5), (1.0, 0.9), (50.0, 0.3)])
def test_fractional_orders_join_the_integer_ones_continuously_and_rdp_grows_with_order(z, q):
    near = rdp_gaussian(z, q, [2.0, 2.0 + 1e-7, 10.0, 10.0 - 1e-7])
    assert near[1] == pytest.approx(near[0], rel=1e-5)
    assert near[3] == pytest.approx(near[2], rel=1e-5)
    # Rényi divergence is non-decreasing in its order; a broken series would show as a dip.
    rdp = rdp_gaussian(z, q, DEFAULT_ORDERS)
    assert np.isfinite(rdp).all()
    assert (np.diff(rdp) >= -1e-12 * rdp[1:]).all()


def test_no_overflow_at_large_orders_small_noise_or_tiny_sample_rates():
    for z, q in [(0.1, 0.5), (0.3, 0.999), (1.0, 1e-9), (50.0, 1e-6)]:
        rdp = rdp_gaussian(z, q, DEFAULT_ORDERS)
        assert not np.isnan(rdp).any() and (rdp >= 0).all()
        assert np.isfinite(rdp[DEFAULT_ORDERS.index(1024.0)])
    # Small q: RDP ~ a q^2 (e^{1/z^2} - 1) / 2, far below 1 but not lost to underflow.
    assert rdp_gaussian(1.0, 1e-4, [2])[0] == pytest.approx(1e-8 * (math.e - 1), rel=1e-6)


def test_sampling_never_costs_more_than_full_participation():
    for z in [0.3, 1.0, 4.0]:
        full = rdp_gaussian(z, 1.0, DEFAULT_ORDERS)
        for q in [0.5, 0.99, 1 - 1e-9, 1 - 1e-15]:
            rdp = rdp_gaussian(z, q, DEFAULT_ORDERS)
            assert (rdp <= full).all()
        # Just below 1, where log(1 - q) has no digits left, the series is not trusted: the unsampled bound is used.
        assert rdp_gaussian(z, 1 - 1e-15, DEFAULT_ORDERS) == pytest.approx(full, rel=1e-12)


def test_zero_noise_is_no_privacy():
    assert np.isinf(rdp_gaussian(0.0, 0.5, DEFAULT_ORDERS)).all()
    eps, order = PrivacyLedger(steps=[(1.0, 1.0), (0.0, 1.0)]).epsilon(1e-5)
    assert eps == math.inf and math.isnan(order)


def test_an_empty_ledger_has_spent_nothing():
    eps, order = PrivacyLedger().epsilon(1e-5)
    assert eps == 0.0 and math.isnan(order)


# ---------------------------------------------------------------- recognised implementations

# ORDERS below is [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]: our
# DEFAULT_ORDERS, and exactly dp-accounting's DEFAULT_RDP_ORDERS; both references were given it explicitly.

# Opacus 1.6.0 (PyPI `opacus==1.6.0` installed with --no-deps in a throwaway venv outside this repo, with numpy 2.4.6 and
# scipy 1.17.1; its opacus/accountants/analysis/rdp.py loaded by file path, since the package __init__ needs torch):
#     r = rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=ORDERS)
#     rdp.get_privacy_spent(orders=ORDERS, rdp=r, delta=delta)
OPACUS_1_6_0 = [
    # (z, q, steps, delta, epsilon, optimal order)
    (1.1, 0.01, 10_000, 1e-5, 5.63199236854841, 4.7),
    (0.8, 0.05, 500, 1e-6, 14.849331329456104, 2.6),
    (2.0, 1.0, 100, 1e-5, 35.08175401905626, 1.9),
    (1.0, 0.001, 100_000, 1e-5, 1.7854249444037111, 11.0),
    (4.0, 0.1, 1_000, 1e-5, 3.736241517996425, 6.3),
    (0.6, 0.2, 50, 1e-5, 29.57534388451227, 1.7),
    (1.0, 0.5, 100, 1e-5, 42.86520221182576, 1.7),
    (0.7, 0.9, 10, 1e-6, 30.88866566158399, 2.1),
]

# Google's dp-accounting 0.6.0 (PyPI `dp-accounting==0.6.0`, same throwaway venv):
#     acc = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
#     acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
#     acc.get_epsilon_and_optimal_order(delta)
# Its conversion is Opacus's (plus a shortcut to 0 when RDP < ~delta^2, never here), but for fractional orders it sums
# the magnitudes of an alternating series and drops any order that needs over 1000 terms: a valid upper bound, but loose
# by up to ~1.5% per order (see QUADRATURE) and by up to ~5% in epsilon where it drops the best orders (q >= 0.2).
# The four cases of the brief agree within 1%.
DP_ACCOUNTING_0_6_0 = [
    (1.1, 0.01, 10_000, 1e-5, 5.632010670081592, 4.7),
    (0.8, 0.05, 500, 1e-6, 14.919412001048531, 2.6),
    (2.0, 1.0, 100, 1e-5, 35.08175401905626, 1.9),
    (1.0, 0.001, 100_000, 1e-5, 1.7854249444038008, 11.0),
    (4.0, 0.1, 1_000, 1e-5, 3.7362417078948433, 6.3),
    (0.6, 0.2, 50, 1e-5, 30.27313190353715, 1.8),
    (1.0, 0.5, 100, 1e-5, 44.799704561309746, 1.9),
    (0.7, 0.9, 10, 1e-6, 30.88869299073144, 2.1),
]

# Ground truth for single orders, independent of any series: log(A_alpha) / (alpha - 1) with
# A_alpha = E_{x ~ N(0, z^2)} [((1 - q) + q exp((2x - 1) / (2 z^2)))^alpha] (Mironov, Talwar, Zhang 2019, Sec. 3),
# integrated by mpmath 1.4.1 `mp.quad` at 40 digits over (-inf, -20z, -5z, 0, 0.5, 1, 5z + a, 20z + 2a, 60z + 4a, inf).
QUADRATURE = [
    # (z, q, order, rdp)
    (0.6, 0.2, 1.7, 0.29547302119299432),
    (0.6, 0.2, 1.1, 0.11787604946142086),
    (0.8, 0.05, 2.6, 0.014594679399247384),
    (1.1, 0.01, 4.7, 0.00031778807182194698),
    (1.0, 0.5, 1.3, 0.19378570235855545),
    (0.5, 0.5, 1.1, 0.79263177957152035),
    (3.0, 0.5, 1.5, 0.021413356320631909),
    (1.0, 0.2, 2.5, 0.096327987879017613),
    (1.0, 0.9, 7.5, 3.6286230869555337),
    (2.0, 0.1, 3.0, 0.0043736583485770585),
    (0.6, 0.2, 2.0, 0.47208248373120295),
]


def ledger_of(z: float, q: float, steps: int) -> PrivacyLedger:
    ledger = PrivacyLedger()
    ledger.record(z, q)
    ledger.steps *= steps
    return ledger


@pytest.mark.parametrize("z, q, steps, delta, eps_ref, order_ref", OPACUS_1_6_0)
def test_epsilon_matches_opacus(z, q, steps, delta, eps_ref, order_ref):
    eps, order = ledger_of(z, q, steps).epsilon(delta)
    # The brief asks for 1%; the two agree to rounding, so hold them to far less.
    assert eps == pytest.approx(eps_ref, rel=1e-9)
    assert order == order_ref


@pytest.mark.parametrize("z, q, steps, delta, eps_ref, order_ref", DP_ACCOUNTING_0_6_0)
def test_epsilon_is_within_dp_accountings_looser_bound(z, q, steps, delta, eps_ref, order_ref):
    eps, _ = ledger_of(z, q, steps).epsilon(delta)
    assert eps <= eps_ref * (1 + 1e-9)  # rounding at the integer orders
    assert eps == pytest.approx(eps_ref, rel=0.01 if q < 0.2 or q == 1.0 else 0.05)


@pytest.mark.parametrize("z, q, order, rdp_ref", QUADRATURE)
def test_rdp_matches_quadrature_of_the_definition_and_never_understates_it(z, q, order, rdp_ref):
    got = rdp_gaussian(z, q, [order])[0]
    assert got == pytest.approx(rdp_ref, rel=1e-10)
    assert got >= rdp_ref * (1 - 1e-14)


# ---------------------------------------------------------------- monotonicity and inversion

zs = st.floats(0.5, 5.0)
qs = st.floats(1e-3, 1.0)
rounds = st.integers(1, 5_000)


@settings(max_examples=30, deadline=None, database=None)
@given(z=zs, q=qs, t=rounds, more=st.integers(1, 5_000))
def test_epsilon_grows_with_rounds(z, q, t, more):
    a, b = epsilon_after(z, q, t, 1e-5), epsilon_after(z, q, t + more, 1e-5)
    assert b >= a
    assert b > a or a == 0.0


@settings(max_examples=30, deadline=None, database=None)
@given(z=zs, q=qs, t=rounds, factor=st.floats(1.05, 3.0))
def test_epsilon_grows_with_sample_rate_and_falls_with_noise(z, q, t, factor):
    base = epsilon_after(z, q, t, 1e-5)
    assert epsilon_after(z, min(1.0, q * factor), t, 1e-5) >= base * (1 - 1e-12)
    assert epsilon_after(z * factor, q, t, 1e-5) <= base * (1 + 1e-12)


@settings(max_examples=20, deadline=None, database=None)
@given(target=st.floats(0.5, 10.0), t=st.integers(1, 2_000), q=st.floats(0.01, 1.0))
def test_noise_multiplier_for_inverts_epsilon(target, t, q):
    z = noise_multiplier_for(target, 1e-5, t, q)
    assert epsilon_after(z, q, t, 1e-5) <= target
    # ... and it is the smallest such z to within the tolerance: a little less noise overspends.
    assert epsilon_after(z * (1 - 2e-3), q, t, 1e-5) > target


def test_noise_multiplier_for_a_known_case():
    # One full-participation Gaussian step at z = 1 spends 4.7285 (see the closed-form test above).
    assert noise_multiplier_for(4.7285, 1e-5, 1) == pytest.approx(1.0, rel=1e-3)


# ---------------------------------------------------------------- ledger


def test_ledger_json_round_trip_continues_identically():
    rounds = [(1.1, 0.2), (0.9, 0.2), (1.1, 0.2), (2.0, 1.0), (1.3, 0.05)]
    direct = PrivacyLedger()
    for z, q in rounds:
        direct.record(z, q)

    first = PrivacyLedger()
    for z, q in rounds[:3]:
        first.record(z, q)
    restored = PrivacyLedger.from_json(json.loads(json.dumps(first.to_json())))
    for z, q in rounds[3:]:
        restored.record(z, q)

    assert restored == direct
    assert restored.epsilon(1e-5) == direct.epsilon(1e-5)
    # Composition is the sum of the per-round RDP.
    total = sum(rdp_gaussian(z, q, DEFAULT_ORDERS) for z, q in rounds)
    assert direct.epsilon(1e-5) == pytest.approx(rdp_to_epsilon(DEFAULT_ORDERS, total, 1e-5), rel=1e-12)


@pytest.mark.parametrize(
    "bad", [None, [], {"steps": [[1.0, 0.5]]}, {"version": 1, "steps": [[1.0]]}, {"version": 1, "steps": [[1.0, 0]]}]
)
def test_ledger_rejects_malformed_json(bad):
    with pytest.raises(PrivacyError):
        PrivacyLedger.from_json(bad)


# ---------------------------------------------------------------- noise scale


def test_noise_std_by_hand():
    # z * C * max w = 1.2 * 0.5 * 0.5
    assert noise_std(1.2, 0.5, [0.2, 0.5, 0.3]) == pytest.approx(0.3, rel=1e-15)
    assert noise_std(1.0, 2.0, [0.25] * 4) == 0.5
    assert noise_std(0.0, 2.0, [1.0]) == 0.0
    assert noise_std(1.0, 1.0, [1 / 3] * 3) == pytest.approx(1 / 3)  # sum within 1e-9 of 1 is accepted


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: rdp_gaussian(-0.1, 0.5, [2]), "noise_multiplier"),
        (lambda: rdp_gaussian(float("nan"), 0.5, [2]), "noise_multiplier"),
        (lambda: rdp_gaussian(1.0, 0.0, [2]), "sample_rate"),
        (lambda: rdp_gaussian(1.0, 1.5, [2]), "sample_rate"),
        (lambda: rdp_gaussian(1.0, 0.5, [1.0, 2]), "orders"),
        (lambda: rdp_gaussian(1.0, 0.5, []), "orders"),
        (lambda: rdp_to_epsilon([2, 3], np.array([0.1, 0.2]), 0.0), "delta"),
        (lambda: rdp_to_epsilon([2, 3], np.array([0.1, 0.2]), 1.0), "delta"),
        (lambda: rdp_to_epsilon([2, 3], np.array([0.1]), 1e-5), "rdp"),
        (lambda: rdp_to_epsilon([2, 3], np.array([0.1, -1.0]), 1e-5), "rdp"),
        (lambda: rdp_to_epsilon([0.5, 3], np.array([0.1, 0.2]), 1e-5), "orders"),
        (lambda: noise_std(-1.0, 1.0, [1.0]), "noise_multiplier"),
        (lambda: noise_std(1.0, 0.0, [1.0]), "clip_norm"),
        (lambda: noise_std(1.0, 1.0, [0.5, 0.6]), "weights"),
        (lambda: noise_std(1.0, 1.0, [1.5, -0.5]), "weights"),
        (lambda: noise_std(1.0, 1.0, []), "weights"),
        (lambda: PrivacyLedger().record(1.0, 0.0), "sample_rate"),
        (lambda: PrivacyLedger().record(-1.0, 0.5), "noise_multiplier"),
        (lambda: PrivacyLedger().epsilon(2.0), "delta"),
        (lambda: noise_multiplier_for(0.0, 1e-5, 10), "target_epsilon"),
        (lambda: noise_multiplier_for(1.0, 1e-5, 0), "rounds"),
        (lambda: noise_multiplier_for(1.0, 1e-5, 10, 0.0), "sample_rate"),
        (lambda: noise_multiplier_for(1.0, 0.0, 10), "delta"),
        (lambda: noise_multiplier_for(0.003, 1e-5, 10), "target_epsilon"),  # below what infinite noise reaches
        (lambda: PrivacyLedger(steps=[(1.0, 2.0)]), "sample_rate"),
    ],
)
def test_bad_input_raises_privacy_error_naming_the_parameter(call, name):
    with pytest.raises(PrivacyError, match=name) as info:
        call()
    assert isinstance(info.value, FedhpcError) and isinstance(info.value, ValueError)
