"""`AnalyticDPMScheduler`: DDPM/DDIM sampling with the analytic optimal reverse variance.

Bao, Li, Zhu, Zhang, "Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance in Diffusion Probabilistic
Models", ICLR 2022. The mean of each step is DDPM's (eta = 1) or DDIM's (eta < 1); only the variance changes.
"""

from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from . import reverse_step as rs
from .scheduling_base import GAMMA_HELP, ReverseStepOutput, ReverseVarianceSchedulerMixin

AnalyticDPMSchedulerOutput = ReverseStepOutput


class AnalyticDPMScheduler(ReverseVarianceSchedulerMixin, SchedulerMixin, ConfigMixin):
    """
    Analytic-DPM: the reverse step of DDPM (`eta=1`, Analytic-DDPM) or DDIM (`eta=0`, Analytic-DDIM) with the
    optimal variance `sigma^2 = lambda^2 + gamma_{t,s}^2 * bbar_t / abar_t * (1 - Gamma_t)`, where
    `Gamma_t = E||eps_theta(x_t, t)||^2 / d` is a table estimated once per model.

    Swap it into any pipeline that drives a noise-prediction model:
    `pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=table)`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): the number of training timesteps T.
        beta_start (`float`, defaults to 0.0001): the first beta.
        beta_end (`float`, defaults to 0.02): the last beta.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`,
            `"sigmoid"` or `"laplace"`, as in diffusers.
        trained_betas (`List[float]`, *optional*): the betas, overriding the three arguments above.
        prediction_type (`str`, defaults to `"epsilon"`): what the model predicts: `"epsilon"`, `"v_prediction"` or
            `"sample"`. Everything is converted to `eps_hat` and `x0_hat` first.
        clip_sample (`bool`, defaults to `True`): clip `x0_hat` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample_range (`float`, defaults to 1.0): the clip range of `x0_hat`.
        thresholding (`bool`, defaults to `False`): dynamic thresholding of `x0_hat` instead of clipping.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of dynamic thresholding.
        sample_max_value (`float`, defaults to 1.0): the largest threshold of dynamic thresholding.
        timestep_spacing (`str`, defaults to `"leading"`): `"linspace"`, `"leading"` or `"trailing"`, as in
            diffusers, or `"optimal"`: the K-step trajectory that minimises the negative ELBO, by dynamic
            programming over the Gamma table (needs `gamma`; best for likelihood, the even spacings for FID).
        steps_offset (`int`, defaults to 0): offset added to `"leading"` timesteps.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale the betas to zero terminal SNR.
        eta (`float`, defaults to 1.0): the forward family, `lambda^2 = eta^2 * tilde_beta`. 1.0 is Analytic-DDPM,
            0.0 Analytic-DDIM; a pipeline's `eta` argument overrides it per call.
        gamma (`List[float]`, *optional*): `Gamma_t` for `t = 0 .. T-1` (a list, numpy array or tensor). Stored in
            `scheduler_config.json`, so it travels with `save_pretrained`, `from_pretrained` and `push_to_hub`.
            A scheduler made from this config (`DDIMScheduler.from_config(config)`) keeps it too, so that
            `AnalyticDPMScheduler.from_config(ddim.config)` gets it back; an explicit `gamma=` wins.
        gamma_from_batch (`bool`, defaults to `False`): without a table, estimate `Gamma_t` from the current batch
            as the mean of `eps_hat^2` (the authors' data-free fallback; needs a batch of many samples). It stays a
            tensor on the model's device.
        clip_variance (`bool`, defaults to `True`): clip `v` to `[0, max_x0_variance]` (Theorem 2).
        max_x0_variance (`float`, defaults to 1.0): the upper bound `((b - a) / 2)^2` of `v` for data in `[a, b]`.
        last_step_sigma_clip (`float`, *optional*): `y` of the clip `sigma <= y * 2/255 * sqrt(pi/2)` on the step
            that lands on the last timestep (the papers use 2 for CIFAR10 and CelebA, 1 elsewhere, for FID).
            `None` switches it off.
        set_alpha_to_one (`bool`, defaults to `True`): as in `DDIMScheduler`: after `tau_1` the step lands on the
            clean sample (`abar = 1`) and returns `x0_hat`; with `False` (every Stable Diffusion DDIM config) it
            lands on `abar = alphas_cumprod[0]`, for every `eta`. `DDPMScheduler` has no such key and always ends at
            1.
        check_finite (`bool`, defaults to `True`): raise a clear error when the model output holds NaN or Inf. The
            check is kept on the device and read once, at the last step (one synchronisation per sampling loop,
            where a pipeline waits for the result anyway); `False` skips it and the sampling loop never reads the
            accelerator.
        gamma_guidance_scale (`float`, *optional*): what the table was estimated for (written by
            `PipelineGammaEstimate.to_scheduler` and `analytic-schedulers estimate-gamma`): the guidance scale `s`
            of the prediction `eps_u + s (eps_c - eps_u)` whose Gamma it is; `None` when the table does not depend
            on one. `use_analytic_dpm` warns when the pipeline samples at another scale.
        gamma_conditioning (`str`, *optional*): what that prediction was conditioned on: `"captions"` (one per
            image), `"prompt"` (one for all), `"empty"` (the empty prompt), or `None` (an unconditional model, or
            not recorded).
        gamma_sample_shape (`List[int]`, *optional*): the shape `[C, H, W]` of the denoiser inputs the table was
            estimated on (latents or pixels); the step refuses samples with another channel count (a check of host
            metadata, free).
        gamma_latent (`str`, *optional*): how images were encoded for a latent table, `"sample"`, `"mean"` or
            `"deterministic"`; `None` for pixels (or not recorded, when `gamma_sample_shape` is `None` too).
    """

    __module__ = "analytic_schedulers"  # the stable name pipelines record (see the package docstring)

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        eta: float = 1.0,
        gamma: Optional[Union[List[float], np.ndarray, torch.Tensor]] = None,
        gamma_from_batch: bool = False,
        clip_variance: bool = True,
        max_x0_variance: float = 1.0,
        last_step_sigma_clip: Optional[float] = None,
        set_alpha_to_one: bool = True,
        check_finite: bool = True,
        gamma_guidance_scale: Optional[float] = None,
        gamma_conditioning: Optional[str] = None,
        gamma_sample_shape: Optional[List[int]] = None,
        gamma_latent: Optional[str] = None,
    ):
        self._init_schedule(gamma)

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        if model_output.shape != sample.shape:
            hint = ""
            if model_output.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]:
                hint = (" It has twice the sample's channels: for an `[eps, h]` noise-square head use "
                        "`SNDPMScheduler`; for a learned-variance model pass `model_output[:, :C]`.")
            raise ValueError(
                f"AnalyticDPMScheduler expects a model output of the sample's shape {tuple(sample.shape)}, got "
                f"{tuple(model_output.shape)}.{hint}"
            )
        return model_output, None

    def _x0_variance(self, t: int, abar_t: float, eps_hat: torch.Tensor, extra):
        if self._gamma_list is not None:
            gamma_t = self._gamma_list[t]
        elif self.config.gamma_from_batch:
            # a 0-dim tensor on the model's device, never read back (float64 except on MPS, which has none)
            dtype = torch.float32 if eps_hat.device.type == "mps" else torch.float64
            gamma_t = eps_hat.to(dtype).square().mean()
        else:
            raise ValueError(
                "AnalyticDPMScheduler has no Gamma table: the analytic variance needs "
                "Gamma_t = E||eps_theta(x_t, t)||^2 / d for your model. " + GAMMA_HELP
                + " (Or set `gamma_from_batch=True` to estimate it from each large batch.)"
            )
        return rs.analytic_x0_variance(gamma_t, abar_t)
