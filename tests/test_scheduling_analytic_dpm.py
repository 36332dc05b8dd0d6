"""AnalyticDPMScheduler: exactness on Gaussian data, reductions to diffusers' schedulers, the diffusers contract."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel, SNDPMScheduler
from helpers import DiffusersLog, sample_loop

S = 0.3  # data std of the isotropic Gaussian check


def exact_setup(**config):
    base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False, **config)
    model = GaussianDataModel.from_scheduler(base, data_std=S)
    return AnalyticDPMScheduler.from_config(base.config, gamma=model.exact_gamma()), model


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("K", [10, 25])
def test_exact_on_isotropic_gaussian(K, eta):
    scheduler, model = exact_setup(eta=eta, clip_variance=True, last_step_sigma_clip=None)
    scheduler.set_timesteps(K)
    std = sample_loop(scheduler, model, 8000).std().item()

    ddpm = DDPMScheduler.from_config(scheduler.config, variance_type="fixed_small")
    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="leading")
    baseline = ddpm if eta == 1.0 else ddim
    baseline.set_timesteps(K)
    base_std = sample_loop(baseline, model, 8000, **({} if eta == 1.0 else {"eta": 0.0})).std().item()
    print(f"\nK={K} eta={eta}: target std {S}; Analytic {std:.4f} ({std / S - 1:+.2%}); "
          f"{type(baseline).__name__} {base_std:.4f} ({base_std / S - 1:+.2%})")
    assert abs(std / S - 1) < 0.01
    # the fixed-variance samplers are far off at these K (the reason the package exists)
    assert abs(base_std / S - 1) > 0.1


def test_exact_for_every_prediction_type():
    base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False)
    for prediction_type in ["v_prediction", "sample"]:
        model = GaussianDataModel.from_scheduler(base, data_std=S, output=prediction_type)
        scheduler = AnalyticDPMScheduler.from_config(base.config, prediction_type=prediction_type,
                                                     gamma=model.exact_gamma())
        scheduler.set_timesteps(10)
        assert abs(sample_loop(scheduler, model, 4000).std().item() / S - 1) < 0.015


def test_gamma_from_batch_fallback_is_close_to_exact():
    scheduler, model = exact_setup()
    scheduler = AnalyticDPMScheduler.from_config(scheduler.config, gamma=None, gamma_from_batch=True)
    scheduler.set_timesteps(10)
    assert abs(sample_loop(scheduler, model, 4000).std().item() / S - 1) < 0.02


# ------------------------------------------------------------------------------------------------ reductions

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def random_model_output(seed, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("clip_sample", [False, True])
def test_reduces_to_ddpm_fixed_small_when_v_is_zero(prediction_type, clip_sample):
    config = dict(prediction_type=prediction_type, clip_sample=clip_sample, timestep_spacing="leading")
    ddpm = DDPMScheduler(variance_type="fixed_small", **config)
    ours = AnalyticDPMScheduler.from_config(ddpm.config, gamma=[1.0] * 1000)  # Gamma = 1 <=> v = 0
    for scheduler in (ddpm, ours):
        scheduler.set_timesteps(10)
    for t in ours.timesteps:
        model_output, sample = random_model_output(int(t))
        a = ddpm.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        b = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_reduces_to_ddim_when_v_is_zero(prediction_type, eta, use_clipped_model_output):
    ddim = DDIMScheduler(prediction_type=prediction_type, clip_sample=True, timestep_spacing="leading")
    ours = AnalyticDPMScheduler.from_config(ddim.config, gamma=np.ones(1000))
    for scheduler in (ddim, ours):
        scheduler.set_timesteps(10)
    for t in ours.timesteps:
        model_output, sample = random_model_output(int(t))
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(t) + 1))
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped_model_output, variance_noise=noise)
        a = ddim.step(model_output, t, sample, **kwargs)
        b = ours.step(model_output, t, sample, **kwargs)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_whole_trajectory_matches_ddpm_with_same_generator():
    ddpm = DDPMScheduler(clip_sample=True)
    ours = AnalyticDPMScheduler.from_config(ddpm.config, gamma=torch.ones(1000))
    model = GaussianDataModel.from_scheduler(ddpm, data_std=S)
    for scheduler in (ddpm, ours):
        scheduler.set_timesteps(20)
    torch.testing.assert_close(sample_loop(ours, model, 16), sample_loop(ddpm, model, 16), rtol=1e-5, atol=1e-5)


def test_analytic_variance_is_between_lambda_and_its_bound():
    scheduler, model = exact_setup()
    scheduler.set_timesteps(10)
    x = torch.randn(2, 1, 8, 8)
    for t in scheduler.timesteps[:-1]:
        out = scheduler.step(model(x, t).sample, t, x)
        s = scheduler.previous_timestep(t)
        abar_t, abar_s = scheduler._abar_list[int(t)], scheduler._abar_list[s]
        tilde_beta = (1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)
        assert tilde_beta - 1e-7 <= out.variance.item() <= 1 - abar_t / abar_s + 1e-7


# ------------------------------------------------------------------------------------------------ diffusers contract


def test_config_round_trip_keeps_gamma(tmp_path):
    gamma = torch.linspace(0.0, 1.0, 1000)
    scheduler = AnalyticDPMScheduler(gamma=gamma, eta=0.3, last_step_sigma_clip=2.0, timestep_spacing="trailing")
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "AnalyticDPMScheduler" and len(saved["gamma"]) == 1000
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    torch.testing.assert_close(loaded.gamma_table, gamma.double())
    for s in (scheduler, loaded):
        s.set_timesteps(7)
    model_output, sample = random_model_output(3)
    a = scheduler.step(model_output, scheduler.timesteps[2], sample, generator=torch.Generator().manual_seed(0))
    b = loaded.step(model_output, loaded.timesteps[2], sample, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("other", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_from_config_round_trips_with_diffusers(other, spacing):
    theirs = other(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
                   steps_offset=1, prediction_type="v_prediction")
    ours = AnalyticDPMScheduler.from_config(theirs.config, gamma=[0.5] * 1000)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod)
    for K in (10, 25, 999):  # leading + steps_offset=1 at K=1000 would give timestep 1000 in diffusers
        ours.set_timesteps(K)
        theirs.set_timesteps(K)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    back = other.from_config(ours.config)
    assert back.config.timestep_spacing == spacing and back.config.prediction_type == "v_prediction"
    torch.testing.assert_close(back.alphas_cumprod, theirs.alphas_cumprod)
    assert DDPMScheduler in ours.compatibles and DDIMScheduler in ours.compatibles


def test_step_shape_dtype_and_tuple_output():
    scheduler = AnalyticDPMScheduler(gamma=[0.9] * 1000)
    scheduler.set_timesteps(10)
    model_output, sample = random_model_output(0)
    t = scheduler.timesteps[3]
    out = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(0))
    tup = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert out.prev_sample.shape == sample.shape and out.pred_original_sample.shape == sample.shape
    torch.testing.assert_close(out.prev_sample, tup[0])
    torch.testing.assert_close(out.pred_original_sample, tup[1])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        half = scheduler.step(model_output.to(dtype), t, sample.to(dtype), generator=torch.Generator().manual_seed(0))
        assert half.prev_sample.dtype == dtype
        if dtype != torch.float64:  # the noise is drawn in float32 for half precisions: the same sample
            torch.testing.assert_close(half.prev_sample.float(), out.prev_sample, rtol=0.02, atol=0.03)


def test_determinism_with_generator_and_timestep_types():
    scheduler = AnalyticDPMScheduler(gamma=[0.9] * 1000)
    scheduler.set_timesteps(10)
    model_output, sample = random_model_output(0)
    t = scheduler.timesteps[0]
    a = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(5)).prev_sample
    b = scheduler.step(model_output, int(t), sample, generator=torch.Generator().manual_seed(5)).prev_sample
    c = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(6)).prev_sample
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="either `generator` or `variance_noise`"):
        scheduler.step(model_output, t, sample, generator=torch.Generator(), variance_noise=torch.randn_like(sample))


def test_trained_betas_and_add_noise():
    betas = np.linspace(1e-4, 0.02, 1000)
    ours = AnalyticDPMScheduler(trained_betas=betas, gamma=[0.5] * 1000)
    theirs = DDPMScheduler(trained_betas=betas)
    torch.testing.assert_close(ours.betas, theirs.betas)
    assert isinstance(ours.config.trained_betas, list)
    x0, noise = random_model_output(0)
    timesteps = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))
    torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps), theirs.get_velocity(x0, noise, timesteps))
    assert len(ours) == 1000 and ours.init_noise_sigma == 1.0 and ours.order == 1
    torch.testing.assert_close(ours.scale_model_input(x0, 3), x0)


def test_custom_timesteps_and_previous_timestep():
    scheduler = AnalyticDPMScheduler(gamma=[0.5] * 1000)
    scheduler.set_timesteps(timesteps=[999, 500, 20, 0])
    assert [scheduler.previous_timestep(t) for t in scheduler.timesteps] == [500, 20, 0, -1]
    with pytest.raises(ValueError, match="descending"):
        scheduler.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="not on the current trajectory"):
        scheduler.step(torch.zeros(1, 1, 2, 2), 7, torch.zeros(1, 1, 2, 2))


def test_zero_terminal_snr_with_v_prediction_is_finite():
    scheduler = AnalyticDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing", gamma=[0.99] * 1000)
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 1, 4, 4)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.randn_like(x), t, x).prev_sample
        assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="clip_variance"):
        AnalyticDPMScheduler(rescale_betas_zero_snr=True, clip_variance=False)


# ----------------------------------------------------------------------------------------------- diffusers-native steps

SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 set_alpha_to_one=False, timestep_spacing="leading", clip_sample=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_stable_diffusion_ddim_config_matches_ddim_at_every_step_including_the_last(prediction_type, eta):
    """`set_alpha_to_one=False`: after tau_1 the step lands on alphas_cumprod[0], as DDIMScheduler's."""
    ddim = DDIMScheduler(prediction_type=prediction_type, **SD_CONFIG)
    ours = AnalyticDPMScheduler.from_config(ddim.config, gamma=[1.0] * 1000)  # Gamma = 1: zero x0 variance
    assert ours.config.set_alpha_to_one is False
    for scheduler in (ddim, ours):
        scheduler.set_timesteps(10)
    assert ours.timesteps[-1] == 1
    for t in ours.timesteps:
        model_output, sample = random_model_output(int(t), (2, 4, 8, 8))
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(int(t) + 1))
        a = ddim.step(model_output, t, sample, eta=eta, variance_noise=noise)
        b = ours.step(model_output, t, sample, eta=eta, variance_noise=noise)
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5, atol=1e-5)
    # the last step did not return x0_hat: it stayed at abar_0 < 1
    assert not torch.allclose(b.prev_sample, b.pred_original_sample)


def test_set_alpha_to_one_default_ends_on_the_clean_sample():
    ours = AnalyticDPMScheduler.from_config(DDPMScheduler().config, gamma=[0.5] * 1000)  # DDPM has no such key
    assert ours.config.set_alpha_to_one is True
    ours.set_timesteps(10)
    model_output, sample = random_model_output(0)
    last = ours.step(model_output, ours.timesteps[-1], sample)
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample)
    assert last.variance.item() == 0.0


@pytest.mark.parametrize("timesteps", [None, [999, 500, 20, 0]])
def test_previous_timestep_returns_what_ddpm_returns(timesteps):
    ddpm = DDPMScheduler()
    ours = AnalyticDPMScheduler.from_config(ddpm.config, gamma=[0.5] * 1000)
    for t in (torch.tensor(5), torch.tensor(0)):  # before set_timesteps: t - 1
        assert torch.equal(ours.previous_timestep(t), ddpm.previous_timestep(t))
    for scheduler in (ddpm, ours):
        scheduler.set_timesteps(**({"num_inference_steps": 10} if timesteps is None else {"timesteps": timesteps}))
    for t in ours.timesteps:
        theirs, mine = ddpm.previous_timestep(t), ours.previous_timestep(t)
        assert isinstance(mine, torch.Tensor) and mine.dtype == theirs.dtype and mine.device == theirs.device
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
        assert ours.previous_timestep(int(t)) == int(theirs) and isinstance(ours.previous_timestep(int(t)), int)
    assert ours.previous_timestep(ours.timesteps[-1]).item() == -1


def noisy_trajectory(scheduler, x, timesteps, noises):
    """Steps `x` through `timesteps` with fixed noise; returns every intermediate sample."""
    samples = [x]
    for t in timesteps:
        model_output = 0.3 * x + 0.001 * float(t)
        x = scheduler.step(model_output, t, x, variance_noise=noises[int(t)]).prev_sample
        samples.append(x)
    return samples


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_img2img_begin_index_equals_the_full_trajectory_from_there(eta):
    scheduler = AnalyticDPMScheduler(gamma=torch.linspace(0.2, 0.95, 1000), eta=eta, clip_sample=False)
    scheduler.set_timesteps(10)
    noises = {int(t): torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(int(t)))
              for t in scheduler.timesteps}
    full = noisy_trajectory(scheduler, torch.randn(2, 1, 4, 4), scheduler.timesteps, noises)
    assert scheduler.step_index == 10
    for start in (3, 9):
        # as StableDiffusionImg2ImgPipeline: set_timesteps, set_begin_index(t_start * order), loop timesteps[t_start:]
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(start * scheduler.order)
        assert scheduler.begin_index == start and scheduler.step_index is None
        part = noisy_trajectory(scheduler, full[start], scheduler.timesteps[start:], noises)
        assert scheduler.step_index == 10
        torch.testing.assert_close(part[-1], full[-1], rtol=0, atol=0)
        # without set_begin_index (a hand-written loop): the same
        scheduler.set_timesteps(10)
        torch.testing.assert_close(noisy_trajectory(scheduler, full[start], scheduler.timesteps[start:], noises)[-1],
                                   full[-1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(10)


def test_stepping_out_of_order_or_with_copies_of_the_timesteps_is_still_correct():
    scheduler = AnalyticDPMScheduler(gamma=torch.linspace(0.2, 0.95, 1000), clip_sample=False)
    reference = AnalyticDPMScheduler.from_config(scheduler.config)
    for s in (scheduler, reference):
        s.set_timesteps(10)
    model_output, sample = random_model_output(0, (2, 1, 4, 4))
    noise = torch.randn_like(sample)
    order = [4, 0, 9, 5, 5, 1, 8]
    scheduler.set_begin_index(2)  # a begin index the loop does not follow
    for i in order:
        expected = reference.step(model_output, int(reference.timesteps[i]), sample, variance_noise=noise)
        for t in (scheduler.timesteps[i], scheduler.timesteps[i].clone(), int(scheduler.timesteps[i])):
            out = scheduler.step(model_output, t, sample, variance_noise=noise)
            torch.testing.assert_close(out.prev_sample, expected.prev_sample, rtol=0, atol=0)
            assert scheduler.step_index == i + 1


def test_switching_to_ddim_and_back_keeps_the_table_without_a_wall_of_log(tmp_path):
    table = torch.rand(1000, generator=torch.Generator().manual_seed(0)).double()
    analytic = AnalyticDPMScheduler.from_config(DDIMScheduler(**SD_CONFIG).config, gamma=table, eta=0.0)
    with DiffusersLog() as log:
        ddim = DDIMScheduler.from_config(analytic.config)
    assert 0 < len(log.text) < 600, log.text  # one line; the table shows as "<Gamma table: 1000 values ...>"
    assert "<Gamma table: 1000 values" in log.text
    assert ddim.config.set_alpha_to_one is False  # shared keys travel as before

    with DiffusersLog() as log:
        back = AnalyticDPMScheduler.from_config(ddim.config)
    assert len(log.text) < 600
    torch.testing.assert_close(back.gamma_table, table)
    assert back.config.eta == 0.0 and back.config.set_alpha_to_one is False

    # through a saved DDIM config too: diffusers keeps the keys DDIM does not take
    ddim.save_pretrained(tmp_path)
    assert len(json.loads((tmp_path / "scheduler_config.json").read_text())["gamma"]) == 1000
    torch.testing.assert_close(AnalyticDPMScheduler.from_pretrained(tmp_path).gamma_table, table)
    back.save_pretrained(tmp_path / "analytic")
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path / "analytic")
    with DiffusersLog() as log:  # every key of ours is in a config read from disk: still one short line
        DDIMScheduler.from_config(loaded.config)
    assert "check_finite" in log.text and len(log.text) < 600, log.text
    # a table given explicitly wins over the one the config carries
    other = AnalyticDPMScheduler.from_config(ddim.config, gamma=[0.5] * 1000)
    assert other.gamma_table.unique().tolist() == [0.5]
    assert AnalyticDPMScheduler.from_config(ddim.config, gamma=None, gamma_from_batch=True).gamma_table is None


# ------------------------------------------------------------------------------------------------ errors


def test_step_without_gamma_says_how_to_estimate():
    scheduler = AnalyticDPMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="estimate_gamma"):
        scheduler.step(torch.zeros(1, 1, 4, 4), scheduler.timesteps[0], torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("cls", [AnalyticDPMScheduler, SNDPMScheduler])
def test_step_refuses_a_sample_with_other_channels_than_the_tables(cls):
    scheduler = cls(gamma=[0.5] * 1000, gamma_sample_shape=[3, 8, 8])
    scheduler.set_timesteps(10)
    sample = torch.zeros(1, 4, 4, 4)
    output = torch.zeros(1, 8 if cls is SNDPMScheduler else 4, 4, 4)
    with pytest.raises(ValueError, match=r"pixels of shape \[3, 8, 8\].*4 channels.*estimate_pipeline_gamma"):
        scheduler.step(output, scheduler.timesteps[0], sample)
    with pytest.raises(ValueError, match="gamma_latent"):
        cls(gamma=[0.5] * 1000, gamma_latent="mode")


@pytest.mark.parametrize("gamma,match", [([0.5] * 999, "one value per training timestep"),
                                         ([0.5] * 999 + [float("nan")], "non-finite"),
                                         (["a"] * 1000, "list of floats")])
def test_bad_gamma_tables(gamma, match):
    with pytest.raises(ValueError, match=match):
        AnalyticDPMScheduler(gamma=gamma)


def test_too_many_inference_steps():
    with pytest.raises(ValueError, match="num_inference_steps <= 1000"):
        AnalyticDPMScheduler(gamma=[0.5] * 1000).set_timesteps(1001)


def test_non_finite_model_output_is_reported_at_the_last_step():
    """The check stays on the device during the loop and is read once, at the last step."""
    scheduler = AnalyticDPMScheduler(gamma=[0.5] * 1000)
    scheduler.set_timesteps(10)
    bad = torch.zeros(1, 1, 4, 4)
    bad[0, 0, 1, 1] = float("nan")
    x = torch.zeros(1, 1, 4, 4)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        scheduler.step(bad if i == 2 else torch.zeros_like(x), t, x)
    with pytest.raises(ValueError, match=r"timestep 700 \(step 3 of 10\) contains NaN or Inf"):
        scheduler.step(torch.zeros_like(x), scheduler.timesteps[-1], x)
    # reported once: the next loop starts clean
    for t in scheduler.timesteps:
        scheduler.step(torch.zeros_like(x), t, x)

    unchecked = AnalyticDPMScheduler(gamma=[0.5] * 1000, check_finite=False)
    unchecked.set_timesteps(10)
    for t in unchecked.timesteps:
        out = unchecked.step(bad, t, x)
    assert torch.isnan(out.prev_sample).any()


def test_wrong_channel_count_points_to_sn_scheduler():
    scheduler = AnalyticDPMScheduler(gamma=[0.5] * 1000)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="SNDPMScheduler"):
        scheduler.step(torch.zeros(1, 2, 4, 4), scheduler.timesteps[0], torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("clip_variance", [True, False])
def test_gamma_slightly_outside_unit_interval_gives_no_nan(clip_variance):
    gamma = torch.full((1000,), 1.02)
    gamma[::2] = -0.01
    scheduler = AnalyticDPMScheduler(gamma=gamma, clip_variance=clip_variance, clip_sample=False)
    scheduler.set_timesteps(50)
    x = torch.randn(4, 1, 4, 4)
    for t in scheduler.timesteps:
        out = scheduler.step(torch.randn_like(x), t, x)
        assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.variance).all()
        x = out.prev_sample


def test_last_step_sigma_clip_caps_only_the_step_onto_tau_1():
    scheduler = AnalyticDPMScheduler(gamma=[0.0] * 1000, last_step_sigma_clip=1.0, timestep_spacing="linspace")
    free = AnalyticDPMScheduler.from_config(scheduler.config, last_step_sigma_clip=None)
    for s in (scheduler, free):
        s.set_timesteps(10)
    x = torch.zeros(1, 1, 4, 4)
    variances = [scheduler.step(x, t, x).variance.item() for t in scheduler.timesteps]
    free_variances = [free.step(x, t, x).variance.item() for t in free.timesteps]
    cap = (2 / 255 * np.sqrt(np.pi / 2)) ** 2
    assert variances[-2] == pytest.approx(cap) and free_variances[-2] > cap
    assert variances[:-2] == free_variances[:-2] and variances[-1] == 0.0


# ------------------------------------------------------------------------------------------------ pipelines


def test_ddpm_and_ddim_pipelines(tiny_unet, tmp_path):
    scheduler = AnalyticDPMScheduler(gamma=[0.9] * 1000)
    pipe = DDPMPipeline(unet=tiny_unet, scheduler=scheduler)
    image = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (2, 8, 8, 1) and np.isfinite(image).all()

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][0].startswith("analytic_schedulers") and index["scheduler"][1] == "AnalyticDPMScheduler"
    reloaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.scheduler, AnalyticDPMScheduler)
    again = reloaded(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    np.testing.assert_allclose(again, image, atol=1e-5)

    ddim = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler())
    ddim.scheduler = AnalyticDPMScheduler.from_config(ddim.scheduler.config, gamma=[0.9] * 1000)
    out = ddim(batch_size=2, num_inference_steps=5, eta=0.0, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()
