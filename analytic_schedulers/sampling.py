"""The registry of named samplers and one sampling loop, shared by the commands, the examples and the benchmarks.

A sampler is a scheduler built from the model's own scheduler config (the same betas, spacing and prediction type)
plus the keyword arguments its `step` needs. What a sampler is (its forward family `eta`, its variance, whether it
needs a Gamma table or a noise-square head, whether it has an ELBO) is written once, in `SAMPLERS`; nothing parses
sampler names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from .runtime import call_model, model_device_dtype

SCHEDULER_KINDS = ("ddpm", "ddim", "dpmsolver++", "analytic", "noise-square")


@dataclass(frozen=True)
class SamplerSpec:
    """
    What a named sampler is.

    Args:
        description: one line for `--help`.
        kind: `"ddpm"`, `"ddim"`, `"dpmsolver++"` (diffusers' schedulers), `"analytic"` (`AnalyticDPMScheduler`) or
            `"noise-square"` (`SNDPMScheduler`).
        eta: the forward family: 1 = DDPM-type, 0 = DDIM-type (`None` for DPM-Solver).
        variance_type: the fixed variance of diffusers' `DDPMScheduler` (`fixed_small`, `fixed_large`).
        covariance_type: `"sn"` or `"npr"`: the noise-square head the sampler needs.
        spacing: a `timestep_spacing` of its own (`"optimal"`), else the model's.
    """

    description: str
    kind: str
    eta: Optional[float] = None
    variance_type: Optional[str] = None
    covariance_type: Optional[str] = None
    spacing: Optional[str] = None

    @property
    def needs_gamma(self) -> bool:
        """Whether it needs the model's Gamma table."""
        return self.kind == "analytic"

    @property
    def needs_head(self) -> bool:
        """Whether the model must output `[eps, h]` from a noise-square head."""
        return self.covariance_type is not None

    @property
    def has_elbo(self) -> bool:
        """Whether its negative ELBO is finite: a Gaussian step of the DDPM forward process (`eta = 1`)."""
        return self.eta == 1.0 and self.kind in ("ddpm", "analytic", "noise-square")


SAMPLERS: Dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec("diffusers DDPMScheduler, variance tilde_beta (fixed_small)", "ddpm", 1.0, "fixed_small"),
    "ddpm-large": SamplerSpec("diffusers DDPMScheduler, variance beta (fixed_large)", "ddpm", 1.0, "fixed_large"),
    "ddim": SamplerSpec("diffusers DDIMScheduler, eta = 0", "ddim", 0.0),
    "dpmsolver++": SamplerSpec("diffusers DPMSolverMultistepScheduler (DPM-Solver++ 2M)", "dpmsolver++"),
    "analytic-ddpm": SamplerSpec("Analytic-DDPM (eta = 1)", "analytic", 1.0),
    "analytic-ddim": SamplerSpec("Analytic-DDIM (eta = 0)", "analytic", 0.0),
    "analytic-ddpm-optimal": SamplerSpec("Analytic-DDPM on the optimal (likelihood) trajectory", "analytic", 1.0,
                                         spacing="optimal"),
    "sn-ddpm": SamplerSpec("SN-DDPM: per-pixel variance from a noise-square head (eta = 1)", "noise-square", 1.0,
                           covariance_type="sn"),
    "sn-ddim": SamplerSpec("SN-DDIM (eta = 0)", "noise-square", 0.0, covariance_type="sn"),
    "npr-ddpm": SamplerSpec("NPR-DDPM: per-pixel variance from a noise-prediction-residual head (eta = 1)",
                            "noise-square", 1.0, covariance_type="npr"),
    "npr-ddim": SamplerSpec("NPR-DDIM (eta = 0)", "noise-square", 0.0, covariance_type="npr"),
}


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry of `name`, or a `ValueError` listing the names."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


@dataclass
class Sampler:
    """A ready scheduler, the keyword arguments its `step` needs, and (for diffusers' own schedulers on the
    optimal trajectory) the Gamma table its trajectory comes from."""

    name: str
    spec: SamplerSpec
    scheduler: object
    step_kwargs: Dict = field(default_factory=dict)
    trajectory_gamma: Optional[Sequence[float]] = None

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """`scheduler.set_timesteps(K)`, or the K-step optimal trajectory as custom timesteps (diffusers' schedulers
        with `timestep_spacing="optimal"`)."""
        if self.trajectory_gamma is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return
        from .schedule import alphas_cumprod_float64
        from .trajectory import optimal_trajectory

        abar = alphas_cumprod_float64(self.scheduler)
        timesteps, _ = optimal_trajectory(self.trajectory_gamma, abar, num_inference_steps)
        self.scheduler.set_timesteps(timesteps=timesteps.tolist(), device=device)


def build_sampler(
    name: str,
    base_config,
    gamma: Optional[Sequence[float]] = None,
    last_step_sigma_clip: Optional[float] = None,
    gamma_from_batch: bool = False,
    **config,
) -> Sampler:
    """
    Builds the named sampler from a model's scheduler config (the same betas, spacing and prediction type).

    Args:
        name: a key of `SAMPLERS`.
        base_config: the model's scheduler config (e.g. `pipe.scheduler.config`).
        gamma: the Gamma table, needed by the `analytic-*` samplers (optional for SN/NPR).
        last_step_sigma_clip: `y` of the last-step clip for this package's samplers, `None` for off.
        gamma_from_batch: the `analytic-*` samplers estimate `Gamma_t` from each batch instead of a table
            (data-free; ignored when `gamma` is given).
        config: further config entries of this package's schedulers (`max_x0_variance`, the table's provenance
            `gamma_guidance_scale`, ...); diffusers' samplers ignore them.
    """
    from .scheduling_analytic_dpm import AnalyticDPMScheduler
    from .scheduling_sn_dpm import SNDPMScheduler

    spec = sampler_spec(name)
    spacing = spec.spacing or dict(base_config).get("timestep_spacing")
    from_batch = gamma_from_batch and gamma is None and spec.needs_gamma and spacing != "optimal"
    if (spec.needs_gamma or spacing == "optimal") and gamma is None and not from_batch:
        needs = "the optimal trajectory needs" if spacing == "optimal" else f"sampler {name!r} needs"
        raise ValueError(
            f"{needs[0].upper() + needs[1:]} a Gamma table for this model. Estimate it once with "
            "`analytic-schedulers estimate-gamma --model <model> --data <images> --output <folder>` and pass the "
            "folder as the Gamma source."
        )
    if spec.kind in ("ddpm", "ddim", "dpmsolver++"):
        return _diffusers_sampler(name, spec, base_config, gamma if spacing == "optimal" else None)
    ours = dict(config, eta=spec.eta, gamma=gamma, last_step_sigma_clip=last_step_sigma_clip)
    if spacing is not None:
        ours["timestep_spacing"] = spacing
    if spec.kind == "analytic":
        return Sampler(name, spec, AnalyticDPMScheduler.from_config(base_config, gamma_from_batch=from_batch, **ours))
    return Sampler(name, spec, SNDPMScheduler.from_config(base_config, covariance_type=spec.covariance_type, **ours))


def _diffusers_sampler(name: str, spec: SamplerSpec, base_config, trajectory_gamma) -> Sampler:
    """One of diffusers' own schedulers; on the optimal trajectory it takes that trajectory as custom timesteps."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = dict(base_config)
    if trajectory_gamma is not None:
        if spec.kind == "ddim":
            raise ValueError(
                "diffusers' DDIMScheduler takes no custom timesteps, so it cannot follow the optimal trajectory: use "
                "analytic-ddim, or another --spacing."
            )
        config["timestep_spacing"] = "leading"  # replaced by the custom timesteps in `set_timesteps`
    if spec.kind == "ddpm":
        scheduler = DDPMScheduler.from_config(config, variance_type=spec.variance_type)
    elif spec.kind == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(config)
    step_kwargs = {"eta": spec.eta} if spec.kind == "ddim" else {}
    return Sampler(name, spec, scheduler, step_kwargs, trajectory_gamma)


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    sampler: Sampler,
    num_inference_steps: int,
    generators: Union[torch.Generator, List[torch.Generator], None] = None,
    batch_size: int = 1,
    sample_shape: Optional[Sequence[int]] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> torch.Tensor:
    """
    Runs `num_inference_steps` reverse steps and returns float32 samples in the model's data range.

    Args:
        model: called as `model(x, t).sample`; for samplers that need a head it must return `[eps, h]`.
        sampler: from `build_sampler`.
        generators: one generator, or one per image (then every image is reproducible on its own, whatever the
            batch size or the number of processes).
        batch_size: number of images when `generators` is not a list.
        sample_shape: `(C, H, W)`; defaults to the model config's `in_channels` and `sample_size`.
        device, dtype: where and in which precision the model runs (default: the model's).
    """
    from tqdm.auto import tqdm

    scheduler = sampler.scheduler
    if isinstance(generators, list):
        batch_size = len(generators)
    if sample_shape is None:
        size = model.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (model.config.in_channels, *size)
    model_device, model_dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    sampler.set_timesteps(num_inference_steps, device=device)
    x = randn_tensor((batch_size, *sample_shape), generator=generators, device=device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=sampler.name, leave=False):
        output = call_model(model, scheduler.scale_model_input(x, t), t, dtype=dtype or model_dtype)
        x = scheduler.step(output, t, x, generator=generators, **sampler.step_kwargs).prev_sample
    return x.float()
