"""`SNDPMScheduler`: DDPM/DDIM sampling with a per-dimension optimal reverse variance from a noise-square head.

Bao, Li, Sun, Zhu, Zhang, "Estimating the Optimal Covariance with Imperfect Mean in Diffusion Probabilistic Models",
ICML 2022. SN-DPM learns `h ~ E[eps^2 | x_t]`, NPR-DPM learns `h ~ E[(eps - eps_hat)^2 | x_t]`; either gives the
posterior variance of `x_0` per dimension. The mean of each step is DDPM's (eta = 1) or DDIM's (eta < 1), exactly as
in `AnalyticDPMScheduler`; only `v` differs (see `reverse_step.sn_x0_variance` / `npr_x0_variance`).
"""

from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from . import reverse_step as rs
from .scheduling_base import ReverseStepOutput, ReverseVarianceSchedulerMixin

SNDPMSchedulerOutput = ReverseStepOutput

COVARIANCE_TYPES = ("sn", "npr")

HEAD_HELP = (
    "Wrap your UNet2DModel or UNet2DConditionModel with a trained noise-square head: "
    "`pipe.unet = analytic_schedulers.load_head_model(head_path, unet=pipe.unet)` (e.g. a model folder with "
    "`subfolder=\"sn_head\"`), or a new one, `analytic_schedulers.NoiseSquareHeadModel.from_unet(unet, "
    "covariance_type=...)`, trained with `train_noise_square_head` or `analytic-schedulers train-head` "
    "(UNet2DModel backbones). For a plain noise-prediction model use `AnalyticDPMScheduler` (in Stable Diffusion "
    "without a table: `gamma_from_batch=True`)."
)


class SNDPMScheduler(ReverseVarianceSchedulerMixin, SchedulerMixin, ConfigMixin):
    """
    SN-DPM / NPR-DPM: the reverse step of DDPM (`eta=1`) or DDIM (`eta=0`) with the optimal variance per dimension,
    `sigma^2 = lambda^2 + gamma_{t,s}^2 * v`, where `v` estimates `Var[x_0 | x_t]` from a second model output `h`:

    - `covariance_type="sn"` (SN-DPM): `h ~ E[eps^2 | x_t]` and `v = bbar_t / abar_t * (h - eps_hat^2)`,
    - `covariance_type="npr"` (NPR-DPM): `h ~ E[(eps - eps_hat)^2 | x_t]` and `v = bbar_t / abar_t * h`.

    The model output has `2C` channels, `cat([prediction, h], dim=1)`, `C` being the sample's channels (the
    `NoiseSquareHeadModel` of this package produces it). `h` is always about the noise `eps`, whatever the
    `prediction_type` of the first `C` channels: `v_prediction` and `sample` outputs are converted to `eps_hat` first
    and `h` is combined with that `eps_hat`.

    Swap it into any pipeline that drives the head model, e.g.
    `DDPMPipeline(unet=head_model, scheduler=SNDPMScheduler.from_config(ddpm_scheduler.config))`, or in Stable
    Diffusion `pipe.unet = NoiseSquareHeadModel(unet=pipe.unet, head=head)`. Under classifier-free guidance the
    pipeline combines `[eps, h]` of its two branches linearly, so `h` is `h_u + s (h_c - h_u)`: the per-dimension
    variance of a guided prediction is not identifiable from the branches, and this is an approximation (for SN its
    average over dimensions and `x_t` is Analytic-DPM's guided variance; see `docs/method.md`).

    Args:
        num_train_timesteps (`int`, defaults to 1000): the number of training timesteps T.
        beta_start (`float`, defaults to 0.0001): the first beta.
        beta_end (`float`, defaults to 0.02): the last beta.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`,
            `"sigmoid"` or `"laplace"`, as in diffusers.
        trained_betas (`List[float]`, *optional*): the betas, overriding the three arguments above.
        prediction_type (`str`, defaults to `"epsilon"`): what the first `C` output channels predict: `"epsilon"`,
            `"v_prediction"` or `"sample"`. The last `C` channels are `h`, about `eps` in every case.
        clip_sample (`bool`, defaults to `True`): clip `x0_hat` to `[-clip_sample_range, clip_sample_range]`.
        clip_sample_range (`float`, defaults to 1.0): the clip range of `x0_hat`.
        thresholding (`bool`, defaults to `False`): dynamic thresholding of `x0_hat` instead of clipping.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of dynamic thresholding.
        sample_max_value (`float`, defaults to 1.0): the largest threshold of dynamic thresholding.
        timestep_spacing (`str`, defaults to `"leading"`): `"linspace"`, `"leading"` or `"trailing"`, as in
            diffusers.
        steps_offset (`int`, defaults to 0): offset added to `"leading"` timesteps.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale the betas to zero terminal SNR.
        eta (`float`, defaults to 1.0): the forward family, `lambda^2 = eta^2 * tilde_beta`. 1.0 is SN-DDPM, 0.0
            SN-DDIM; a pipeline's `eta` argument overrides it per call.
        covariance_type (`str`, defaults to `"sn"`): `"sn"` (the head predicts `E[eps^2 | x_t]`) or `"npr"` (it
            predicts `E[(eps - eps_hat)^2 | x_t]`). Must match how the head was trained.
        gamma (`List[float]`, *optional*): an Analytic-DPM table `Gamma_t` for `t = 0 .. T-1`. The variance never
            reads it; it only serves trajectories computed from it (the optimal trajectory).
        clip_variance (`bool`, defaults to `True`): clip `v` to `[0, max_x0_variance]` (Theorem 2 of Analytic-DPM).
            A head's `h - eps_hat^2` can be negative; with the clip off, `sigma^2` is still floored at 0.
        max_x0_variance (`float`, defaults to 1.0): the upper bound `((b - a) / 2)^2` of `v` for data in `[a, b]`.
        last_step_sigma_clip (`float`, *optional*): `y` of the clip `sigma <= y * 2/255 * sqrt(pi/2)` on the step
            that lands on the last timestep (for FID; never used for likelihoods). `None` switches it off.
        set_alpha_to_one (`bool`, defaults to `True`): as in `DDIMScheduler`: after `tau_1` the step lands on the
            clean sample (`abar = 1`) and returns `x0_hat`; with `False` (every Stable Diffusion DDIM config) it
            lands on `abar = alphas_cumprod[0]`, for every `eta`. `DDPMScheduler` has no such key and always ends at
            1.
        check_finite (`bool`, defaults to `True`): raise a clear error when the model output holds NaN or Inf. The
            check is kept on the device and read once, at the last step (one synchronisation per sampling loop,
            where a pipeline waits for the result anyway); `False` skips it and the sampling loop never reads the
            accelerator.
        gamma_guidance_scale (`float`, *optional*), gamma_conditioning (`str`, *optional*),
        gamma_sample_shape (`List[int]`, *optional*), gamma_latent (`str`, *optional*): what `gamma` was estimated
            for, as in `AnalyticDPMScheduler` (the step refuses samples of other channels than a table's); kept so
            that a config passes between the two schedulers unchanged.
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
        covariance_type: str = "sn",
        gamma: Optional[Union[List[float], np.ndarray, torch.Tensor]] = None,
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
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"`covariance_type` must be 'sn' (h ~ E[eps^2 | x_t]) or 'npr' (h ~ E[(eps - eps_hat)^2 | x_t]), "
                f"got {covariance_type!r}."
            )
        self._init_schedule(gamma)

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        channels = sample.shape[1] if sample.ndim > 1 else None
        if channels is not None and model_output.shape == sample.shape:
            raise ValueError(
                f"SNDPMScheduler needs a model output of 2C = {2 * channels} channels, `[eps, h]` from a "
                f"noise-square head, but got {channels} channels (a plain prediction). " + HEAD_HELP
            )
        expected = (sample.shape[0], 2 * channels, *sample.shape[2:]) if channels is not None else None
        if expected is None or tuple(model_output.shape) != expected:
            raise ValueError(
                f"SNDPMScheduler needs a model output `[eps, h]` of shape {expected} (twice the channels of the "
                f"sample {tuple(sample.shape)}), got {tuple(model_output.shape)}. " + HEAD_HELP
            )
        prediction, h = model_output.split(channels, dim=1)
        return prediction, h

    def _x0_variance(self, t: int, abar_t: float, eps_hat: torch.Tensor, extra):
        # `extra` is h, about eps for every prediction type; `eps_hat` is already converted to a noise prediction
        if self.config.covariance_type == "sn":
            return rs.sn_x0_variance(extra, eps_hat, abar_t)
        return rs.npr_x0_variance(extra, abar_t)
