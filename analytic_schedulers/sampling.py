"""Named samplers and one sampling loop, shared by the command line, the examples and the benchmarks.

A sampler is a scheduler built from the model's own scheduler config, plus the keyword arguments its `step` needs and
the kind of model output it consumes (`"eps"`: the model's prediction; `"sn"`/`"npr"`: `[eps, h]` from a
noise-square head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_analytic_dpm import AnalyticDPMScheduler


@dataclass
class Sampler:
    """A ready scheduler and what driving it needs."""

    name: str
    scheduler: object
    step_kwargs: Dict = field(default_factory=dict)
    model_output: str = "eps"  # "eps", or "sn"/"npr" for a noise-square head's [eps, h]


@dataclass(frozen=True)
class SamplerSpec:
    description: str
    needs: str  # "", "gamma" or "head"
    build: Callable


def _ours(cls_name: str, eta: float, covariance_type: Optional[str] = None, spacing: Optional[str] = None):
    def build(config, gamma, last_step_sigma_clip):
        extra = {} if spacing is None else {"timestep_spacing": spacing}
        if covariance_type is None:
            scheduler = AnalyticDPMScheduler.from_config(config, gamma=gamma, eta=eta,
                                                         last_step_sigma_clip=last_step_sigma_clip, **extra)
            return scheduler, {}, "eps"
        from .scheduling_sn_dpm import SNDPMScheduler

        scheduler = SNDPMScheduler.from_config(config, covariance_type=covariance_type, gamma=gamma, eta=eta,
                                               last_step_sigma_clip=last_step_sigma_clip, **extra)
        return scheduler, {}, covariance_type

    return build


SAMPLERS: Dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec("diffusers DDPMScheduler, variance tilde_beta (fixed_small)", "",
                        lambda c, g, y: (DDPMScheduler.from_config(c, variance_type="fixed_small"), {}, "eps")),
    "ddpm-large": SamplerSpec("diffusers DDPMScheduler, variance beta (fixed_large)", "",
                              lambda c, g, y: (DDPMScheduler.from_config(c, variance_type="fixed_large"), {}, "eps")),
    "ddim": SamplerSpec("diffusers DDIMScheduler, eta = 0", "",
                        lambda c, g, y: (DDIMScheduler.from_config(c), {"eta": 0.0}, "eps")),
    "dpmsolver++": SamplerSpec("diffusers DPMSolverMultistepScheduler (DPM-Solver++ 2M)", "",
                               lambda c, g, y: (DPMSolverMultistepScheduler.from_config(c), {}, "eps")),
    "analytic-ddpm": SamplerSpec("Analytic-DDPM (eta = 1)", "gamma", _ours("analytic", 1.0)),
    "analytic-ddim": SamplerSpec("Analytic-DDIM (eta = 0)", "gamma", _ours("analytic", 0.0)),
    "analytic-ddpm-optimal": SamplerSpec("Analytic-DDPM on the optimal (likelihood) trajectory", "gamma",
                                         _ours("analytic", 1.0, spacing="optimal")),
    "sn-ddpm": SamplerSpec("SN-DDPM: per-pixel variance from a noise-square head (eta = 1)", "head",
                           _ours("sn", 1.0, "sn")),
    "sn-ddim": SamplerSpec("SN-DDIM (eta = 0)", "head", _ours("sn", 0.0, "sn")),
    "npr-ddpm": SamplerSpec("NPR-DDPM: per-pixel variance from a noise-prediction-residual head (eta = 1)", "head",
                            _ours("npr", 1.0, "npr")),
    "npr-ddim": SamplerSpec("NPR-DDIM (eta = 0)", "head", _ours("npr", 0.0, "npr")),
}


def build_sampler(
    name: str,
    base_config,
    gamma: Optional[Sequence[float]] = None,
    last_step_sigma_clip: Optional[float] = None,
) -> Sampler:
    """
    Builds the named sampler from a model's scheduler config (the same betas, spacing and prediction type).

    Args:
        name: a key of `SAMPLERS`.
        base_config: the model's scheduler config (e.g. `pipe.scheduler.config`).
        gamma: the Gamma table, needed by the `analytic-*` samplers (optional for SN/NPR).
        last_step_sigma_clip: `y` of the last-step clip for this package's samplers, `None` for off.
    """
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}.")
    spec = SAMPLERS[name]
    if spec.needs == "gamma" and gamma is None:
        raise ValueError(
            f"Sampler {name!r} needs a Gamma table for this model. Estimate it once with "
            "`analytic-schedulers estimate-gamma --model <model> --data <images> --output <folder>` and pass the "
            "folder as the Gamma source."
        )
    scheduler, step_kwargs, model_output = spec.build(base_config, gamma, last_step_sigma_clip)
    return Sampler(name, scheduler, step_kwargs, model_output)


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
        model: called as `model(x, t).sample`; for `sn`/`npr` samplers it must return `[eps, h]`.
        sampler: from `build_sampler`.
        generators: one generator, or one per image (then every image is reproducible on its own, whatever the
            batch size or the number of processes).
        batch_size: number of images when `generators` is not a list.
        sample_shape: `(C, H, W)`; defaults to the model config's `in_channels` and `sample_size`.
    """
    from tqdm.auto import tqdm

    scheduler = sampler.scheduler
    if isinstance(generators, list):
        batch_size = len(generators)
    if sample_shape is None:
        size = model.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (model.config.in_channels, *size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = randn_tensor((batch_size, *sample_shape), generator=generators, device=device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=sampler.name, leave=False):
        model_input = scheduler.scale_model_input(x, t).to(dtype)
        output = model(model_input, t).sample
        x = scheduler.step(output, t, x, generator=generators, **sampler.step_kwargs).prev_sample
    return x.float()
