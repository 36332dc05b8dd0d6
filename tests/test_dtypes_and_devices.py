"""Half-precision models and generators on the sample's device: the math runs in float32, outputs keep the sample's
dtype, and a seed gives the same images as float32 within the half type's precision. On a CUDA device the same loop
runs with `torch.Generator("cuda")`, and its steps make no synchronising call."""

import contextlib
import copy

import pytest
import torch
from diffusers import DDPMScheduler

from analytic_schedulers import AnalyticDPMScheduler, SNDPMScheduler, estimate_gamma
from analytic_schedulers.likelihood import nll_bits_per_dim
from analytic_schedulers.noise_square_head import NoiseSquareHeadModel
from analytic_schedulers.sampling import build_sampler, sample_images

HALF = [torch.bfloat16, torch.float16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def with_head(unet, kind):
    """The scheduler of `kind` and the model it drives (`[eps, h]` for SN/NPR)."""
    if kind == "analytic":
        return AnalyticDPMScheduler(gamma=[0.9] * 1000), unet
    return SNDPMScheduler(covariance_type=kind), NoiseSquareHeadModel.from_unet(copy.deepcopy(unet), kind)


def half(model, dtype):
    return copy.deepcopy(model).to(dtype)


@torch.no_grad()
def loop(scheduler, model, dtype, device="cpu", seed=0, num_steps=10, around_step=contextlib.nullcontext):
    """A sampling loop with the sample in `dtype`; checks that every step keeps it."""
    scheduler.set_timesteps(num_steps, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((4, 1, 8, 8), generator=generator, device=device).to(dtype)
    for t in scheduler.timesteps:
        output = model(x, t).sample
        with around_step():
            out = scheduler.step(output, t, x, generator=generator)
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype
        x = out.prev_sample
    return x


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["analytic", "sn", "npr"])
def test_half_precision_model_keeps_the_sample_dtype_and_matches_float32(tiny_unet, kind, dtype):
    scheduler, model = with_head(tiny_unet, kind)
    reference = loop(scheduler, model, torch.float32)
    images = loop(scheduler, half(model, dtype), dtype)
    error = (images.float() - reference).abs()
    eps = torch.finfo(dtype).eps  # bf16: 2^-7, fp16: 2^-10
    assert error.max() <= 8 * eps and error.mean() <= eps, (error.max().item(), error.mean().item())


def test_half_precision_model_with_a_float32_sample_returns_float32(tiny_unet):
    """As `sample_images` runs it: the sample stays float32, only the model input is cast."""
    sampler = build_sampler("analytic-ddpm", DDPMScheduler().config, gamma=[0.9] * 1000)
    reference = sample_images(tiny_unet, sampler, 10, torch.Generator().manual_seed(0), batch_size=2)
    images = sample_images(half(tiny_unet, torch.bfloat16), sampler, 10, torch.Generator().manual_seed(0),
                           batch_size=2)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, reference, atol=8 * 2**-7, rtol=0)


def test_generator_on_the_sample_device_reproduces_the_images(tiny_unet):
    scheduler, model = with_head(tiny_unet, "analytic")
    device = next(model.parameters()).device
    first = loop(scheduler, model, torch.float32, device=device, seed=3)
    torch.testing.assert_close(loop(scheduler, model, torch.float32, device=device, seed=3), first, rtol=0, atol=0)
    assert not torch.equal(loop(scheduler, model, torch.float32, device=device, seed=4), first)


def test_bf16_model_gives_the_float32_gamma_and_nll(tiny_unet):
    data = torch.round((torch.linspace(-1, 1, 8 * 64).reshape(8, 1, 8, 8) + 1) * 127.5) / 127.5 - 1
    bf16 = half(tiny_unet, torch.bfloat16)
    gamma = [estimate_gamma(m, data, DDPMScheduler(), timesteps=[10, 500, 990], generator=0, progress=False).gamma
             for m in (tiny_unet, bf16)]
    estimated = ~torch.isnan(gamma[0])
    torch.testing.assert_close(gamma[1][estimated], gamma[0][estimated], rtol=0.02, atol=0)
    scheduler = AnalyticDPMScheduler(gamma=[0.9] * 1000)
    scheduler.set_timesteps(4)
    nll = [nll_bits_per_dim(m, scheduler, data, generator=0) for m in (tiny_unet, bf16)]
    assert nll[1].dtype == torch.float64
    torch.testing.assert_close(nll[1], nll[0], rtol=0.01, atol=0)


@contextlib.contextmanager
def synchronising_is_an_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
@pytest.mark.parametrize("kind", ["analytic", "sn"])
def test_cuda_steps_with_a_device_generator_never_synchronise(tiny_unet, kind):
    scheduler, model = with_head(tiny_unet, kind)
    scheduler = type(scheduler).from_config(scheduler.config, check_finite=False)
    model = half(model, torch.float16).to("cuda")
    images = loop(scheduler, model, torch.float16, device="cuda", around_step=synchronising_is_an_error)
    assert images.dtype == torch.float16 and images.device.type == "cuda"
