"""Estimating the Gamma table of Analytic-DPM from a model and data, on one device or many (Accelerate).

`Gamma_t = E ||eps_theta(x_t, t)||^2 / d` with `x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps`, `x_0` from the training
data and one fresh `eps` per image and timestep (Bao et al., ICLR 2022, eq. 8; `docs/method.md#estimating-gamma`). The
Monte-Carlo estimate over M images is the mean of the per-image values `g_i = ||eps_hat_i||^2 / d`; its standard error
is `std(g_i) / sqrt(M)`.

The file has two halves:

- the math, pure tensor functions and the additive `GammaSums` (sums of `g_i` and `g_i^2` per timestep, reduced
  across processes by a plain sum), which never see a model;
- `estimate_gamma`, the loop that feeds a model with noised images and accumulates those sums.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import reverse_step as rs
from .data import shard_images
from .runtime import (GeneratorLike, call_model, make_generator, model_device_dtype, seed_of, stream_seed,
                      write_json_atomically)
from .schedule import alphas_cumprod_float64

__all__ = ["GammaEstimate", "GammaSums", "estimate_gamma", "mean_square_per_sample"]


# ---------------------------------------------------------------------------------------------------------------------
# The math: per-sample values, additive sums, mean and standard error
# ---------------------------------------------------------------------------------------------------------------------


def mean_square_per_sample(eps_hat: torch.Tensor) -> torch.Tensor:
    """`g_i = ||eps_hat_i||^2 / d` for each sample of a batch `[N, ...]`, as float64 `[N]`."""
    return eps_hat.reshape(eps_hat.shape[0], -1).float().square().mean(dim=1).double()


@dataclass
class GammaSums:
    """
    Per-timestep sufficient statistics of the Monte-Carlo estimate: `count_t`, `sum_t = sum_i g_i` and
    `sum_sq_t = sum_i g_i^2`, all float64 of shape `[T]`. Sums are additive, so batches, processes and runs merge by
    `+` (`accelerator.reduce(..., "sum")` is exactly the merge).
    """

    count: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor

    @classmethod
    def zeros(cls, num_train_timesteps: int, device: Union[str, torch.device, None] = None) -> "GammaSums":
        """Empty sums, on `device` (default CPU): accumulating where the model runs needs no host reads."""
        z = lambda: torch.zeros(num_train_timesteps, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(), z())

    @property
    def num_train_timesteps(self) -> int:
        return self.count.numel()

    def add(self, timesteps: torch.Tensor, values: torch.Tensor) -> None:
        """Adds the per-sample values `values[i] = g_i` observed at `timesteps[i]` (in place, on the sums' device)."""
        timesteps = torch.as_tensor(timesteps).long().flatten().to(self.count.device)
        values = values.double().flatten().to(self.count.device)
        self.count.index_add_(0, timesteps, torch.ones_like(values))
        self.total.index_add_(0, timesteps, values)
        self.total_sq.index_add_(0, timesteps, values * values)

    def __add__(self, other: "GammaSums") -> "GammaSums":
        return GammaSums(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    def stacked(self) -> torch.Tensor:
        """`[3, T]`: count, sum, sum of squares (what a distributed reduction sends)."""
        return torch.stack([self.count, self.total, self.total_sq])

    @classmethod
    def from_stacked(cls, stacked: torch.Tensor) -> "GammaSums":
        stacked = stacked.detach().to("cpu", torch.float64)
        return cls(stacked[0].clone(), stacked[1].clone(), stacked[2].clone())

    def mean(self) -> torch.Tensor:
        """`Gamma_t = sum_t / count_t`; NaN where `count_t = 0` (not estimated)."""
        return gamma_from_sums(self.count, self.total)

    def stderr(self) -> torch.Tensor:
        """The standard error of `mean()`; NaN where not estimated, inf where only one sample was seen."""
        return stderr_from_sums(self.count, self.total, self.total_sq)


def gamma_from_sums(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """`sum / count`, NaN where `count = 0`."""
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def stderr_from_sums(count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> torch.Tensor:
    """`sqrt(s^2 / n)` with the unbiased sample variance `s^2 = (sum_sq - n mean^2) / (n - 1)`."""
    n = count.clamp(min=1)
    mean = total / n
    # float64 cancellation can make the variance a hair negative when all g_i are equal
    var = ((total_sq - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0.0)
    stderr = (var / n).sqrt()
    stderr = torch.where(count == 1, torch.full_like(stderr, math.inf), stderr)
    return torch.where(count > 0, stderr, torch.full_like(stderr, math.nan))


def fill_missing(table: torch.Tensor, fill: Union[str, float]) -> torch.Tensor:
    """Fills the NaN entries of a table: `"interpolate"` (linear in `t` between estimated timesteps, constant beyond
    the first and last) or a constant."""
    table = table.clone()
    missing = torch.isnan(table)
    if not missing.any():
        return table
    if isinstance(fill, str):
        if fill != "interpolate":
            raise ValueError(f"`fill` must be 'interpolate' or a number, got {fill!r}.")
        known = (~missing).nonzero().flatten()
        if len(known) == 0:
            raise ValueError("No timestep was estimated: there is nothing to interpolate from.")
        t = np.arange(table.numel())
        table = torch.from_numpy(np.interp(t, known.numpy(), table[known].numpy()))
    else:
        table[missing] = float(fill)
    return table


# ---------------------------------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class GammaEstimate:
    """
    A Monte-Carlo estimate of the Gamma table.

    Args:
        gamma (`torch.Tensor`, float64, `[T]`):
            `Gamma_t` for every training timestep; **NaN at timesteps that were not estimated** (when only a subset,
            such as one trajectory, was asked for).
        stderr (`torch.Tensor`, float64, `[T]`):
            Its Monte-Carlo standard error, `std(g_i) / sqrt(M)`; NaN where not estimated.
        num_samples (`int`):
            M, the number of images behind each estimated entry.
        timesteps_estimated (`torch.Tensor`, int64):
            The estimated timesteps, ascending.
        sums (`GammaSums`):
            The sufficient statistics; pass the estimate as `resume_from=` to add the remaining timesteps, or add two
            estimates' `sums` to merge runs.

    A table the scheduler accepts must be finite everywhere: use `to_scheduler` (which refuses a partial table unless
    `fill=` says how to complete it) or `filled(...)`.
    """

    gamma: torch.Tensor
    stderr: torch.Tensor
    num_samples: int
    timesteps_estimated: torch.Tensor
    sums: GammaSums

    @classmethod
    def from_sums(cls, sums: GammaSums) -> "GammaEstimate":
        estimated = (sums.count > 0).nonzero().flatten()
        num_samples = int(sums.count[estimated].min().item()) if len(estimated) else 0
        return cls(sums.mean(), sums.stderr(), num_samples, estimated, sums)

    @property
    def is_complete(self) -> bool:
        """Whether every training timestep was estimated."""
        return len(self.timesteps_estimated) == self.gamma.numel()

    def filled(self, fill: Union[str, float] = "interpolate") -> torch.Tensor:
        """
        The table with the timesteps that were not estimated filled in: `"interpolate"` (linear in `t`, constant
        outside the estimated range) or a number. Trajectories that visit only estimated timesteps use estimates;
        any other trajectory uses the filled values, which are not estimates.
        """
        return fill_missing(self.gamma, fill)

    def to_scheduler(self, config, fill: Optional[Union[str, float]] = None, **kwargs):
        """
        An `AnalyticDPMScheduler` with this table, e.g. `estimate.to_scheduler(pipe.scheduler.config)`.

        Args:
            config: a scheduler (its `config` is used) or a scheduler config, typically the model's own.
            fill (`str` or `float`, *optional*): required when the table is partial; see `filled`.
            kwargs: further config overrides (`eta`, `last_step_sigma_clip`, ...).
        """
        from .scheduling_analytic_dpm import AnalyticDPMScheduler

        if not self.is_complete:
            if fill is None:
                raise ValueError(
                    f"The table was estimated at {len(self.timesteps_estimated)} of {self.gamma.numel()} timesteps "
                    "(a subset such as one trajectory), and a scheduler needs a value at every timestep. Pass "
                    "`fill='interpolate'` (or a number) to fill the others explicitly: trajectories through the "
                    "estimated timesteps then use estimates, others use filled values; or estimate all timesteps."
                )
            table = self.filled(fill)
        else:
            table = self.gamma
        config = getattr(config, "config", config)
        return AnalyticDPMScheduler.from_config(config, gamma=table, **kwargs)

    # ------------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict (NaN and inf as `null`; the sums kept exactly, so that runs can be merged or resumed)."""
        as_list = lambda x: [v if math.isfinite(v) else None for v in x.tolist()]  # noqa: E731
        return {
            "num_train_timesteps": self.gamma.numel(),
            "num_samples": self.num_samples,
            "timesteps_estimated": self.timesteps_estimated.tolist(),
            "gamma": as_list(self.gamma),
            "gamma_stderr": as_list(self.stderr),
            "sums": {"count": self.sums.count.tolist(), "sum": self.sums.total.tolist(),
                     "sum_sq": self.sums.total_sq.tolist()},
        }

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "GammaEstimate":
        try:
            sums = state["sums"]
            stacked = torch.tensor([sums["count"], sums["sum"], sums["sum_sq"]], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"Not a saved GammaEstimate (missing or malformed 'sums'): {error}") from None
        return cls.from_sums(GammaSums.from_stacked(stacked))

    def save(self, path: Union[str, os.PathLike], extra: Optional[Dict[str, Any]] = None) -> None:
        """Writes the estimate as JSON, atomically (a reader never sees a half-written file)."""
        state = self.to_dict()
        if extra:
            state.update(extra)
        write_json_atomically(path, state)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "GammaEstimate":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------------------------------------
# The estimate: a loop that feeds the model with noised images and accumulates `GammaSums`
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one process needs for the loop, fixed before the first model call."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device
    dtype: torch.dtype
    abar: List[float]
    prediction_type: str
    shard: torch.Tensor
    shard_kwargs: Dict[str, torch.Tensor]
    todo: List[int]
    images_per_call: int
    timesteps_per_call: int
    seed: int


def estimate_gamma(
    model: Callable,
    data,
    scheduler,
    num_samples: Optional[int] = None,
    batch_size: int = 64,
    timesteps: Optional[Sequence[int]] = None,
    generator: GeneratorLike = None,
    accelerator=None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    return_stderr: bool = True,
    resume_from: Optional[Union[GammaEstimate, GammaSums]] = None,
    callback: Optional[Callable[[GammaSums], None]] = None,
    model_kwargs: Optional[Dict[str, torch.Tensor]] = None,
    check_range: bool = True,
) -> Union[GammaEstimate, torch.Tensor]:
    """
    Estimates `Gamma_t = E ||eps_theta(x_t, t)||^2 / d` (Analytic-DPM, Bao et al. ICLR 2022, eq. 8) by Monte Carlo:
    for each of M images `x_0` and each timestep `t`, one fresh `eps`, `x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps`,
    one model call. M*T calls for the full table (the papers: M = 50,000 on CIFAR10, 10,000 on CelebA/ImageNet 64).
    See `docs/method.md#estimating-gamma`.

    Args:
        model (`Callable`):
            `model(x_t, t, **model_kwargs)` with `t` a long tensor `[N]`, returning a tensor, a diffusers output with
            `.sample` (e.g. `UNet2DModel`) or a tuple; of the sample's shape, predicting the scheduler's
            `prediction_type` (converted to `eps` here). Put it on the device and in eval mode (a module in training
            mode is switched to eval for the run).
        data:
            Training images in `[-1, 1]` (or a latent model's latents): a tensor `[N, C, H, W]`, a map-style
            `Dataset`, or a `DataLoader` / iterable of batches (tensors, tuples/lists whose first element is the
            images, or dicts with `"pixel_values"`, `"images"`, ...). The first M images are used and kept in memory
            (this process's shard of them).
        scheduler:
            The model's noise schedule: any diffusers scheduler (`alphas_cumprod`, `config.prediction_type`).
        num_samples (`int`, *optional*):
            M; defaults to all the data. When the data holds fewer, all of it is used, with a warning.
        batch_size (`int`, defaults to 64):
            Inputs per model call. With fewer images than this, several timesteps share a call.
        timesteps (`Sequence[int]`, *optional*):
            Estimate only these timesteps, e.g. `scheduler.timesteps` after `set_timesteps(K)`: M*K calls instead of
            M*T. The other entries of the result are NaN (see `GammaEstimate.to_scheduler(fill=...)`).
        generator (`int` or `torch.Generator`, *optional*):
            The seed (or a generator to draw the seed from). Noise is drawn per process and timestep from streams
            derived from it, so a run is reproducible for a given seed, number of processes and batch size.
        accelerator (`accelerate.Accelerator`, *optional*):
            For multi-process runs (`accelerate launch`): each process evaluates its shard of the images (every W-th
            one), the sums are reduced, and every process returns the same table.
        device (`str` or `torch.device`, *optional*):
            Where inputs go; defaults to `accelerator.device`, else the model's device.
        dtype (`torch.dtype`, *optional*):
            The model's input dtype; defaults to the model's. The statistics are accumulated in float64.
        progress (`bool`, defaults to `True`):
            Show a tqdm progress bar (on the main process only).
        return_stderr (`bool`, defaults to `True`):
            Return a `GammaEstimate` (table, standard error, counts). `False` returns the bare float64 table `[T]`.
        resume_from (`GammaEstimate` or `GammaSums`, *optional*):
            Earlier results: their estimated timesteps are skipped and their sums kept.
        callback (`Callable[[GammaSums], None]`, *optional*):
            Called on every process after each group of timesteps with the global sums so far (for checkpoints).
            Each call reduces the sums and reads them to the host (one synchronisation per group).
        model_kwargs (`Dict[str, torch.Tensor]`, *optional*):
            Per-image inputs of the model, each `[N, ...]` aligned with the images (e.g. one caption embedding per
            image as `encoder_hidden_states`); sharded and batched with them and passed as `model(x_t, t, **kw)`.

    Returns:
        `GammaEstimate`, or a float64 tensor `[T]` with NaN at timesteps not estimated when `return_stderr=False`.

    The loop never waits for the device: noise is drawn there, the sums stay there, and they are read back once at
    the end (and after each group of timesteps when `callback` is given). The range check reads the images on the
    host, before they move to the device.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    resumed = _resumed_sums(resume_from, len(alphas_cumprod_float64(scheduler)))
    run = _prepare(model, data, scheduler, num_samples, batch_size, timesteps, generator, accelerator, device, dtype,
                   resumed, model_kwargs, check_range)
    local = GammaSums.zeros(len(run.abar), device=run.device)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    bar = _progress_bar(run, progress)
    try:
        with torch.inference_mode():
            for g in range(0, len(run.todo), run.timesteps_per_call):
                group = run.todo[g:g + run.timesteps_per_call]
                _estimate_group(model, run, group, local, bar)
                if callback is not None:
                    callback(_checked(resumed + _reduced(local, accelerator), group))
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    total = _checked(resumed + _reduced(local, accelerator), run.todo)
    estimate = GammaEstimate.from_sums(total)
    return estimate if return_stderr else estimate.gamma


def _resumed_sums(resume_from, num_train_timesteps: int) -> GammaSums:
    if resume_from is None:
        return GammaSums.zeros(num_train_timesteps)
    resumed = resume_from.sums if isinstance(resume_from, GammaEstimate) else resume_from
    if resumed.num_train_timesteps != num_train_timesteps:
        raise ValueError(f"`resume_from` has {resumed.num_train_timesteps} timesteps, the schedule "
                         f"{num_train_timesteps}.")
    return resumed


def _prepare(model, data, scheduler, num_samples, batch_size, timesteps, generator, accelerator, device, dtype,
             resumed: GammaSums, model_kwargs, check_range: bool) -> _Run:
    """Processes, the schedule, the timesteps still to do, this process's images, and how calls are packed."""
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = accelerator.is_local_main_process if accelerator else True
    model_device, model_dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else (accelerator.device if accelerator else model_device)
    abar = alphas_cumprod_float64(scheduler).tolist()
    wanted = _wanted_timesteps(timesteps, len(abar))

    shard, used, available = shard_images(data, num_samples, rank, world_size, batch_size)
    if used == 0:
        raise ValueError("`data` is empty: Gamma needs training images (in [-1, 1]).")
    if is_main and num_samples is not None and available is not None and num_samples > available:
        warnings.warn(f"`num_samples`={num_samples} but the data holds only {available} images; used all {used}.",
                      stacklevel=3)
    if check_range:
        _check_range(shard, accelerator, warn=is_main)
    _check_resumable(resumed, used)
    in_channels = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(in_channels, int) and shard.numel() and shard.shape[1] != in_channels:
        raise ValueError(f"The images have {shard.shape[1]} channels but the model expects {in_channels}.")
    done = set((resumed.count > 0).nonzero().flatten().tolist())
    todo = [t for t in wanted if t not in done]
    # packing from global quantities only, so that every process runs the same number of reductions
    images_per_call = min(batch_size, math.ceil(used / world_size))
    timesteps_per_call = max(1, min(batch_size // images_per_call, len(todo) or 1))
    kwargs = {name: _aligned(name, value, used)[rank:used:world_size].to(device)
              for name, value in (model_kwargs or {}).items()}
    return _Run(rank, world_size, is_main, device, dtype or model_dtype, abar,
                getattr(scheduler.config, "prediction_type", "epsilon"), shard.to(device), kwargs, todo,
                images_per_call, timesteps_per_call, seed_of(generator))


def _wanted_timesteps(timesteps: Optional[Sequence[int]], num_train_timesteps: int) -> List[int]:
    if timesteps is None:
        return list(range(num_train_timesteps))
    wanted = sorted({int(t) for t in torch.as_tensor(timesteps).flatten().tolist()})
    if not wanted or wanted[0] < 0 or wanted[-1] >= num_train_timesteps:
        raise ValueError(f"`timesteps` must be a non-empty list of integers in [0, {num_train_timesteps - 1}].")
    return wanted


def _check_resumable(resumed: GammaSums, used: int) -> None:
    done = (resumed.count > 0).nonzero().flatten().tolist()
    stale = [t for t in done if int(resumed.count[t].item()) != used]
    if stale:
        raise ValueError(
            f"`resume_from` holds {int(resumed.count[stale[0]].item())} samples at timestep {stale[0]}, but this run "
            f"uses {used}: resume with the same data and `num_samples`."
        )


def _aligned(name: str, value, used: int) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.ndim == 0 or value.shape[0] < used:
        raise ValueError(f"`model_kwargs[{name!r}]` must hold one entry per image ({used}), got shape "
                         f"{tuple(value.shape)}.")
    return value


def _progress_bar(run: _Run, progress: bool):
    if not (progress and run.is_main):
        return None
    from tqdm.auto import tqdm

    calls = math.ceil(len(run.todo) / run.timesteps_per_call) * math.ceil(run.shard.shape[0] / run.images_per_call)
    return tqdm(total=calls, desc="Estimating Gamma", unit="call", dynamic_ncols=True)


def _estimate_group(model, run: _Run, group: List[int], local: GammaSums, bar) -> None:
    """All of this process's images at the timesteps of `group`, `images_per_call` images a call."""
    generators = [make_generator(stream_seed(run.seed, run.world_size, run.rank, t), run.device) for t in group]
    for start in range(0, run.shard.shape[0], run.images_per_call):
        rows = slice(start, start + run.images_per_call)
        x_t, t_batch = _noised_batch(run.shard[rows], group, run.abar, generators)
        kwargs = {name: value[rows].repeat(len(group), *([1] * (value.ndim - 1)))
                  for name, value in run.shard_kwargs.items()}
        output = call_model(model, x_t, t_batch, dtype=run.dtype, **kwargs)
        if output.shape != x_t.shape:
            raise ValueError(_shape_error(output.shape, x_t.shape))
        local.add(t_batch, _mean_square_of_eps(output, x_t, group, run.abar, run.prediction_type))
        if bar is not None:
            bar.update(1)


def _reduced(local: GammaSums, accelerator) -> GammaSums:
    """The sums of every process (on the CPU): one reduction, which is also this loop's only host read."""
    stacked = local.stacked()
    if accelerator is not None and accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="sum")
    return GammaSums.from_stacked(stacked)


def _checked(sums: GammaSums, timesteps: List[int]) -> GammaSums:
    """Raises when the (host) sums at `timesteps` are not finite; one read of one vector."""
    finite = torch.isfinite(sums.total[timesteps] + sums.total_sq[timesteps]).tolist()
    bad = [t for t, ok in zip(timesteps, finite) if not ok]
    if bad:
        raise ValueError(
            f"The model output at timesteps {bad[:10]} contains NaN or Inf. With fp16, try bf16 or float32 for the "
            "model; otherwise check the images."
        )
    return sums


def _noised_batch(x0: torch.Tensor, group: List[int], abar: List[float],
                  generators: List[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """`x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps` for every timestep of `group`, concatenated along the batch."""
    parts, ts = [], []
    for t, gen in zip(group, generators):
        eps = torch.randn(x0.shape, generator=gen, device=gen.device, dtype=torch.float32).to(x0.device)
        parts.append(math.sqrt(abar[t]) * x0 + math.sqrt(1.0 - abar[t]) * eps)
        ts.append(torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device))
    return torch.cat(parts), torch.cat(ts)


def _mean_square_of_eps(output: torch.Tensor, x_t: torch.Tensor, group: List[int], abar: List[float],
                        prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":  # eps is the output itself (also at zero-SNR timesteps, where x0 is undefined)
        return mean_square_per_sample(output)
    n = x_t.shape[0] // len(group)
    values = []
    for i, t in enumerate(group):
        rows = slice(i * n, (i + 1) * n)
        eps, _ = rs.eps_and_x0_from_model_output(output[rows].float(), x_t[rows], abar[t], prediction_type)
        values.append(mean_square_per_sample(eps))
    return torch.cat(values)


def _check_range(shard: torch.Tensor, accelerator, warn: bool) -> None:
    """Warns once when the images are not in [-1, 1] (all processes take part in the reduction). Runs once per run,
    on the host copy of the shard before it moves to the device, so it never waits for the device."""
    if shard.numel():
        local = torch.stack([shard.max(), -shard.min()]).to(torch.float64)
    else:
        local = torch.full((2,), -math.inf, dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        local = accelerator.gather(local.to(accelerator.device)[None]).cpu().amax(dim=0)
    high, negative_low = local.tolist()
    low = -negative_low
    if not warn or not math.isfinite(high):
        return
    tolerance = 1e-3
    if high > 1 + tolerance or low < -1 - tolerance:
        hint = " They look like [0, 255]: use `x / 127.5 - 1`." if high > 2 and low >= 0 else ""
        warnings.warn(
            f"The images range over [{low:.3g}, {high:.3g}], outside [-1, 1] where diffusion models are trained; "
            f"Gamma estimated from them is not the model's.{hint} Images in [0, 1] map to [-1, 1] with `x * 2 - 1`.",
            stacklevel=4,
        )
    elif low >= 0 and high <= 1 + tolerance:
        warnings.warn(
            f"All image values lie in [{low:.3g}, {high:.3g}] (none negative): if your images are in [0, 1], map "
            "them to [-1, 1] with `x * 2 - 1` first.",
            stacklevel=4,
        )


def _shape_error(output_shape, sample_shape) -> str:
    hint = ""
    if len(output_shape) > 1 and output_shape[1] == 2 * sample_shape[1]:
        hint = (" It has twice the sample's channels: for a learned-variance model pass "
                "`lambda x, t: model(x, t).sample[:, :C]`; for an `[eps, h]` noise-square head, take the `eps` half.")
    return (f"The model output has shape {tuple(output_shape)}, but the noised images have shape "
            f"{tuple(sample_shape)}: Gamma needs an output of the sample's shape.{hint}")
