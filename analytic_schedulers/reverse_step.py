"""The Gaussian reverse step of the DDIM family with an estimated optimal variance, as pure functions.

One step goes from timestep ``t`` to the next lower timestep ``s`` of a trajectory. With ``abar``/``bbar`` the
cumulative products of the noise schedule (``bbar = 1 - abar``):

- ``alpha_{t|s} = abar_t / abar_s``, ``beta_{t|s} = 1 - alpha_{t|s}``,
  ``tilde_beta_{s|t} = beta_{t|s} * bbar_s / bbar_t`` (the DDPM posterior variance),
- ``lambda^2 = eta^2 * tilde_beta_{s|t}`` (eta = 1: DDPM, eta = 0: DDIM),
- ``gamma_{t,s}^2 = (sqrt(abar_s) - sqrt((bbar_s - lambda^2) * abar_t / bbar_t))^2``, the squared coefficient of
  ``x_0`` in the posterior mean,
- the step is ``N(mu, sigma^2)`` with ``sigma^2 = lambda^2 + gamma_{t,s}^2 * v`` where ``v`` estimates the posterior
  variance of ``x_0`` per dimension (Analytic-DPM, Bao et al. ICLR 2022, Theorem 1 and its DDIM extension;
  SN-DPM / NPR-DPM, Bao et al. ICML 2022).

Scalars of the schedule are Python floats (float64); tensors keep the caller's dtype. None of these functions sees a
model or a config.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

Scalar = Union[float, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Model outputs
# ---------------------------------------------------------------------------------------------------------------------


def eps_and_x0_from_model_output(
    model_output: torch.Tensor, sample: torch.Tensor, abar_t: Scalar, prediction_type: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Turns a model output into the pair `(eps_hat, x0_hat)`.

    `epsilon`: the output is `eps_hat`. `sample`: the output is `x0_hat`. `v_prediction`:
    `v = sqrt(abar_t) * eps - sqrt(bbar_t) * x_0` (Salimans & Ho, 2022), so `x0 = sqrt(abar) x_t - sqrt(bbar) v` and
    `eps = sqrt(abar) v + sqrt(bbar) x_t`.

    `abar_t` is a float, or a tensor broadcastable against `sample` for one timestep per sample (e.g. `[N, 1, 1, 1]`,
    as in training). A tensor is not checked for zero-SNR entries, which would read it back from the device: there
    an epsilon prediction's `x0_hat` is infinite (its `eps_hat` is still the output).
    """
    if isinstance(abar_t, torch.Tensor):
        sqrt_abar, sqrt_bbar = abar_t.sqrt(), (1.0 - abar_t).sqrt()
    else:
        sqrt_abar, sqrt_bbar = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
        if prediction_type == "epsilon" and abar_t <= 0.0:
            raise ValueError(
                "At a zero-SNR timestep (alphas_cumprod = 0) x_0 cannot be recovered from an epsilon prediction. "
                "Use a `v_prediction` model with zero-terminal-SNR schedules, or `rescale_betas_zero_snr=False`."
            )
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_bbar * eps) / sqrt_abar
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_abar * x0) / sqrt_bbar
    elif prediction_type == "v_prediction":
        x0 = sqrt_abar * sample - sqrt_bbar * model_output
        eps = sqrt_abar * model_output + sqrt_bbar * sample
    else:
        raise ValueError(
            f"`prediction_type` {prediction_type!r} is not supported; choose 'epsilon', 'sample' or 'v_prediction'."
        )
    return eps, x0


def eps_from_x0(x0: torch.Tensor, sample: torch.Tensor, abar_t: float) -> torch.Tensor:
    """`eps = (x_t - sqrt(abar_t) x_0) / sqrt(bbar_t)`, used to re-derive `eps` from a clipped `x_0`."""
    return (sample - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of `x_0` (Imagen, Saharia et al. 2022), as in diffusers' `DDPMScheduler`."""
    batch = x0.shape[0]
    flat = x0.reshape(batch, -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.reshape(batch, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def process_x0(
    x0: torch.Tensor,
    clip_sample: bool,
    clip_sample_range: float,
    thresholding: bool,
    ratio: float,
    max_value: float,
) -> torch.Tensor:
    """Bounds `x0_hat` as diffusers' schedulers do: dynamic thresholding when `thresholding` (it takes precedence),
    else a clip to `[-clip_sample_range, clip_sample_range]` when `clip_sample`, else `x0` unchanged.

    `ratio` and `max_value` are the config's `dynamic_thresholding_ratio` and `sample_max_value`.
    """
    if thresholding:
        return dynamic_threshold(x0, ratio, max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


# ---------------------------------------------------------------------------------------------------------------------
# Coefficients of one step t -> s (Python floats)
# ---------------------------------------------------------------------------------------------------------------------


def ddpm_posterior_variance(abar_t: float, abar_s: float) -> float:
    """`tilde_beta_{s|t} = beta_{t|s} * bbar_s / bbar_t`, the variance of `q(x_s | x_t, x_0)` of DDPM."""
    beta_ts = 1.0 - abar_t / abar_s
    return beta_ts * (1.0 - abar_s) / (1.0 - abar_t)


def ddim_lambda_sq(abar_t: float, abar_s: float, eta: float) -> float:
    """`lambda^2 = eta^2 * tilde_beta_{s|t}`: the variance of the forward family's posterior (DDIM, eq. 16)."""
    return eta * eta * ddpm_posterior_variance(abar_t, abar_s)


def x0_coefficient_sq(abar_t: float, abar_s: float, lambda_sq: float) -> float:
    """`gamma_{t,s}^2 = (sqrt(abar_s) - sqrt((bbar_s - lambda^2) * abar_t / bbar_t))^2`.

    For `lambda^2 = tilde_beta` (DDPM) it equals `abar_s * beta_{t|s}^2 / bbar_t^2`.
    """
    direction_sq = max(1.0 - abar_s - lambda_sq, 0.0)  # rounding can push it a hair below 0 when eta = 1
    return (math.sqrt(abar_s) - math.sqrt(direction_sq * abar_t / (1.0 - abar_t))) ** 2


def last_step_variance_cap(y: float) -> float:
    """The cap `(y * 2/255 * sqrt(pi/2))^2` on the variance of the step that lands on `tau_1`.

    It keeps `E|sigma * z| <= 2y/255`, i.e. the last noise below `y` 8-bit levels (Analytic-DPM, Appendix F).
    """
    return (y * 2.0 / 255.0 * math.sqrt(math.pi / 2.0)) ** 2


# ---------------------------------------------------------------------------------------------------------------------
# Estimates of the posterior variance of x_0 per dimension, `v`
# ---------------------------------------------------------------------------------------------------------------------


def _snr_inverse(abar_t: float) -> float:
    """`bbar_t / abar_t`, infinite at a zero-SNR timestep (the bound on `v` then takes over)."""
    return (1.0 - abar_t) / abar_t if abar_t > 0.0 else math.inf


def analytic_x0_variance(gamma_t: Scalar, abar_t: float) -> Scalar:
    """Analytic-DPM: `v = bbar_t / abar_t * (1 - Gamma_t)` with `Gamma_t = E||eps_hat(x_t, t)||^2 / d`."""
    ratio = _snr_inverse(abar_t)
    if math.isinf(ratio):
        return math.inf
    return ratio * (1.0 - gamma_t)


def sn_x0_variance(h: torch.Tensor, eps_hat: torch.Tensor, abar_t: float) -> torch.Tensor:
    """SN-DPM: `v = bbar_t / abar_t * (h - eps_hat^2)` with `h ~ E[eps^2 | x_t]` per dimension."""
    ratio = _snr_inverse(abar_t)
    if math.isinf(ratio):
        return torch.full_like(h, math.inf)
    return ratio * (h - eps_hat * eps_hat)


def npr_x0_variance(h: torch.Tensor, abar_t: float) -> torch.Tensor:
    """NPR-DPM: `v = bbar_t / abar_t * h` with `h ~ E[(eps - eps_hat)^2 | x_t]` per dimension."""
    ratio = _snr_inverse(abar_t)
    if math.isinf(ratio):
        return torch.full_like(h, math.inf)
    return ratio * h


def bound_x0_variance(v: Scalar, max_x0_variance: float) -> Scalar:
    """Theorem 2 of Analytic-DPM: for data in `[a, b]`, `0 <= v <= ((b - a) / 2)^2`."""
    if isinstance(v, torch.Tensor):
        return v.clamp(min=0.0, max=max_x0_variance)
    return min(max(v, 0.0), max_x0_variance)


# ---------------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------------


def reverse_variance(lambda_sq: float, coef_sq: float, v: Scalar) -> Scalar:
    """`sigma^2 = lambda^2 + gamma_{t,s}^2 * v`, floored at 0 so that an unbounded negative `v` never yields NaN."""
    if isinstance(v, torch.Tensor):
        return (lambda_sq + coef_sq * v).clamp(min=0.0)
    if math.isinf(v) and coef_sq == 0.0:
        return lambda_sq
    return max(lambda_sq + coef_sq * v, 0.0)


def ddpm_mean(x0_hat: torch.Tensor, sample: torch.Tensor, abar_t: float, abar_s: float) -> torch.Tensor:
    """Posterior mean of DDPM (Ho et al. 2020, eq. 7):
    `mu = sqrt(abar_s) beta_{t|s} / bbar_t * x0_hat + sqrt(alpha_{t|s}) bbar_s / bbar_t * x_t`."""
    alpha_ts = abar_t / abar_s
    beta_ts = 1.0 - alpha_ts
    bbar_t, bbar_s = 1.0 - abar_t, 1.0 - abar_s
    return (math.sqrt(abar_s) * beta_ts / bbar_t) * x0_hat + (math.sqrt(alpha_ts) * bbar_s / bbar_t) * sample


def ddim_mean(x0_hat: torch.Tensor, eps_hat: torch.Tensor, abar_s: float, lambda_sq: float) -> torch.Tensor:
    """Mean of the DDIM family (Song et al. 2021, eq. 12): `mu = sqrt(abar_s) x0_hat + sqrt(bbar_s - lambda^2) eps_hat`."""
    direction_sq = max(1.0 - abar_s - lambda_sq, 0.0)
    return math.sqrt(abar_s) * x0_hat + math.sqrt(direction_sq) * eps_hat
