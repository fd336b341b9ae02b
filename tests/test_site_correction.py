"""FedProx's proximal term and SCAFFOLD's control-variate correction on local gradients, by hand."""

from __future__ import annotations

import torch

from fedhpc.training.site_correction import GradCorrection

T = torch.tensor


def model_with(weight: list[float], grad: list[float]) -> torch.nn.Module:
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(T([weight]))
    m.weight.grad = T([grad])
    return m


def test_fedprox_adds_mu_times_the_distance_to_the_global_model():
    m = model_with([1.0, -2.0], [0.5, 0.5])
    corr = GradCorrection(m, anchor={"weight": T([[0.0, 0.0]])}, mu=0.1)
    corr()
    assert torch.allclose(m.weight.grad, T([[0.5 + 0.1 * 1.0, 0.5 + 0.1 * -2.0]]))


def test_fedprox_pulls_local_training_towards_the_global_model():
    torch.manual_seed(0)
    x, y = torch.randn(64, 2), torch.randn(64, 1) + 5.0

    def train(mu: float) -> float:
        m = torch.nn.Linear(2, 1)
        w0 = {k: v.detach().clone() for k, v in m.named_parameters()}
        corr = GradCorrection(m, anchor=w0, mu=mu)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(50):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            corr()
            opt.step()
        return float(sum(((p.detach() - w0[k]) ** 2).sum() for k, p in m.named_parameters()).sqrt())

    d = [train(mu) for mu in (0.0, 1.0, 10.0)]
    assert d[0] > d[1] > d[2] and d[2] < 0.5 * d[0], d


def test_scaffold_adds_c_minus_c_i_and_its_new_control_is_the_mean_raw_gradient():
    m = model_with([0.0, 0.0], [1.0, 2.0])
    corr = GradCorrection(m, c_global={"weight": T([[0.5, 0.5]])}, c_local={"weight": T([[0.25, 1.0]])})
    corr()
    assert torch.allclose(m.weight.grad, T([[1.0 + 0.25, 2.0 - 0.5]]))
    m.weight.grad = T([[3.0, 0.0]])
    corr()
    new, delta = corr.control_update()
    assert torch.allclose(new["weight"], T([[2.0, 1.0]]))  # mean of the raw (uncorrected) gradients
    assert torch.allclose(delta["weight"], T([[2.0 - 0.25, 1.0 - 1.0]]))


def test_scaffold_without_a_site_control_starts_from_zero():
    m = model_with([0.0, 0.0], [1.0, 1.0])
    corr = GradCorrection(m, c_global={"weight": T([[0.5, -0.5]])}, c_local={})
    corr()
    assert torch.allclose(m.weight.grad, T([[1.5, 0.5]]))
    assert torch.allclose(corr.control_update()[1]["weight"], T([[1.0, 1.0]]))
