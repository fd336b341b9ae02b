"""The pure aggregation strategies against hand-computed numbers, properties and Byzantine attacks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from fedhpc.aggregation.strategies import (
    DEFAULT_MOMENTUM,
    DEFAULT_SERVER_LR,
    SERVER_STATE,
    cap_domain_share,
    clip_factor,
    coordinate_median,
    heterogeneity_coefficients,
    krum_select,
    layerwise_scales,
    normalise,
    pairwise_sq_distances,
    server_step,
    staleness_factor,
    tolerance_problem,
    trimmed_mean,
    weighted_sum,
)

T = torch.tensor
PROPERTY = settings(max_examples=100, deadline=None)


def approx(t: torch.Tensor, want: list[float], rel: float = 1e-6, abs_: float = 1e-9):
    """fp32 result against float64 numbers worked out by hand (fp32 carries ~7 digits)."""
    assert t.dtype == torch.float32
    assert t.tolist() == pytest.approx(want, rel=rel, abs=abs_), (t.tolist(), want)


# ---------------------------------------------------------------- server optimisers, two steps with state carried

X0 = T([1.0, 2.0, 3.0])
D1 = T([0.1, -0.2, 0.3])
D2 = T([-0.05, 0.1, 0.001])


def two_steps(name: str, **kw) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    x1, s1 = server_step(name, X0, D1, {}, **kw)
    x2, s2 = server_step(name, x1, D2, s1, **kw)
    return x1, s1, x2, s2


def test_state_keys_and_defaults_of_the_server_optimisers():
    assert SERVER_STATE["fedavg"] == () and SERVER_STATE["fedavgm"] == ("momentum",)
    assert SERVER_STATE["diloco"] == ("momentum",) and SERVER_STATE["fedadam"] == ("m", "v")
    assert DEFAULT_SERVER_LR == {"diloco": 0.7, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}
    assert DEFAULT_MOMENTUM == {"fedavgm": 0.9, "diloco": 0.9}
    with pytest.raises(ValueError, match="unknown server optimiser 'sgd'"):
        server_step("sgd", X0, D1, {}, lr=1.0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold"])
def test_fedavg_is_x_plus_lr_delta_and_keeps_no_state(name):
    x1, s1, x2, s2 = two_steps(name, lr=0.5)
    approx(x1, [1.05, 1.9, 3.15])  # x0 + 0.5 Δ1
    approx(x2, [1.025, 1.95, 3.1505])  # x1 + 0.5 Δ2
    assert s1 == {} and s2 == {}


def test_fedavgm_by_hand():
    x1, s1, x2, s2 = two_steps("fedavgm", lr=0.5, momentum=0.9)
    approx(s1["momentum"], [0.1, -0.2, 0.3])  # m1 = Δ1
    approx(x1, [1.05, 1.9, 3.15])
    approx(s2["momentum"], [0.04, -0.08, 0.271])  # m2 = 0.9 m1 + Δ2
    approx(x2, [1.07, 1.86, 3.2855])  # x1 + 0.5 m2


def test_diloco_is_nesterov_sgd_on_the_negative_delta_by_hand():
    x1, s1, x2, s2 = two_steps("diloco", lr=0.7, momentum=0.9)
    # g1 = −Δ1 = [−0.1, 0.2, −0.3]; b1 = g1; x1 = x0 − 0.7 (g1 + 0.9 b1) = x0 − 1.33 g1
    approx(s1["momentum"], [-0.1, 0.2, -0.3])
    approx(x1, [1.133, 1.734, 3.399])
    # g2 = [0.05, −0.1, −0.001]; b2 = 0.9 b1 + g2 = [−0.04, 0.08, −0.271]
    # x2 = x1 − 0.7 (g2 + 0.9 b2) = x1 − 0.7 [0.014, −0.028, −0.2449]
    approx(s2["momentum"], [-0.04, 0.08, -0.271])
    approx(x2, [1.1232, 1.7536, 3.57043])


def test_diloco_equals_torch_sgd_with_nesterov_momentum_on_the_pseudo_gradient():
    p = torch.nn.Parameter(X0.clone())
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    x, state = X0.clone(), {}
    for d in (D1, D2, T([0.3, 0.0, -0.2])):
        p.grad = -d.clone()
        opt.step()
        x, state = server_step("diloco", x, d, state, lr=0.7, momentum=0.9)
        # Bit for bit: server_step uses torch's own sequence of operations.
        assert torch.equal(state["momentum"], opt.state[p]["momentum_buffer"])
        assert torch.equal(x, p.detach())


ADAPTIVE = dict(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
# m is the same first moment for all three (Reddi et al. 2021, Algorithm 2): m = 0.9 m + 0.1 Δ
M1 = [0.01, -0.02, 0.03]
M2 = [0.009 - 0.005, -0.018 + 0.01, 0.027 + 0.0001]  # [0.004, −0.008, 0.0271]


def adaptive_x(x: list[float], m: list[float], v: list[float]) -> list[float]:
    return [xi + 0.01 * mi / (math.sqrt(vi) + 1e-3) for xi, mi, vi in zip(x, m, v, strict=True)]


def test_fedadam_by_hand():
    x1, s1, x2, s2 = two_steps("fedadam", **ADAPTIVE)
    v1 = [1e-4, 4e-4, 9e-4]  # v = 0.99·0 + 0.01 Δ1²
    approx(s1["m"], M1)
    approx(s1["v"], v1, rel=1e-5)
    # x1 = x0 + 0.01 m1 / (√v1 + τ) = [1 + 0.0001/0.011, 2 − 0.0002/0.021, 3 + 0.0003/0.031]
    approx(x1, [1 + 0.0001 / 0.011, 2 - 0.0002 / 0.021, 3 + 0.0003 / 0.031])
    assert x1[0].item() == pytest.approx(1.0090909, rel=1e-7)
    v2 = [0.99e-4 + 0.25e-4, 3.96e-4 + 1e-4, 8.91e-4 + 1e-8]  # 0.99 v1 + 0.01 Δ2²
    approx(s2["m"], M2, rel=1e-5)
    approx(s2["v"], v2, rel=1e-5)
    approx(x2, adaptive_x(adaptive_x([1.0, 2.0, 3.0], M1, v1), M2, v2))


def test_fedyogi_by_hand():
    x1, s1, x2, s2 = two_steps("fedyogi", **ADAPTIVE)
    # v0 = τ² = 1e-6 < Δ1², so sign(v0 − Δ1²) = −1 and v grows: v1 = v0 + 0.01 Δ1²
    v1 = [1.01e-4, 4.01e-4, 9.01e-4]
    approx(s1["m"], M1)
    approx(s1["v"], v1, rel=1e-5)
    approx(x1, adaptive_x([1.0, 2.0, 3.0], M1, v1))
    # step 2: Δ2² = [0.0025, 0.01, 1e-6]: v1 < Δ2² on the first two (v grows), v1 > Δ2² on the third (v shrinks)
    v2 = [1.01e-4 + 2.5e-5, 4.01e-4 + 1e-4, 9.01e-4 - 1e-8]
    approx(s2["v"], v2, rel=1e-5)
    approx(x2, adaptive_x(adaptive_x([1.0, 2.0, 3.0], M1, v1), M2, v2))


def test_fedadagrad_by_hand():
    x1, s1, x2, s2 = two_steps("fedadagrad", **ADAPTIVE)
    v1 = [0.010001, 0.040001, 0.090001]  # τ² + Δ1²
    v2 = [0.012501, 0.050001, 0.090002]  # v1 + Δ2²
    approx(s1["v"], v1, rel=1e-6)
    approx(s2["v"], v2, rel=1e-6)
    approx(s2["m"], M2, rel=1e-5)
    approx(x1, adaptive_x([1.0, 2.0, 3.0], M1, v1))
    approx(x2, adaptive_x(adaptive_x([1.0, 2.0, 3.0], M1, v1), M2, v2))


@pytest.mark.parametrize("name", ["fedavgm", "diloco", "fedadam", "fedyogi", "fedadagrad"])
def test_server_step_leaves_its_inputs_and_the_previous_state_untouched(name):
    x, d = X0.clone(), D1.clone()
    _, s1 = server_step(name, x, d, {}, lr=0.1)
    kept = {k: v.clone() for k, v in s1.items()}
    _, s2 = server_step(name, x, d, s1, lr=0.1)
    assert torch.equal(x, X0) and torch.equal(d, D1)
    for k in kept:
        assert torch.equal(s1[k], kept[k]), f"{name} changed the caller's {k} state in place"
        assert s2[k].data_ptr() != s1[k].data_ptr()


# ---------------------------------------------------------------- combine rules by hand


def test_coordinate_median_of_odd_and_even_counts():
    odd = T([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0]])
    assert torch.equal(coordinate_median(odd), T([2.0, 0.0]))
    even = T([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0], [10.0, 1.0]])
    assert torch.equal(coordinate_median(even), T([2.5, 0.5]))  # means of the two middle values
    assert torch.equal(coordinate_median(T([[7.0, -3.0]])), T([7.0, -3.0]))


def test_trimmed_mean_by_hand_and_refuses_to_trim_everything():
    stack = T([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    assert torch.equal(trimmed_mean(stack, 0), T([22.0, -8.8]))
    assert torch.equal(trimmed_mean(stack, 1), T([3.0, 1.0]))  # mean of (2, 3, 4) and of (0, 1, 2)
    assert torch.equal(trimmed_mean(stack, 2), T([3.0, 1.0]))  # only the middle value is left
    with pytest.raises(ValueError, match="trimmed mean of 4 updates cannot drop 2 from each end"):
        trimmed_mean(stack[:4], 2)
    with pytest.raises(ValueError):
        trimmed_mean(stack, 3)


def test_weighted_sum_accepts_a_lazy_iterable():
    assert torch.equal(weighted_sum((t for t in [T([1.0, 2.0]), T([4.0, 0.0])]), [0.5, 0.25]), T([1.5, 1.0]))


def test_pairwise_sq_distances_from_a_gram_matrix():
    x = T([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    d = pairwise_sq_distances(x @ x.T)
    assert d.dtype == torch.float64
    assert d.tolist() == [[0.0, 25.0, 1.0], [25.0, 0.0, 20.0], [1.0, 20.0, 0.0]]
    # rounding can make a distance slightly negative; it is clamped at 0
    assert pairwise_sq_distances(T([[1.0, 1.0 + 1e-7], [1.0 + 1e-7, 1.0]], dtype=torch.float64)).min() >= 0


# Squared distances among 5 updates: 0, 1, 2 close together, 3 a bit off, 4 far away.
D = T(
    [
        [0.0, 1.0, 2.0, 5.0, 100.0],
        [1.0, 0.0, 1.0, 4.0, 100.0],
        [2.0, 1.0, 0.0, 3.0, 100.0],
        [5.0, 4.0, 3.0, 0.0, 90.0],
        [100.0, 100.0, 100.0, 90.0, 0.0],
    ],
    dtype=torch.float64,
)


def test_krum_and_multikrum_on_a_hand_made_distance_matrix():
    # f = 1: a score sums the n − f − 2 = 2 smallest distances to the others:
    # 0: 1 + 2 = 3, 1: 1 + 1 = 2, 2: 1 + 2 = 3, 3: 3 + 4 = 7, 4: 90 + 100 = 190
    assert krum_select(D, 1) == [1]
    assert krum_select(D, 1, select=2) == [0, 1]  # 0 and 2 tie at 3: the lower index wins
    assert krum_select(D, 1, select=3) == [0, 1, 2]
    assert krum_select(D, 1, select=4) == [0, 1, 2, 3]  # n − f: only the farthest is left out
    # f = 0: 3 nearest; 0: 1+2+5 = 8, 1: 1+1+4 = 6, 2: 1+2+3 = 6, 3: 3+4+5 = 12, 4: 290
    assert krum_select(D, 0) == [1]
    assert krum_select(D, 0, select=2) == [1, 2]


def test_krum_refuses_impossible_n_and_f():
    with pytest.raises(ValueError, match=r"Krum needs n > 2f \+ 2 updates; got n = 5, f = 2"):
        krum_select(D, 2)  # n − f − 2 = 1 neighbour would still be computable, but 2f + 2 = 6 ≥ 5
    with pytest.raises(ValueError, match="got n = 4, f = 1"):
        krum_select(D[:4, :4], 1)
    with pytest.raises(ValueError, match="Multi-Krum can select 1 … n − f = 4 updates, not 5"):
        krum_select(D, 1, select=5)
    with pytest.raises(ValueError, match="not 0"):
        krum_select(D, 1, select=0)


def test_tolerance_problem_messages():
    for rule in ("median", "trimmed_mean"):
        assert tolerance_problem(rule, 4, 2) == (
            f"{rule} tolerates f faulty sites only with n ≥ 2f + 1 = 5 sites; there are 4"
        )
        assert tolerance_problem(rule, 5, 2) is None
    for rule in ("krum", "multikrum"):
        assert tolerance_problem(rule, 6, 2) == f"{rule} needs n > 2f + 2 = 6 sites to tolerate f = 2; there are 6"
        assert tolerance_problem(rule, 7, 2) is None
        assert tolerance_problem(rule, 3, 0) is None
    assert tolerance_problem("multikrum", 7, 2, select=6) == "multikrum can average at most n − f = 5 updates, not 6"
    assert tolerance_problem("multikrum", 7, 2, select=5) is None
    assert tolerance_problem("mean", 3, 1).startswith("the weighted mean has no breakdown point")
    assert tolerance_problem("mean", 3, 0) is None


# ---------------------------------------------------------------- weights and their modifiers


def test_normalise_by_hand_and_refusals():
    assert normalise({"b": 1.0, "a": 3.0}) == {"a": 0.75, "b": 0.25}
    assert list(normalise({"b": 1.0, "a": 3.0})) == ["a", "b"]
    assert normalise({}) == {}
    for bad in ({"a": 0.0}, {"a": 2.0, "b": -1.0}, {"a": math.inf}, {"a": math.nan}):
        with pytest.raises(ValueError, match="cannot normalise"):
            normalise(bad)


def test_staleness_factor_of_every_decay_by_hand():
    want = {
        "constant": [1.0, 1.0, 1.0],
        "polynomial": [1.0, 1 / math.sqrt(2), 1 / math.sqrt(6)],  # (1 + s)^-0.5
        "hinge": [1.0, 1.0, 1 / (0.5 * (5 - 4) + 1)],  # 1 up to 4 rounds, then 1/(a(s − 4) + 1) = 2/3
        "exponential": [1.0, math.exp(-0.5), math.exp(-2.5)],
    }
    for decay, values in want.items():
        got = [staleness_factor(s, decay, exponent=0.5, hinge=4) for s in (0, 1, 5)]
        assert got == pytest.approx(values, rel=1e-15), decay
    assert staleness_factor(5, "hinge") == pytest.approx(2 / 3)
    assert staleness_factor(3, "polynomial", exponent=1.0) == 0.25
    assert staleness_factor(-2, "exponential") == 1.0  # negative staleness counts as fresh
    with pytest.raises(ValueError, match="unknown staleness decay 'linear'"):
        staleness_factor(1, "linear")


def test_heterogeneity_coefficients_by_hand():
    # τ = 0.5·1 + 0.5·4 = 2.5; coefficients p τ / a = [0.5·2.5/1, 0.5·2.5/4]
    assert heterogeneity_coefficients({"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 4.0}) == {"a": 1.25, "b": 0.3125}
    # equal efforts: the weights themselves
    assert heterogeneity_coefficients({"a": 0.75, "b": 0.25}, {"a": 2.0, "b": 2.0}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match=r"sites \['b'\] report no training effort"):
        heterogeneity_coefficients({"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0})


def test_cap_domain_share_brings_every_domain_under_the_cap():
    mix = {"a": {"law": 1.0}, "b": {"clin": 1.0}, "c": {"law": 0.5, "web": 0.5}}
    before = {"law": 0.6 + 0.1, "clin": 0.2, "web": 0.1}
    w, shares = cap_domain_share({"a": 0.6, "b": 0.2, "c": 0.2}, mix, cap=0.4)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(v >= 0 for v in w.values())
    assert max(shares.values()) <= 0.4 + 1e-6, shares
    assert shares["law"] < before["law"] and w["a"] < 0.6  # the law-heavy site lost weight
    # the reported shares are those of the returned weights
    assert shares["law"] == pytest.approx(w["a"] + 0.5 * w["c"])
    assert shares["web"] == pytest.approx(0.5 * w["c"])
    # under the cap already: unchanged
    w2, s2 = cap_domain_share({"a": 0.3, "b": 0.4, "c": 0.3}, mix, cap=0.5)
    assert w2 == {"a": 0.3, "b": 0.4, "c": 0.3} and s2 == pytest.approx({"law": 0.45, "clin": 0.4, "web": 0.15})


def test_cap_domain_share_returns_the_best_it_can_when_the_cap_is_infeasible():
    # one domain holds everything whatever the weights: the cap cannot be met, the weights stay as they are
    w, shares = cap_domain_share({"a": 0.6, "b": 0.4}, {"a": {"law": 1.0}, "b": {"law": 1.0}}, cap=0.4)
    assert w == pytest.approx({"a": 0.6, "b": 0.4}) and shares == pytest.approx({"law": 1.0})
    # law ≥ 0.5 for any weights: the best reachable moves all the weight to the 50/50 site
    w, shares = cap_domain_share({"a": 0.5, "b": 0.5}, {"a": {"law": 1.0}, "b": {"law": 0.5, "web": 0.5}}, cap=0.3)
    assert sum(w.values()) == pytest.approx(1.0) and w["b"] > 0.99
    assert shares["law"] == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------- clipping and layer-wise normalisation


def test_clip_factor_by_hand():
    assert clip_factor(5.0, 2.0) == 0.4
    assert clip_factor(1.0, 2.0) == 1.0
    assert clip_factor(2.0, 2.0) == 1.0
    assert clip_factor(5.0, None) == 1.0
    assert clip_factor(0.0, 1.0) == 1.0


def test_layerwise_scales_by_hand():
    # weighted mean norm 0.75·5 + 0.25·1 = 4: a scaled by 4/5, b by 4/1
    assert layerwise_scales({"a": 5.0, "b": 1.0}, {"a": 0.75, "b": 0.25}) == {"a": 0.8, "b": 4.0}
    # a zero update stays zero; b goes to the mean norm 0.5·0 + 0.5·2 = 1
    assert layerwise_scales({"a": 0.0, "b": 2.0}, {"a": 0.5, "b": 0.5}) == {"a": 0.0, "b": 0.5}
    # weights need not be normalised: only their ratio counts
    assert layerwise_scales({"a": 5.0, "b": 1.0}, {"a": 3.0, "b": 1.0}) == {"a": 0.8, "b": 4.0}


# ---------------------------------------------------------------- properties

_value = hst.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@hst.composite
def _identical(draw):
    n = draw(hst.integers(1, 7))
    u = T(draw(hst.lists(_value, min_size=1, max_size=6)), dtype=torch.float32)
    raw = draw(hst.lists(hst.floats(0.01, 100.0), min_size=n, max_size=n))
    return n, u, raw


@PROPERTY
@given(_identical())
def test_identical_updates_aggregate_to_themselves(case):
    n, u, raw = case
    stack = u.expand(n, -1).clone()
    w = list(normalise({f"s{i}": r for i, r in enumerate(raw)}).values())
    torch.testing.assert_close(weighted_sum(list(stack), w), u, rtol=1e-5, atol=1e-5)
    assert torch.equal(coordinate_median(stack), u)
    for trim in range((n - 1) // 2 + 1):
        torch.testing.assert_close(trimmed_mean(stack, trim), u, rtol=1e-6, atol=0)
    if n >= 3:
        for f in range((n - 3) // 2 + 1):  # n > 2f + 2
            x = stack.double()
            chosen = krum_select(pairwise_sq_distances(x @ x.T), f, select=n - f)
            assert len(chosen) == n - f
            torch.testing.assert_close(stack[chosen].mean(dim=0), u, rtol=1e-6, atol=0)


@PROPERTY
@given(hst.dictionaries(hst.text(min_size=1, max_size=4), hst.floats(0.0, 1e6), min_size=1, max_size=12))
def test_normalised_weights_sum_to_one_and_are_not_negative(raw):
    if sum(raw.values()) <= 0:
        with pytest.raises(ValueError):
            normalise(raw)
        return
    w = normalise(raw)
    assert sorted(w) == sorted(raw) and list(w) == sorted(raw)
    assert all(v >= 0 for v in w.values())
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)


@hst.composite
def _sites_and_permutation(draw):
    n = draw(hst.integers(1, 8))
    dim = draw(hst.integers(1, 5))
    rows = draw(hst.lists(hst.lists(_value, min_size=dim, max_size=dim), min_size=n, max_size=n))
    raw = draw(hst.lists(hst.floats(0.01, 100.0), min_size=n, max_size=n))
    perm = draw(hst.permutations(list(range(n))))
    return T(rows, dtype=torch.float32), raw, perm


@PROPERTY
@given(_sites_and_permutation())
def test_permuting_the_sites_changes_nothing(case):
    stack, raw, perm = case
    n = stack.shape[0]
    w = list(normalise({f"s{i}": r for i, r in enumerate(raw)}).values())
    mean = weighted_sum(list(stack), w)
    permuted = weighted_sum([stack[i] for i in perm], [w[i] for i in perm])
    torch.testing.assert_close(permuted, mean, rtol=1e-5, atol=1e-3)  # summation order only
    assert torch.equal(coordinate_median(stack[perm]), coordinate_median(stack))
    for trim in range((n - 1) // 2 + 1):
        assert torch.equal(trimmed_mean(stack[perm], trim), trimmed_mean(stack, trim))


# ---------------------------------------------------------------- Byzantine robustness

HONEST, FAULTY, DIM = 7, 2, 8
CENTRE = torch.linspace(1.0, 3.0, DIM)


def robust_aggregate(rule: str, stack: torch.Tensor, f: int) -> torch.Tensor:
    if rule == "median":
        return coordinate_median(stack)
    if rule == "trimmed_mean":
        return trimmed_mean(stack, f)
    x = stack.double()
    n = stack.shape[0]
    chosen = krum_select(pairwise_sq_distances(x @ x.T), f, 1 if rule == "krum" else n - f)
    return stack[chosen].mean(dim=0)


@pytest.mark.parametrize("attack", ["scaled_x100", "sign_flip", "random_sd100"])
@settings(max_examples=40, deadline=None)
@given(seed=hst.integers(0, 2**31 - 1))
def test_robust_rules_resist_f_attackers_that_drag_the_mean_away(attack, seed):
    g = torch.Generator().manual_seed(seed)
    honest = CENTRE + 0.1 * torch.randn(HONEST, DIM, generator=g)
    if attack == "scaled_x100":
        bad = 100 * (CENTRE + 0.1 * torch.randn(FAULTY, DIM, generator=g))
    elif attack == "sign_flip":
        bad = -(CENTRE + 0.1 * torch.randn(FAULTY, DIM, generator=g))
    else:
        bad = 100 * torch.randn(FAULTY, DIM, generator=g)
    # attackers first and last, so no rule can profit from their position
    stack = torch.cat([bad[:1], honest, bad[1:]])
    target = honest.mean(dim=0)
    bound = 2 * float((honest - target).norm(dim=1).max())
    for rule in ("median", "trimmed_mean", "krum", "multikrum"):
        assert tolerance_problem(rule, HONEST + FAULTY, FAULTY) is None
        dist = float((robust_aggregate(rule, stack, FAULTY) - target).norm())
        assert dist <= bound, (rule, dist, bound)
    # ...while the plain mean is dragged outside the honest ball
    mean_dist = float((stack.mean(dim=0) - target).norm())
    assert mean_dist > 2 * bound, (mean_dist, bound)
