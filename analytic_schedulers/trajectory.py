"""The optimal K-step trajectory of Analytic-DPM (Bao et al., ICLR 2022, Section 4), as pure functions.

With the Analytic-DPM variance, a step `t -> s` of the DDPM forward process (`eta = 1`) contributes
`KL = (d/2) * log(sigma^2_{s|t} / tilde_beta_{s|t})` to the negative ELBO in expectation, because the optimal variance
makes the other KL terms cancel. Writing `v_t = bbar_t / abar_t * (1 - Gamma_t)` (the estimated posterior variance of
`x_0` per dimension) and using `abar_s * beta_{t|s} = abar_s - abar_t`:

    step_cost(s, t) = log(sigma^2_{s|t} / tilde_beta_{s|t}) = log1p((abar_s - abar_t) * v_t / (bbar_s * bbar_t)).

The paper's DP cost `J(s, t) = log(1 - beta_{t|s} * Gamma_t / bbar_t)` (`paper_step_cost`) differs from it by
`log(bbar_t * abar_s) - log(bbar_s * abar_t)`, which telescopes along any trajectory, so both pick the same trajectory
between fixed ends `T - 1` and `0` whenever `v_t` is inside the Theorem-2 bounds. We minimise `step_cost` because it is
the log variance ratio of the sampler actually run: `v_t` is clipped to `[0, max_x0_variance]` exactly as the scheduler
clips it, it stays finite for zero-terminal-SNR schedules (where `J` is `-inf`), and the summed cost has units:
`cost / (2 ln 2)` is the predicted sum of the trajectory's KL terms in bits/dim (prior and decoder terms excluded,
they do not depend on the trajectory).

Gamma above 1. Estimated tables exceed 1 where the true `Gamma_t` is within sampling noise of 1 (large `t`). There
`v_t` clips to 0, a step would look free and the DP would jump over the whole noisy region. As the official code
(`_dp_seg` of baofff/Analytic-DPM), we run the DP only below the bad region and space the remaining steps evenly over
it: with `t*` the first timestep with `Gamma_t > 1` and `n_bad = T - t*`, the top `2 * n_bad` timesteps get
`K2 ~ 0.8 * (2 * n_bad / T) * K` evenly spaced steps and the DP places the other `K1 = K - K2` on
`[0, T - 1 - 2 * n_bad]` (`split_gamma_above_one`).

Indexing is diffusers' (`docs/method.md#notation`): timesteps `0 .. T-1`, `abar_t = alphas_cumprod[t]`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, list]


def _as_float64(values: ArrayLike, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                                        dtype=np.float64))
    if tensor.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one value per training timestep), got shape {tuple(tensor.shape)}.")
    return tensor


def _check_inputs(gamma: ArrayLike, alphas_cumprod: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    gamma, abar = _as_float64(gamma, "gamma"), _as_float64(alphas_cumprod, "alphas_cumprod")
    if len(gamma) != len(abar):
        raise ValueError(
            f"`gamma` has {len(gamma)} entries but the schedule has {len(abar)} timesteps: a Gamma table belongs to "
            "one noise schedule."
        )
    if not (torch.isfinite(gamma).all() and torch.isfinite(abar).all()):
        raise ValueError("`gamma` and `alphas_cumprod` must be finite.")
    if (abar < 0).any() or (abar[0] >= 1.0) or (abar[1:] > abar[:-1]).any():
        raise ValueError(
            "`alphas_cumprod` must be non-increasing in [0, 1) with alphas_cumprod[0] < 1 (a first beta of 0 makes "
            "the first step's posterior variance 0 and every KL infinite)."
        )
    return gamma, abar


def x0_variance(gamma: ArrayLike, alphas_cumprod: ArrayLike, max_x0_variance: Optional[float] = 1.0) -> torch.Tensor:
    """`v_t = bbar_t / abar_t * (1 - Gamma_t)` clipped to `[0, max_x0_variance]` (Theorem 2), float64, shape `[T]`.

    As the sampler: infinite (then clipped) at zero SNR; `max_x0_variance=None` leaves the upper side unclipped.
    """
    gamma, abar = _check_inputs(gamma, alphas_cumprod)
    bbar = 1.0 - abar
    v = torch.where(abar > 0, bbar / abar.clamp(min=1e-300) * (1.0 - gamma), torch.full_like(abar, math.inf))
    v = v.clamp(min=0.0)  # Gamma_t > 1 means a negative variance: clip as the sampler does
    return v if max_x0_variance is None else v.clamp(max=float(max_x0_variance))


def step_cost_matrix(
    gamma: ArrayLike, alphas_cumprod: ArrayLike, max_x0_variance: Optional[float] = 1.0
) -> torch.Tensor:
    """The cost of every step `t -> s`: `C[s, t] = log(sigma^2_{s|t} / tilde_beta_{s|t})`, `+inf` where `s >= t`.

    `(d/2) * C[s, t]` is the step's expected KL term of the negative ELBO (nats) with the Analytic-DPM variance.

    Args:
        gamma: `Gamma_t` for `t = 0 .. T-1`.
        alphas_cumprod: `abar_t` for `t = 0 .. T-1`.
        max_x0_variance: the upper clip of `v_t` (`None`: none), as the scheduler's `max_x0_variance`.

    Returns:
        `torch.Tensor` float64 of shape `[T, T]` (128 MB at T = 4000), a transposed view of a `[t, s]` buffer.
    """
    return _step_cost_by_t(gamma, alphas_cumprod, max_x0_variance).t()


def _step_cost_by_t(gamma: ArrayLike, alphas_cumprod: ArrayLike, max_x0_variance: Optional[float]) -> torch.Tensor:
    """`step_cost_matrix` laid out as `[t, s]`, so that the DP reduces over contiguous rows."""
    v = x0_variance(gamma, alphas_cumprod, max_x0_variance)
    abar = _as_float64(alphas_cumprod, "alphas_cumprod")
    bbar = 1.0 - abar
    # (abar_s - abar_t) * v_t / (bbar_s * bbar_t), built in place in one [T, T] buffer
    cost = abar[None, :] - abar[:, None]
    cost.mul_((v / bbar)[:, None]).div_(bbar[None, :])
    cost.log1p_()
    cost.masked_fill_(torch.ones_like(cost, dtype=torch.bool).triu_(), math.inf)
    return cost


def step_cost(gamma: ArrayLike, alphas_cumprod: ArrayLike, s: int, t: int,
              max_x0_variance: Optional[float] = 1.0) -> float:
    """`log(sigma^2_{s|t} / tilde_beta_{s|t})` of one step `t -> s` (`0 <= s < t`), see `step_cost_matrix`."""
    v = x0_variance(gamma, alphas_cumprod, max_x0_variance)
    abar = _as_float64(alphas_cumprod, "alphas_cumprod")
    if not 0 <= s < t < len(abar):
        raise ValueError(f"Need 0 <= s < t < {len(abar)}, got s={s}, t={t}.")
    return math.log1p(float((abar[s] - abar[t]) * v[t] / ((1 - abar[s]) * (1 - abar[t]))))


def paper_step_cost(gamma: ArrayLike, alphas_cumprod: ArrayLike, s: int, t: int) -> float:
    """The paper's DP cost `J(s, t) = log(1 - beta_{t|s} * Gamma_t / bbar_t)` (`docs/method.md#the-optimal-trajectory`), with `Gamma_t <= 1`.

    `Gamma_t` is clamped to at most 1 (`v_t >= 0`), which keeps the argument positive
    (`>= alpha_{t|s} bbar_s / bbar_t`).
    Equals `step_cost(s, t) - log(bbar_t * abar_s / (bbar_s * abar_t))` while `v_t <= max_x0_variance`.
    """
    gamma, abar = _check_inputs(gamma, alphas_cumprod)
    if not 0 <= s < t < len(abar):
        raise ValueError(f"Need 0 <= s < t < {len(abar)}, got s={s}, t={t}.")
    beta_ts = 1.0 - float(abar[t] / abar[s])
    return math.log(1.0 - beta_ts * min(float(gamma[t]), 1.0) / (1.0 - float(abar[t])))


def trajectory_cost(cost_matrix: torch.Tensor, timesteps) -> float:
    """Sum of `cost_matrix[s, t]` over the consecutive pairs of a descending trajectory."""
    timesteps = torch.as_tensor(np.asarray(timesteps, dtype=np.int64))
    return float(cost_matrix[timesteps[1:], timesteps[:-1]].sum())


def split_gamma_above_one(gamma: ArrayLike, num_steps: int) -> Tuple[int, int, int]:
    """Where the DP may run when `Gamma_t > 1` somewhere (the official `_split`, in diffusers' indexing).

    Returns:
        `(K1, T1, K2)`: the DP places `K1` timesteps on `[0, T1 - 1]` (ends included), and `K2` timesteps are spaced
        evenly over `[T1, T - 1]` (ending at `T - 1`). `T1 = T` and `K2 = 0` when `Gamma_t <= 1` everywhere.
    """
    gamma = _as_float64(gamma, "gamma")
    T, K = len(gamma), int(num_steps)
    above = (gamma > 1.0).nonzero().flatten()
    if len(above) == 0:
        return K, T, 0
    num_bad = 2 * (T - int(above[0]))  # twice the noisy region, as the official code
    T1 = T - num_bad
    if T1 < 2:
        raise ValueError(
            f"The Gamma table exceeds 1 from timestep {int(above[0])} of {T}: too little of it is usable for the "
            "optimal trajectory. Gamma_t <= 1 in theory; re-estimate the table with more samples, or use an even "
            "`timestep_spacing`."
        )
    K1 = math.ceil((1.0 - 0.8 * num_bad / T) * K)
    K2 = K - K1
    if K1 > T1:
        K1, K2 = T1, K - T1
    if K2 > num_bad:
        K1, K2 = K - num_bad, num_bad
    if K2 == 0:
        K1, K2 = K - 1, 1
    return K1, T1, K2


def _dp(cost_by_t: torch.Tensor, num_steps: int, chunk: int = 1024) -> Tuple[np.ndarray, float]:
    """Minimum-cost path `0 = n_1 < ... < n_K = N - 1` through `cost_by_t[t, s]` (`[N, N]`, `+inf` where `s >= t`).

    `C[k][t] = min_{s < t} C[k-1][s] + cost[s, t]` from `C[1] = (0 at t = 0, inf elsewhere)`, then backtrack from
    `N - 1`: O(K N^2) time in a few large ops per step (rows in chunks: one `[chunk, N]` buffer) and a `[K, N]` table
    of argmins. Few large ops rather than many small ones: on a busy CPU each op pays a thread synchronisation.
    """
    N, K = cost_by_t.shape[0], num_steps
    if K == 1:
        return np.zeros(1, dtype=np.int64), 0.0
    best = torch.full((N,), math.inf, dtype=cost_by_t.dtype)
    best[0] = 0.0
    argmins = torch.zeros((K, N), dtype=torch.int64)
    buffer = torch.empty((chunk, N), dtype=cost_by_t.dtype)
    for k in range(1, K):
        # after k steps the top timestep is >= k; only the last step needs to reach N - 1
        first = k if k < K - 1 else N - 1
        new_best = torch.full((N,), math.inf, dtype=cost_by_t.dtype)
        for start in range(first, N, chunk):
            stop = min(start + chunk, N)
            block = buffer[: stop - start, :stop]
            torch.add(cost_by_t[start:stop, :stop], best[None, :stop], out=block)
            new_best[start:stop], argmins[k, start:stop] = block.min(dim=1)
        best = new_best
    path = [N - 1]
    for k in range(K - 1, 0, -1):
        path.append(int(argmins[k, path[-1]]))
    if path[-1] != 0 or not math.isfinite(float(best[N - 1])):
        raise ValueError("No finite-cost trajectory exists; check the Gamma table and the schedule.")
    return np.asarray(path, dtype=np.int64), float(best[N - 1])


def optimal_trajectory(
    gamma: ArrayLike,
    alphas_cumprod: ArrayLike,
    num_steps: int,
    max_x0_variance: Optional[float] = 1.0,
) -> Tuple[np.ndarray, float]:
    """
    The K-step trajectory `T - 1 = tau_K > ... > tau_1 = 0` that minimises Analytic-DDPM's negative ELBO.

    Dynamic programming over `step_cost_matrix` (Analytic-DPM, Section 4; `docs/method.md#the-optimal-trajectory`), run only
    below the first `Gamma_t > 1` as in the official code (see the module docstring).

    Args:
        gamma (`torch.Tensor`, `np.ndarray` or list): `Gamma_t = E||eps_hat(x_t, t)||^2 / d` for `t = 0 .. T-1`.
        alphas_cumprod (same types): `abar_t` for `t = 0 .. T-1`.
        num_steps (`int`): K, between 2 and T.
        max_x0_variance (`float`, *optional*, defaults to 1.0): the upper clip of `v_t`, as the scheduler's
            (`None` when the scheduler has `clip_variance=False`).

    Returns:
        `(timesteps, cost)`: `np.ndarray` of int64, shape `[K]`, strictly descending from `T - 1` to `0`; and the
        summed `step_cost` of its K - 1 steps (float; `cost / (2 ln 2)` bits/dim is the predicted sum of its KL
        terms).
    """
    gamma, abar = _check_inputs(gamma, alphas_cumprod)
    T, K = len(abar), int(num_steps)
    if not 2 <= K <= T:
        if K == 1 and T == 1:
            return np.zeros(1, dtype=np.int64), 0.0
        raise ValueError(
            f"The optimal trajectory needs 2 <= num_steps <= num_train_timesteps ({T}) (its ends are {T - 1} and 0), "
            f"got {K}."
        )
    cost_by_t = _step_cost_by_t(gamma, abar, max_x0_variance)
    cost = cost_by_t.t()
    if K == T:
        timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)
        return timesteps, trajectory_cost(cost, timesteps)
    K1, T1, K2 = split_gamma_above_one(gamma, K)
    if K2 == 0:
        path, total = _dp(cost_by_t, K)
        return path, total
    lower, _ = _dp(cost_by_t[:T1, :T1], K1)
    stride = (T - T1) / K2
    # floor(x + 0.5), not round(): banker's rounding could merge two points one apart
    upper = np.floor(T - 1 - stride * np.arange(K2) + 0.5).astype(np.int64)
    timesteps = np.concatenate([upper, lower])
    return timesteps, trajectory_cost(cost, timesteps)
