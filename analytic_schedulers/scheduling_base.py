"""What `AnalyticDPMScheduler` and `SNDPMScheduler` share: the schedule, the trajectory and one `step`.

The subclasses differ only in how they read the model output and in the estimate `v` of the posterior variance of
`x_0` (see `reverse_step.py`); everything else lives here once.

A step never reads a tensor back from the accelerator: its position on the trajectory comes from the host (a Python
int, or which entry of `self.timesteps` was passed), its coefficients are Python floats of the host trajectory, and the
check for a non-finite model output is kept on the device until the last step (`check_finite`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import reverse_step as rs
from .schedule import alphas_cumprod_from_betas, check_trajectory, make_betas, spaced_timesteps

GAMMA_HELP = (
    "Estimate the table once for your model with `analytic_schedulers.estimate_gamma(unet, images, scheduler)` or "
    "`analytic-schedulers estimate-gamma --model <model> --data <images> --output <folder>`, then pass it as "
    "`AnalyticDPMScheduler.from_config(config, gamma=table)` or load the folder with `from_pretrained`."
)


@dataclass
class ReverseStepOutput(BaseOutput):
    """
    Output of `step` for the schedulers of this package.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            The sample at the previous (lower) timestep, `x_s`. Feed it to the model at the next step.
        pred_original_sample (`torch.Tensor` of the same shape):
            The predicted denoised sample `x0_hat` (clipped when `clip_sample`).
        variance (`torch.Tensor`):
            The variance `sigma^2` of the step's Gaussian, a 0-dim tensor for Analytic-DPM or one value per dimension
            for SN/NPR-DPM; zero for the last step when `set_alpha_to_one` (it returns the mean `x0_hat`).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    variance: Optional[torch.Tensor] = None


@dataclass
class ReverseStepDistribution:
    """The Gaussian of one reverse step `x_t -> x_s`, before any noise is drawn.

    Args:
        mean: `mu`, shaped like the sample.
        variance: `sigma^2`, a 0-dim tensor or one value per dimension; zero after the last timestep when
            `set_alpha_to_one` (the step then returns the clean sample `x0_hat`).
        pred_original_sample: `x0_hat` (clipped when `clip_sample`).
        pred_epsilon: `eps_hat` as used by the mean.
        prev_timestep: `s`, or -1 after the last timestep `tau_1`.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    pred_original_sample: torch.Tensor
    pred_epsilon: torch.Tensor
    prev_timestep: int


def validate_gamma(gamma, num_train_timesteps: int, scheduler=None) -> Optional[torch.Tensor]:
    """Checks a Gamma table (list, numpy array, tensor, complete `GammaEstimate` or `PipelineGammaEstimate`) and
    returns it as a float64 tensor, or `None`. A table object with a `check_schedule` method (a
    `PipelineGammaEstimate`) is first checked against `scheduler`'s noise schedule."""
    if gamma is None:
        return None
    if scheduler is not None and callable(getattr(gamma, "check_schedule", None)):
        gamma.check_schedule(scheduler)
    if hasattr(gamma, "gamma") and hasattr(gamma, "is_complete"):  # a `GammaEstimate`
        if not gamma.is_complete:
            raise ValueError("This Gamma estimate covers only some timesteps; use "
                             "`estimate.to_scheduler(config, fill='interpolate')` or `gamma=estimate.filled()`.")
        gamma = gamma.gamma
    if isinstance(gamma, torch.Tensor):
        table = gamma.detach().to("cpu", torch.float64)
    else:
        try:
            table = torch.as_tensor(np.asarray(gamma, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"`gamma` must be a list of floats, a numpy array or a tensor: {error}") from None
    table = table.flatten() if table.ndim > 1 and table.numel() == num_train_timesteps else table
    if table.ndim != 1 or table.numel() != num_train_timesteps:
        raise ValueError(
            f"`gamma` must hold one value per training timestep ({num_train_timesteps}), got shape "
            f"{tuple(table.shape)}. A table estimated for another schedule cannot be reused. " + GAMMA_HELP
        )
    bad = (~torch.isfinite(table)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"`gamma` has non-finite values at timesteps {bad[:10].tolist()}: a table may leave timesteps out only "
            "when it is not used there; re-estimate it. " + GAMMA_HELP
        )
    return table


PROVENANCE_KEYS = ("gamma_guidance_scale", "gamma_conditioning", "gamma_sample_shape", "gamma_latent")
CONDITIONINGS = ("captions", "prompt", "empty")
LATENT_ENCODINGS = ("sample", "mean", "deterministic")


def check_provenance(provenance: Dict[str, object]) -> Dict[str, object]:
    """Checks the config keys that record what a Gamma table was estimated for; returns them JSON-able."""
    scale, conditioning = provenance.get("gamma_guidance_scale"), provenance.get("gamma_conditioning")
    shape, latent = provenance.get("gamma_sample_shape"), provenance.get("gamma_latent")
    if conditioning is not None and conditioning not in CONDITIONINGS:
        raise ValueError(f"`gamma_conditioning` must be one of {CONDITIONINGS} or None, got {conditioning!r}.")
    if latent is not None and latent not in LATENT_ENCODINGS:
        raise ValueError(f"`gamma_latent` must be one of {LATENT_ENCODINGS} or None (pixels), got {latent!r}.")
    if shape is not None:
        if isinstance(shape, (str, bytes)) or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
            raise ValueError(f"`gamma_sample_shape` must be a list of positive ints [C, H, W], got {shape!r}.")
        shape = [int(n) for n in shape]
    return {"gamma_guidance_scale": None if scale is None else float(scale), "gamma_conditioning": conditioning,
            "gamma_sample_shape": shape, "gamma_latent": latent}


def _not_found_help(location, subfolder: Optional[str]) -> str:
    where = f"{location}/{subfolder}" if subfolder else str(location)
    text = (f"No scheduler config at {where!r}. A Gamma table is a scheduler folder that `analytic-schedulers "
            "estimate-gamma --output` writes (`--push-to-hub REPO_ID` publishes it as `analytic_scheduler/`): load it "
            "with `AnalyticDPMScheduler.from_pretrained(REPO_ID, subfolder=\"analytic_scheduler\")`, or check the "
            "path, the repository id and `subfolder`.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline and not os.path.isdir(str(location)):
        text += " The Hub is switched off (HF_HUB_OFFLINE=1) and no copy is cached: download it once online first."
    return text


class GammaTable(list):
    """The Gamma table as the config holds it: a plain list of floats (JSON writes it as a list) with a one-line `repr`.

    diffusers keeps config keys that another scheduler does not take and names them in a warning:
    `DDIMScheduler.from_config(analytic.config)` lists `gamma` there, and with a plain list the warning is the whole
    table (about 13,000 characters). With this `repr` the warning is one short line, the table stays in the DDIM
    scheduler's config and comes back with `AnalyticDPMScheduler.from_config(ddim.config)`.
    """

    def __repr__(self) -> str:
        if not self:
            return "<Gamma table: empty>"
        return f"<Gamma table: {len(self)} values in [{min(self):.4g}, {max(self):.4g}]>"


class ReverseVarianceSchedulerMixin:
    """Shared machinery; a subclass sets `_x0_variance` and `_split_model_output` and registers its config."""

    order = 1
    init_noise_sigma = 1.0

    # ------------------------------------------------------------------------------------------------ set-up

    def _init_schedule(self, gamma) -> None:
        """Validates the config and derives the schedule; `gamma` is the table as passed to `__init__`."""
        # the config keeps JSON-able lists only
        trained_betas = self.config.trained_betas
        self.register_to_config(
            trained_betas=None if trained_betas is None else np.asarray(trained_betas, dtype=np.float64).tolist(),
        )
        config = self.config
        self.betas = make_betas(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas,
            config.rescale_betas_zero_snr,
        )
        self.alphas = 1.0 - self.betas
        # derived in float64 once; `alphas_cumprod` is what diffusers code reads (float32, like DDPMScheduler's)
        self._abar64 = alphas_cumprod_from_betas(self.betas)
        self._abar_list: List[float] = self._abar64.tolist()
        self.alphas_cumprod = self._abar64.to(torch.float32)
        # after tau_1 the step lands on abar = 1 (the clean sample) or on alphas_cumprod[0], as DDIMScheduler
        self._final_abar = 1.0 if config.set_alpha_to_one else self._abar_list[0]
        # sqrt(abar), sqrt(bbar) for add_noise / get_velocity, per (device, dtype), cast once from float64
        self._forward_tables: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        if config.eta < 0:
            raise ValueError(f"`eta` must be >= 0 (1 = DDPM, 0 = DDIM), got {config.eta}.")
        if config.max_x0_variance <= 0:
            raise ValueError(f"`max_x0_variance` must be positive, got {config.max_x0_variance}.")
        if config.last_step_sigma_clip is not None and config.last_step_sigma_clip <= 0:
            raise ValueError("`last_step_sigma_clip` must be positive, or None to switch the clip off.")
        if self._abar_list[-1] <= 0.0 and not config.clip_variance:
            raise ValueError(
                "This schedule reaches zero SNR (alphas_cumprod[-1] = 0), where bbar/abar is infinite: keep "
                "`clip_variance=True` so that the Theorem-2 bound caps the variance there."
            )
        self._init_gamma(gamma)
        self.num_inference_steps: Optional[int] = None
        self.custom_timesteps = False
        self._set_trajectory(np.arange(config.num_train_timesteps - 1, -1, -1, dtype=np.int64), device=None)

    def _init_gamma(self, gamma) -> None:
        """The table on this schedule, into the config as a JSON-able list with its provenance (the `gamma_*` keys;
        a `PipelineGammaEstimate` records its own)."""
        self.gamma_table = validate_gamma(gamma, self.config.num_train_timesteps, scheduler=self)
        self._gamma_list: Optional[List[float]] = None if self.gamma_table is None else self.gamma_table.tolist()
        provenance = gamma.provenance() if callable(getattr(gamma, "provenance", None)) else {}
        self.register_to_config(gamma=None if self._gamma_list is None else GammaTable(self._gamma_list),
                                **check_provenance({**{key: self.config.get(key) for key in PROVENANCE_KEYS},
                                                    **provenance}))
        shape = self.config.gamma_sample_shape
        # the channels a table's samples must have (host metadata, checked in every step for free)
        self._gamma_channels = shape[0] if shape and self.gamma_table is not None else None

    def _set_trajectory(self, timesteps: np.ndarray, device) -> None:
        self.timesteps = torch.from_numpy(timesteps.copy()).to(device)
        self._trajectory: List[int] = timesteps.tolist()
        self._index_of = {t: i for i, t in enumerate(self._trajectory)}
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        # index of the first step whose model output was not finite (K: none yet), kept on the model's device
        self._first_nonfinite_step: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------------ public surface

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: Optional[str] = None, **kwargs):
        """
        diffusers' `SchedulerMixin.from_pretrained` (a folder or Hub id, `subfolder`, Hub options), with an error
        that says where this package's tables are published when `scheduler_config.json` is not found.
        """
        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except OSError as error:
            raise OSError(f"{error} {_not_found_help(pretrained_model_name_or_path, subfolder)}") from error

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """The model input needs no scaling for these schedulers; returns `sample` unchanged."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """
        Sets the trajectory `tau_K > ... > tau_1` (run before inference) and resets `step_index` and `begin_index`.

        Args:
            num_inference_steps (`int`, *optional*):
                K, the number of model evaluations. The trajectory follows `timestep_spacing`.
            device (`str` or `torch.device`, *optional*):
                The device to move `self.timesteps` to (the model's, so that no step reads the accelerator).
            timesteps (`List[int]`, *optional*):
                A custom descending trajectory, instead of `num_inference_steps`.
        """
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            trajectory = check_trajectory(timesteps, T)
            self.custom_timesteps = True
        else:
            trajectory = self._spaced_trajectory(int(num_inference_steps))
            self.custom_timesteps = False
        self.num_inference_steps = len(trajectory)
        self._set_trajectory(trajectory, device)

    def _spaced_trajectory(self, num_inference_steps: int) -> np.ndarray:
        config = self.config
        if config.timestep_spacing != "optimal":
            return spaced_timesteps(num_inference_steps, config.num_train_timesteps, config.timestep_spacing,
                                    config.steps_offset)
        # "optimal": the K-step trajectory minimising Analytic-DDPM's NELBO, by DP over the Gamma table (cached per K)
        from .trajectory import optimal_trajectory

        gamma = getattr(self, "gamma_table", None)
        if gamma is None:
            raise ValueError(
                "`timestep_spacing='optimal'` chooses the trajectory from the Gamma table, and this scheduler has "
                "none (`gamma_from_batch` cannot serve: the trajectory is fixed before the first batch). " + GAMMA_HELP
            )
        max_x0_variance = getattr(config, "max_x0_variance", 1.0) if getattr(config, "clip_variance", True) else None
        key = (int(num_inference_steps), max_x0_variance)
        cache = self.__dict__.setdefault("_optimal_trajectory_cache", {})
        if key not in cache:
            cache[key] = optimal_trajectory(gamma, self._abar64, key[0], max_x0_variance)[0]
        return cache[key].copy()

    # ------------------------------------------------------------------------------------------------ position

    @property
    def step_index(self) -> Optional[int]:
        """The index in `self.timesteps` of the next step: one past the last step taken, `None` before the first."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The index of the first timestep, set by img2img pipelines through `set_begin_index`; `None` otherwise."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """
        Sets the index of the first timestep. diffusers' img2img pipelines call it as
        `set_begin_index(t_start * scheduler.order)` before starting from `timesteps[t_start]`.

        Args:
            begin_index (`int`, defaults to 0):
                The index in `self.timesteps` of the first step.
        """
        if not 0 <= int(begin_index) < len(self._trajectory):
            raise ValueError(
                f"`begin_index` must be in [0, {len(self._trajectory) - 1}] for the current {len(self._trajectory)} "
                f"timesteps, got {begin_index}. Call `set_timesteps` first."
            )
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: Union[int, torch.Tensor]) -> int:
        """
        The index of `timestep` in `self.timesteps`.

        Reads nothing from the accelerator for a Python int, a CPU tensor, or an entry of `self.timesteps` (what
        pipelines pass: `for t in scheduler.timesteps`); any other accelerator tensor is read back, one
        synchronisation.

        Args:
            timestep (`int` or `torch.Tensor`):
                A timestep of the current trajectory.

        Returns:
            `int`: its index, 0 for `tau_K`.
        """
        if isinstance(timestep, torch.Tensor):
            index = self._entry_index(timestep)
            if index is not None:
                return index
            if timestep.numel() != 1:
                raise ValueError(
                    f"Pass one timestep per step, got a tensor of shape {tuple(timestep.shape)}: step with `t` from "
                    "`for t in scheduler.timesteps`."
                )
            timestep = timestep.item()
        t = int(timestep)
        index = self._index_of.get(t)
        if index is None:
            raise ValueError(
                f"Timestep {t} is not on the current trajectory ({self._trajectory[:3]}...{self._trajectory[-2:]}). "
                "Call `set_timesteps` and step through `scheduler.timesteps`."
            )
        return index

    def _entry_index(self, timestep: torch.Tensor) -> Optional[int]:
        """The index of `timestep` when it is a view of one entry of `self.timesteps`, from its storage offset (host
        metadata, no data read); `None` for any other tensor."""
        timesteps = self.timesteps
        if timestep.numel() != 1 or timestep.dtype != timesteps.dtype or timestep.device != timesteps.device:
            return None
        if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
            return None
        index, remainder = divmod(timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0))
        return index if remainder == 0 and 0 <= index < len(self._trajectory) else None

    def _init_step_index(self, timestep: Union[int, torch.Tensor]) -> None:
        """Starts tracking the position: at `begin_index` when a pipeline set one, else at `timestep`'s index."""
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def _index_for_step(self, timestep: Union[int, torch.Tensor]) -> int:
        """The index of the step at `timestep`: the tracked position when `timestep` is the entry there (what every
        pipeline loop passes), else found from `timestep` itself (stepping out of order, or starting part-way without
        `set_begin_index`)."""
        if self._step_index is None:
            self._init_step_index(timestep)
            if self._begin_index is None:  # found from `timestep` itself
                return self._step_index
        index = self._step_index
        if index < len(self._trajectory) and self._is_entry(timestep, index):
            return index
        return self.index_for_timestep(timestep)

    def _is_entry(self, timestep: Union[int, torch.Tensor], index: int) -> bool:
        """Whether `timestep` is `self.timesteps[index]`, decided on the host (`False` when that needs a read)."""
        if isinstance(timestep, torch.Tensor):
            return self._entry_index(timestep) == index
        return int(timestep) == self._trajectory[index]

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """
        The next lower timestep of the trajectory, or -1 after `tau_1` (the clean sample), as
        `DDPMScheduler.previous_timestep`.

        Args:
            timestep (`int` or `torch.Tensor`):
                A timestep of the current trajectory.

        Returns:
            `int` for an int; for a tensor, a 0-dim tensor of `self.timesteps`' dtype and device (the entry
            `self.timesteps[i + 1]`, or -1). `DDPMScheduler` returns the -1 on the CPU, and a tensor for ints too.
        """
        index = self.index_for_timestep(timestep)
        if not isinstance(timestep, torch.Tensor):
            return self._next_timestep(index)
        if index + 1 < len(self._trajectory):
            return self.timesteps[index + 1]
        return torch.full((), -1, dtype=self.timesteps.dtype, device=self.timesteps.device)

    def _next_timestep(self, index: int) -> int:
        return self._trajectory[index + 1] if index + 1 < len(self._trajectory) else -1

    # ------------------------------------------------------------------------------------------------ forward process

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """The forward process `x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps` (as `DDPMScheduler.add_noise`); the
        timesteps index a copy of the tables on the samples' device, so nothing is read back."""
        sqrt_abar, sqrt_bbar = self._forward_coefficients(original_samples, timesteps)
        return sqrt_abar * original_samples + sqrt_bbar * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The `v_prediction` target `v = sqrt(abar_t) eps - sqrt(bbar_t) x_0` (as `DDPMScheduler.get_velocity`)."""
        sqrt_abar, sqrt_bbar = self._forward_coefficients(sample, timesteps)
        return sqrt_abar * noise - sqrt_bbar * sample

    def _forward_coefficients(self, like: torch.Tensor, timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._forward_tables:
            sqrt_abar, sqrt_bbar = self._abar64.sqrt(), (1.0 - self._abar64).sqrt()
            self._forward_tables[key] = (sqrt_abar.to(like.dtype).to(like.device),
                                         sqrt_bbar.to(like.dtype).to(like.device))
        sqrt_abar, sqrt_bbar = self._forward_tables[key]
        timesteps = torch.as_tensor(timesteps).to(device=like.device, dtype=torch.long).flatten()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return sqrt_abar[timesteps].reshape(shape), sqrt_bbar[timesteps].reshape(shape)

    # ------------------------------------------------------------------------------------------------ the step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: Optional[float] = None,
        use_clipped_model_output: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[ReverseStepOutput, Tuple]:
        """
        One reverse step `x_t -> x_s` with the estimated optimal variance, `s` the next timestep of the trajectory.

        Reads nothing back from the accelerator when `timestep` is an entry of `self.timesteps` or a Python int
        (see `index_for_timestep`); with `check_finite`, the last step reads one flag.

        Args:
            model_output (`torch.Tensor`):
                The model's output at `(sample, timestep)`, of the scheduler's `prediction_type`.
            timestep (`int` or `torch.Tensor`):
                The current timestep `t`, an entry of `self.timesteps`.
            sample (`torch.Tensor`):
                The current sample `x_t`.
            eta (`float`, *optional*):
                Overrides the config's `eta` for this step (1 = DDPM forward process, 0 = DDIM). Pipelines such as
                `DDIMPipeline` and Stable Diffusion pass their own `eta` (default 0.0) here.
            use_clipped_model_output (`bool`, *optional*):
                Re-derive `eps_hat` from the clipped `x0_hat` for the DDIM-form mean (as `DDIMScheduler`). Defaults
                to `False`.
            generator (`torch.Generator`, *optional*):
                Random number generator for the step's noise.
            variance_noise (`torch.Tensor`, *optional*):
                The standard normal noise to use instead of drawing it with `generator`.
            return_dict (`bool`, defaults to `True`):
                Return a `ReverseStepOutput` instead of a tuple.

        Returns:
            `ReverseStepOutput` or `tuple`: `(prev_sample, pred_original_sample, variance)`.
        """
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass either `generator` or `variance_noise`, not both.")
        index = self._index_for_step(timestep)
        step = self._distribution_at(index, model_output, sample, eta, use_clipped_model_output, True)
        mean, variance = step.mean, step.variance
        if self._returns_clean_sample(index):  # the last step returns the mean x0_hat with no noise
            prev_sample = mean
        else:
            if variance_noise is None:
                # drawn in the compute dtype, so that a seed gives the same sample in fp16, bf16 and fp32
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device,
                                              dtype=mean.dtype)
            elif variance_noise.shape != sample.shape:
                raise ValueError(
                    f"`variance_noise` has shape {tuple(variance_noise.shape)}, expected {tuple(sample.shape)}."
                )
            prev_sample = mean + variance.sqrt() * variance_noise.to(mean.dtype)
        self._step_index = index + 1
        prev_sample, x0_hat = prev_sample.to(sample.dtype), step.pred_original_sample.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0_hat, variance
        return ReverseStepOutput(prev_sample=prev_sample, pred_original_sample=x0_hat, variance=variance)

    def step_distribution(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: Optional[float] = None,
        use_clipped_model_output: Optional[bool] = None,
        apply_last_step_sigma_clip: bool = True,
        check_finite: Optional[bool] = None,
    ) -> "ReverseStepDistribution":
        """
        The Gaussian `p(x_s | x_t) = N(mean, variance)` of one reverse step, without drawing from it.

        Arguments as in `step`; `apply_last_step_sigma_clip=False` ignores `last_step_sigma_clip` (likelihoods never
        use it); `check_finite` overrides the config's for this step (`False`: no device flag is kept or read, for a
        caller that checks its results itself, as `dataset_nll_bits_per_dim` does). After the last timestep
        (`prev_timestep == -1`) the mean is `x0_hat` and the variance zero, unless `set_alpha_to_one=False` (then the
        step lands on `alphas_cumprod[0]`). Tensors are in float32 (float64 for float64 samples). Does not advance
        `step_index`.
        """
        index = self.index_for_timestep(timestep)
        return self._distribution_at(index, model_output, sample, eta, use_clipped_model_output,
                                     apply_last_step_sigma_clip, check_finite)

    def _returns_clean_sample(self, index: int) -> bool:
        """Whether the step at `index` is the last one and returns `x0_hat` itself (`set_alpha_to_one`)."""
        return index + 1 == len(self._trajectory) and self.config.set_alpha_to_one

    def _distribution_at(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        eta: Optional[float],
        use_clipped_model_output: Optional[bool],
        apply_last_step_sigma_clip: bool,
        check_finite: Optional[bool] = None,
    ) -> "ReverseStepDistribution":
        config = self.config
        eta = config.eta if eta is None else float(eta)
        check_finite = config.check_finite if check_finite is None else check_finite
        if eta < 0:
            raise ValueError(f"`eta` must be >= 0, got {eta}.")

        # 1. the step t -> s, read from the host trajectory; after tau_1, s = -1 and abar_s = 1 or alphas_cumprod[0]
        t, s = self._trajectory[index], self._next_timestep(index)
        abar_t = self._abar_list[t]
        abar_s = self._abar_list[s] if s >= 0 else self._final_abar

        # 2. model output -> eps_hat, x0_hat (math in float32 or better, whatever the model's dtype)
        self._check_table_channels(sample)
        compute_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x_t = sample.to(compute_dtype)
        output, extra = self._split_model_output(model_output, sample)
        if check_finite:
            self._record_nonfinite(model_output, index)
        eps_hat, x0_hat = rs.eps_and_x0_from_model_output(output.to(compute_dtype), x_t, abar_t,
                                                          config.prediction_type)
        if extra is not None:
            extra = extra.to(compute_dtype)

        # 3. clip or threshold x0_hat
        x0_hat = rs.process_x0(x0_hat, config.clip_sample, config.clip_sample_range, config.thresholding,
                               config.dynamic_thresholding_ratio, config.sample_max_value)

        if s < 0 and check_finite:
            self._raise_if_nonfinite()
        if self._returns_clean_sample(index):
            zero = torch.zeros((), dtype=compute_dtype, device=sample.device)
            return ReverseStepDistribution(x0_hat, zero, x0_hat, eps_hat, s)

        # 4. variance sigma^2 = lambda^2 + gamma_ts^2 * v, v bounded by Theorem 2
        lambda_sq = rs.ddim_lambda_sq(abar_t, abar_s, eta)
        coef_sq = rs.x0_coefficient_sq(abar_t, abar_s, lambda_sq)
        v = self._x0_variance(t, abar_t, eps_hat, extra)
        if config.clip_variance:
            v = rs.bound_x0_variance(v, config.max_x0_variance)
        variance = rs.reverse_variance(lambda_sq, coef_sq, v)
        clip_y = config.last_step_sigma_clip if apply_last_step_sigma_clip else None
        if clip_y is not None and s == self._trajectory[-1]:
            cap = rs.last_step_variance_cap(clip_y)
            variance = variance.clamp(max=cap) if isinstance(variance, torch.Tensor) else min(variance, cap)
        if isinstance(variance, torch.Tensor):
            variance = variance.to(compute_dtype)
        else:  # a float (a Gamma table): filled on the device, no host-to-device copy
            variance = torch.full((), variance, dtype=compute_dtype, device=sample.device)

        # 5. mean: DDPM's posterior mean for eta = 1, the DDIM form (raw eps_hat) otherwise
        if eta == 1.0:
            mean = rs.ddpm_mean(x0_hat, x_t, abar_t, abar_s)
        else:
            if use_clipped_model_output:
                eps_hat = rs.eps_from_x0(x0_hat, x_t, abar_t)
            mean = rs.ddim_mean(x0_hat, eps_hat, abar_s, lambda_sq)
        return ReverseStepDistribution(mean, variance, x0_hat, eps_hat, s)

    def _check_table_channels(self, sample: torch.Tensor) -> None:
        """Refuses a sample of other channels than the table's `gamma_sample_shape` (host metadata: no sync)."""
        if self._gamma_channels is None or sample.ndim < 2 or sample.shape[1] == self._gamma_channels:
            return
        config = self.config
        inputs = "pixels" if config.gamma_latent is None else "latents"
        raise ValueError(
            f"The Gamma table was estimated on {inputs} of shape {list(config.gamma_sample_shape)}, but the sample "
            f"has {sample.shape[1]} channels ({tuple(sample.shape)}): Gamma is a statistic of one denoiser's own "
            "inputs. Estimate a table for this model (`analytic_schedulers.estimate_pipeline_gamma(pipe, images, "
            "...)` or `analytic-schedulers estimate-gamma --model <pipeline> ...`), or sample with "
            "`gamma_from_batch=True`."
        )

    # ------------------------------------------------------------------------------------------------ finite check

    def _record_nonfinite(self, model_output: torch.Tensor, index: int) -> None:
        """Notes on the device, without reading it, whether `model_output` holds NaN or Inf (first such step)."""
        finite = torch.isfinite(model_output).all()
        first = self._first_nonfinite_step
        if first is None or first.device != finite.device:
            first = torch.full((), len(self._trajectory), dtype=torch.long, device=finite.device)
        self._first_nonfinite_step = torch.where(finite, first, first.clamp(max=index))

    def _raise_if_nonfinite(self) -> None:
        """At the last step: reads the device flag (the one synchronisation of a sampling loop) and raises."""
        first, self._first_nonfinite_step = self._first_nonfinite_step, None
        if first is None:
            return
        first = int(first.item())
        if first < len(self._trajectory):
            raise ValueError(
                f"The model output at timestep {self._trajectory[first]} (step {first + 1} of "
                f"{len(self._trajectory)}) contains NaN or Inf, and so do the samples after it. With fp16, try bf16 "
                "or float32 for the model; otherwise check the model's inputs. (Checked once per sampling loop, at "
                "its last step; `check_finite=False` switches the check off.)"
            )

    # ------------------------------------------------------------------------------------------------ subclass hooks

    def _split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """Returns `(prediction, extra)`; `extra` is what `_x0_variance` needs beyond `eps_hat`."""
        raise NotImplementedError

    def _x0_variance(self, t: int, abar_t: float, eps_hat: torch.Tensor, extra):
        """The estimate `v` of the posterior variance of `x_0` per dimension (a float or a tensor)."""
        raise NotImplementedError
