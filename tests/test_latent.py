"""Analytic-DPM in latent and text-to-image pipelines: latent and guided Gamma against oracles, the checks that keep a
table with its pipeline, and sampling in LDM, Stable Diffusion (epsilon and v), img2img and the data-free route."""

import dataclasses
import functools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.utils.data import DataLoader, TensorDataset

from analytic_schedulers import AnalyticDPMScheduler, SNDPMScheduler, estimate_gamma
from analytic_schedulers.latent import encode_images, estimate_pipeline_gamma
from analytic_schedulers.pipeline_gamma import PipelineGammaEstimate, use_analytic_dpm
from analytic_schedulers.reverse_step import eps_and_x0_from_model_output
from helpers import DiffusersLog
from tiny_pipelines import (SCALED_LINEAR, tiny_images, tiny_ldm, tiny_stable_diffusion, tiny_unet, tiny_vae,
                            tiny_vq_model)

TIMESTEPS = [0, 300, 600, 999]
FAST = dict(timesteps=TIMESTEPS, progress=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def sd_v(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("tokenizer"), prediction_type="v_prediction")


@pytest.fixture(scope="module")
def img2img(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("tokenizer"), img2img=True)


@pytest.fixture(scope="module")
def ldm():
    return tiny_ldm()


class IdentityEncoder(torch.nn.Module):
    """A VAE stand-in whose latents are the images themselves (scaling factor 1, no shift)."""

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)

    def encode(self, images):
        return SimpleNamespace(latents=images)


def trajectory(pipe, steps):
    scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


# ------------------------------------------------------------------------------------------------ encoding


def test_latent_gamma_with_an_identity_encoder_equals_pixel_gamma():
    unet, images, scheduler = tiny_unet(in_channels=3, sample_size=8), tiny_images(6), DDPMScheduler()
    latent = estimate_pipeline_gamma(unet, images, vae=IdentityEncoder(), scheduler=scheduler, generator=3, **FAST)
    pixel = estimate_gamma(unet, images, scheduler, generator=3, **FAST)
    torch.testing.assert_close(latent.gamma, pixel.gamma, rtol=1e-12, atol=0, equal_nan=True)
    assert latent.latent == "deterministic" and latent.sample_shape == (3, 8, 8)


def test_latents_are_encoded_as_img2img_encodes_them():
    vae, images = tiny_vae(scaling_factor=0.5), tiny_images(3)
    latents, encoding = encode_images(vae, images, generator=torch.Generator().manual_seed(5))
    expected = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(5)) * 0.5
    torch.testing.assert_close(latents, expected)
    assert encoding == "sample"
    mean, encoding = encode_images(vae, images, latent="mean")
    assert encoding == "mean" and not torch.allclose(mean, latents)
    seeded = [encode_images(vae, images, generator=seed)[0] for seed in (7, 7, 8)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.allclose(seeded[0], seeded[2])


def test_images_are_read_alike_from_tensors_datasets_and_loaders():
    vae, images = tiny_vae(), tiny_images(5)
    sources = [images, TensorDataset(images), DataLoader(TensorDataset(images), batch_size=2),
               [{"pixel_values": images[:3]}, {"pixel_values": images[3:]}]]
    expected, _ = encode_images(vae, images[:4], latent="mean")
    for source in sources:
        latents, _ = encode_images(vae, source, latent="mean", num_samples=4, batch_size=3)
        torch.testing.assert_close(latents, expected)


def test_latents_subtract_the_shift_factor_before_scaling():
    vae, images = tiny_vae(scaling_factor=0.5, shift_factor=0.25), tiny_images(3)
    latents, _ = encode_images(vae, images, latent="mean")
    torch.testing.assert_close(latents, (vae.encode(images).latent_dist.mean - 0.25) * 0.5)


def test_vq_latents_decode_as_ldm_pipeline_decodes_them():
    vq, images = tiny_vq_model(scaling_factor=0.5), tiny_images(3)
    latents, encoding = encode_images(vq, images)
    with torch.no_grad():  # LDMPipeline decodes `latents / scaling_factor`
        torch.testing.assert_close(vq.decode(latents / 0.5).sample, vq.decode(vq.encode(images).latents).sample)
    assert encoding == "deterministic"


# ------------------------------------------------------------------------------------------------ guided Gamma


def branch_eps(pipe, scheduler, x, t, embeds):
    """The unet's prediction for `embeds`, converted to eps per sample (an oracle independent of the package's)."""
    output = pipe.unet(x, t, encoder_hidden_states=embeds.expand(x.shape[0], -1, -1)).sample
    abar = scheduler.alphas_cumprod.double()
    return torch.stack([eps_and_x0_from_model_output(o[None], xi[None], abar[ti].item(),
                                                     scheduler.config.prediction_type)[0][0]
                        for o, xi, ti in zip(output, x, t)])


def oracle_gamma(pipe, images, scale, seed=4):
    """Gamma of `eps_u + s (eps_c - eps_u)` from two separate unet calls per input, each converted to eps first."""
    latents, _ = encode_images(pipe.vae, images, generator=seed)
    cond, uncond = pipe.encode_prompt("cat", "cpu", 1, True)
    scheduler = pipe.scheduler

    def guided_eps(x, t):
        eps_u, eps_c = branch_eps(pipe, scheduler, x, t, uncond), branch_eps(pipe, scheduler, x, t, cond)
        return {0.0: eps_u, 1.0: eps_c}.get(scale, eps_u + scale * (eps_c - eps_u))

    as_eps = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    return latent_gamma(guided_eps, latents, as_eps, seed)


def latent_gamma(model, latents, scheduler, seed):
    """`estimate_gamma` on latents, without its warning that they are not pixels in [-1, 1]."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The images range over")
        return estimate_gamma(model, latents, scheduler, generator=seed, **FAST).gamma


@pytest.mark.parametrize("scale, meaning", [(1.0, "conditional"), (0.0, "unconditional")])
def test_guidance_scale_1_and_0_give_the_conditional_and_unconditional_gamma(sd, scale, meaning):
    images = tiny_images(4)
    guided = estimate_pipeline_gamma(sd, images, prompt="cat", guidance_scale=scale, generator=4, **FAST)
    torch.testing.assert_close(guided.gamma, oracle_gamma(sd, images, scale), equal_nan=True)
    assert guided.guidance_scale == scale and guided.conditioning == "prompt"


@pytest.mark.parametrize("pipe_name", ["sd", "sd_v"])
def test_guided_gamma_is_gamma_of_the_guided_eps(pipe_name, request):
    """For v-prediction the package converts the guided v; the oracle guides the converted eps: the same."""
    pipe, images = request.getfixturevalue(pipe_name), tiny_images(4)
    guided = estimate_pipeline_gamma(pipe, images, prompt="cat", guidance_scale=3.0, generator=4, **FAST)
    torch.testing.assert_close(guided.gamma, oracle_gamma(pipe, images, 3.0), equal_nan=True, rtol=1e-5, atol=1e-6)
    unguided = estimate_pipeline_gamma(pipe, images, prompt="cat", guidance_scale=1.0, generator=4, **FAST)
    assert not torch.allclose(guided.gamma[TIMESTEPS], unguided.gamma[TIMESTEPS])


def test_captions_equal_to_the_prompt_give_the_prompts_gamma(sd):
    images = tiny_images(4)
    prompt = estimate_pipeline_gamma(sd, images, prompt="cat", guidance_scale=3.0, generator=4, **FAST)
    same = estimate_pipeline_gamma(sd, images, captions=["cat"] * 4, guidance_scale=3.0, generator=4, **FAST)
    mixed = estimate_pipeline_gamma(sd, images, captions=["cat", "dog", "a", "b"], guidance_scale=3.0, generator=4,
                                    **FAST)
    torch.testing.assert_close(same.gamma, prompt.gamma, equal_nan=True, rtol=1e-5, atol=1e-7)
    assert same.conditioning == "captions"
    assert not torch.allclose(mixed.gamma[TIMESTEPS], prompt.gamma[TIMESTEPS])


def test_empty_prompt_gives_the_unconditional_gamma_with_no_scale_recorded(sd):
    images = tiny_images(4)
    empty = estimate_pipeline_gamma(sd, images, generator=4, **FAST)
    torch.testing.assert_close(empty.gamma, oracle_gamma_empty(sd, images), equal_nan=True)
    assert empty.conditioning == "empty" and empty.guidance_scale is None


def oracle_gamma_empty(pipe, images, seed=4):
    latents, _ = encode_images(pipe.vae, images, generator=seed)
    empty = pipe.encode_prompt("", "cpu", 1, False)[0]
    model = lambda x, t: pipe.unet(x, t, encoder_hidden_states=empty.expand(x.shape[0], -1, -1))  # noqa: E731
    return latent_gamma(model, latents, pipe.scheduler, seed)


# ------------------------------------------------------------------------------------------------ clear errors


@pytest.mark.parametrize("captions", [["cat"] * 3, ["cat"] * 5, "cat"])
def test_captions_must_be_one_per_image(sd, captions):
    with pytest.raises(ValueError, match="caption"):
        estimate_pipeline_gamma(sd, tiny_images(4), captions=captions, guidance_scale=3.0, **FAST)


def test_captions_beyond_the_images_are_refused_unless_num_samples_cuts_the_data(sd):
    with pytest.raises(ValueError, match="4 captions for 2 images"):
        estimate_pipeline_gamma(sd, tiny_images(2), captions=["cat"] * 4, guidance_scale=3.0, **FAST)
    used = estimate_pipeline_gamma(sd, tiny_images(4), captions=["cat"] * 6, num_samples=2, guidance_scale=3.0,
                                   **FAST)
    assert used.estimate.num_samples == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="cat"), "guidance_scale"),
    (dict(prompt="cat", captions=["cat"] * 4, guidance_scale=2.0), "not both"),
])
def test_text_conditioning_arguments_are_checked(sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_pipeline_gamma(sd, tiny_images(4), **kwargs, **FAST)


def test_unconditional_and_bare_models_refuse_prompts(sd, ldm):
    with pytest.raises(ValueError, match="unconditional"):
        estimate_pipeline_gamma(ldm, tiny_images(4), prompt="cat", guidance_scale=2.0, **FAST)
    with pytest.raises(ValueError, match="pass the pipeline"):
        estimate_pipeline_gamma(sd.unet, tiny_images(4), vae=sd.vae, scheduler=sd.scheduler, prompt="cat",
                                guidance_scale=2.0, **FAST)


def test_pixel_table_on_a_latent_pipeline_is_refused_naming_the_fix(ldm):
    pixel = estimate_pipeline_gamma(tiny_unet(in_channels=3, sample_size=8), tiny_images(4),
                                    scheduler=DDIMScheduler(**SCALED_LINEAR), generator=0, **FAST)
    with pytest.raises(ValueError, match=r"pixel space.*latents.*estimate_pipeline_gamma\(pipe, images"):
        use_analytic_dpm(ldm, pixel, fill="interpolate")


def test_table_of_another_noise_schedule_is_refused(ldm):
    table = estimate_pipeline_gamma(ldm, tiny_images(4), generator=0, **FAST)
    with pytest.raises(ValueError, match="another noise schedule"):
        table.to_scheduler(DDIMScheduler().config, fill="interpolate")  # linear betas, not scaled_linear


# ------------------------------------------------------------------------------------------------ the table's record


def test_scheduler_config_records_what_the_table_was_estimated_for(sd, tmp_path):
    table = estimate_pipeline_gamma(sd, tiny_images(4), prompt="cat", guidance_scale=3.0, generator=0, **FAST)
    latents, _ = encode_images(sd.vae, tiny_images(4), generator=0)
    scheduler = table.to_scheduler(sd.scheduler.config, fill="interpolate")
    scheduler.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    for config in (scheduler.config, loaded.config):
        assert config.gamma_guidance_scale == 3.0 and config.gamma_conditioning == "prompt"
        assert list(config.gamma_sample_shape) == [4, 4, 4] and config.gamma_latent == "sample"
        assert config.clip_sample is False
        assert config.max_x0_variance == pytest.approx(((latents.max() - latents.min()).item() / 2) ** 2)
    torch.testing.assert_close(loaded.gamma_table, table.filled("interpolate"))


def test_the_record_is_ordinary_config_keys_of_both_schedulers(sd, tmp_path):
    table = estimate_pipeline_gamma(sd, tiny_images(4), prompt="cat", guidance_scale=3.0, generator=0, **FAST)
    table.to_scheduler(sd.scheduler.config, fill="interpolate").save_pretrained(tmp_path)
    with DiffusersLog() as log:
        loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
        back = AnalyticDPMScheduler.from_config(SNDPMScheduler.from_config(loaded.config).config)
    assert "gamma_guidance_scale" not in log.text and "gamma_sample_shape" not in log.text, log.text
    assert back.config.gamma_guidance_scale == 3.0 and back.config.gamma_sample_shape == [4, 4, 4]
    assert back.config.gamma_conditioning == "prompt" and back.config.gamma_latent == "sample"


def test_a_saved_table_goes_into_its_pipeline_with_the_same_checks(sd, ldm, tmp_path):
    table = estimate_pipeline_gamma(sd, tiny_images(4), prompt="cat", guidance_scale=3.0, generator=0, **FAST)
    table.to_scheduler(sd.scheduler.config, fill="interpolate", max_x0_variance=2.5).save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    scheduler = use_analytic_dpm(sd, loaded, eta=0.0)
    assert sd.scheduler is scheduler and scheduler.config.max_x0_variance == 2.5 and scheduler.config.eta == 0.0
    assert scheduler.config.gamma_guidance_scale == 3.0
    torch.testing.assert_close(scheduler.gamma_table, loaded.gamma_table)
    with pytest.warns(UserWarning, match="estimated for guidance scale 3"):
        sd("cat", num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    with pytest.raises(ValueError, match="latent space.*3 channels"):
        use_analytic_dpm(ldm, loaded)  # 4-channel latents of another model


def test_sampling_at_another_guidance_scale_warns_once_per_scale(tmp_path):
    pipe = tiny_stable_diffusion(tmp_path)
    table = estimate_pipeline_gamma(pipe, tiny_images(4), prompt="cat", guidance_scale=3.0,
                                    timesteps=trajectory(pipe, 2), progress=False)
    use_analytic_dpm(pipe, table, fill="interpolate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (3.0, 5.0, 5.0, 1.0, 0.0):
            pipe("cat", num_inference_steps=2, guidance_scale=scale, output_type="latent")
    messages = [str(w.message) for w in caught if "estimated for guidance scale" in str(w.message)]
    assert len(messages) == 2  # 5 once; 1 and 0 are the same unguided scale 1
    assert "samples at 5" in messages[0] and "conditional prediction alone" in messages[1]


def test_pipelines_sharing_a_unet_check_their_own_tables(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    text2img = tiny_stable_diffusion(tmp_path)
    img2img = StableDiffusionImg2ImgPipeline(**text2img.components)
    table = estimate_pipeline_gamma(text2img, tiny_images(4), prompt="cat", guidance_scale=3.0,
                                    timesteps=trajectory(text2img, 2), progress=False)
    use_analytic_dpm(text2img, table, fill="interpolate")
    use_analytic_dpm(img2img, dataclasses.replace(table, guidance_scale=5.0), fill="interpolate")
    calls = [(text2img, 3.0), (img2img, 5.0), (img2img, 3.0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pipe, scale in calls:
            extra = {"image": (tiny_images(1) + 1) / 2} if pipe is img2img else {}
            pipe("cat", num_inference_steps=2, guidance_scale=scale, output_type="latent", **extra)
    messages = [str(w.message) for w in caught if "estimated for guidance scale" in str(w.message)]
    assert len(messages) == 1 and "scale 5, but the pipeline samples at 3" in messages[0]


# ------------------------------------------------------------------------------------------------ sampling


def finite_and_eta_dependent(run):
    """Runs `run(eta)` at eta 0 and 1 from the same seed; the samples must be finite and differ (eta is used)."""
    samples = [torch.as_tensor(run(eta)) for eta in (0.0, 1.0)]
    assert all(torch.isfinite(s).all() for s in samples)
    assert not torch.allclose(samples[0], samples[1])


def test_ldm_pipeline_samples_at_eta_0_and_1(ldm):
    steps = 3
    table = estimate_pipeline_gamma(ldm, tiny_images(4), timesteps=trajectory(ldm, steps), progress=False)
    use_analytic_dpm(ldm, table, fill="interpolate")
    finite_and_eta_dependent(lambda eta: ldm(num_inference_steps=steps, eta=eta, output_type="np",
                                             generator=torch.Generator().manual_seed(0)).images)


@pytest.mark.parametrize("pipe_name", ["sd", "sd_v"])
def test_stable_diffusion_samples_at_eta_0_and_1(pipe_name, request):
    pipe, steps = request.getfixturevalue(pipe_name), 3
    table = estimate_pipeline_gamma(pipe, tiny_images(4), prompt="cat", guidance_scale=3.0,
                                    timesteps=trajectory(pipe, steps), progress=False)
    use_analytic_dpm(pipe, table, fill="interpolate")
    finite_and_eta_dependent(lambda eta: pipe("cat", num_inference_steps=steps, guidance_scale=3.0, eta=eta,
                                              output_type="latent", generator=torch.Generator().manual_seed(0)).images)


def unet_inputs(pipe, **call):
    """The (timestep, first latent input) of every unet call of one pipeline call."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((int(args[1]), args[0].clone())))
    try:
        out = pipe(**call).images
    finally:
        handle.remove()
    return seen, out


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_img2img_starts_where_ddim_starts(img2img, strength):
    """Begin index and `add_noise`: the same timesteps and the same first noised latents as DDIMScheduler."""
    steps = 10
    call = dict(prompt="cat", image=(tiny_images(1) + 1) / 2, strength=strength, num_inference_steps=steps,
                guidance_scale=3.0, output_type="latent")
    ddim = DDIMScheduler.from_config(img2img.scheduler.config)
    img2img.scheduler = ddim
    expected, _ = unet_inputs(img2img, generator=torch.Generator().manual_seed(0), **call)
    table = estimate_pipeline_gamma(img2img, tiny_images(4), prompt="cat", guidance_scale=3.0,
                                    timesteps=trajectory(img2img, steps), progress=False)
    use_analytic_dpm(img2img, table, fill="interpolate")
    for eta in (0.0, 1.0):
        seen, out = unet_inputs(img2img, generator=torch.Generator().manual_seed(0), eta=eta, **call)
        assert [t for t, _ in seen] == [t for t, _ in expected] and len(seen) == int(steps * strength)
        torch.testing.assert_close(seen[0][1], expected[0][1])
        assert torch.isfinite(out).all()
    img2img.scheduler = ddim


def test_gamma_from_batch_samples_stable_diffusion_without_data(sd):
    sd.scheduler = AnalyticDPMScheduler.from_config(sd.scheduler.config, gamma_from_batch=True)
    variances, step = [], sd.scheduler.step

    @functools.wraps(step)  # keeps the signature, from which the pipeline decides to pass `eta`
    def recording_step(*args, **kwargs):
        output = step(*args, **kwargs)
        variances.append(output[2])
        return output

    sd.scheduler.step = recording_step
    latents = sd("cat", num_images_per_prompt=4, num_inference_steps=3, guidance_scale=3.0, eta=1.0,
                 output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (4, 4, 4, 4) and torch.isfinite(latents).all()
    assert len(variances) == 3 and all(math.isfinite(float(v)) and float(v) >= 0 for v in variances)


def test_pipeline_gamma_estimate_passes_as_gamma_with_its_record_and_schedule_check(ldm):
    table = estimate_pipeline_gamma(ldm, tiny_images(4), progress=False, timesteps=list(range(1000)), batch_size=512)
    assert isinstance(table, PipelineGammaEstimate) and table.is_complete
    scheduler = AnalyticDPMScheduler.from_config(ldm.scheduler.config, gamma=table)
    torch.testing.assert_close(scheduler.gamma_table, table.gamma)
    assert scheduler.config.gamma_latent == "deterministic" and scheduler.config.gamma_sample_shape == [3, 4, 4]
    with pytest.raises(ValueError, match="another noise schedule"):
        AnalyticDPMScheduler.from_config(DDIMScheduler().config, gamma=table)  # linear betas, not scaled_linear
