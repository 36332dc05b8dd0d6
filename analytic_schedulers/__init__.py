"""Analytic-DPM, SN-DPM and NPR-DPM schedulers for Hugging Face diffusers."""

from .gaussian import GaussianDataModel
from .scheduling_analytic_dpm import AnalyticDPMScheduler, AnalyticDPMSchedulerOutput
from .scheduling_base import ReverseStepOutput

__version__ = "0.1.0"

__all__ = [
    "AnalyticDPMScheduler",
    "AnalyticDPMSchedulerOutput",
    "GaussianDataModel",
    "ReverseStepOutput",
]
