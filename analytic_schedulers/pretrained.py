"""Finding and loading models, Gamma tables and heads: a local folder, a Hub id, or the model bundled with the package.

A model location is a diffusers pipeline layout (`unet/`, `scheduler/`, as `DDPMPipeline.save_pretrained` writes it)
or a bare `UNet2DModel` folder. Beside them, this package looks for:

- `analytic_scheduler/scheduler_config.json`: an `AnalyticDPMScheduler` config with the Gamma table
  (what `analytic-schedulers estimate-gamma --output` writes),
- `sn_head/`, `npr_head/`: trained noise-square heads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "ddpm-digits-16"
GAMMA_SUBFOLDER = "analytic_scheduler"


def model_location(model: Optional[str]) -> str:
    """`model` itself, or the bundled digits model when `model` is None."""
    if model is None:
        if not (BUNDLED_MODEL / "unet").is_dir():
            raise ValueError(f"The bundled model is missing from {BUNDLED_MODEL}; reinstall the package.")
        return str(BUNDLED_MODEL)
    return model


def _is_local(location: str) -> bool:
    return os.path.isdir(location)


def load_unet(model: Optional[str] = None, subfolder: Optional[str] = None, **kwargs):
    """
    Loads a `UNet2DModel` from a folder or Hub id (a pipeline folder's `unet/`, or the folder itself).

    Raises:
        ValueError: when the location holds no `UNet2DModel`, with what was found instead.
    """
    from diffusers import UNet2DModel

    location = model_location(model)
    if subfolder is None:
        local_unet = _is_local(location) and (Path(location) / "unet" / "config.json").is_file()
        local_bare = _is_local(location) and (Path(location) / "config.json").is_file()
        subfolder = "unet" if local_unet or not (local_bare or _is_local(location)) else None
    if _is_local(location):
        config_path = Path(location) / (subfolder or "") / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"{location!r} is not a UNet2DModel folder: no {config_path.relative_to(location)} found. Pass a "
                "pipeline folder with unet/, a UNet2DModel folder, or a Hub id such as google/ddpm-cifar10-32."
            )
        class_name = json.loads(config_path.read_text()).get("_class_name")
        if class_name != "UNet2DModel":
            raise ValueError(
                f"{str(config_path)!r} describes a {class_name!r}, not a UNet2DModel; this command drives "
                "UNet2DModel pipelines (DDPM/DDIM-style)."
            )
    try:
        return UNet2DModel.from_pretrained(location, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not load a UNet2DModel from {location!r} (subfolder={subfolder!r}): {error}") from None


def load_scheduler_config(model: Optional[str] = None, subfolder: str = "scheduler"):
    """The model's own scheduler config (betas, spacing, prediction type), or DDPM defaults if it has none."""
    from diffusers import DDPMScheduler

    location = model_location(model)
    if _is_local(location) and not (Path(location) / subfolder / "scheduler_config.json").is_file():
        return DDPMScheduler().config
    try:
        return DDPMScheduler.load_config(location, subfolder=subfolder)
    except (OSError, ValueError):
        return DDPMScheduler().config


def load_gamma(source: Optional[str] = None, model: Optional[str] = None) -> Optional[List[float]]:
    """
    The Gamma table from a scheduler folder or Hub id (`scheduler_config.json` with a `gamma` entry).

    With `source=None`, looks in the model's `analytic_scheduler/` folder; returns None when there is no table.
    """
    from .scheduling_analytic_dpm import AnalyticDPMScheduler

    if source is None:
        location = model_location(model)
        if _is_local(location):
            folder = Path(location) / GAMMA_SUBFOLDER
            if not (folder / "scheduler_config.json").is_file():
                return None
            config = AnalyticDPMScheduler.load_config(str(folder))
        else:
            try:
                config = AnalyticDPMScheduler.load_config(location, subfolder=GAMMA_SUBFOLDER)
            except (OSError, ValueError):
                return None
    else:
        try:
            config = AnalyticDPMScheduler.load_config(source)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not read a scheduler config with a Gamma table from {source!r}: {error}") from None
        if config.get("gamma") is None:
            raise ValueError(f"The scheduler config at {source!r} has no `gamma` table.")
    return config.get("gamma")


def head_location(model: Optional[str], covariance_type: str) -> Optional[str]:
    """The model's `sn_head/` or `npr_head/` folder, if it has one."""
    location = model_location(model)
    folder = Path(location) / f"{covariance_type}_head"
    return str(folder) if _is_local(location) and folder.is_dir() else None


def load_model_and_schedule(model: Optional[str], subfolder: Optional[str] = None, gamma: Optional[str] = None,
                            **unet_kwargs):
    """`(unet, scheduler config as a dict, Gamma table or None)` of a model location (see `load_unet`,
    `load_scheduler_config`, `load_gamma`)."""
    unet = load_unet(model, subfolder, **unet_kwargs)
    return unet, dict(load_scheduler_config(model)), load_gamma(gamma, model)
