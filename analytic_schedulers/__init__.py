"""Analytic-DPM, SN-DPM and NPR-DPM schedulers for Hugging Face diffusers."""

from .gamma import GammaEstimate, GammaSums, estimate_gamma
from .gaussian import GaussianDataModel
from .likelihood import NELBOTerms, dataset_nll_bits_per_dim, nelbo_terms_bpd, nll_bits_per_dim
from .noise_square_head import NoiseSquareHead, NoiseSquareHeadModel, load_head_model
from .scheduling_analytic_dpm import AnalyticDPMScheduler, AnalyticDPMSchedulerOutput
from .scheduling_base import ReverseStepDistribution, ReverseStepOutput
from .scheduling_sn_dpm import SNDPMScheduler, SNDPMSchedulerOutput
from .training import train_noise_square_head
from .trajectory import optimal_trajectory, step_cost_matrix

__version__ = "0.1.0"

__all__ = [
    "AnalyticDPMScheduler",
    "AnalyticDPMSchedulerOutput",
    "GammaEstimate",
    "GammaSums",
    "GaussianDataModel",
    "NELBOTerms",
    "NoiseSquareHead",
    "NoiseSquareHeadModel",
    "ReverseStepDistribution",
    "ReverseStepOutput",
    "SNDPMScheduler",
    "SNDPMSchedulerOutput",
    "dataset_nll_bits_per_dim",
    "estimate_gamma",
    "load_head_model",
    "nelbo_terms_bpd",
    "nll_bits_per_dim",
    "optimal_trajectory",
    "step_cost_matrix",
    "train_noise_square_head",
]
