"""Estimating the Gamma table of Analytic-DPM from a model and data, on one device or many (Accelerate).

`Gamma_t = E ||eps_theta(x_t, t)||^2 / d` with `x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps`, `x_0` from the training
data and one fresh `eps` per image and timestep (Bao et al., ICLR 2022, eq. 8; MATH.md, "Estimating Gamma"). The
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
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import reverse_step as rs
from .schedule import alphas_cumprod_from_betas

__all__ = ["GammaEstimate", "GammaSums", "estimate_gamma", "mean_square_per_sample"]

DATA_KEYS = ("images", "pixel_values")


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
    def zeros(cls, num_train_timesteps: int) -> "GammaSums":
        z = lambda: torch.zeros(num_train_timesteps, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z())

    @property
    def num_train_timesteps(self) -> int:
        return self.count.numel()

    def add(self, timesteps: torch.Tensor, values: torch.Tensor) -> None:
        """Adds the per-sample values `values[i] = g_i` observed at `timesteps[i]` (in place)."""
        timesteps = torch.as_tensor(timesteps).long().flatten().cpu()
        values = values.double().flatten().cpu()
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
        """Writes the estimate as JSON, atomically (a temporary file, then `os.replace`)."""
        state = self.to_dict()
        if extra:
            state.update(extra)
        write_json_atomically(path, state)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "GammaEstimate":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def write_json_atomically(path: Union[str, os.PathLike], state: Dict[str, Any]) -> None:
    """Writes JSON to `path` so that a reader sees either the old file or the complete new one, never a half."""
    write_text_atomically(path, json.dumps(state, allow_nan=False) + "\n")


def write_text_atomically(path: Union[str, os.PathLike], text: str) -> None:
    """Writes `text` to a temporary file in the same folder, syncs it, then renames it over `path` (`os.replace`)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Data: whatever the user has -> this process's shard of the first M images, as one tensor
# ---------------------------------------------------------------------------------------------------------------------


def images_from_batch(batch) -> torch.Tensor:
    """The image tensor `[B, C, H, W]` of a batch: a tensor, the first element of a tuple/list, or a dict's
    `"images"` / `"pixel_values"`."""
    if isinstance(batch, dict):
        for key in DATA_KEYS:
            if key in batch:
                batch = batch[key]
                break
        else:
            raise ValueError(f"A dict batch needs one of the keys {DATA_KEYS}; got keys {sorted(batch)}.")
    elif isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("Got an empty tuple/list as a batch.")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"Expected image batches as tensors (or tuples/lists/dicts holding them), got {type(batch).__name__}."
        )
    if batch.ndim < 2:
        raise ValueError(f"Expected a batch of images `[B, C, H, W]`, got shape {tuple(batch.shape)}.")
    if not batch.is_floating_point():
        raise ValueError(
            f"Expected float images in [-1, 1], got dtype {batch.dtype}. For uint8 images use `x / 127.5 - 1`."
        )
    return batch


def shard_images(data, num_samples: Optional[int], rank: int, world_size: int,
                 batch_size: int) -> Tuple[torch.Tensor, int, Optional[int]]:
    """
    This process's images: global indices `rank, rank + W, ...` below `M = min(num_samples, available)`.

    Returns `(shard [n, ...] float32 on CPU, M, available or None when the data ran out before num_samples)`.
    Tensors and map-style datasets load only this shard; other iterables are read up to M images by every process
    (the model calls are split, the reading is not).
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}.")
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        data = images_from_batch(data)
        available = data.shape[0]
        used = available if num_samples is None else min(num_samples, available)
        return data[rank:used:world_size].float().cpu(), used, available
    map_style = isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
    if map_style and hasattr(data, "__len__"):
        available = len(data)
        used = available if num_samples is None else min(num_samples, available)
        subset = torch.utils.data.Subset(data, range(rank, used, world_size))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
        parts = [images_from_batch(b).float().cpu() for b in loader]
        return (torch.cat(parts) if parts else _empty_like_dataset(data)), used, available
    if not isinstance(data, Iterable):
        raise TypeError(
            f"`data` must be a tensor, a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}."
        )
    parts: List[torch.Tensor] = []
    seen = 0
    shape = None
    for batch in data:
        images = images_from_batch(batch)
        if shape is not None and images.shape[1:] != shape:
            raise ValueError(f"Batches have different image shapes: {tuple(shape)} and {tuple(images.shape[1:])}.")
        shape = images.shape[1:]
        if num_samples is not None:
            images = images[: num_samples - seen]
        first = (rank - seen) % world_size  # the first index of this batch that is ours
        parts.append(images[first::world_size].float().cpu())
        seen += images.shape[0]
        if num_samples is not None and seen >= num_samples:
            return torch.cat(parts), seen, None
    if seen == 0:
        return torch.empty(0), 0, 0
    return torch.cat(parts), seen, seen


def _empty_like_dataset(data) -> torch.Tensor:
    return torch.empty(0) if len(data) == 0 else images_from_batch(
        torch.utils.data.default_collate([data[0]]))[:0].float()


# ---------------------------------------------------------------------------------------------------------------------
# The model-calling loop
# ---------------------------------------------------------------------------------------------------------------------


def _abar_float64(scheduler) -> torch.Tensor:
    abar = getattr(scheduler, "_abar64", None)
    if abar is not None:
        return abar.double().cpu()
    if getattr(scheduler, "betas", None) is not None:
        return alphas_cumprod_from_betas(scheduler.betas).cpu()
    return torch.as_tensor(scheduler.alphas_cumprod).double().cpu()


def _timestep_seed(seed: int, rank: int, world_size: int, t: int) -> int:
    # one independent stream per (run seed, process, timestep): a resumed run redraws exactly the same noise
    return int(np.random.SeedSequence([seed, world_size, rank, t]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _model_output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"The model returned {type(output).__name__}; expected a tensor, a diffusers output with `.sample` or a tuple."
    )


def _model_device_dtype(model) -> Tuple[torch.device, torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                dtype = tensor.dtype if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32) else None
                return tensor.device, dtype or torch.float32
    return torch.device("cpu"), torch.float32


def _check_range(shard: torch.Tensor, reduce_max: Callable[[torch.Tensor], torch.Tensor], warn: bool) -> None:
    local = torch.tensor([shard.max().item(), -shard.min().item()] if shard.numel() else [-math.inf, -math.inf],
                         dtype=torch.float64)
    high, neg_low = reduce_max(local).tolist()
    low = -neg_low
    if not warn or not math.isfinite(high):
        return
    tolerance = 1e-3
    if high > 1 + tolerance or low < -1 - tolerance:
        hint = " They look like [0, 255]: use `x / 127.5 - 1`." if high > 2 and low >= 0 else ""
        warnings.warn(
            f"The images range over [{low:.3g}, {high:.3g}], outside [-1, 1] where diffusion models are trained; "
            f"Gamma estimated from them is not the model's.{hint} Images in [0, 1] map to [-1, 1] with `x * 2 - 1`.",
            stacklevel=3,
        )
    elif low >= 0 and high <= 1 + tolerance:
        warnings.warn(
            f"All image values lie in [{low:.3g}, {high:.3g}] (none negative): if your images are in [0, 1], map "
            "them to [-1, 1] with `x * 2 - 1` first.",
            stacklevel=3,
        )


def estimate_gamma(
    model: Callable,
    data,
    scheduler,
    num_samples: Optional[int] = None,
    batch_size: int = 64,
    timesteps: Optional[Sequence[int]] = None,
    generator: Optional[Union[int, torch.Generator]] = None,
    accelerator=None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    return_stderr: bool = True,
    resume_from: Optional[Union[GammaEstimate, GammaSums]] = None,
    callback: Optional[Callable[[GammaSums], None]] = None,
) -> Union[GammaEstimate, torch.Tensor]:
    """
    Estimates `Gamma_t = E ||eps_theta(x_t, t)||^2 / d` (Analytic-DPM, Bao et al. ICLR 2022, eq. 8) by Monte Carlo:
    for each of M images `x_0` and each timestep `t`, one fresh `eps`, `x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps`,
    one model call. M*T calls for the full table (the papers: M = 50,000 on CIFAR10, 10,000 on CelebA/ImageNet 64).

    Args:
        model (`Callable`):
            `model(x_t, t)` with `t` a long tensor `[N]`, returning a tensor, a diffusers output with `.sample`
            (e.g. `UNet2DModel`) or a tuple; of the sample's shape, predicting the scheduler's `prediction_type`
            (converted to `eps` here). Put it on the device and in eval mode (a module in training mode is switched
            to eval for the run). Wrap conditional models: `lambda x, t: unet(x, t, encoder_hidden_states=...)`.
        data:
            Training images in `[-1, 1]`: a tensor `[N, C, H, W]`, a map-style `Dataset`, or a `DataLoader` /
            iterable of batches (tensors, tuples/lists whose first element is the images, or dicts with `"images"` or
            `"pixel_values"`). The first M images are used and kept in memory (this process's shard of them).
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

    Returns:
        `GammaEstimate`, or a float64 tensor `[T]` with NaN at timesteps not estimated when `return_stderr=False`.
    """
    # 1. processes and devices
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    is_main = accelerator.is_local_main_process if accelerator else True
    model_device, model_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else (accelerator.device if accelerator else model_device)
    dtype = dtype or model_dtype
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")

    def reduce_sum(x: torch.Tensor) -> torch.Tensor:
        if accelerator is None or world_size == 1:
            return x
        return accelerator.reduce(x.to(accelerator.device), reduction="sum").cpu()

    def reduce_max(x: torch.Tensor) -> torch.Tensor:
        if accelerator is None or world_size == 1:
            return x
        return accelerator.gather(x.to(accelerator.device)[None]).cpu().amax(dim=0)

    # 2. the schedule and the timesteps to estimate
    abar = _abar_float64(scheduler)
    T = abar.numel()
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if timesteps is None:
        wanted = list(range(T))
    else:
        wanted = sorted({int(t) for t in torch.as_tensor(timesteps).flatten().tolist()})
        if not wanted or wanted[0] < 0 or wanted[-1] >= T:
            raise ValueError(f"`timesteps` must be a non-empty list of integers in [0, {T - 1}].")
    resumed = GammaSums.zeros(T)
    if resume_from is not None:
        resumed = resume_from.sums if isinstance(resume_from, GammaEstimate) else resume_from
        if resumed.num_train_timesteps != T:
            raise ValueError(f"`resume_from` has {resumed.num_train_timesteps} timesteps, the schedule {T}.")

    # 3. this process's images
    shard, used, available = shard_images(data, num_samples, rank, world_size, batch_size)
    if used == 0:
        raise ValueError("`data` is empty: Gamma needs training images (in [-1, 1]).")
    if is_main and num_samples is not None and available is not None and num_samples > available:
        warnings.warn(f"`num_samples`={num_samples} but the data holds only {available} images; used all {used}.",
                      stacklevel=2)
    _check_range(shard, reduce_max, warn=is_main)
    done = set((resumed.count > 0).nonzero().flatten().tolist())
    stale = [t for t in done if int(resumed.count[t].item()) != used]
    if stale:
        raise ValueError(
            f"`resume_from` holds {int(resumed.count[stale[0]].item())} samples at timestep {stale[0]}, but this run "
            f"uses {used}: resume with the same data and `num_samples`."
        )
    todo = [t for t in wanted if t not in done]
    in_channels = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(in_channels, int) and shard.numel() and shard.shape[1] != in_channels:
        raise ValueError(f"The images have {shard.shape[1]} channels but the model expects {in_channels}.")

    # 4. packing: images per call, and timesteps per call when there are fewer images than `batch_size`
    # (from global quantities only, so that every process runs the same number of reductions)
    per_process = math.ceil(used / world_size)
    images_per_call = min(batch_size, per_process)
    timesteps_per_call = max(1, min(batch_size // images_per_call, len(todo) or 1))
    shard = shard.to(device)
    n_local = shard.shape[0]
    seed = _base_seed(generator)

    # 5. the loop: groups of timesteps outside (so that finished timesteps can be checkpointed), images inside
    local = GammaSums.zeros(T)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        calls = math.ceil(len(todo) / timesteps_per_call) * math.ceil(n_local / images_per_call)
        bar = tqdm(total=calls, desc="Estimating Gamma", unit="call", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for g in range(0, len(todo), timesteps_per_call):
                group = todo[g:g + timesteps_per_call]
                generators = [_make_generator(_timestep_seed(seed, rank, world_size, t), device) for t in group]
                for start in range(0, n_local, images_per_call):
                    x0 = shard[start:start + images_per_call]
                    x_t, t_batch = _noised_batch(x0, group, abar, generators)
                    output = _model_output_tensor(model(x_t.to(dtype), t_batch))
                    if output.shape != x_t.shape:
                        raise ValueError(_shape_error(output.shape, x_t.shape))
                    values = _mean_square_of_eps(output, x_t, group, abar, prediction_type)
                    if not torch.isfinite(values).all():
                        raise ValueError(
                            f"The model output at timesteps {group} contains NaN or Inf. With fp16, try bf16 or "
                            "float32 for the model; otherwise check the images."
                        )
                    local.add(t_batch, values)
                    if bar is not None:
                        bar.update(1)
                if callback is not None:
                    callback(resumed + GammaSums.from_stacked(reduce_sum(local.stacked())))
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()

    # 6. the global sums, the same on every process
    total = resumed + GammaSums.from_stacked(reduce_sum(local.stacked()))
    estimate = GammaEstimate.from_sums(total)
    return estimate if return_stderr else estimate.gamma


def _base_seed(generator) -> int:
    if generator is None:
        return 0
    if isinstance(generator, int):
        return generator
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    raise TypeError(f"`generator` must be an int seed or a torch.Generator, got {type(generator).__name__}.")


def _make_generator(seed: int, device: torch.device) -> torch.Generator:
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # devices without their own generators: draw on the CPU
        return torch.Generator().manual_seed(seed)


def _noised_batch(x0: torch.Tensor, group: List[int], abar: torch.Tensor,
                  generators: List[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """`x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps` for every timestep of `group`, concatenated along the batch."""
    parts, ts = [], []
    for t, gen in zip(group, generators):
        eps = torch.randn(x0.shape, generator=gen, device=gen.device, dtype=torch.float32).to(x0.device)
        a = abar[t].item()
        parts.append(math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps)
        ts.append(torch.full((x0.shape[0],), t, dtype=torch.long))
    return torch.cat(parts), torch.cat(ts).to(x0.device)


def _mean_square_of_eps(output: torch.Tensor, x_t: torch.Tensor, group: List[int], abar: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":  # eps is the output itself (also at zero-SNR timesteps, where x0 is undefined)
        return mean_square_per_sample(output)
    n = x_t.shape[0] // len(group)
    values = []
    for i, t in enumerate(group):
        rows = slice(i * n, (i + 1) * n)
        eps, _ = rs.eps_and_x0_from_model_output(output[rows].float(), x_t[rows], abar[t].item(), prediction_type)
        values.append(mean_square_per_sample(eps))
    return torch.cat(values)


def _shape_error(output_shape, sample_shape) -> str:
    hint = ""
    if len(output_shape) > 1 and output_shape[1] == 2 * sample_shape[1]:
        hint = (" It has twice the sample's channels: for a learned-variance model pass "
                "`lambda x, t: model(x, t).sample[:, :C]`; for an `[eps, h]` noise-square head, take the `eps` half.")
    return (f"The model output has shape {tuple(output_shape)}, but the noised images have shape "
            f"{tuple(sample_shape)}: Gamma needs an output of the sample's shape.{hint}")
