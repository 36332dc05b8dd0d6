"""Negative ELBO in bits/dim of a diffusion model on a K-step trajectory (`docs/method.md#the-likelihood-elbo`).

For data `x_0` on the 8-bit grid of `[-1, 1]` and a trajectory `tau_K > ... > tau_1` (the scheduler's `timesteps`):

    NELBO(x_0) = KL(q(x_{tau_K} | x_0) || N(0, I))                                   prior
               + sum over consecutive (s, t) of KL(q(x_s | x_t, x_0) || p(x_s | x_t))   fresh x_t ~ q(x_t | x_0) each
               - log p(x_0 | x_{tau_1})                                               discretised Gaussian decoder

with `q(x_s | x_t, x_0) = N(mu_q, tilde_beta_{s|t})` of the DDPM forward process (eta = 1), `p(x_s | x_t)` the
scheduler's Gaussian step, and the decoder `N(clip(x0_hat), tilde_beta of the first training step)` over 256 bins.
Bits/dim = NELBO / (d ln 2). The Gaussian math lives in `gaussian_math.py`; here only the loop that calls the model.

Schedulers: this package's (`AnalyticDPMScheduler`, `SNDPMScheduler`, with `eta = 1`; through `step_distribution`
without the FID-only last-step clip) and diffusers' `DDPMScheduler` with `variance_type` `fixed_small`
(`tilde_beta_{s|t}`) or `fixed_large` (`beta_{t|s}`) on the strided trajectory, as the papers' baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from . import gaussian_math as gm
from . import reverse_step as rs
from .data import images_from_batch
from .runtime import (GeneratorLike, as_generator, call_model, make_generator, model_device_dtype, seed_of,
                      to_device)
from .schedule import alphas_cumprod_float64

QUANTIZE_HELP = "Quantize images in [-1, 1] to 8 bits first: `x = torch.round((x + 1) * 127.5) / 127.5 - 1`."
DDPM_VARIANCES = {
    "fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large", "fixed_large_log": "large",
}


@dataclass
class NELBOTerms:
    """The terms of the negative ELBO of each image, in bits/dim.

    Args:
        prior_bpd: `[B]`, `KL(q(x_{tau_K} | x_0) || N(0, I))`.
        step_bpd: `[B, K - 1]`, the KL term of step `timesteps[i] -> timesteps[i + 1]` in column `i`.
        decoder_bpd: `[B]`, `-log p(x_0 | x_{tau_1})`.
        timesteps: the trajectory, descending.
    """

    prior_bpd: torch.Tensor
    step_bpd: torch.Tensor
    decoder_bpd: torch.Tensor
    timesteps: List[int]

    @property
    def total_bpd(self) -> torch.Tensor:
        """`[B]`: the negative ELBO in bits/dim, an upper bound on the NLL."""
        return self.prior_bpd + self.step_bpd.sum(dim=1) + self.decoder_bpd


def check_8bit_data(x0: torch.Tensor) -> torch.Tensor:
    """Checks that `x0` lies in `[-1, 1]` on the 8-bit grid `{-1 + 2k/255}`; returns it snapped to the grid, float64.

    One read of the values (NaN/Inf, range and grid in one small tensor): check a host copy to keep the device busy.
    """
    if not torch.is_floating_point(x0):
        raise ValueError(f"`x0` must be a float tensor in [-1, 1], got dtype {x0.dtype}. " + QUANTIZE_HELP)
    x = x0.detach().to(torch.float64)
    if x.numel() == 0:
        return x
    levels = (x + 1.0) * 127.5
    rounded = levels.round()
    nonfinite, low, high, off_grid = torch.stack(
        [(~torch.isfinite(x)).sum().to(torch.float64), x.min(), x.max(), (levels - rounded).abs().max()]
    ).tolist()
    if nonfinite:
        raise ValueError("`x0` contains NaN or Inf.")
    if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise ValueError(
            f"`x0` must lie in [-1, 1] (the likelihood is of 8-bit images scaled to [-1, 1]), got values in "
            f"[{low:.4g}, {high:.4g}]. Map uint8 images with `x = img / 127.5 - 1`."
        )
    if off_grid > 1e-3:
        raise ValueError(
            f"`x0` is not on the 8-bit grid (a value is {off_grid:.3g} levels off): the discretised likelihood is "
            "defined for 256 levels only. " + QUANTIZE_HELP
        )
    return rounded / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ scheduler adapters


def _is_reverse_variance_scheduler(scheduler) -> bool:
    from .scheduling_base import ReverseVarianceSchedulerMixin

    return isinstance(scheduler, ReverseVarianceSchedulerMixin)


def _check_scheduler(scheduler) -> None:
    if _is_reverse_variance_scheduler(scheduler):
        if float(scheduler.config.eta) != 1.0:
            raise ValueError(
                f"The likelihood needs `eta=1` (the DDPM forward process), got eta={scheduler.config.eta}: with "
                "eta=0 (DDIM) the reverse step is deterministic and the ELBO is infinite. Use "
                "`type(scheduler).from_config(scheduler.config, eta=1.0)`."
            )
        return
    from diffusers import DDPMScheduler

    if isinstance(scheduler, DDPMScheduler):
        if scheduler.config.variance_type not in DDPM_VARIANCES:
            raise ValueError(
                f"DDPMScheduler with variance_type={scheduler.config.variance_type!r} is not supported; use "
                "'fixed_small' (tilde_beta) or 'fixed_large' (beta)."
            )
        return
    raise TypeError(
        f"{type(scheduler).__name__} is not supported: pass an AnalyticDPMScheduler or SNDPMScheduler with eta=1, or "
        "a DDPMScheduler with variance_type 'fixed_small' or 'fixed_large'. (DDIM-type samplers with eta=0 have a "
        "deterministic step and an infinite ELBO.)"
    )


def _model_step(scheduler, model_output: torch.Tensor, t: int, s: int, x_t: torch.Tensor, abar: List[float],
                check_finite: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(mean, variance, x0_hat)` of the scheduler's step `x_t -> x_s` (`s = -1`: only `x0_hat` is meaningful);
    `check_finite` overrides a reverse-variance scheduler's (`None`: its config's)."""
    if _is_reverse_variance_scheduler(scheduler):
        step = scheduler.step_distribution(model_output, t, x_t, apply_last_step_sigma_clip=False,
                                           check_finite=check_finite)
        if step.prev_timestep != s:
            raise ValueError(f"The scheduler steps from {t} to {step.prev_timestep}, expected {s}.")
        return step.mean, step.variance, step.pred_original_sample
    # DDPMScheduler: the mean and fixed variance on the strided trajectory, from its config
    config = scheduler.config
    abar_t = abar[t]
    _, x0_hat = rs.eps_and_x0_from_model_output(model_output.to(x_t.dtype), x_t, abar_t, config.prediction_type)
    x0_hat = rs.process_x0(x0_hat, config.clip_sample, config.clip_sample_range, config.thresholding,
                           config.dynamic_thresholding_ratio, config.sample_max_value)
    if s < 0:
        return x0_hat, torch.zeros((), dtype=x_t.dtype, device=x_t.device), x0_hat
    abar_s = abar[s]
    mean = rs.ddpm_mean(x0_hat, x_t, abar_t, abar_s)
    if DDPM_VARIANCES[config.variance_type] == "small":
        variance = rs.ddpm_posterior_variance(abar_t, abar_s)
    else:
        variance = 1.0 - abar_t / abar_s
    return mean, torch.full((), variance, dtype=x_t.dtype, device=x_t.device), x0_hat  # filled there, not copied


# ------------------------------------------------------------------------------------------------ the loop


@torch.no_grad()
def nelbo_terms_bpd(model, scheduler, x0: torch.Tensor, generator: GeneratorLike = None) -> NELBOTerms:
    """
    The prior, step and decoder terms of the negative ELBO of each image of `x0`, in bits/dim.

    Args and checks as `nll_bits_per_dim`. Makes K model calls (K - 1 steps and the decoder).

    Returns:
        `NELBOTerms`, float64 tensors on `x0`'s device.
    """
    _check_scheduler(scheduler)
    x0 = check_8bit_data(x0)
    timesteps, abar = _trajectory_and_schedule(scheduler)
    dtype = model_device_dtype(model)[1]
    return _nelbo_terms(model, scheduler, x0, as_generator(generator, x0.device), timesteps, abar, dtype)


def _trajectory_and_schedule(scheduler) -> Tuple[List[int], List[float]]:
    """The scheduler's timesteps (one read when they live on the device) and `abar_t` in float64, as Python lists."""
    abar = alphas_cumprod_float64(scheduler).tolist()
    if len(abar) < 2:
        raise ValueError("The decoder variance needs at least two training timesteps.")
    return [int(t) for t in torch.as_tensor(scheduler.timesteps).tolist()], abar


def _nelbo_terms(model, scheduler, x0: torch.Tensor, generator, timesteps: List[int], abar: List[float],
                 dtype: torch.dtype, check_finite: Optional[bool] = None) -> NELBOTerms:
    """The loop of `nelbo_terms_bpd` for checked data `x0` (float64, on the grid), the trajectory `timesteps`, the
    schedule `abar` and the model's input dtype `dtype` (`model_device_dtype`, found once); it reads nothing back from
    the device (a reverse-variance scheduler with `check_finite` reads one flag at the decoder step; `check_finite`
    overrides the scheduler's config, `None` keeps it)."""
    batch, num_dims = x0.shape[0], x0[0].numel()
    to_bpd = 1.0 / (num_dims * math.log(2.0))

    def sum_dims(term: torch.Tensor) -> torch.Tensor:
        return term.flatten(1).sum(dim=1) * to_bpd

    def noisy(t: int) -> torch.Tensor:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        return math.sqrt(abar[t]) * x0 + math.sqrt(1.0 - abar[t]) * noise

    # 1. prior KL at tau_K
    prior = sum_dims(gm.prior_kl(x0, abar[timesteps[0]]))

    # 2. one KL per step t -> s, each with a fresh x_t ~ q(x_t | x_0)
    steps = torch.zeros((batch, len(timesteps) - 1), dtype=torch.float64, device=x0.device)
    for i, (t, s) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x_t = noisy(t)
        mean, variance, _ = _model_step(scheduler, call_model(model, x_t, t, dtype=dtype), t, s, x_t, abar,
                                        check_finite)
        mean_q, variance_q = gm.ddpm_posterior(x0, x_t, abar[t], abar[s])
        steps[:, i] = sum_dims(gm.normal_kl(mean_q, variance_q, mean.to(torch.float64), variance.to(torch.float64)))

    # 3. decoder at tau_1: mean x0_hat clipped to the data range, variance tilde_beta of the first training step
    t = timesteps[-1]
    x_t = noisy(t)
    _, _, x0_hat = _model_step(scheduler, call_model(model, x_t, t, dtype=dtype), t, -1, x_t, abar, check_finite)
    decoder_variance = rs.ddpm_posterior_variance(abar[1], abar[0])
    log_p = gm.discretized_gaussian_log_likelihood(x0, x0_hat.to(torch.float64).clamp(-1.0, 1.0), decoder_variance)
    return NELBOTerms(prior_bpd=prior, step_bpd=steps, decoder_bpd=-sum_dims(log_p), timesteps=timesteps)


def nll_bits_per_dim(model, scheduler, x0: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """
    The negative ELBO of each image in bits/dim on the scheduler's current trajectory (an upper bound on its NLL).

    Analytic-DPM, Bao et al. ICLR 2022, Section 6.1; `docs/method.md#the-likelihood-elbo`. Call `scheduler.set_timesteps(K)` first
    (`timestep_spacing="optimal"` gives the paper's best trajectory).

    Args:
        model (`torch.nn.Module` or callable):
            The noise-prediction network, called as `model(x_t, timesteps)` (e.g. a `UNet2DModel`), returning a
            tensor or an output with `.sample`; its output is read with the scheduler's `prediction_type`. It must be
            on `x0`'s device.
        scheduler:
            `AnalyticDPMScheduler` or `SNDPMScheduler` with `eta=1` (diagonal variances are fine), or diffusers'
            `DDPMScheduler` with `variance_type="fixed_small"` or `"fixed_large"`.
        x0 (`torch.Tensor`):
            A batch of images `[B, C, H, W]` in `[-1, 1]` on the 8-bit grid (`round((x + 1) * 127.5) / 127.5 - 1`).
        generator (`int` or `torch.Generator`, *optional*):
            Seeds the forward noise (one fresh draw per term).

    Returns:
        `torch.Tensor` of shape `[B]`, float64: bits/dim per image.

    Raises:
        ValueError: for `eta != 1` (the DDIM ELBO is infinite), data outside `[-1, 1]` or off the 8-bit grid, or an
            unsupported `variance_type`. TypeError: for other schedulers.
    """
    return nelbo_terms_bpd(model, scheduler, x0, generator).total_bpd


@torch.no_grad()
def dataset_nll_bits_per_dim(
    model,
    scheduler,
    data,
    accelerator=None,
    batch_size: int = 64,
    generator: GeneratorLike = 0,
    progress: bool = False,
) -> torch.Tensor:
    """
    `nll_bits_per_dim` of every image of a dataset, sharded over the processes of an `accelerate.Accelerator`.

    Args:
        model: as in `nll_bits_per_dim`; moved to `accelerator.device` when an accelerator is given.
        scheduler: as in `nll_bits_per_dim`, with its trajectory set.
        data (`torch.Tensor` `[N, C, H, W]` or `torch.utils.data.Dataset`): 8-bit images in `[-1, 1]`, best on the
            CPU; a dataset may yield tensors, tuples (image first) or dicts with `"pixel_values"` / `"images"` /
            `"image"`.
        accelerator (`accelerate.Accelerator`, *optional*): shards the batches over its processes and gathers the
            results (`gather_for_metrics`, so no image is counted twice). Without one, runs on the model's device.
        batch_size (`int`, defaults to 64): images per model call and process.
        generator (`int` or `torch.Generator`, defaults to 0): seeds the forward noise (one stream per process).
        progress (`bool`, defaults to `False`): show a progress bar (main process only).

    Returns:
        `torch.Tensor` of shape `[N]`, float64 on the CPU: bits/dim per image, in dataset order. The mean and its
        standard error summarise it: `nll.mean()`, `nll.std() / len(nll) ** 0.5`.

    The loop never waits for the device: each batch is checked on the host before it moves there, the results stay
    there and come back once at the end, where they are checked for NaN and Inf (instead of the scheduler's
    `check_finite` flag at every batch).
    """
    from tqdm.auto import tqdm

    _check_scheduler(scheduler)
    loader, process, main = _sharded_loader(data, batch_size, accelerator)
    model_device, dtype = model_device_dtype(model)  # moving the model to the accelerator keeps its dtype
    device = accelerator.device if accelerator is not None else model_device
    if accelerator is not None and hasattr(model, "to"):
        model = model.to(device)
    generator = make_generator(seed_of(generator) + 1_000_003 * process, device)  # one stream per process
    timesteps, abar = _trajectory_and_schedule(scheduler)
    results = []
    for batch in tqdm(loader, desc="NLL", disable=not (progress and main)):
        x0 = to_device(check_8bit_data(images_from_batch(batch)), device)  # checked on the host copy
        # check_finite=False: no device flag read at every batch; the results are checked once, at the end
        nll = _nelbo_terms(model, scheduler, x0, generator, timesteps, abar, dtype, check_finite=False).total_bpd
        if accelerator is not None:
            nll = accelerator.gather_for_metrics(nll)
        results.append(nll)
    nll = torch.cat(results).cpu() if results else torch.zeros(0, dtype=torch.float64)
    _check_finite_nll(nll)
    return nll


def _sharded_loader(data, batch_size: int, accelerator):
    """`(loader, process index, is main process)`; the loader yields host batches (no device placement)."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, torch.Tensor):
        data = TensorDataset(data)
    elif not isinstance(data, Dataset):
        raise TypeError(f"`data` must be a tensor or a torch Dataset, got {type(data).__name__}.")
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    if accelerator is None:
        return loader, 0, True
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    return loader, accelerator.process_index, accelerator.is_main_process


def _check_finite_nll(nll: torch.Tensor) -> None:
    """Raises when an image's NLL (on the host) is NaN or Inf."""
    bad = (~torch.isfinite(nll)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"The NLL of images {bad[:10].tolist()} is NaN or Inf: the model output held NaN or Inf for them. With "
            "fp16, try bf16 or float32 for the model; otherwise check the model's inputs."
        )
