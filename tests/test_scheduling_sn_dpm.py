"""SNDPMScheduler: exactness on anisotropic Gaussian data, reductions, bad inputs, the diffusers contract."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from analytic_schedulers import reverse_step as rs
from analytic_schedulers.gaussian import GaussianDataModel
from analytic_schedulers.scheduling_analytic_dpm import AnalyticDPMScheduler
from analytic_schedulers.scheduling_sn_dpm import SNDPMScheduler
from helpers import sample_loop

# per-pixel data std of the anisotropic check (8x8, one channel)
STDS = torch.linspace(0.05, 0.6, 64)
NUM_SAMPLES = 8000


def per_pixel_std_ratio(samples):
    return samples.std(dim=0).flatten() / STDS


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("K", [10, 25])
def test_exact_on_anisotropic_gaussian_where_analytic_dpm_fails(K, eta):
    # Analytic-DPM with the exact Gamma table: one variance per step cannot fit per-pixel stds from 0.05 to 0.6
    base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False, eta=eta)
    eps_model = GaussianDataModel.from_scheduler(base, data_std=STDS)
    analytic = AnalyticDPMScheduler.from_config(base.config, gamma=eps_model.exact_gamma())
    analytic.set_timesteps(K)
    analytic_ratio = per_pixel_std_ratio(sample_loop(analytic, eps_model, NUM_SAMPLES))
    print(f"\nK={K} eta={eta}: per-pixel sample std / s, max |error| (mean ratio)")
    print(f"  Analytic-DPM (exact Gamma): {(analytic_ratio - 1).abs().max():.1%} ({analytic_ratio.mean():.4f})")
    assert (analytic_ratio - 1).abs().max() > 0.06  # the reason SN/NPR-DPM exist

    for covariance_type in ("sn", "npr"):
        scheduler = SNDPMScheduler.from_config(base.config, covariance_type=covariance_type)
        model = GaussianDataModel.from_scheduler(scheduler, data_std=STDS, output=covariance_type)
        scheduler.set_timesteps(K)
        samples = sample_loop(scheduler, model, NUM_SAMPLES)
        ratio = per_pixel_std_ratio(samples)
        print(f"  {covariance_type.upper()}-DPM (exact h):         {(ratio - 1).abs().max():.1%} ({ratio.mean():.4f})")
        assert torch.isfinite(samples).all()
        assert (ratio - 1).abs().max() < 0.06
        assert abs(ratio.mean().item() - 1) < 0.01


def test_exact_with_v_prediction_h_is_about_eps():
    """The first C channels may be a v prediction; h stays E[eps^2 | x_t] (converted eps_hat is used)."""
    base = SNDPMScheduler(timestep_spacing="linspace", clip_sample=False, prediction_type="v_prediction")
    model = GaussianDataModel.from_scheduler(base, data_std=STDS, output="sn")
    abar = base.alphas_cumprod.double()

    def v_model(x, t):
        eps, h = model(x, t).sample.double().split(1, dim=1)
        a = abar[int(t)]
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        return type("Out", (), {"sample": torch.cat([v, h], 1).float()})

    base.set_timesteps(10)
    ratio = per_pixel_std_ratio(sample_loop(base, v_model, 4000))
    assert (ratio - 1).abs().max() < 0.08 and abs(ratio.mean().item() - 1) < 0.015


# ------------------------------------------------------------------------------------------------ reductions


def random_pair(seed, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def zero_v_output(model_output, covariance_type, prediction_type="epsilon", sample=None, abar_t=None, shift=0.0):
    """`[prediction, h]` with h chosen so that v = 0 (h = eps_hat^2 for SN, h = 0 for NPR), minus `shift`."""
    if covariance_type == "npr":
        return torch.cat([model_output, torch.zeros_like(model_output) - shift], 1)
    eps_hat, _ = rs.eps_and_x0_from_model_output(model_output, sample, abar_t, prediction_type)
    return torch.cat([model_output, eps_hat.square() - shift], 1)


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shift", [0.0, 0.5])  # 0.5: h below its minimum, v < 0 clipped to 0
def test_reduces_to_ddpm_fixed_small_when_v_is_zero(covariance_type, prediction_type, shift):
    ddpm = DDPMScheduler(variance_type="fixed_small", prediction_type=prediction_type, clip_sample=True)
    ours = SNDPMScheduler.from_config(ddpm.config, covariance_type=covariance_type)
    for scheduler in (ddpm, ours):
        scheduler.set_timesteps(10)
    for t in ours.timesteps:
        model_output, sample = random_pair(int(t))
        both = zero_v_output(model_output, covariance_type, prediction_type, sample, ours._abar_list[int(t)], shift)
        a = ddpm.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        b = ours.step(both, t, sample, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_reduces_to_ddim_when_v_is_zero(covariance_type, eta):
    ddim = DDIMScheduler(clip_sample=True, timestep_spacing="leading")
    ours = SNDPMScheduler.from_config(ddim.config, covariance_type=covariance_type)
    for scheduler in (ddim, ours):
        scheduler.set_timesteps(10)
    for t in ours.timesteps:
        model_output, sample = random_pair(int(t))
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(t) + 1))
        both = zero_v_output(model_output, covariance_type, "epsilon", sample, ours._abar_list[int(t)])
        a = ddim.step(model_output, t, sample, eta=eta, variance_noise=noise)
        b = ours.step(both, t, sample, eta=eta, variance_noise=noise)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stable_diffusion_ddim_config_matches_ddim_at_every_step_including_the_last(covariance_type, prediction_type):
    """`set_alpha_to_one=False` (every Stable Diffusion DDIM config): the last step lands on alphas_cumprod[0]."""
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         set_alpha_to_one=False, timestep_spacing="leading", clip_sample=False,
                         prediction_type=prediction_type)
    ours = SNDPMScheduler.from_config(ddim.config, covariance_type=covariance_type)
    for scheduler in (ddim, ours):
        scheduler.set_timesteps(10)
    for t in ours.timesteps:
        model_output, sample = random_pair(int(t))
        both = zero_v_output(model_output, covariance_type, prediction_type, sample, ours._abar_list[int(t)])
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(t) + 1))
        a = ddim.step(model_output, t, sample, eta=0.0, variance_noise=noise)
        b = ours.step(both, t, sample, eta=0.0, variance_noise=noise)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_matches_analytic_dpm_when_h_carries_the_same_variance(eta):
    """SN with h = eps_hat^2 + 1 - Gamma_t (and NPR with h = 1 - Gamma_t) is Analytic-DPM's step."""
    gamma = torch.linspace(0.02, 0.99, 1000)
    analytic = AnalyticDPMScheduler(gamma=gamma, eta=eta, clip_sample=False, timestep_spacing="linspace")
    sn = SNDPMScheduler.from_config(analytic.config, covariance_type="sn")
    npr = SNDPMScheduler.from_config(analytic.config, covariance_type="npr")
    for scheduler in (analytic, sn, npr):
        scheduler.set_timesteps(10)
    for t in analytic.timesteps:
        eps, sample = random_pair(int(t), (2, 1, 4, 4))
        noise = torch.randn_like(sample)
        extra = 1.0 - gamma[int(t)].item()
        a = analytic.step(eps, t, sample, variance_noise=noise)
        b = sn.step(torch.cat([eps, eps.square() + extra], 1), t, sample, variance_noise=noise)
        c = npr.step(torch.cat([eps, torch.full_like(eps, extra)], 1), t, sample, variance_noise=noise)
        for out in (b, c):
            torch.testing.assert_close(out.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.variance, torch.full_like(out.variance, a.variance.item()),
                                       rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------ bad input


def test_c_channel_output_says_it_needs_eps_and_h():
    scheduler = SNDPMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"needs a model output of 2C = 6 channels, `\[eps, h\]`.*NoiseSquareHead"):
        scheduler.step(torch.zeros(2, 3, 4, 4), scheduler.timesteps[0], sample)
    with pytest.raises(ValueError, match=r"`\[eps, h\]` of shape \(2, 6, 4, 4\)"):
        scheduler.step(torch.zeros(2, 9, 4, 4), scheduler.timesteps[0], sample)


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
@pytest.mark.parametrize("clip_variance", [True, False])
def test_negative_variance_estimates_give_no_nan(covariance_type, clip_variance):
    scheduler = SNDPMScheduler(covariance_type=covariance_type, clip_variance=clip_variance, clip_sample=False,
                               timestep_spacing="linspace")
    scheduler.set_timesteps(25)
    x = torch.randn(4, 1, 4, 4)
    for t in scheduler.timesteps:
        eps = torch.randn_like(x)
        h = eps.square() - 3.0 if covariance_type == "sn" else torch.full_like(x, -3.0)  # v < 0 everywhere
        out = scheduler.step(torch.cat([eps, h], 1), t, x)
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.variance).all()
        assert (out.variance >= 0).all()
        s = scheduler.previous_timestep(t)
        if s >= 0:  # the bound (or the floor at 0) leaves the DDPM posterior variance, lambda^2 = tilde_beta
            lambda_sq = rs.ddim_lambda_sq(scheduler._abar_list[int(t)], scheduler._abar_list[s], 1.0)
            assert out.variance.max().item() <= lambda_sq + 1e-7
        x = out.prev_sample


def test_invalid_covariance_type():
    with pytest.raises(ValueError, match="covariance_type"):
        SNDPMScheduler(covariance_type="full")


def test_per_dimension_variance_and_bounds():
    scheduler = SNDPMScheduler(covariance_type="npr", clip_sample=False)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[-2]  # t = 100: bbar / abar = 0.12
    eps = torch.zeros(1, 1, 2, 2)
    h = torch.tensor([0.0, 0.1, 100.0, 1e6]).reshape(1, 1, 2, 2)  # the last two reach the Theorem-2 bound
    out = scheduler.step(torch.cat([eps, h], 1), t, torch.zeros(1, 1, 2, 2))
    variance = out.variance.flatten()
    assert out.variance.shape == (1, 1, 2, 2)
    assert variance[0] < variance[1] < variance[2] and variance[2] == variance[3]


# ------------------------------------------------------------------------------------------------ diffusers contract


def test_config_round_trip_and_from_config(tmp_path):
    scheduler = SNDPMScheduler(covariance_type="npr", eta=0.0, last_step_sigma_clip=1.0, gamma=[0.5] * 1000,
                               timestep_spacing="trailing")
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "SNDPMScheduler" and saved["covariance_type"] == "npr"
    loaded = SNDPMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert loaded.gamma_table is not None and len(loaded.gamma_table) == 1000

    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")
    ours = SNDPMScheduler.from_config(ddpm.config)
    torch.testing.assert_close(ours.alphas_cumprod, ddpm.alphas_cumprod)
    ours.set_timesteps(10)
    ddpm.set_timesteps(10)
    assert ours.timesteps.tolist() == ddpm.timesteps.tolist()
    assert DDPMScheduler.from_config(ours.config).config.beta_schedule == "squaredcos_cap_v2"
    # from an Analytic-DPM config: the Gamma table travels along (for the optimal trajectory)
    analytic = AnalyticDPMScheduler(gamma=np.full(1000, 0.7))
    assert SNDPMScheduler.from_config(analytic.config).gamma_table[0].item() == pytest.approx(0.7)
    assert DDPMScheduler in ours.compatibles


def test_step_dtype_tuple_and_last_step():
    scheduler = SNDPMScheduler(timestep_spacing="linspace")
    scheduler.set_timesteps(5)
    eps, sample = random_pair(0, (2, 2, 4, 4))
    output = torch.cat([eps, eps.square() + 0.1], 1)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = scheduler.step(output.to(dtype), scheduler.timesteps[1], sample.to(dtype))
        assert out.prev_sample.dtype == dtype and torch.isfinite(out.prev_sample).all()
    tup = scheduler.step(output, scheduler.timesteps[1], sample, return_dict=False,
                         generator=torch.Generator().manual_seed(0))
    ref = scheduler.step(output, scheduler.timesteps[1], sample, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tup[0], ref.prev_sample)
    last = scheduler.step(output, scheduler.timesteps[-1], sample)
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample)
    assert float(last.variance) == 0.0


def test_last_step_sigma_clip_caps_every_pixel():
    scheduler = SNDPMScheduler(covariance_type="npr", last_step_sigma_clip=1.0, timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 4, 4)
    output = torch.cat([x, torch.full_like(x, 1e3)], 1)
    variance = scheduler.step(output, scheduler.timesteps[-2], x).variance
    assert variance.max().item() == pytest.approx((2 / 255 * math.sqrt(math.pi / 2)) ** 2)
