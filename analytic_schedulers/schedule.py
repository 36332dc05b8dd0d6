"""Noise schedules and inference trajectories, as pure functions.

Notation (diffusers' indexing; `docs/method.md#notation` maps it to the papers'): training timesteps ``t = 0 .. T-1``,
``abar_t = alphas_cumprod[t]``, ``bbar_t = 1 - abar_t``. A trajectory is a descending array of timesteps
``tau_K > ... > tau_1``; the step after ``tau_1`` lands on the clean sample, written ``abar = 1``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Optional[Sequence[float]] = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The betas of a diffusers schedule, computed exactly as `DDPMScheduler` computes them (float32).

    Returns:
        `torch.Tensor` of shape `[num_train_timesteps]`, float32.
    """
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(
                f"`trained_betas` has {betas.numel()} entries but `num_train_timesteps` is {num_train_timesteps}; "
                "pass one beta per training timestep."
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"Unknown `beta_schedule` {beta_schedule!r}; choose one of {BETA_SCHEDULES}.")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
        raise ValueError("The betas must be finite and lie in [0, 1].")
    return betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """`abar_t = prod_{i <= t} (1 - beta_i)`, accumulated in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def alphas_cumprod_float64(schedule) -> torch.Tensor:
    """
    `abar_t` of a schedule in float64 on the CPU, the one place the package derives it: from the betas of any
    diffusers scheduler (accumulated in float64, more exact than its float32 `alphas_cumprod`), or from a tensor of
    `alphas_cumprod` itself.
    """
    if isinstance(schedule, torch.Tensor):
        return schedule.detach().to("cpu", torch.float64).flatten()
    betas = getattr(schedule, "betas", None)
    if betas is not None:
        return alphas_cumprod_from_betas(torch.as_tensor(betas).cpu())
    abar = getattr(schedule, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(f"{type(schedule).__name__} is not a noise schedule: pass a diffusers scheduler (with "
                        "`betas` or `alphas_cumprod`) or an `alphas_cumprod` tensor.")
    return torch.as_tensor(abar).detach().to("cpu", torch.float64).flatten()


def spaced_timesteps(
    num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """A descending K-step trajectory, with diffusers' `timestep_spacing` conventions.

    Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al., 2023):
    `linspace` includes both `0` and `T - 1`; `leading` is `0, T//K, 2*T//K, ...` plus `steps_offset`;
    `trailing` ends at `T - 1`.

    Returns:
        `np.ndarray` of int64, shape `[K]`, strictly descending.
    """
    K, T = int(num_inference_steps), int(num_train_timesteps)
    if K < 1:
        raise ValueError(f"`num_inference_steps` must be at least 1, got {K}.")
    if K > T:
        raise ValueError(
            f"`num_inference_steps`={K} is larger than `num_train_timesteps`={T}: the model was trained on {T} "
            f"timesteps, so a trajectory can visit at most {T}. Use num_inference_steps <= {T}."
        )
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, K).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = T // K
        timesteps = (np.arange(0, K) * step_ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1
    else:
        raise ValueError(
            f"Unknown `timestep_spacing` {spacing!r}; choose one of {TIMESTEP_SPACINGS}, or 'optimal' (the "
            "likelihood-optimal trajectory of a scheduler with a Gamma table)."
        )
    return check_trajectory(timesteps, T)


def check_trajectory(timesteps: Sequence[int], num_train_timesteps: int) -> np.ndarray:
    """Validates a custom trajectory: integers, strictly descending, inside `[0, T - 1]`."""
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or len(timesteps) == 0:
        raise ValueError("`timesteps` must be a non-empty 1-D list of integers.")
    if not np.issubdtype(timesteps.dtype, np.integer):
        if not np.all(np.equal(np.mod(timesteps, 1), 0)):
            raise ValueError(f"`timesteps` must be integers, got {timesteps.tolist()}.")
        timesteps = timesteps.astype(np.int64)
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"`timesteps` must be strictly descending, got {timesteps.tolist()}.")
    if timesteps[0] >= num_train_timesteps or timesteps[-1] < 0:
        raise ValueError(
            f"`timesteps` must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps={num_train_timesteps}), "
            f"got {timesteps[0]} .. {timesteps[-1]}."
        )
    return timesteps.astype(np.int64)
