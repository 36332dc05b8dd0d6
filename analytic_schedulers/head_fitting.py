"""The `"cached"` recipe for a noise-square head: one backbone pass per draw, then a full-batch fit of the output layer.

The backbone is frozen, and the head without a ResBlock is `GroupNorm -> SiLU -> 3x3 conv -> output activation`: once
the GroupNorm's affine is held where it is (the identity for a new head), the raw output `r` is *linear* in the conv's
weights, `r = X w + b`, where a row `X` is the conv's input `SiLU(GroupNorm(f))` over the 3x3 neighbourhood of one
pixel. So the head's whole training set can be computed once:

1. **Cache** (`collect_head_cache`). Draw `num_draws` triples `(x_0, t, eps)`, `t` uniform over the transitions
   `t -> s` of the scheduler's own trajectories for `num_inference_steps` (its `timestep_spacing` and
   `steps_offset`; the last step, onto the clean sample, has no variance and is left out). One forward pass of the
   head model per draw gives the prediction (turned into `eps_hat` and the clipped or thresholded `x0_hat` as the
   scheduler does) and, through a hook, the conv's input. At `pixels_per_draw` random pixels keep `X` and `x_0`,
   `eps`, `eps_hat`, `x0_hat` (`C` channels each) and the transition.
2. **Fit** (`fit_output_layer`). Full-batch L-BFGS on the conv's weights and bias only (`9 F + 1` numbers per output
   channel for `F` feature channels), starting from the head's current weights (zero for a new head: `h = 1`), on
   one of the losses below, plus `l2 * ||w||^2`. With several processes each keeps its own rows and every
   evaluation sums the loss and its gradient over them.

Losses, each averaged over rows and channels (see `docs/method.md`, "Fitting the head: the cached recipe"):

- `"kl"` (default): the ELBO's own step term `KL(q(x_s | x_t, x_0) || p(x_s | x_t))` in bits, with `v` computed as
  `SNDPMScheduler` computes it (the SN or NPR formula, bounded to `[0, max_x0_variance]`) and the mean from the
  processed `x0_hat`. Summed over the transitions it is the sum of the NLL's step terms at those K's. Over `v` it is
  minimised by `v = E[(x_0 - x0_hat)^2 | x_t]` (a proper scoring rule), NPR's target where nothing clips. Where the
  bound clips `v` the KL is flat in `h`, so `gnll_weight` adds the `"gnll"` loss, which pins `h` there.
- `"gnll"`: `log h + target / h`, the Gaussian NLL of the target `eps^2` (SN) or `(eps - eps_hat)^2` (NPR) as a
  variance; also minimised by the conditional mean, and scale-free.
- `"mse"`: the papers' `(h - target)^2`.

Cost on the bundled 16x16 digits model, one CPU thread: about 2 ms per draw for the cache (40 s at the default 20,000
draws) and 25-35 s for the fit, 60-75 s in all, where the plain recipe takes 0.11-0.15 s per Adam step (batch 64)
and needs about 5000 steps to beat Analytic-DPM's likelihood.

Not covered: heads with a ResBlock (not linear in their weights: use the plain recipe); `timestep_spacing="optimal"`
(pass the model's own scheduler). The KL is that of the DDPM forward process (`eta = 1`), the one with an ELBO; the
fitted head serves any `eta`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import reverse_step as rs
from .gaussian_math import ddpm_posterior, normal_kl
from .noise_square_head import NoiseSquareHeadModel, apply_output_activation, require_head_model
from .runtime import GeneratorLike, call_model, make_generator, model_device_dtype, seed_of, stream_seed, to_device
from .schedule import alphas_cumprod_float64, spaced_timesteps

__all__ = ["CachedFitRecipe", "HeadCache", "HeadFit", "KLSegment", "OutputLayerFit", "StepCoefficients",
           "collect_head_cache", "fit_noise_square_head", "fit_output_layer", "fit_transitions", "gaussian_nll",
           "head_objective", "kl_segments", "neighbourhoods", "noise_square_target", "posterior_mean_gap",
           "step_kl_bits"]

LOSSES = ("kl", "gnll", "mse")
RESBLOCK_HELP = (
    "The cached recipe fits the output conv of a head without ResBlock, whose output is linear in that conv's "
    "weights; a ResBlock head is not. Train it with the plain recipe: `train_noise_square_head(..., "
    "recipe=\"plain\", num_steps=...)` or `analytic-schedulers train-head --recipe plain`."
)
# what diffusers' DDPMScheduler assumes for config entries an older config may lack
_SCHEDULER_DEFAULTS = {"timestep_spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon",
                       "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
                       "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "clip_variance": True,
                       "max_x0_variance": 1.0}


@dataclass(frozen=True)
class CachedFitRecipe:
    """
    The hyperparameters of the cached recipe (see the module docstring).

    Args:
        num_draws (`int`, defaults to 20000): backbone forward passes, one `(x_0, t, eps)` each: the cost that
            matters.
        pixels_per_draw (`int`, defaults to 16): random pixels kept per draw; the fit has `num_draws *
            pixels_per_draw` rows.
        num_inference_steps (`Tuple[int, ...]`, defaults to `(10, 25)`): the K's whose trajectories are fitted. A
            head fitted on K = 10 and 25 also beats Analytic-DPM at K = 50 and 100 on the bundled model.
        loss (`str`, defaults to `"kl"`): `"kl"`, `"gnll"` or `"mse"`.
        gnll_weight (`float`, defaults to 0.01): with `"kl"`, add this times the `"gnll"` loss, which pins `h` where
            the KL is flat (`v` bounded) so that `h` estimates its target at every fitted step; it leaves the NLL
            unchanged. Needs `output_activation="softplus"` (0 switches it off).
        max_evaluations (`int`, defaults to 300): L-BFGS stops after this many evaluations of the loss (its line
            search may finish with one more), or earlier once it has converged.
        l2 (`float`, defaults to 1e-6): ridge penalty on the conv's weights.
        batch_size (`int`, defaults to 128): draws per backbone call while caching.
    """

    num_draws: int = 20000
    pixels_per_draw: int = 16
    num_inference_steps: Tuple[int, ...] = (10, 25)
    loss: str = "kl"
    gnll_weight: float = 0.01
    max_evaluations: int = 300
    l2: float = 1e-6
    batch_size: int = 128

    def __post_init__(self):
        steps = (self.num_inference_steps,) if isinstance(self.num_inference_steps, int) else self.num_inference_steps
        object.__setattr__(self, "num_inference_steps", tuple(int(k) for k in steps))
        if self.num_draws < 1 or self.pixels_per_draw < 1 or self.batch_size < 1 or self.max_evaluations < 1:
            raise ValueError("`num_draws`, `pixels_per_draw`, `batch_size` and `max_evaluations` must be positive.")
        if not self.num_inference_steps or min(self.num_inference_steps) < 2:
            raise ValueError(f"`num_inference_steps` must be K's of at least 2 steps (K = 1 has no step with a "
                             f"variance), got {self.num_inference_steps}.")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
        if self.gnll_weight < 0 or self.l2 < 0:
            raise ValueError("`gnll_weight` and `l2` must be >= 0.")

    @classmethod
    def from_value(cls, recipe: Union["CachedFitRecipe", Dict[str, Any], str, None]) -> "CachedFitRecipe":
        """`recipe` as a `CachedFitRecipe`: itself, the defaults for `None` or `"cached"`, or built from a dict."""
        if recipe is None or recipe == "cached":
            return cls()
        if isinstance(recipe, cls):
            return recipe
        if isinstance(recipe, dict):
            return cls(**recipe)
        raise TypeError(f"A cached recipe must be a CachedFitRecipe, a dict of its fields or 'cached', got {recipe!r}.")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-able dict."""
        return {**asdict(self), "num_inference_steps": list(self.num_inference_steps)}


# ---------------------------------------------------------------------------------------------------------------------
# The steps that are fitted
# ---------------------------------------------------------------------------------------------------------------------


def fit_transitions(scheduler_config, num_train_timesteps: int, num_inference_steps: Sequence[int]) -> torch.Tensor:
    """
    The transitions `t -> s` of the scheduler's K-step trajectories for each K, from its `timestep_spacing` and
    `steps_offset` (`schedule.spaced_timesteps`); the last step of each, onto the clean sample, is left out.

    Returns:
        `torch.Tensor` `[S, 2]` (long): `(t, s)` per transition, trajectory after trajectory (a transition shared by
        two trajectories appears twice, so it is drawn as often as the NLLs at both K's weigh it).
    """
    spacing = _config_value(scheduler_config, "timestep_spacing")
    if spacing == "optimal":
        raise ValueError("The cached recipe fits the steps of the model's own timestep spacing; 'optimal' trajectories "
                         "come from a Gamma table. Pass the model's own scheduler (e.g. its DDPMScheduler).")
    pairs = []
    for k in num_inference_steps:
        timesteps = spaced_timesteps(k, num_train_timesteps, spacing, _config_value(scheduler_config, "steps_offset"))
        pairs += list(zip(timesteps[:-1].tolist(), timesteps[1:].tolist()))
    return torch.tensor(pairs, dtype=torch.long)


def _config_value(config, key: str):
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return _SCHEDULER_DEFAULTS[key] if value is None else value


# ---------------------------------------------------------------------------------------------------------------------
# The losses, as pure functions of tensors
# ---------------------------------------------------------------------------------------------------------------------


def noise_square_target(eps: torch.Tensor, eps_hat: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """What `h` estimates: `eps^2` (SN, `h ~ E[eps^2 | x_t]`) or `(eps - eps_hat)^2` (NPR,
    `h ~ E[(eps - eps_hat)^2 | x_t]`); `eps_hat` is the frozen backbone's (no gradient)."""
    if covariance_type == "sn":
        return eps.square()
    if covariance_type == "npr":
        return (eps - eps_hat.detach()).square()
    raise ValueError(f"`covariance_type` must be 'sn' or 'npr', got {covariance_type!r}.")


@dataclass(frozen=True)
class StepCoefficients:
    """One step `t -> s` of the DDPM forward process (`eta = 1`): `lambda^2 = tilde_beta_{s|t}` and
    `gamma_{t,s}^2`, the squared coefficient of `x_0` in the posterior mean (`reverse_step`)."""

    t: int
    s: int
    abar_t: float
    abar_s: float
    lambda_sq: float
    coef_sq: float

    @classmethod
    def of(cls, abar: Sequence[float], t: int, s: int) -> "StepCoefficients":
        lambda_sq = rs.ddim_lambda_sq(abar[t], abar[s], 1.0)
        return cls(t, s, abar[t], abar[s], lambda_sq, rs.x0_coefficient_sq(abar[t], abar[s], lambda_sq))


def posterior_mean_gap(x0: torch.Tensor, x0_hat: torch.Tensor, x_t: torch.Tensor,
                       step: StepCoefficients) -> torch.Tensor:
    """`mu_q - mu_p`: the true posterior mean `q(x_s | x_t, x_0)` minus the step's mean with `x0_hat` (DDPM's form,
    `eta = 1`); it is `gamma_{t,s} (x_0 - x0_hat)` and does not depend on the head."""
    true_mean, _ = ddpm_posterior(x0, x_t, step.abar_t, step.abar_s)
    return true_mean - rs.ddpm_mean(x0_hat, x_t, step.abar_t, step.abar_s)


def step_kl_bits(h: torch.Tensor, eps_hat: torch.Tensor, mean_gap: torch.Tensor, step: StepCoefficients,
                 covariance_type: str, max_x0_variance: float) -> torch.Tensor:
    """
    `KL(q(x_s | x_t, x_0) || p(x_s | x_t))` per element, in bits, for the step's `v` from `h` exactly as
    `SNDPMScheduler` computes it: `v` by the SN or NPR formula, bounded to `[0, max_x0_variance]` (`math.inf`: no
    upper bound), `sigma^2 = lambda^2 + gamma_{t,s}^2 v`.
    """
    if covariance_type == "sn":
        v = rs.sn_x0_variance(h, eps_hat, step.abar_t)
    else:
        v = rs.npr_x0_variance(h, step.abar_t)
    variance = rs.reverse_variance(step.lambda_sq, step.coef_sq, rs.bound_x0_variance(v, max_x0_variance))
    return normal_kl(mean_gap, step.lambda_sq, torch.zeros_like(mean_gap), variance) / math.log(2.0)


def gaussian_nll(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`log h + target / h` per element: the Gaussian NLL (up to constants) of a residual whose square is `target`,
    with variance `h`; minimised over `h` by `E[target | x_t]`, and scale-free."""
    return torch.log(h) + target / h


@dataclass
class KLSegment:
    """The cached rows of one transition, with what the KL needs of them besides `h`."""

    rows: torch.Tensor  # [n] long, indices into the cache
    step: StepCoefficients
    eps_hat: torch.Tensor  # [n, C]
    mean_gap: torch.Tensor  # [n, C], `posterior_mean_gap`


def head_objective(h: torch.Tensor, target: torch.Tensor, loss: str, gnll_weight: float = 0.0,
                   segments: Sequence[KLSegment] = (), covariance_type: str = "npr",
                   max_x0_variance: float = 1.0) -> torch.Tensor:
    """
    The recipe's loss summed over rows and channels (divide by their number for the mean): `"mse"`
    `(h - target)^2`, `"gnll"` `gaussian_nll`, or `"kl"` `step_kl_bits` over `segments` (which cover the rows of `h`)
    plus `gnll_weight` times `gaussian_nll`.

    Args:
        h: `[R, C]`, the head's output at the cached rows.
        target: `[R, C]`, `noise_square_target` of the rows.
    """
    if loss == "mse":
        return (h - target).square().sum()
    if loss == "gnll":
        return gaussian_nll(h, target).sum()
    total = sum(step_kl_bits(h[segment.rows], segment.eps_hat, segment.mean_gap, segment.step, covariance_type,
                             max_x0_variance).sum() for segment in segments)
    if gnll_weight:
        total = total + gnll_weight * gaussian_nll(h, target).sum()
    return total


# ---------------------------------------------------------------------------------------------------------------------
# The cache: the only part that calls the model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class HeadCache:
    """
    The rows of the fit, one per kept pixel of a draw (this process's draws, on its device).

    Args:
        features: `[R, F * k * k]`, the head conv's input over the pixel's `k x k` neighbourhood, in the order of
            `conv.weight.flatten(1)`.
        x0, eps, eps_hat, x0_hat: `[R, C]` at the pixel; `x0_hat` processed as the scheduler does (clip or
            dynamic thresholding, on the whole image).
        step: `[R]` long, the row's transition (an index into `transitions`).
        pixel: `[R]` long, the pixel's row-major index in the image; rows come `pixels_per_draw` per draw.
        transitions: `[S, 2]` long, `(t, s)` of each transition (`fit_transitions`).
        num_draws: this process's draws.
        cpu_seconds, wall_seconds: what collecting cost this process.
    """

    features: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    eps_hat: torch.Tensor
    x0_hat: torch.Tensor
    step: torch.Tensor
    pixel: torch.Tensor
    transitions: torch.Tensor
    num_draws: int
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def __len__(self) -> int:
        return self.step.shape[0]


def neighbourhoods(z: torch.Tensor, pixels: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """
    The `k x k` neighbourhoods (zero-padded, as a `k x k` conv with padding `k // 2` sees them) of the given pixels:
    row `i * P + j` is pixel `pixels[i, j]` of image `i`, its entries ordered as `conv.weight.flatten(1)`
    (channel, then kernel row, then kernel column). The same as `F.unfold(z, k, padding=k // 2)` at those pixels,
    without unfolding the whole map.

    Args:
        z: `[B, F, H, W]`, the conv's input.
        pixels: `[B, P]` long, row-major pixel indices.

    Returns:
        `torch.Tensor` `[B * P, F * k * k]`.
    """
    batch, channels, height, width = z.shape
    pad = kernel_size // 2
    padded = F.pad(z, (pad, pad, pad, pad)).flatten(2)  # [B, F, (H + 2 pad) (W + 2 pad)]
    y, x = pixels // width, pixels % width
    taps = []
    for dy in range(kernel_size):
        for dx in range(kernel_size):
            index = (y + dy) * (width + 2 * pad) + (x + dx)  # the tap (dy - pad, dx - pad) in padded coordinates
            taps.append(padded.gather(2, index[:, None, :].expand(-1, channels, -1)))
    columns = torch.stack(taps, dim=-1)  # [B, F, P, k * k]
    return columns.permute(0, 2, 1, 3).reshape(batch * pixels.shape[1], channels * kernel_size ** 2)


def _at_pixels(value: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B * P, C]`, the values at `pixels` (`[B, P]`, row-major indices)."""
    flat = value.flatten(2)
    return flat.gather(2, pixels[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2).reshape(-1, flat.shape[1])


class _ConvInput:
    """Keeps the input of the head's conv during a forward pass (a forward pre-hook, removed on exit)."""

    def __init__(self, conv: torch.nn.Module):
        self.conv, self.value = conv, None

    def __enter__(self):
        self.handle = self.conv.register_forward_pre_hook(self._keep)
        return self

    def _keep(self, module, args) -> None:
        self.value = args[0]

    def __exit__(self, *exc_info):
        self.handle.remove()

    def pop(self) -> torch.Tensor:
        value, self.value = self.value, None
        return value


@dataclass
class _Collection:
    """What every batch of draws of one process shares."""

    head_model: NoiseSquareHeadModel
    images: torch.Tensor  # [N, C, H, W] on the CPU
    abar: torch.Tensor  # [T] float64 on the CPU
    transitions: torch.Tensor  # [S, 2]
    config: Any  # the scheduler's config
    pixels_per_draw: int
    generator: torch.Generator  # this process's stream, on the CPU
    device: torch.device
    dtype: torch.dtype
    conv_input: _ConvInput
    rows: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


def _collect_batch(run: _Collection, n: int) -> None:
    """`n` draws: one forward pass of the head model, then the rows at `pixels_per_draw` random pixels of each."""
    g, config = run.generator, run.config
    channels, height, width = run.images.shape[1:]
    index = torch.randint(run.images.shape[0], (n,), generator=g)
    step = torch.randint(run.transitions.shape[0], (n,), generator=g)
    eps = torch.randn((n, channels, height, width), generator=g)
    pixels = torch.rand(n, height * width, generator=g).argsort(dim=1)[:, :run.pixels_per_draw]
    t = run.transitions[step, 0]
    abar_t = run.abar[t].float().reshape(-1, 1, 1, 1)
    x0, eps, abar_t, t_device, pixels = (to_device(v, run.device) for v in (run.images[index], eps, abar_t, t, pixels))
    x_t = abar_t.sqrt() * x0 + (1.0 - abar_t).sqrt() * eps
    prediction = call_model(run.head_model, x_t, t_device, dtype=run.dtype)[:, :channels].float()
    eps_hat, x0_hat = rs.eps_and_x0_from_model_output(prediction, x_t, abar_t, _config_value(config, "prediction_type"))
    x0_hat = rs.process_x0(x0_hat, _config_value(config, "clip_sample"), _config_value(config, "clip_sample_range"),
                           _config_value(config, "thresholding"), _config_value(config, "dynamic_thresholding_ratio"),
                           _config_value(config, "sample_max_value"))
    conv = run.head_model.head.conv
    values = {"features": neighbourhoods(run.conv_input.pop().float(), pixels, conv.kernel_size[0]),
              **{name: _at_pixels(v, pixels) for name, v in
                 (("x0", x0), ("eps", eps), ("eps_hat", eps_hat), ("x0_hat", x0_hat))},
              "step": to_device(step.repeat_interleave(run.pixels_per_draw), run.device), "pixel": pixels.flatten()}
    for name, value in values.items():
        run.rows.setdefault(name, []).append(value)


@torch.no_grad()
def collect_head_cache(head_model: NoiseSquareHeadModel, images: torch.Tensor, scheduler,
                       recipe: Optional[CachedFitRecipe] = None, generator: GeneratorLike = 0, accelerator=None,
                       progress: bool = False) -> HeadCache:
    """
    Step 1 of the cached recipe: `recipe.num_draws` forward passes of `head_model` (this process's share of them),
    and the rows of the fit at `recipe.pixels_per_draw` random pixels of each (see `HeadCache`).

    Args:
        head_model (`NoiseSquareHeadModel`): the backbone with the head to fit (any weights; they define `X`).
        images (`torch.Tensor`): training images `[N, C, H, W]` in `[-1, 1]`.
        scheduler: the model's diffusers scheduler: its `alphas_cumprod`, `timestep_spacing`, `steps_offset`,
            `prediction_type` and `clip_sample` / `thresholding` are read.
        recipe (`CachedFitRecipe`, *optional*): defaults to `CachedFitRecipe()`.
        generator (`int` or `torch.Generator`, defaults to 0): the seed; each process draws from its own stream
            `(seed, number of processes, rank)`, so a run is reproducible for a given seed and number of processes.
        accelerator (`accelerate.Accelerator`, *optional*): process `r` of `W` makes draws `r, r + W, ...`, on its
            device.
        progress (`bool`, defaults to `False`): a progress bar (main process).

    Returns:
        `HeadCache` on the model's (or the accelerator's) device.
    """
    from tqdm.auto import tqdm

    recipe = recipe or CachedFitRecipe()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device, dtype = model_device_dtype(head_model)
    abar = alphas_cumprod_float64(scheduler)
    transitions = fit_transitions(scheduler.config, len(abar), recipe.num_inference_steps)
    seed = stream_seed(seed_of(generator), world, rank)
    run = _Collection(head_model, images.float().cpu(), abar, transitions, scheduler.config, recipe.pixels_per_draw,
                      make_generator(seed), accelerator.device if accelerator is not None else device, dtype,
                      _ConvInput(head_model.head.conv))
    draws = len(range(rank, recipe.num_draws, world))
    bar = tqdm(total=draws, desc="caching head inputs", unit="draw", dynamic_ncols=True,
               disable=not progress or (accelerator is not None and not accelerator.is_local_main_process))
    head_model.eval()
    with run.conv_input:
        for begin in range(0, draws, recipe.batch_size):
            n = min(recipe.batch_size, draws - begin)
            _collect_batch(run, n)
            bar.update(n)
    bar.close()
    rows = {name: torch.cat(values) for name, values in run.rows.items()}
    return HeadCache(**rows, transitions=transitions, num_draws=draws, cpu_seconds=time.process_time() - cpu_start,
                     wall_seconds=time.perf_counter() - wall_start)


# ---------------------------------------------------------------------------------------------------------------------
# The fit: L-BFGS on the output layer, over the cached rows of every process
# ---------------------------------------------------------------------------------------------------------------------


def kl_segments(cache: HeadCache, abar: Sequence[float]) -> List[KLSegment]:
    """The cache's rows grouped by transition, each with its coefficients, `eps_hat` and `posterior_mean_gap`."""
    segments = []
    for index, (t, s) in enumerate(cache.transitions.tolist()):
        rows = (cache.step == index).nonzero().flatten()
        if rows.numel() == 0:
            continue
        step = StepCoefficients.of(abar, t, s)
        x0, eps = cache.x0[rows], cache.eps[rows]
        x_t = math.sqrt(step.abar_t) * x0 + math.sqrt(1.0 - step.abar_t) * eps
        segments.append(KLSegment(rows, step, cache.eps_hat[rows], posterior_mean_gap(x0, cache.x0_hat[rows], x_t,
                                                                                          step)))
    return segments


@dataclass
class OutputLayerFit:
    """What `fit_output_layer` did: the loss at every evaluation (the mean over rows and channels of every
    process, with the `l2` term), and its cost on this process."""

    losses: List[float]
    rows: int
    cpu_seconds: float
    wall_seconds: float


def _reduce_sum(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, reduction="sum")


def fit_output_layer(head_model: NoiseSquareHeadModel, cache: HeadCache, scheduler,
                     recipe: Optional[CachedFitRecipe] = None, accelerator=None) -> OutputLayerFit:
    """
    Step 2 of the cached recipe: full-batch L-BFGS (strong Wolfe line search) of the head conv's weights and bias on
    the recipe's loss over the cached rows, starting from the head's current weights, which it then holds.

    With several processes each keeps its own rows: every evaluation sums the loss and its gradient over processes
    (one reduction), so all processes take the same L-BFGS steps and end with the same head.

    Args:
        head_model (`NoiseSquareHeadModel`): its head's conv is fitted in place.
        cache (`HeadCache`): this process's rows (`collect_head_cache`).
        scheduler: the model's scheduler (`alphas_cumprod`; `clip_variance` and `max_x0_variance` when it is an
            `SNDPMScheduler`, else the defaults `True`, 1.0).
        recipe (`CachedFitRecipe`, *optional*): the loss and the optimizer's settings.
        accelerator (`accelerate.Accelerator`, *optional*): the processes whose rows are fitted together.

    Returns:
        `OutputLayerFit`.
    """
    recipe = recipe or CachedFitRecipe()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    head = head_model.head
    kind, activation = head.config.covariance_type, head.config.output_activation
    config = scheduler.config
    max_v = _config_value(config, "max_x0_variance") if _config_value(config, "clip_variance") else math.inf
    segments = kl_segments(cache, alphas_cumprod_float64(scheduler).tolist()) if recipe.loss == "kl" else ()
    target = noise_square_target(cache.eps, cache.eps_hat, kind)
    elements = _reduce_sum(torch.tensor(float(target.numel()), device=target.device), accelerator)
    weight = head.conv.weight.detach().flatten(1).float().clone().requires_grad_(True)  # [C, F k k]
    bias = head.conv.bias.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=recipe.max_evaluations,
                                  max_eval=recipe.max_evaluations, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    losses: List[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        h = apply_output_activation(cache.features @ weight.T + bias, activation)
        value = head_objective(h, target, recipe.loss, recipe.gnll_weight, segments, kind, max_v) / elements
        value.backward()
        value = _reduce_sum(value.detach(), accelerator) + recipe.l2 * weight.detach().square().sum()
        for parameter in (weight, bias):
            parameter.grad = _reduce_sum(parameter.grad, accelerator)
        weight.grad += 2 * recipe.l2 * weight.detach()
        losses.append(value.item())
        return value

    optimizer.step(closure)
    with torch.no_grad():
        head.conv.weight.copy_(weight.reshape(head.conv.weight.shape))
        head.conv.bias.copy_(bias)
    return OutputLayerFit(losses, int(elements.item()) // target.shape[1], time.process_time() - cpu_start,
                          time.perf_counter() - wall_start)


# ---------------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class HeadFit:
    """
    The record of one cached fit.

    Args:
        recipe: the recipe's fields (`CachedFitRecipe.to_dict`).
        seed: the seed of the draws.
        num_processes: the processes that shared the draws.
        rows: the rows fitted, over all processes.
        losses: the loss at every L-BFGS evaluation.
        cache_cpu_seconds, fit_cpu_seconds, cache_wall_seconds, fit_wall_seconds: the cost of each stage on the
            main process (each process collects its share of the draws and fits over all rows).
    """

    recipe: Dict[str, Any]
    seed: int
    num_processes: int
    rows: int
    losses: List[float]
    cache_cpu_seconds: float
    fit_cpu_seconds: float
    cache_wall_seconds: float
    fit_wall_seconds: float

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of the whole recipe on this process (`time.process_time`, all its threads)."""
        return self.cache_cpu_seconds + self.fit_cpu_seconds

    @property
    def wall_seconds(self) -> float:
        return self.cache_wall_seconds + self.fit_wall_seconds

    def to_dict(self, losses: bool = True) -> Dict[str, Any]:
        """A JSON-able record (with the CPU and wall seconds in all; without the losses when `losses=False`)."""
        record = {**asdict(self), "cpu_seconds": self.cpu_seconds, "wall_seconds": self.wall_seconds,
                  "evaluations": len(self.losses)}
        if not losses:
            record.pop("losses")
        return record


def check_head_model(head_model, recipe: CachedFitRecipe, sample_size: Tuple[int, int]) -> None:
    """Raises for a model the cached recipe cannot fit, saying what to use instead."""
    require_head_model(head_model)
    config = head_model.head.config
    if config.resblock:
        raise ValueError(RESBLOCK_HELP)
    if config.output_activation != "softplus" and (recipe.loss == "gnll" or (recipe.loss == "kl" and
                                                                              recipe.gnll_weight)):
        raise ValueError("The 'gnll' loss needs h > 0, which an `output_activation='identity'` head does not keep: "
                         "use a softplus head, or `CachedFitRecipe(loss='kl', gnll_weight=0)` or `loss='mse'`.")
    if recipe.pixels_per_draw > sample_size[0] * sample_size[1]:
        raise ValueError(f"`pixels_per_draw`={recipe.pixels_per_draw} exceeds the {sample_size[0]}x{sample_size[1]} "
                         "pixels of a sample.")


def fit_noise_square_head(head_model: NoiseSquareHeadModel, images: torch.Tensor, scheduler,
                          recipe: Union[CachedFitRecipe, Dict[str, Any], str, None] = None,
                          generator: GeneratorLike = 0, accelerator=None, progress: bool = False) -> HeadFit:
    """
    The cached recipe: fits the output layer of `head_model`'s head in place from `recipe.num_draws` forward passes
    (`collect_head_cache`, then `fit_output_layer`). `train_noise_square_head(..., recipe="cached")` and
    `analytic-schedulers train-head --recipe cached` call it and save the head.

    Args:
        head_model (`NoiseSquareHeadModel`): a head without ResBlock on its frozen backbone.
        images (`torch.Tensor`): training images `[N, C, H, W]` in `[-1, 1]`.
        scheduler: the model's diffusers scheduler (not a bare `alphas_cumprod`: its trajectories, prediction type
            and clipping are read).
        recipe (`CachedFitRecipe`, `dict` or `"cached"`, *optional*): the hyperparameters (defaults if `None`).
        generator (`int` or `torch.Generator`, defaults to 0): the seed of the draws (see `collect_head_cache`).
        accelerator (`accelerate.Accelerator`, *optional*): processes that share the draws and fit together.
        progress (`bool`, defaults to `False`): a progress bar while caching.

    Returns:
        `HeadFit`, the record of the fit; `head_model` is left in `eval()` mode with the fitted head.
    """
    recipe = CachedFitRecipe.from_value(recipe)
    if getattr(scheduler, "config", None) is None:
        raise TypeError("The cached recipe needs the model's diffusers scheduler (its trajectories, prediction type "
                        f"and clipping), got {type(scheduler).__name__}.")
    check_head_model(head_model, recipe, tuple(images.shape[2:]))
    seed = seed_of(generator)
    cache = collect_head_cache(head_model, images, scheduler, recipe, seed, accelerator, progress)
    fitted = fit_output_layer(head_model, cache, scheduler, recipe, accelerator)
    head_model.eval()
    return HeadFit(recipe.to_dict(), seed, accelerator.num_processes if accelerator is not None else 1, fitted.rows,
                   fitted.losses, cache.cpu_seconds, fitted.cpu_seconds, cache.wall_seconds, fitted.wall_seconds)
