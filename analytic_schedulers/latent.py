"""Gamma for latent and text-to-image pipelines (`LDMPipeline`, Stable Diffusion 1/2, img2img).

A latent pipeline runs the diffusion on `z_0 = scaling_factor * (E(x_0) - shift_factor)`, `E` its VAE's encoder
(`shift_factor` is `None`, read as 0, for Stable Diffusion), so its Gamma table is
`Gamma_t = E ||eps_theta(z_t, t, c)||^2 / d` with `d` the number of latent dimensions: the images are encoded once,
then `estimate_gamma` runs on the latents.

Under classifier-free guidance the pipeline steps with `eps_hat = eps_u + s (eps_c - eps_u)` (`eps_u` for the empty
prompt, `eps_c` for the prompt, `s` the guidance scale), and that is the prediction whose Gamma the scheduler needs.
For `v_prediction` models the guided `v` is converted to `eps`: the conversion `eps = sqrt(abar_t) v + sqrt(bbar_t) z_t`
is affine in `v` and the guidance weights `1 - s` and `s` sum to one, so converting the guided `v` equals guiding the
converted `eps` (see `docs/method.md`). A pipeline at `guidance_scale <= 1` does not guide: it uses `eps_c` alone,
which is `s = 1` here.

Without data: `AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma_from_batch=True)` estimates `Gamma_t` at
every step from the current batch's guided prediction (the mean of `eps_hat^2`), as the authors' Stable Diffusion code
does. It needs no table but a batch of several images (`num_images_per_prompt`), and the estimate is that of the
prompt being sampled rather than of the data distribution.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import images_from_batch, shard_images
from .gamma import estimate_gamma
from .pipeline_gamma import PipelineGammaEstimate
from .runtime import GeneratorLike, make_generator, model_device_dtype, model_output_tensor, seed_of, stream_seed
from .schedule import alphas_cumprod_float64

__all__ = ["GuidedPrediction", "encode_captions", "encode_images", "estimate_pipeline_gamma", "image_batches"]

LATENT_MODES = ("sample", "mean")
_ENCODE_STREAM = 1  # the encoder's noise stream, `stream_seed(seed, 1)`, apart from estimate_gamma's


# ---------------------------------------------------------------------------------------------------------------------
# Images -> latents
# ---------------------------------------------------------------------------------------------------------------------


def image_batches(data, num_samples: Optional[int], batch_size: int) -> Iterator[torch.Tensor]:
    """The first `num_samples` images of `data` (all when `None`) in batches of at most `batch_size`: a tensor, a
    map-style `Dataset`, or an iterable of batches (see `images_from_batch`)."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        data = images_from_batch(data)[:num_samples]
        yield from data.split(batch_size)
        return
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        count = len(data) if num_samples is None else min(num_samples, len(data))
        data = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(count)), batch_size=batch_size)
    seen = 0
    for batch in data:
        images = images_from_batch(batch)
        if num_samples is not None:
            images = images[: num_samples - seen]
        seen += images.shape[0]
        yield from images.split(batch_size)
        if num_samples is not None and seen >= num_samples:
            return


def encode_images(
    vae,
    data,
    latent: str = "sample",
    num_samples: Optional[int] = None,
    batch_size: int = 16,
    generator: GeneratorLike = None,
) -> Tuple[torch.Tensor, str]:
    """
    Encodes images as a latent pipeline's denoiser sees them: `scaling_factor * (latent - shift_factor)`, as the
    Stable Diffusion training scripts and `StableDiffusionImg2ImgPipeline` do (`shift_factor` `None` reads as 0).

    Args:
        vae (`AutoencoderKL`, `VQModel` or alike):
            Has `encode(images)` returning a `latent_dist` (a Gaussian posterior) or `latents` (a deterministic
            encoding, e.g. `VQModel`'s, before quantization, as `LDMPipeline` decodes it), and `config.scaling_factor`.
        data:
            Images in `[-1, 1]`: a tensor `[N, C, H, W]`, a map-style `Dataset` or an iterable of batches.
        latent (`str`, defaults to `"sample"`):
            For a Gaussian posterior: `"sample"` draws from it (what the models are trained on, and what img2img
            encodes), `"mean"` takes its mean. Deterministic encoders ignore it.
        num_samples (`int`, *optional*): encode only the first this many images.
        batch_size (`int`, defaults to 16): images per encoder call.
        generator (`int` or `torch.Generator`, *optional*): the seed of the `"sample"` draws.

    Returns:
        `(latents, encoding)`: float32 latents `[N, c, h, w]` on the CPU, and `"sample"`, `"mean"` or
        `"deterministic"`, what was done.
    """
    if latent not in LATENT_MODES:
        raise ValueError(f"`latent` must be one of {LATENT_MODES}, got {latent!r}.")
    scaling = getattr(getattr(vae, "config", None), "scaling_factor", None)
    if scaling is None:
        raise ValueError("The VAE has no `config.scaling_factor`: the pipeline could not decode its latents either. "
                         "Pass the pipeline's own `vae` (or `vqvae`).")
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    device, dtype = model_device_dtype(vae)
    if not isinstance(generator, torch.Generator):
        generator = make_generator(stream_seed(seed_of(generator), _ENCODE_STREAM), device)
    parts, encoding, low, high = [], "deterministic", math.inf, -math.inf
    with torch.no_grad():  # not inference mode: the results are ordinary tensors
        for images in image_batches(data, num_samples, batch_size):
            low, high = min(low, images.min().item()), max(high, images.max().item())
            z, encoding = _encode_batch(vae, images.to(device, dtype), latent, generator)
            parts.append(((z.float() - shift) * scaling).cpu())
    if not parts:
        raise ValueError("`data` is empty: Gamma needs images (in [-1, 1]).")
    if low < -1.001 or high > 1.001:
        warnings.warn(f"The images range over [{low:.3g}, {high:.3g}], but the VAE encodes images in [-1, 1]: map "
                      "[0, 255] with `x / 127.5 - 1` and [0, 1] with `x * 2 - 1`.", stacklevel=2)
    return torch.cat(parts), encoding


def _encode_batch(vae, images: torch.Tensor, latent: str, generator) -> Tuple[torch.Tensor, str]:
    output = vae.encode(images)
    posterior = getattr(output, "latent_dist", None)
    if posterior is not None:
        return (posterior.sample(generator) if latent == "sample" else posterior.mean), latent
    z = getattr(output, "latents", output)
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"`vae.encode` returned {type(output).__name__}; expected an output with `latent_dist` "
                        "(AutoencoderKL) or `latents` (VQModel).")
    return z, "deterministic"


# ---------------------------------------------------------------------------------------------------------------------
# The guided prediction
# ---------------------------------------------------------------------------------------------------------------------


class GuidedPrediction(torch.nn.Module):
    """
    The prediction a text-to-image pipeline steps with, `pred_u + s (pred_c - pred_u)`, as a model
    `model(x_t, t, encoder_hidden_states=None)` for `estimate_gamma`. Both branches run in one call of twice the
    batch, as in the pipelines; `s = 1` runs the conditional branch alone and `s = 0` the unconditional one.

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        guidance_scale (`float`): `s`.
        negative_embeds (`torch.Tensor`, `[1, L, D]`): the empty prompt's embedding (`pred_u`).
        prompt_embeds (`torch.Tensor`, `[1, L, D]`, *optional*): a fixed prompt's embedding, used when the call
            passes no `encoder_hidden_states` (per-image captions pass theirs).
    """

    def __init__(self, unet, guidance_scale: float, negative_embeds: torch.Tensor,
                 prompt_embeds: Optional[torch.Tensor] = None):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.guidance_scale = float(guidance_scale)
        self.register_buffer("negative_embeds", negative_embeds, persistent=False)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, s = sample.shape[0], self.guidance_scale
        uncond = self.negative_embeds.expand(n, -1, -1)
        if s == 0.0:
            return model_output_tensor(self.unet(sample, timestep, encoder_hidden_states=uncond.to(sample.dtype)))
        if encoder_hidden_states is None and self.prompt_embeds is None:
            raise ValueError("GuidedPrediction has no fixed prompt: pass `encoder_hidden_states` (one per sample).")
        cond = self.prompt_embeds.expand(n, -1, -1) if encoder_hidden_states is None else encoder_hidden_states
        if s == 1.0:
            return model_output_tensor(self.unet(sample, timestep, encoder_hidden_states=cond.to(sample.dtype)))
        embeds = torch.cat([uncond, cond.to(uncond.device)]).to(sample.dtype)
        output = model_output_tensor(self.unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                                               encoder_hidden_states=embeds))
        pred_u, pred_c = output.chunk(2)
        return pred_u + s * (pred_c - pred_u)


def encode_captions(pipe, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """The pipeline's own text embeddings of `captions` (`pipe.encode_prompt`, no guidance), `[N, L, D]`."""
    device = model_device_dtype(pipe.text_encoder)[0]
    with torch.no_grad():  # not inference mode: the results are ordinary tensors
        parts = [pipe.encode_prompt(list(captions[i:i + batch_size]), device, 1, False)[0]
                 for i in range(0, len(captions), batch_size)]
    return torch.cat(parts)


def _conditioning(pipe, unet, captions, prompt, guidance_scale) -> Optional[str]:
    """Checks the conditioning arguments; returns `None` (unconditional denoiser), `"empty"`, `"prompt"` or
    `"captions"`."""
    if getattr(unet.config, "cross_attention_dim", None) is None:  # an unconditional denoiser (LDM)
        if captions is not None or prompt is not None or guidance_scale is not None:
            raise ValueError("This model is unconditional: `captions`, `prompt` and `guidance_scale` apply to "
                             "text-conditional models (UNet2DConditionModel) only; leave them out.")
        return None
    if captions is not None and prompt is not None:
        raise ValueError("Pass either `captions` (one per image) or one `prompt`, not both.")
    if getattr(pipe, "encode_prompt", None) is None:
        raise ValueError("A text-conditional model needs its prompts encoded: pass the pipeline (its `encode_prompt` "
                         "and text encoder are used) instead of the bare model.")
    if captions is None and not prompt:
        return "empty"
    if guidance_scale is None:
        raise ValueError("Pass the `guidance_scale` you will sample with (Stable Diffusion's default is 7.5): Gamma "
                         "of the guided prediction depends on it.")
    return "prompt" if captions is None else "captions"


def _guided_model(pipe, unet, conditioning, captions, prompt, guidance_scale, count: int, limited: bool,
                  batch_size: int):
    """`(model, model_kwargs)` for `estimate_gamma`: the denoiser itself, or the guided prediction."""
    if conditioning is None:
        return unet, None
    negative = encode_captions(pipe, [""])
    if conditioning == "empty":  # the empty prompt's prediction, whatever the scale
        return GuidedPrediction(unet, 0.0, negative), None
    if conditioning == "prompt":
        return GuidedPrediction(unet, guidance_scale, negative, encode_captions(pipe, [prompt])), None
    embeds = encode_captions(pipe, _checked_captions(captions, count, limited), batch_size)
    return GuidedPrediction(unet, guidance_scale, negative), {"encoder_hidden_states": embeds}


def _checked_captions(captions, count: int, limited: bool) -> List[str]:
    """One caption per image; `limited`: `num_samples` cut the data, and captions of the images after it may follow."""
    if isinstance(captions, str):
        raise ValueError("`captions` must be a list with one caption per image; for one caption for all images pass "
                         "`prompt=` instead.")
    captions = list(captions)
    if len(captions) != count and not (limited and len(captions) > count):
        raise ValueError(f"Got {len(captions)} captions for {count} images: pass one caption per image, in the "
                         "images' order (with `num_samples`, the first `num_samples` captions are used).")
    return captions[:count]


# ---------------------------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------------------------


def estimate_pipeline_gamma(
    pipe,
    data,
    captions: Optional[Sequence[str]] = None,
    prompt: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    latent: str = "sample",
    num_samples: Optional[int] = None,
    generator: GeneratorLike = None,
    vae=None,
    scheduler=None,
    encode_batch_size: int = 16,
    **estimate_kwargs,
) -> PipelineGammaEstimate:
    """
    Estimates the Gamma table of a pipeline's denoiser on the inputs it sees when sampling: latents of the images
    (encoded once with the pipeline's VAE), and for text-to-image pipelines the guided prediction at `guidance_scale`.
    Use the result with `use_analytic_dpm(pipe, estimate)` or `estimate.to_scheduler(pipe.scheduler.config)`.

    Args:
        pipe (`DiffusionPipeline` or a model):
            `LDMPipeline` (its `vqvae`), `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` (its `vae`,
            `encode_prompt` and text encoder), a pixel pipeline (no VAE), or a bare denoiser with `scheduler=` (and
            `vae=` for a latent one; unconditional models only).
        data:
            Images in `[-1, 1]`: a tensor `[N, 3, H, W]`, a map-style `Dataset` or an iterable of batches.
        captions (`Sequence[str]`, *optional*):
            One caption per image, in order: Gamma of the prediction for each image's own caption. Every process
            holds all caption embeddings (`N x L x D` values, e.g. 1.2 GB in fp16 for 10,000 Stable Diffusion ones).
        prompt (`str`, *optional*):
            One prompt for every image instead. Neither (or `""`) estimates Gamma of the empty-prompt prediction,
            which does not depend on the guidance scale.
        guidance_scale (`float`, *optional*):
            `s` of `eps_u + s (eps_c - eps_u)`; required with captions or a prompt; use the scale you sample with
            (a pipeline at a scale <= 1 does not guide, which is `s = 1`).
        latent (`str`, defaults to `"sample"`):
            `"sample"` encodes each image as a draw from the VAE posterior (what the denoiser was trained on), `"mean"`
            as its mean; deterministic encoders (`VQModel`) ignore it.
        num_samples (`int`, *optional*): use the first this many images (M); all by default.
        generator (`int` or `torch.Generator`, *optional*): the seed of the encoding draws and of Gamma's noise.
        vae, scheduler (*optional*): override the pipeline's.
        encode_batch_size (`int`, defaults to 16): images (and captions) per encoder call.
        estimate_kwargs: passed to `estimate_gamma`: `batch_size` (inputs per call; guidance doubles the denoiser's
            batch), `timesteps`, `accelerator`, `device`, `dtype`, `progress`, `resume_from`, `callback`.

    Returns:
        `PipelineGammaEstimate`: the `GammaEstimate` and what it was estimated for (shape, schedule, encoding,
        conditioning, guidance scale, and for latents Theorem 2's bound `max_x0_variance` of their range).

    With no images at all, use `gamma_from_batch=True` instead (see this module's documentation).
    """
    unet, vae, scheduler = _components(pipe, vae, scheduler)
    conditioning = _conditioning(pipe, unet, captions, prompt, guidance_scale)
    scale = None if conditioning in (None, "empty") else float(guidance_scale)
    seed = seed_of(generator)
    # 1. the images as the denoiser sees them: latents, or the pixels themselves
    if vae is None:
        x0, encoding = shard_images(data, num_samples, batch_size=encode_batch_size)[0], None  # float32, CPU
    else:
        x0, encoding = encode_images(vae, data, latent, num_samples, encode_batch_size, seed)
    # 2. the prediction the pipeline steps with
    limited = num_samples is not None and x0.shape[0] == num_samples
    model, model_kwargs = _guided_model(pipe, unet, conditioning, captions, prompt, scale, x0.shape[0], limited,
                                        encode_batch_size)
    # 3. Gamma of that prediction on those inputs
    estimate = _estimate(model, x0, scheduler, model_kwargs, seed, estimate_kwargs, latent_space=vae is not None)
    bound = ((x0.max() - x0.min()).item() / 2) ** 2 if vae is not None else None
    return PipelineGammaEstimate(estimate, tuple(x0.shape[1:]), alphas_cumprod_float64(scheduler), encoding,
                                 conditioning, scale, bound)


def _components(pipe, vae, scheduler):
    """`(denoiser, encoder or None, scheduler)` of a pipeline or a bare model."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        if scheduler is None:
            raise ValueError("Pass the model's `scheduler` (its noise schedule), or the whole pipeline.")
        return pipe, vae, scheduler
    if vae is None:
        vae = getattr(pipe, "vae", None)
        vae = getattr(pipe, "vqvae", None) if vae is None else vae
    return unet, vae, pipe.scheduler if scheduler is None else scheduler


def _estimate(model, x0, scheduler, model_kwargs, seed: int, estimate_kwargs: Dict, latent_space: bool):
    reserved = sorted({"num_samples", "generator", "return_stderr", "model_kwargs"} & set(estimate_kwargs))
    if reserved:
        raise TypeError(f"estimate_pipeline_gamma sets {reserved} itself; pass `num_samples`/`generator` as its own "
                        "arguments.")
    # latents are not in [-1, 1]; the pixels were checked when encoding
    return estimate_gamma(model, x0, scheduler, generator=seed, model_kwargs=model_kwargs,
                          check_range=not latent_space, **estimate_kwargs)
