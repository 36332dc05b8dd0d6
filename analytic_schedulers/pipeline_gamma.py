"""A Gamma table together with what it was estimated for, and putting it into a pipeline safely.

A table is a statistic of one denoiser on its own inputs under one noise schedule: pixels or latents of a given
shape, and for text-to-image pipelines the guided prediction at one guidance scale. `PipelineGammaEstimate` keeps
those facts with the table, writes them into the scheduler's config (`gamma_guidance_scale`, `gamma_conditioning`,
`gamma_sample_shape`, `gamma_latent`), and `use_analytic_dpm` refuses a table that does not fit the pipeline and warns
(once per scale) when the pipeline samples at another guidance scale than the table's.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .gamma import GammaEstimate
from .schedule import alphas_cumprod_float64

__all__ = ["PipelineGammaEstimate", "check_same_schedule", "check_table_inputs", "guidance_scale_mismatch",
           "sampling_guidance_scale", "use_analytic_dpm"]

_FIX = ("Estimate the table for this pipeline with `estimate_pipeline_gamma(pipe, images, ...)` (command line: "
        "`analytic-schedulers estimate-gamma --model <pipeline> --data <images> ...`).")


@dataclass
class PipelineGammaEstimate:
    """
    A Gamma table with what it was estimated for (from `estimate_pipeline_gamma`).

    Args:
        estimate (`GammaEstimate`): the table, its standard error and counts.
        sample_shape (`Tuple[int, ...]`): the shape of one denoiser input, `(C, H, W)` (latent or pixel).
        alphas_cumprod (`torch.Tensor`, float64 `[T]`): the noise schedule it was estimated under.
        latent (`str`, *optional*): how images were encoded (`"sample"`, `"mean"`, `"deterministic"`); `None` for
            pixel space.
        conditioning (`str`, *optional*): `"captions"` (one per image), `"prompt"` (one for all), `"empty"` (the
            empty prompt), or `None` for an unconditional denoiser.
        guidance_scale (`float`, *optional*): the guidance scale `s` of the prediction; `None` when the table does
            not depend on one (unconditional model, empty prompt).
        max_x0_variance (`float`, *optional*): for latents, Theorem 2's bound `((b - a) / 2)^2` of their observed
            range `[a, b]` (the scheduler's default 1 holds for pixels in `[-1, 1]` only).

    It reads as a `GammaEstimate` (`gamma`, `is_complete`, `filled`), so it can also be passed as `gamma=` directly.
    """

    estimate: GammaEstimate
    sample_shape: Tuple[int, ...]
    alphas_cumprod: torch.Tensor
    latent: Optional[str] = None
    conditioning: Optional[str] = None
    guidance_scale: Optional[float] = None
    max_x0_variance: Optional[float] = None

    @property
    def gamma(self) -> torch.Tensor:
        return self.estimate.gamma

    @property
    def is_complete(self) -> bool:
        return self.estimate.is_complete

    def filled(self, fill: Union[str, float] = "interpolate") -> torch.Tensor:
        return self.estimate.filled(fill)

    def provenance(self) -> Dict[str, Any]:
        """The scheduler config keys that record what the table was estimated for (JSON-able)."""
        return {"gamma_guidance_scale": self.guidance_scale, "gamma_conditioning": self.conditioning,
                "gamma_sample_shape": list(self.sample_shape), "gamma_latent": self.latent}

    def to_scheduler(self, config, fill: Optional[Union[str, float]] = None, **kwargs):
        """
        An `AnalyticDPMScheduler` with this table, on the pipeline's own config (`pipe.scheduler.config`).

        For latents, `max_x0_variance` is set to the latents' bound and `clip_sample` defaults to `False` when the
        config does not set it (clipping latents to `[-1, 1]` is wrong); `kwargs` override both.

        Raises:
            ValueError: the config's noise schedule is not the table's, or the table is partial and `fill` is unset.
        """
        config = getattr(config, "config", config)
        defaults = {**self.provenance(), **_latent_defaults(self.latent, self.max_x0_variance, config)}
        scheduler = self.estimate.to_scheduler(config, fill=fill, **{**defaults, **kwargs})
        self.check_schedule(scheduler)
        return scheduler

    def check_schedule(self, scheduler) -> None:
        """Raises `ValueError` when `scheduler`'s noise schedule is not the one the table was estimated under."""
        check_same_schedule(self.alphas_cumprod, scheduler)

    def check_pipeline(self, pipe) -> None:
        """Raises `ValueError` when the table is not for `pipe`'s denoiser inputs (pixel vs latent, channels) or its
        schedule."""
        check_table_inputs(pipe, self.latent, self.sample_shape)
        self.check_schedule(pipe.scheduler)


def _latent_defaults(latent: Optional[str], max_x0_variance: Optional[float], config) -> Dict[str, Any]:
    """For a latent table: Theorem 2's bound of the latents' range, and no clipping of `x0_hat` to `[-1, 1]` unless
    the pipeline's config asks for it."""
    if latent is None:
        return {}
    return {"max_x0_variance": max_x0_variance, "clip_sample": config.get("clip_sample", False)}


def check_same_schedule(table_alphas_cumprod: torch.Tensor, scheduler) -> None:
    """Raises `ValueError` when `scheduler`'s noise schedule is not the one a table was estimated under."""
    expected, abar = table_alphas_cumprod, alphas_cumprod_float64(scheduler)
    if abar.shape != expected.shape or not torch.allclose(abar, expected, atol=1e-6):
        raise ValueError(
            f"The Gamma table was estimated under another noise schedule ({len(expected)} steps, "
            f"alphas_cumprod[-1] = {expected[-1].item():.3g}) than this scheduler's ({len(abar)} "
            f"steps, {abar[-1].item():.3g}); Gamma_t depends on the schedule. " + _FIX
        )


def check_table_inputs(pipe, latent: Optional[str], sample_shape) -> None:
    """Raises `ValueError` when a table of inputs `sample_shape` (latents encoded as `latent`, pixels for `None`) is
    not for `pipe`'s denoiser: pixels vs latents, or another channel count."""
    in_latents = getattr(pipe, "vae", None) is not None or getattr(pipe, "vqvae", None) is not None
    channels = getattr(pipe.unet.config, "in_channels", None)
    space = "pixel" if latent is None else "latent"
    if in_latents == (latent is None) or (channels is not None and channels != sample_shape[0]):
        raise ValueError(
            f"The Gamma table was estimated in {space} space (inputs of shape {list(sample_shape)}), but "
            f"{type(pipe).__name__} denoises {'latents' if in_latents else 'pixels'} with {channels} channels: "
            "Gamma is a statistic of the denoiser's own inputs. " + _FIX
            + (" It encodes the images with the pipeline's VAE first." if in_latents else "")
        )


# ---------------------------------------------------------------------------------------------------------------------
# Into a pipeline, with the guidance-scale check
# ---------------------------------------------------------------------------------------------------------------------


def use_analytic_dpm(pipe, gamma=None, fill: Optional[Union[str, float]] = None, config=None, **kwargs):
    """
    Swaps an `AnalyticDPMScheduler` into `pipe` (on the pipeline's own scheduler config) and returns it.

    With a `PipelineGammaEstimate`, or a scheduler that holds a table with its record (one loaded from a table folder,
    `AnalyticDPMScheduler.from_pretrained(repo_id, subfolder="analytic_scheduler")`), the table is first checked
    against the pipeline (pixel or latent inputs, channels, noise schedule), and each call of the pipeline at a
    guidance scale other than the table's warns, once per scale: the new scheduler compares the pipeline's scale with
    its config's `gamma_guidance_scale` when the pipeline sets its timesteps. The plain
    `pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=table)` works too, without those
    checks.

    Args:
        pipe (`DiffusionPipeline`): a pipeline with a `unet` and a `scheduler`.
        gamma: a `PipelineGammaEstimate`; an `AnalyticDPMScheduler` with a table (its table, record,
            `max_x0_variance` and `clip_variance` are used on the pipeline's own config; a table that does not record
            its inputs is checked for its schedule only); any table `AnalyticDPMScheduler` accepts (unchecked); or
            `None` with `gamma_from_batch=True`.
        fill (`str` or `float`, *optional*): completes a partial `PipelineGammaEstimate` (see `GammaEstimate`).
        config (*optional*): the scheduler config to build on (the noise schedule, spacing, prediction type);
            default `pipe.scheduler.config`.
        kwargs: further config overrides (`eta`, `gamma_from_batch`, ...).
    """
    from .scheduling_analytic_dpm import AnalyticDPMScheduler

    config = pipe.scheduler.config if config is None else getattr(config, "config", config)
    if isinstance(gamma, PipelineGammaEstimate):
        check_table_inputs(pipe, gamma.latent, gamma.sample_shape)
        scheduler = gamma.to_scheduler(config, fill=fill, **kwargs)  # checks the schedule
    elif isinstance(gamma, AnalyticDPMScheduler):
        scheduler = _from_table_scheduler(pipe, gamma, config, kwargs)
    else:
        scheduler = AnalyticDPMScheduler.from_config(config, gamma=gamma, **kwargs)
    scheduler.set_timesteps = _checking_guidance_scale(scheduler.set_timesteps, weakref.ref(pipe),
                                                       scheduler.config.get("gamma_guidance_scale"))
    pipe.scheduler = scheduler
    return scheduler


def _from_table_scheduler(pipe, table, config, kwargs: Dict[str, Any]):
    """An `AnalyticDPMScheduler` on `config` with the table (and its record) of the scheduler `table`."""
    from .scheduling_analytic_dpm import AnalyticDPMScheduler
    from .scheduling_base import PROVENANCE_KEYS

    recorded = table.config
    if table.gamma_table is None:
        raise ValueError("This AnalyticDPMScheduler holds no Gamma table to use. " + _FIX)
    if recorded.gamma_sample_shape is not None:  # a table that records its inputs
        check_table_inputs(pipe, recorded.gamma_latent, recorded.gamma_sample_shape)
    record = {key: recorded[key] for key in PROVENANCE_KEYS}
    record.update(max_x0_variance=recorded.max_x0_variance, clip_variance=recorded.clip_variance)
    record.update(_latent_defaults(recorded.gamma_latent, recorded.max_x0_variance, config))
    scheduler = AnalyticDPMScheduler.from_config(config, gamma=table.gamma_table, **{**record, **kwargs})
    check_same_schedule(alphas_cumprod_float64(table), scheduler)
    return scheduler


def _checking_guidance_scale(set_timesteps, pipe_ref, table_scale: Optional[float]):
    """`set_timesteps` that afterwards warns (once per scale) when the pipeline guides at another scale than the
    table's. Pipelines set their guidance scale before their timesteps, so the check sees the current call's."""
    warned = set()

    @functools.wraps(set_timesteps)  # keeps the signature, which pipelines inspect
    def checked_set_timesteps(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        pipe = pipe_ref()
        sampling_scale = None if pipe is None else sampling_guidance_scale(pipe)
        message = guidance_scale_mismatch(table_scale, sampling_scale)
        if message is not None and sampling_scale not in warned:
            warned.add(sampling_scale)
            warnings.warn(message, stacklevel=2)

    return checked_set_timesteps


def sampling_guidance_scale(pipe) -> Optional[float]:
    """The guidance scale a pipeline's current (or last) call applies: its `guidance_scale` when it guides, 1 when
    it does not (`guidance_scale <= 1`: the conditional prediction alone), `None` for pipelines without one."""
    scale = getattr(pipe, "_guidance_scale", None)
    if scale is None:
        return None
    return float(scale) if getattr(pipe, "do_classifier_free_guidance", scale > 1) else 1.0


def guidance_scale_mismatch(table_scale: Optional[float], sampling_scale: Optional[float]) -> Optional[str]:
    """The warning for sampling at `sampling_scale` with a table estimated at `table_scale`, or `None` when they
    agree or either is unknown."""
    if table_scale is None or sampling_scale is None or abs(table_scale - sampling_scale) <= 1e-6:
        return None
    note = " (a pipeline at guidance_scale <= 1 uses the conditional prediction alone: scale 1)" \
        if sampling_scale == 1.0 else ""
    return (f"The Gamma table was estimated for guidance scale {table_scale:g}, but the pipeline samples at "
            f"{sampling_scale:g}{note}: Gamma of the guided prediction changes with the scale, so the variances are "
            f"not the optimal ones. Estimate a table at this scale (`estimate_pipeline_gamma(pipe, images, "
            f"guidance_scale={sampling_scale:g}, ...)`) or sample with `gamma_from_batch=True`.")
