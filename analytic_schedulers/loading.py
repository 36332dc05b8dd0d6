"""Where models, schedules, Gamma tables and heads come from: the bundled model, a local folder, or the Hub.

A model location is a diffusers pipeline layout (`model_index.json`, `unet/`, `scheduler/`, as
`DDPMPipeline.save_pretrained` writes it) or a bare model folder (`config.json` and weights). Beside the pipeline's own
folders this package looks for:

- `analytic_scheduler/scheduler_config.json`: an `AnalyticDPMScheduler` config with the Gamma table (what
  `analytic-schedulers estimate-gamma` writes),
- `sn_head/`, `npr_head/`: trained noise-square heads (`NoiseSquareHead` folders), composed with `unet/` at load time.

A pipeline with a VAE or a text encoder (`LDMPipeline`, Stable Diffusion) is loaded whole (`load(...,
pipeline=True)`): only its own `__call__` knows how to encode prompts and decode latents.

Every command, example and benchmark loads through these functions, so the same bad location gives the same error
everywhere (`LoadError`, a `ValueError` whose message ends with the fix).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "ddpm-digits-16"
GAMMA_SUBFOLDER = "analytic_scheduler"
HEAD_SUBFOLDERS = {"sn": "sn_head", "npr": "npr_head"}
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_INDEX = "model_index.json"
#: Components that make a pipeline run its own `__call__`: latents to decode, prompts to encode.
OWN_CALL_COMPONENTS = ("vae", "vqvae", "text_encoder")

MODEL_HELP = ("Pass a diffusers pipeline folder (with model_index.json and unet/), a model folder (config.json and "
              "weights), or a Hub id such as google/ddpm-cifar10-32.")

__all__ = [
    "BUNDLED_MODEL", "LoadError", "LoadedModel", "is_own_call_pipeline", "load", "load_gamma", "load_gamma_config",
    "load_head", "load_model", "load_pipeline", "load_scheduler_config", "model_location",
]


class LoadError(ValueError):
    """A model, schedule, table or head that cannot be found or read, with what to do about it."""


# ---------------------------------------------------------------------------------------------------------------------
# Locations and configs
# ---------------------------------------------------------------------------------------------------------------------


def model_location(model: Optional[str]) -> str:
    """`model` itself, or the bundled digits model for `None`; a local path that does not exist is an error."""
    if model is None:
        if not (BUNDLED_MODEL / "unet").is_dir():
            raise LoadError(f"The bundled model is missing from {BUNDLED_MODEL}; reinstall the package.")
        return str(BUNDLED_MODEL)
    model = os.fspath(model)
    if not os.path.isdir(model) and looks_like_path(model):
        raise LoadError(f"The model folder {model!r} does not exist. {MODEL_HELP}")
    return model


def looks_like_path(location: str) -> bool:
    """A local path rather than a Hub model or dataset id (`name` or `org/name`)."""
    return location.startswith((".", "/", "~")) or location.count("/") > 1 or (os.sep != "/" and os.sep in location)


def _is_local(location: str) -> bool:
    return os.path.isdir(location)


def has_file(location: str, subfolder: Optional[str], filename: str) -> bool:
    """Whether `location` (folder or Hub id) holds `subfolder/filename`; offline, a Hub file counts if cached."""
    if _is_local(location):
        return (Path(location) / (subfolder or "") / filename).is_file()
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(location, filename, subfolder=subfolder)
        return True
    except Exception:  # not there, offline without a cached copy, gated: absent for this purpose
        return False


def read_config(location: str, subfolder: Optional[str], filename: str = MODEL_CONFIG) -> Optional[Dict[str, Any]]:
    """The JSON config `subfolder/filename` of a folder or Hub id, or `None` when there is none."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

    # `load_config` reads the file its class names, of any content
    reader = {SCHEDULER_CONFIG: DDPMScheduler, PIPELINE_INDEX: DiffusionPipeline}.get(filename, UNet2DModel)
    if _is_local(location) and not (Path(location) / (subfolder or "") / filename).is_file():
        return None
    try:
        return dict(reader.load_config(location, subfolder=subfolder))
    except (OSError, ValueError):
        return None


def _hub_error(location: str, subfolder: Optional[str], error: Exception) -> LoadError:
    where = location + (f" (subfolder {subfolder!r})" if subfolder else "")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = (" The Hub is switched off (HF_HUB_OFFLINE=1) and no copy is cached: download it once online, or pass "
            "a local folder.") if offline else ""
    return LoadError(f"Could not load {where}: {first_line}.{hint} {MODEL_HELP}")


# ---------------------------------------------------------------------------------------------------------------------
# Models and schedules
# ---------------------------------------------------------------------------------------------------------------------


def model_subfolder(location: str, subfolder: Optional[str] = None) -> Optional[str]:
    """The subfolder of the denoising model: `subfolder` if given, `unet` in a pipeline, else the root."""
    if subfolder is not None:
        return subfolder or None
    if has_file(location, None, PIPELINE_INDEX) or has_file(location, "unet", MODEL_CONFIG):
        return "unet"
    return None


def model_class(class_name: Optional[str]):
    """The class named by a model config's `_class_name`: a diffusers model or one of this package's."""
    import diffusers

    from . import noise_square_head

    cls = getattr(diffusers, class_name or "", None) or getattr(noise_square_head, class_name or "", None)
    if cls is None:
        raise LoadError(f"Unknown model class {class_name!r}: expected a diffusers model such as UNet2DModel.")
    return cls


def load_model(model: Optional[str] = None, subfolder: Optional[str] = None, torch_dtype=None, **hub_kwargs):
    """
    The denoising model of a location: `(model, subfolder)`, the model in `eval()` mode.

    Any diffusers model class works (`UNet2DModel`, `UNet2DConditionModel`, ...), as named by its `config.json`.
    """
    location = model_location(model)
    subfolder = model_subfolder(location, subfolder)
    config = read_config(location, subfolder)
    if config is None:
        where = f"{location!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        if _is_local(location):
            raise LoadError(f"{where} holds no diffusers model: no config.json in it or in unet/. {MODEL_HELP}")
        raise _hub_error(location, subfolder, OSError("no config.json found"))
    cls = model_class(config.get("_class_name"))
    try:
        network = cls.from_pretrained(location, subfolder=subfolder, torch_dtype=torch_dtype, **hub_kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error(location, subfolder, error) from None
    return network.eval(), subfolder


def is_own_call_pipeline(model: Optional[str]) -> bool:
    """Whether `model` is a pipeline (`model_index.json`) with a VAE or a text encoder, whose own `__call__` must
    run: this package's sampling loop drives a bare denoiser in pixel space only."""
    index = read_config(model_location(model), None, PIPELINE_INDEX)
    if index is None:
        return False
    return any(isinstance(index.get(name), (list, tuple)) and index[name][0] is not None
               for name in OWN_CALL_COMPONENTS)


def load_pipeline(model: Optional[str], torch_dtype=None):
    """The whole `DiffusionPipeline` of a folder or Hub id (this package's components included), progress bars off."""
    from diffusers import DiffusionPipeline

    location = model_location(model)
    try:
        with warnings.catch_warnings():  # newer diffusers name it `dtype`; `torch_dtype` works in every version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(location, torch_dtype=torch_dtype)
    except (OSError, ValueError, TypeError) as error:
        raise _hub_error(location, None, error) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_scheduler_config(model: Optional[str] = None, scheduler: Optional[str] = None,
                          subfolder: Optional[str] = None) -> Dict[str, Any]:
    """
    The noise schedule the model was trained with, as a scheduler config dict: from `scheduler` (a folder or Hub id,
    its root or `scheduler/`), else the pipeline's `scheduler/`, else beside the model.

    Raises:
        LoadError: when there is none; a table or sampler built on a guessed schedule would be silently wrong.
    """
    if scheduler is not None:
        candidates = [(model_location(scheduler), None), (model_location(scheduler), "scheduler")]
    else:
        location = model_location(model)
        candidates = [(location, "scheduler"), (location, subfolder), (location, None)]
    for location, sub in candidates:
        config = read_config(location, sub, SCHEDULER_CONFIG)
        if config is not None:
            return config
    where = scheduler if scheduler is not None else model_location(model)
    raise LoadError(
        f"No scheduler_config.json found for {where!r}: samplers and Gamma tables depend on the noise schedule the "
        "model was trained with. Pass --scheduler-config (Python: `scheduler=`) with a folder or Hub id holding the "
        "model's scheduler_config.json."
    )


def load_gamma(source: Optional[str] = None, model: Optional[str] = None) -> Optional[List[float]]:
    """
    The Gamma table of a scheduler folder or Hub id (a `scheduler_config.json` with `gamma`, at its root or in
    `analytic_scheduler/`). With `source=None`, the model's own `analytic_scheduler/`, or `None` when it has none.
    """
    config = load_gamma_config(source, model)
    return None if config is None else config.get("gamma")


def load_gamma_config(source: Optional[str] = None, model: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """
    The whole scheduler config of a Gamma table (as `load_gamma` finds it): the table with what it was estimated for
    (`gamma_sample_shape`, `gamma_guidance_scale`, ..., `max_x0_variance`), for
    `use_analytic_dpm(pipe, AnalyticDPMScheduler.from_config(config))`. `None` when `source` is `None` and the
    model has no `analytic_scheduler/`.
    """
    if source is None:
        config = read_config(model_location(model), GAMMA_SUBFOLDER, SCHEDULER_CONFIG)
        return None if config is None or config.get("gamma") is None else config
    location = model_location(source)
    config = read_config(location, None, SCHEDULER_CONFIG) or read_config(location, GAMMA_SUBFOLDER, SCHEDULER_CONFIG)
    if config is None:
        raise LoadError(f"No scheduler_config.json in {source!r} or its {GAMMA_SUBFOLDER}/: pass the folder that "
                        "`analytic-schedulers estimate-gamma --output` wrote, or its Hub id.")
    if config.get("gamma") is None:
        raise LoadError(f"The scheduler config at {source!r} has no `gamma` table; estimate one with "
                        "`analytic-schedulers estimate-gamma`.")
    return config


def check_same_schedule(table_config: Dict[str, Any], model_config: Dict[str, Any], where: str) -> None:
    """
    Refuses a Gamma table estimated under another noise schedule than the model's: the table is `E||eps||^2 / d`
    at each `abar_t`, so on other `abar_t` it is a different model's table.
    """
    from .pipeline_gamma import check_same_schedule as same_schedule
    from .schedule import alphas_cumprod_float64
    from .scheduling_analytic_dpm import AnalyticDPMScheduler

    schedule = lambda config: AnalyticDPMScheduler.from_config(  # noqa: E731
        {k: v for k, v in config.items() if k != "gamma"})
    try:
        same_schedule(alphas_cumprod_float64(schedule(table_config)), schedule(model_config))
    except ValueError:
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr")
        differ = {k: (table_config.get(k), model_config.get(k)) for k in keys
                  if table_config.get(k) != model_config.get(k)}
        raise LoadError(
            f"The Gamma table at {where} was estimated under another noise schedule than the model's "
            f"({differ or 'trained_betas differ'}; table vs model): it does not apply. Estimate one for this model "
            "with `analytic-schedulers estimate-gamma --model <model> --data <images> --output <folder>`."
        ) from None


def load_head(unet, covariance_type: str, head: Optional[str] = None, model: Optional[str] = None):
    """
    The `NoiseSquareHeadModel` of `unet` with a trained head: from `head` (a head folder or Hub id), else the
    model's `sn_head/` or `npr_head/`; `None` when neither is given nor present.

    Raises:
        LoadError: a head that cannot be read, or that was trained for the other covariance type.
    """
    from .noise_square_head import load_head_model

    if head is not None:
        location, subfolder = model_location(head), None
    else:
        location, subfolder = model_location(model), HEAD_SUBFOLDERS[covariance_type]
        if not has_file(location, subfolder, MODEL_CONFIG):
            return None
    try:
        head_model = load_head_model(location, unet=unet, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise LoadError(f"Could not load the noise-square head at {location!r}"
                        f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {error}") from None
    if head_model.covariance_type != covariance_type:
        raise LoadError(f"The head at {location!r} was trained as {head_model.covariance_type!r}, not "
                        f"{covariance_type!r}: pass the {covariance_type} head, or use the "
                        f"{head_model.covariance_type} samplers.")
    return head_model


# ---------------------------------------------------------------------------------------------------------------------
# Everything a command needs, at once
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A denoising model with its schedule, Gamma table and (lazily) heads, as `load` found them; for a pipeline
    that runs its own `__call__`, the whole `pipeline` too (`unet` is then its denoiser, `gamma_config` the table's
    scheduler config with its record)."""

    unet: Any
    scheduler_config: Dict[str, Any]
    gamma: Optional[List[float]]
    location: str
    subfolder: Optional[str]
    name: str
    _heads: Dict[Tuple[str, Optional[str]], Any] = field(default_factory=dict, repr=False)
    pipeline: Any = None
    gamma_config: Optional[Dict[str, Any]] = None

    def head_model(self, covariance_type: str, head: Optional[str] = None):
        """The model with its `covariance_type` head (see `load_head`), or `None` when there is none."""
        key = (covariance_type, head)
        if key not in self._heads:
            self._heads[key] = load_head(self.unet, covariance_type, head=head, model=self.location)
        return self._heads[key]

    def denoiser(self, covariance_type: Optional[str] = None, head: Optional[str] = None):
        """The model a sampler drives: the UNet, or for `covariance_type` `"sn"`/`"npr"` the head model `[eps, h]`."""
        if covariance_type is None:
            return self.unet
        model = self.head_model(covariance_type, head)
        if model is None:
            raise LoadError(
                f"No {covariance_type} noise-square head for {self.name}: the {covariance_type}-* samplers need one. "
                f"Train it with `analytic-schedulers train-head --covariance-type {covariance_type}` and pass its "
                f"folder as --head (Python: `head=`), or put it in the model's {HEAD_SUBFOLDERS[covariance_type]}/."
            )
        return model

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        """`(C, H, W)` of one sample, from the model's config."""
        config = self.unet.config
        size = config.get("sample_size")
        if size is None or config.get("in_channels") is None:
            raise LoadError(f"The model at {self.name} has no sample_size/in_channels in its config.")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config["in_channels"]), int(height), int(width)

    @property
    def vae(self):
        """The pipeline's `vae` (or `vqvae`), `None` for a model that denoises pixels."""
        for name in ("vae", "vqvae"):
            component = getattr(self.pipeline, name, None)
            if component is not None:
                return component
        return None

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """`(C, H, W)` of one image: the denoiser's sample, or for a latent pipeline what its VAE decodes it to."""
        if self.vae is None:
            return self.sample_shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, height, width = self.sample_shape
        return int(self.vae.config.in_channels), height * factor, width * factor


def load(model: Optional[str] = None, subfolder: Optional[str] = None, scheduler: Optional[str] = None,
         gamma: Union[str, None, bool] = None, torch_dtype=None, pipeline: bool = False) -> LoadedModel:
    """
    The model, its scheduler config and its Gamma table (`load_model`, `load_scheduler_config`,
    `load_gamma_config`: `gamma=None` is the model's own `analytic_scheduler/`, `gamma=False` no table, neither read
    nor checked). With `pipeline=True`, a pipeline that runs its own `__call__` (`is_own_call_pipeline`, no
    `subfolder` given) is loaded whole (`load_pipeline`), its `unet` being the model.
    """
    location = model_location(model)
    name = model if model is not None else f"bundled {BUNDLED_MODEL.name}"
    table = None if gamma is False else load_gamma_config(gamma, location)
    table_gamma = None if table is None else table["gamma"]
    where = repr(gamma or f"{location}/{GAMMA_SUBFOLDER}")
    if pipeline and subfolder is None and is_own_call_pipeline(location):
        pipe = load_pipeline(location, torch_dtype)
        config = load_scheduler_config(location, scheduler) if scheduler else dict(pipe.scheduler.config)
        if table is not None:
            check_same_schedule(table, config, where)
        return LoadedModel(pipe.unet, config, table_gamma, location, "unet", name, pipeline=pipe, gamma_config=table)
    unet, subfolder = load_model(location, subfolder, torch_dtype=torch_dtype)
    config = load_scheduler_config(location, scheduler, subfolder)
    if table is not None:
        check_same_schedule(table, config, where)
    return LoadedModel(unet, config, table_gamma, location, subfolder, name, gamma_config=table)
