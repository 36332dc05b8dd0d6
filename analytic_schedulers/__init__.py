"""Analytic-DPM, SN-DPM and NPR-DPM schedulers for Hugging Face diffusers.

The method is explained in `docs/method.md`. The classes below are defined with `__module__ = "analytic_schedulers"`,
so a pipeline's `save_pretrained` records them in `model_index.json` as `["analytic_schedulers", "<class>"]`, a name
that does not change when modules move. diffusers loads such a component only once `analytic_schedulers` is imported,
and decides how to load it from the base classes it finds on this package (`ModelMixin`, `SchedulerMixin`).
"""

from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (looked up here by diffusers' pipeline loader)

from .gamma import GammaEstimate, GammaSums, estimate_gamma
from .gaussian import GaussianDataModel
from .head_fitting import CachedFitRecipe, fit_noise_square_head
from .latent import encode_images, estimate_pipeline_gamma
from .likelihood import NELBOTerms, dataset_nll_bits_per_dim, nelbo_terms_bpd, nll_bits_per_dim
from .noise_square_head import NoiseSquareHead, NoiseSquareHeadModel, load_head_model
from .pipeline_gamma import PipelineGammaEstimate, use_analytic_dpm
from .scheduling_analytic_dpm import AnalyticDPMScheduler, AnalyticDPMSchedulerOutput
from .scheduling_base import ReverseStepDistribution, ReverseStepOutput
from .scheduling_sn_dpm import SNDPMScheduler, SNDPMSchedulerOutput
from .training import train_noise_square_head
from .trajectory import optimal_trajectory, step_cost_matrix

__version__ = "0.1.0"

__all__ = [
    "AnalyticDPMScheduler",
    "AnalyticDPMSchedulerOutput",
    "CachedFitRecipe",
    "GammaEstimate",
    "GammaSums",
    "GaussianDataModel",
    "NELBOTerms",
    "NoiseSquareHead",
    "NoiseSquareHeadModel",
    "PipelineGammaEstimate",
    "ReverseStepDistribution",
    "ReverseStepOutput",
    "SNDPMScheduler",
    "SNDPMSchedulerOutput",
    "dataset_nll_bits_per_dim",
    "encode_images",
    "estimate_pipeline_gamma",
    "estimate_gamma",
    "fit_noise_square_head",
    "load_head_model",
    "nelbo_terms_bpd",
    "nll_bits_per_dim",
    "optimal_trajectory",
    "step_cost_matrix",
    "train_noise_square_head",
    "use_analytic_dpm",
]
