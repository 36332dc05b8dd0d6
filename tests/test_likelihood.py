"""The NELBO in bits/dim: Gaussian math against independent computations, exactness on Gaussian data, errors, CLI."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel
from analytic_schedulers.gaussian_math import (
    ddpm_posterior,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_kl,
)
from analytic_schedulers.likelihood import (
    check_8bit_data,
    dataset_nll_bits_per_dim,
    nelbo_terms_bpd,
    nll_bits_per_dim,
)
from analytic_schedulers.trajectory import step_cost_matrix, trajectory_cost

S = 0.3
GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1


def quantize(x):
    return (torch.round((x + 1) * 127.5) / 127.5 - 1).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ pure functions


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(100, generator=g, dtype=torch.float64) + 0.01, torch.rand(100, generator=g,
                                                                                   dtype=torch.float64) + 0.01
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                                 torch.distributions.Normal(m2, v2.sqrt()))
    torch.testing.assert_close(normal_kl(m1, v1, m2, v2), expected)
    # scalar variances broadcast; KL of a distribution with itself is 0
    torch.testing.assert_close(normal_kl(m1, 0.5, m1, 0.5), torch.zeros_like(m1))
    torch.testing.assert_close(prior_kl(m1, 0.3), normal_kl(math.sqrt(0.3) * m1, 0.7, torch.zeros_like(m1), 1.0))


def test_discretized_likelihood_matches_numerical_integration():
    g = torch.Generator().manual_seed(0)
    x = GRID[torch.randint(0, 256, (40,), generator=g)]
    x[:3], x[3:6] = -1.0, 1.0  # the edge bins take the tails
    mean = (x + 0.02 * torch.randn(40, generator=g, dtype=torch.float64)).clamp(-1, 1)
    std = 0.01
    got = discretized_gaussian_log_likelihood(x, mean, std**2)
    for xi, mi, lp in zip(x.tolist(), mean.tolist(), got.tolist()):
        lo = -1.0 - 12 * std if xi == -1.0 else xi - 1 / 255
        hi = 1.0 + 12 * std if xi == 1.0 else xi + 1 / 255
        u = torch.linspace(lo, hi, 20001, dtype=torch.float64)
        density = torch.exp(-0.5 * ((u - mi) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        assert lp == pytest.approx(math.log(torch.trapezoid(density, u).item()), abs=1e-6)


@pytest.mark.parametrize("std", [1e-3, 0.0074, 0.3, 5.0])
def test_discretized_likelihood_is_a_distribution_over_256_levels(std):
    for mean in (-1.2, -0.3, 0.0, 0.77, 1.0):
        log_p = discretized_gaussian_log_likelihood(GRID, torch.full_like(GRID, mean), std**2)
        assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)


def test_discretized_likelihood_is_finite_and_symmetric_far_in_the_tails():
    x = torch.tensor([0.5, -1.0, 1.0, 0.2], dtype=torch.float64)
    mean = torch.tensor([-0.9, 0.9, -0.9, 0.8], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x, mean, 1e-4)
    assert torch.isfinite(log_p).all() and (log_p < -1000).all()  # no 1e-12 floor
    torch.testing.assert_close(log_p, discretized_gaussian_log_likelihood(-x, -mean, 1e-4))
    # Mills ratio: log P(bin) ~ log pdf(lower edge) - log(lower edge / std) for a bin far above the mean
    z = (0.5 - 1 / 255 + 0.9) / 0.01
    assert log_p[0].item() == pytest.approx(-0.5 * z * z - math.log(z * math.sqrt(2 * math.pi)), abs=1e-3)


def test_ddpm_posterior_is_the_forward_process_posterior():
    abar_t, abar_s = 0.5, 0.8
    mean, var = ddpm_posterior(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), abar_t, abar_s)
    # joint Gaussian of (x_s, x_t) given x0 = 1: condition x_s on x_t = 0
    alpha = abar_t / abar_s
    cov_st = math.sqrt(alpha) * (1 - abar_s)
    expected_mean = math.sqrt(abar_s) - cov_st / (1 - abar_t) * math.sqrt(abar_t)
    assert mean.item() == pytest.approx(expected_mean)
    assert var == pytest.approx((1 - abar_s) - cov_st**2 / (1 - abar_t))


# ------------------------------------------------------------------------------------------------ Gaussian data


@pytest.fixture(scope="module")
def gaussian():
    base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False)
    model = GaussianDataModel.from_scheduler(base, data_std=S)
    scheduler = AnalyticDPMScheduler.from_config(base.config, gamma=model.exact_gamma())
    x0 = quantize(model.sample_data(1000, generator=torch.Generator().manual_seed(0)))
    return scheduler, model, x0


def ddpm_config(scheduler):
    return {k: v for k, v in scheduler.config.items() if k != "gamma"}


def nll(model, scheduler, x0, K, seed=1):
    scheduler.set_timesteps(K)
    return nll_bits_per_dim(model, scheduler, x0, generator=torch.Generator().manual_seed(seed))


def test_analytic_ddpm_nll_is_the_same_for_every_k_on_gaussian_data(gaussian):
    scheduler, model, x0 = gaussian
    k10, k100 = nll(model, scheduler, x0, 10), nll(model, scheduler, x0, 100)
    ddpm = DDPMScheduler.from_config(ddpm_config(scheduler), variance_type="fixed_small", clip_sample=False)
    ddpm10 = nll(model, ddpm, x0, 10)
    print(f"\nGaussian s={S}, 8x8, {len(x0)} images (bits/dim): Analytic-DDPM K=10 {k10.mean():.4f}, "
          f"K=100 {k100.mean():.4f}; DDPM fixed_small K=10 {ddpm10.mean():.2f}")
    assert k10.shape == (len(x0),) and k10.dtype == torch.float64
    assert abs(k10.mean().item() - k100.mean().item()) < 0.05
    assert ddpm10.mean().item() > k10.mean().item() + 10  # far worse
    # and a discrete Gaussian of std 0.3 has about 7.3 bits/dim of entropy: the bound is close
    entropy_bits = (0.5 * math.log(2 * math.pi * math.e * S**2) - math.log(2 / 255)) / math.log(2)
    assert entropy_bits < k10.mean().item() < entropy_bits + 0.3


def test_step_terms_match_the_trajectory_cost(gaussian):
    # with the exact model, the KL terms sum to (d/2) * step_cost in expectation
    scheduler, model, x0 = gaussian
    scheduler.set_timesteps(10)
    terms = nelbo_terms_bpd(model, scheduler, x0, generator=torch.Generator().manual_seed(2))
    predicted = trajectory_cost(step_cost_matrix(scheduler.gamma_table, scheduler._abar64),
                                scheduler.timesteps.numpy()) / (2 * math.log(2))
    assert terms.step_bpd.shape == (len(x0), 9)
    assert terms.step_bpd.sum(1).mean().item() == pytest.approx(predicted, abs=0.02)
    torch.testing.assert_close(terms.total_bpd, terms.prior_bpd + terms.step_bpd.sum(1) + terms.decoder_bpd)


def test_fixed_large_and_optimal_trajectory(gaussian):
    scheduler, model, x0 = gaussian
    large = DDPMScheduler.from_config(ddpm_config(scheduler), variance_type="fixed_large", clip_sample=False)
    optimal = AnalyticDPMScheduler.from_config(scheduler.config, timestep_spacing="optimal")
    analytic = nll(model, scheduler, x0[:300], 10).mean().item()
    assert nll(model, large, x0[:300], 10).mean().item() > analytic
    assert abs(nll(model, optimal, x0[:300], 10).mean().item() - analytic) < 0.05  # exact: every trajectory


def test_sn_dpm_diagonal_variances_are_exact_on_anisotropic_data():
    sn_module = pytest.importorskip("analytic_schedulers.scheduling_sn_dpm")
    base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False)
    std = torch.linspace(0.05, 0.5, 64)
    model = GaussianDataModel.from_scheduler(base, data_std=std, output="sn")
    x0 = quantize(GaussianDataModel.from_scheduler(base, data_std=std).sample_data(
        400, generator=torch.Generator().manual_seed(0)))
    scheduler = sn_module.SNDPMScheduler.from_config(base.config)
    k10, k50 = nll(model, scheduler, x0, 10).mean().item(), nll(model, scheduler, x0, 50).mean().item()
    analytic = AnalyticDPMScheduler.from_config(base.config, gamma=GaussianDataModel.from_scheduler(
        base, data_std=std).exact_gamma())
    analytic10 = nll(GaussianDataModel.from_scheduler(base, data_std=std), analytic, x0, 10).mean().item()
    assert abs(k10 - k50) < 0.05
    assert analytic10 > k10 + 0.1  # one variance per step is not exact on anisotropic data


# ------------------------------------------------------------------------------------------------ errors


def test_eta_other_than_one_is_rejected(gaussian):
    scheduler, model, x0 = gaussian
    ddim_like = AnalyticDPMScheduler.from_config(scheduler.config, eta=0.0)
    ddim_like.set_timesteps(10)
    with pytest.raises(ValueError, match="infinite"):
        nll_bits_per_dim(model, ddim_like, x0[:4])
    with pytest.raises(TypeError, match="infinite"):
        nll_bits_per_dim(model, DDIMScheduler.from_config(ddpm_config(scheduler)), x0[:4])
    with pytest.raises(ValueError, match="fixed_small"):
        learned = DDPMScheduler.from_config(ddpm_config(scheduler), variance_type="learned_range")
        nll_bits_per_dim(model, learned, x0[:4])


def test_data_outside_the_range_or_off_the_grid_is_rejected(gaussian):
    scheduler, model, x0 = gaussian
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        nll_bits_per_dim(model, scheduler, x0[:4] * 4)
    with pytest.raises(ValueError, match=r"torch.round\(\(x \+ 1\) \* 127.5\)"):
        nll_bits_per_dim(model, scheduler, x0[:4] * 0.999)
    with pytest.raises(ValueError, match="dtype"):
        check_8bit_data(torch.zeros(2, 1, 2, 2, dtype=torch.uint8))
    assert check_8bit_data(x0[:4].float()).dtype == torch.float64


# ------------------------------------------------------------------------------------------------ data sets, CLI


def test_dataset_helper_with_accelerate(gaussian):
    from accelerate import Accelerator

    scheduler, model, x0 = gaussian
    scheduler.set_timesteps(5)
    data = x0[:40]
    result = dataset_nll_bits_per_dim(model, scheduler, data, accelerator=Accelerator(cpu=True), batch_size=40, generator=3)
    direct = nll_bits_per_dim(model, scheduler, data, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(result, direct)
    batched = dataset_nll_bits_per_dim(model, scheduler, torch.utils.data.TensorDataset(data), batch_size=16)
    assert batched.shape == (40,) and torch.isfinite(batched).all()


@pytest.fixture
def tiny_pipeline(tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=100)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "model")
    gamma = np.linspace(0.3, 0.999, 100)
    AnalyticDPMScheduler.from_config(scheduler.config, gamma=gamma).save_pretrained(
        tmp_path / "model" / "analytic_scheduler")
    return tmp_path / "model"


def test_cli_nll(tiny_pipeline, capsys):
    pytest.importorskip("sklearn")
    from analytic_schedulers.cli import main

    common = ["nll", "--model", str(tiny_pipeline), "--num-images", "6", "--batch-size", "6", "--device", "cpu",
              "--no-progress"]
    assert main(common + ["--steps", "4", "--spacing", "optimal"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "analytic-ddpm" in out and "K=4" in out
    assert main(common + ["--steps", "3", "--scheduler", "ddim"]) == 2
    assert "infinite" in capsys.readouterr().err
    assert main(common + ["--steps", "3", "--data", str(tiny_pipeline)]) == 2
    assert "No images" in capsys.readouterr().err
