"""Gaussian terms of the diffusion ELBO, as pure elementwise tensor functions (nats).

None of these sees a model or a scheduler; `likelihood.py` sums them over dimensions and converts to bits/dim.
"""

from __future__ import annotations

import math
from typing import Union

import torch

Scalar = Union[float, torch.Tensor]

#: Half the width of one 8-bit bin of data scaled to [-1, 1] (256 bins of width 2/255).
HALF_BIN = 1.0 / 255.0


def _as_tensor_like(value: Scalar, like: torch.Tensor) -> torch.Tensor:
    """`value` as a tensor of `like`'s dtype and device; a float is filled in there (`torch.as_tensor(float,
    device="cuda")` would copy it from the host and wait for the device)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.full((), float(value), dtype=like.dtype, device=like.device)


def normal_kl(mean1: torch.Tensor, var1: Scalar, mean2: torch.Tensor, var2: Scalar) -> torch.Tensor:
    """`KL(N(mean1, var1) || N(mean2, var2))` per element, in nats.

    `0.5 * (log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1)`. Variances may be floats, 0-dim tensors or
    tensors broadcastable to the means (diagonal covariances); they must be positive.
    """
    var1, var2 = _as_tensor_like(var1, mean1), _as_tensor_like(var2, mean1)
    return 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def _log_prob_between(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """`log(Phi(upper) - Phi(lower))` for standardised `lower < upper`, accurate in both tails.

    Above 0 the symmetric form `Phi(-lower) - Phi(-upper)` avoids subtracting two numbers close to 1.
    """
    flip = lower > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    # log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))); -expm1 keeps small gaps accurate
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var: Scalar) -> torch.Tensor:
    """`log P(x)` per element for 8-bit data in `[-1, 1]` under `N(mean, var)` discretised into 256 bins.

    Each value `x` on the grid `{-1 + 2k/255}` owns the bin `[x - 1/255, x + 1/255]`; the bins of `-1` and `1` extend
    to `-inf` and `+inf` (Ho et al. 2020, eq. 13). Computed with `log_ndtr`, so a bin far in a tail gets its true
    (very negative) log-probability instead of a floor (improved-diffusion and the Analytic-DPM code floor the
    probability at 1e-12 and use a tanh approximation of `Phi`).

    Args:
        x (`torch.Tensor`): data on the 8-bit grid in `[-1, 1]`.
        mean (`torch.Tensor`): the decoder mean, broadcastable to `x`.
        var (`float` or `torch.Tensor`): the decoder variance, positive, broadcastable to `x`.

    Returns:
        `torch.Tensor` of `x`'s shape: log-probabilities in nats (`<= 0`).
    """
    var = _as_tensor_like(var, mean)
    inv_std = torch.rsqrt(var)
    centered = x - mean
    upper = torch.where(x > 1.0 - HALF_BIN, torch.full_like(centered, math.inf), (centered + HALF_BIN) * inv_std)
    lower = torch.where(x < -1.0 + HALF_BIN, torch.full_like(centered, -math.inf), (centered - HALF_BIN) * inv_std)
    return _log_prob_between(lower, upper)


def prior_kl(x0: torch.Tensor, abar_T: float) -> torch.Tensor:
    """`KL(q(x_T | x_0) || N(0, I))` per element (nats), `q(x_T | x_0) = N(sqrt(abar_T) x_0, 1 - abar_T)`."""
    return normal_kl(math.sqrt(abar_T) * x0, 1.0 - abar_T, torch.zeros_like(x0), 1.0)


def ddpm_posterior(x0: torch.Tensor, x_t: torch.Tensor, abar_t: float, abar_s: float):
    """The true posterior `q(x_s | x_t, x_0) = N(mu_q, tilde_beta_{s|t})` of the DDPM forward process (eta = 1).

    `mu_q = sqrt(abar_s) beta_{t|s} / bbar_t * x_0 + sqrt(alpha_{t|s}) bbar_s / bbar_t * x_t`,
    `tilde_beta_{s|t} = beta_{t|s} bbar_s / bbar_t`. Returns `(mu_q, tilde_beta)` (tensor, float).
    """
    alpha_ts = abar_t / abar_s
    beta_ts = 1.0 - alpha_ts
    bbar_t, bbar_s = 1.0 - abar_t, 1.0 - abar_s
    mean = (math.sqrt(abar_s) * beta_ts / bbar_t) * x0 + (math.sqrt(alpha_ts) * bbar_s / bbar_t) * x_t
    return mean, beta_ts * bbar_s / bbar_t
