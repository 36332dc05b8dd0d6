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

__all__ = ["PipelineGammaEstimate", "guidance_scale_mismatch", "sampling_guidance_scale", "use_analytic_dpm"]

_FIX = "Estimate the table for this pipeline with `estimate_pipeline_gamma(pipe, images, ...)`."


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
        defaults: Dict[str, Any] = self.provenance()
        if self.latent is not None:
            defaults.update(max_x0_variance=self.max_x0_variance, clip_sample=config.get("clip_sample", False))
        scheduler = self.estimate.to_scheduler(config, fill=fill, **{**defaults, **kwargs})
        self.check_schedule(scheduler)
        return scheduler

    def check_schedule(self, scheduler) -> None:
        """Raises `ValueError` when `scheduler`'s noise schedule is not the one the table was estimated under."""
        abar = alphas_cumprod_float64(scheduler)
        if abar.shape != self.alphas_cumprod.shape or not torch.allclose(abar, self.alphas_cumprod, atol=1e-6):
            raise ValueError(
                f"The Gamma table was estimated under another noise schedule ({len(self.alphas_cumprod)} steps, "
                f"alphas_cumprod[-1] = {self.alphas_cumprod[-1].item():.3g}) than this scheduler's ({len(abar)} "
                f"steps, {abar[-1].item():.3g}); Gamma_t depends on the schedule. " + _FIX
            )

    def check_pipeline(self, pipe) -> None:
        """Raises `ValueError` when the table is not for `pipe`'s denoiser inputs (pixel vs latent, channels) or its
        schedule."""
        in_latents = getattr(pipe, "vae", None) is not None or getattr(pipe, "vqvae", None) is not None
        channels = getattr(pipe.unet.config, "in_channels", None)
        space = "pixel" if self.latent is None else "latent"
        if in_latents == (self.latent is None) or (channels is not None and channels != self.sample_shape[0]):
            raise ValueError(
                f"The Gamma table was estimated in {space} space (inputs of shape {list(self.sample_shape)}), but "
                f"{type(pipe).__name__} denoises {'latents' if in_latents else 'pixels'} with {channels} channels: "
                "Gamma is a statistic of the denoiser's own inputs. " + _FIX
                + (" It encodes the images with the pipeline's VAE first." if in_latents else "")
            )
        self.check_schedule(pipe.scheduler)


# ---------------------------------------------------------------------------------------------------------------------
# Into a pipeline, with the guidance-scale check
# ---------------------------------------------------------------------------------------------------------------------


def use_analytic_dpm(pipe, gamma=None, fill: Optional[Union[str, float]] = None, **kwargs):
    """
    Swaps an `AnalyticDPMScheduler` into `pipe` (on the pipeline's own scheduler config) and returns it.

    With a `PipelineGammaEstimate`, the table is first checked against the pipeline (pixel or latent inputs, channels,
    noise schedule), and each call of the pipeline at a guidance scale other than the table's warns, once per scale:
    the new scheduler compares the pipeline's scale with its config's `gamma_guidance_scale` when the pipeline sets
    its timesteps. The plain `pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=table)`
    works too, without those checks.

    Args:
        pipe (`DiffusionPipeline`): a pipeline with a `unet` and a `scheduler`.
        gamma: a `PipelineGammaEstimate`, or any table `AnalyticDPMScheduler` accepts (unchecked), or `None` with
            `gamma_from_batch=True`.
        fill (`str` or `float`, *optional*): completes a partial `PipelineGammaEstimate` (see `GammaEstimate`).
        kwargs: further config overrides (`eta`, `gamma_from_batch`, ...).
    """
    from .scheduling_analytic_dpm import AnalyticDPMScheduler

    if isinstance(gamma, PipelineGammaEstimate):
        gamma.check_pipeline(pipe)
        scheduler = gamma.to_scheduler(pipe.scheduler.config, fill=fill, **kwargs)
    else:
        scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=gamma, **kwargs)
    scheduler.set_timesteps = _checking_guidance_scale(scheduler.set_timesteps, weakref.ref(pipe),
                                                       scheduler.config.get("gamma_guidance_scale"))
    pipe.scheduler = scheduler
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
