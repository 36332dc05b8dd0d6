"""The pure step math against independent closed forms."""

import math

import pytest
import torch

from analytic_schedulers import reverse_step as rs


@pytest.mark.parametrize("abar_t,abar_s", [(0.5, 0.9), (0.01, 0.2), (0.9990, 0.9999), (1e-4, 0.5)])
def test_x0_coefficient_reduces_to_ddpm_form(abar_t, abar_s):
    beta_ts = 1 - abar_t / abar_s
    lambda_sq = rs.ddim_lambda_sq(abar_t, abar_s, eta=1.0)
    expected = abar_s * beta_ts**2 / (1 - abar_t) ** 2
    assert rs.x0_coefficient_sq(abar_t, abar_s, lambda_sq) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_and_ddpm_means_agree_for_consistent_eps(eta):
    abar_t, abar_s = 0.3, 0.7
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x_t = math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps
    lambda_sq = rs.ddim_lambda_sq(abar_t, abar_s, eta)
    ddim = rs.ddim_mean(x0, eps, abar_s, lambda_sq)
    # the DDIM-family posterior mean written as a coefficient on x0 plus one on x_t
    coef_x0 = math.sqrt(abar_s) - math.sqrt((1 - abar_s - lambda_sq) * abar_t / (1 - abar_t))
    coef_xt = math.sqrt((1 - abar_s - lambda_sq) / (1 - abar_t))
    torch.testing.assert_close(ddim, coef_x0 * x0 + coef_xt * x_t)
    assert coef_x0**2 == pytest.approx(rs.x0_coefficient_sq(abar_t, abar_s, lambda_sq), rel=1e-12)
    if eta == 1.0:
        torch.testing.assert_close(rs.ddpm_mean(x0, x_t, abar_t, abar_s), ddim)


def test_eps_x0_conversions_invert_each_other():
    abar = 0.42
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0
    for kind, output in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        e, x = rs.eps_and_x0_from_model_output(output, x_t, abar, kind)
        torch.testing.assert_close(e, eps)
        torch.testing.assert_close(x, x0)
    torch.testing.assert_close(rs.eps_from_x0(x0, x_t, abar), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        rs.eps_and_x0_from_model_output(eps, x_t, abar, "score")


def test_eps_x0_conversions_take_one_abar_per_sample():
    abar = torch.tensor([0.9, 0.42, 0.01], dtype=torch.float64).reshape(-1, 1, 1)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 3, 2, 4, generator=g, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    for kind, output in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        e, x = rs.eps_and_x0_from_model_output(output, x_t, abar, kind)
        torch.testing.assert_close(e, eps)
        torch.testing.assert_close(x, x0)
        for i in range(3):  # the same as the float path, sample by sample
            e_i, x_i = rs.eps_and_x0_from_model_output(output[i], x_t[i], abar[i].item(), kind)
            torch.testing.assert_close(e[i], e_i, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x[i], x_i, rtol=1e-12, atol=1e-12)


def test_variance_estimates_and_bounds():
    abar = 0.2
    assert rs.analytic_x0_variance(0.75, abar) == pytest.approx(4 * 0.25)
    h, eps = torch.tensor([0.5, 2.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(rs.sn_x0_variance(h, eps, abar), 4 * (h - eps**2))
    torch.testing.assert_close(rs.npr_x0_variance(h, abar), 4 * h)
    assert rs.bound_x0_variance(-0.1, 1.0) == 0.0 and rs.bound_x0_variance(3.0, 1.0) == 1.0
    torch.testing.assert_close(rs.bound_x0_variance(torch.tensor([-1.0, 0.5, 9.0]), 1.0), torch.tensor([0.0, 0.5, 1.0]))
    # zero SNR: bbar/abar is infinite and only the bound makes v finite
    assert rs.bound_x0_variance(rs.analytic_x0_variance(0.5, 0.0), 1.0) == 1.0
    # a negative v never makes sigma^2 negative
    assert rs.reverse_variance(0.0, 0.5, -3.0) == 0.0
    assert rs.last_step_variance_cap(1.0) == pytest.approx((2 / 255) ** 2 * math.pi / 2)
