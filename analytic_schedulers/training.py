"""Training the noise-square head of a `NoiseSquareHeadModel` (SN-DPM / NPR-DPM), with Accelerate: two recipes.

- `"cached"` (the default, `head_fitting.py`): one backbone forward pass per draw of `(x_0, t, eps)`, `t` on the
  steps of the scheduler's own trajectories, then a full-batch L-BFGS fit of the head's output layer on the ELBO's
  step KL. On the bundled digits model it takes about a minute of one CPU thread and gives NPR-DPM a better
  likelihood than Analytic-DPM at K = 10 and 25 (`benchmarks/heads.py`).
- `"plain"`, the recipe of Bao et al. (ICML 2022): the head trains by Adam on `||h - eps^2||^2` (SN) or
  `||h - (eps - eps_hat)^2||^2` (NPR), `t` uniform over the training timesteps, with an EMA of its weights. The loss
  here is the mean over all elements (a constant multiple of the papers' sum of squares). It is the only recipe for
  a head with a ResBlock, and needs thousands of steps to pay off.

The pretrained noise network stays frozen in both. What a run writes to its `output_dir`:

- the final head, a `NoiseSquareHead` folder (`config.json`, `diffusion_pytorch_model.safetensors`), which
  `load_head_model(output_dir, unet)` composes with the backbone (the plain recipe saves the EMA weights),
- `loss_history.json`: the recipe and its losses (plain: every optimizer step; cached: every L-BFGS evaluation, and
  the record of the fit under `"fit"`: its recipe, seed, rows and CPU seconds),
- plain recipe only: `checkpoints/checkpoint-<step>/`, written by `runtime.save_checkpoint` (safetensors and JSON only): the head,
  the EMA weights, Adam's moments and the RNG states in safetensors files; scalars and hyperparameters in
  `trainer_state.json`.

The cached recipe is one-shot: it writes no checkpoints, and an interrupted fit runs again from the start. Its cache
is not saved: it takes 19 KB per draw on the digits model (370 MB at the default 20,000 draws, several GB on larger
backbones), and collecting it again costs the same forward passes a saved one would spare, well under a minute on
the digits model.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .data import training_images
from .head_fitting import CachedFitRecipe, fit_noise_square_head, noise_square_target
from .noise_square_head import NoiseSquareHeadModel, require_head_model
from .reverse_step import eps_and_x0_from_model_output
from .runtime import (GeneratorLike, call_model, is_checkpoint, load_checkpoint, save_checkpoint, seed_of,
                      to_device, write_json_atomically)
from .schedule import alphas_cumprod_float64

__all__ = ["train_noise_square_head", "noise_square_head_loss", "latest_checkpoint", "choose_recipe"]

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINTS_DIR = "checkpoints"
LOSS_HISTORY = "loss_history.json"
RECIPES = ("plain", "cached")
# the plain recipe's own arguments of `train_noise_square_head`: with the cached recipe they must keep their defaults
# (`PLAIN_DEFAULTS`, read from its signature below)
PLAIN_ARGUMENTS = ("batch_size", "lr", "ema_decay", "ema_warmup", "gradient_accumulation_steps", "mixed_precision",
                   "checkpoint_every", "checkpoints_total_limit", "log_every", "use_ema_weights")
PLAIN_NUM_STEPS = 1000


# ---------------------------------------------------------------------------------------------------------------------
# The loss, as a pure function
# ---------------------------------------------------------------------------------------------------------------------


def noise_square_head_loss(h: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor,
                           covariance_type: str) -> torch.Tensor:
    """The head's regression loss, the mean over all elements.

    SN: `(h - eps^2)^2`, so that `h -> E[eps^2 | x_t]`. NPR: `(h - (eps - eps_hat)^2)^2`, so that
    `h -> E[(eps - eps_hat)^2 | x_t]`; `eps_hat` is the frozen backbone's prediction (no gradient).
    """
    target = noise_square_target(eps, eps_hat, covariance_type)
    return F.mse_loss(h.float(), target.float())


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def train_noise_square_head(
    head_model: NoiseSquareHeadModel,
    data,
    scheduler,
    num_steps: Optional[int] = None,
    batch_size: int = 128,
    lr: float = 1e-4,
    ema_decay: float = 0.9999,
    ema_warmup: bool = True,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "no",
    output_dir: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 1000,
    checkpoints_total_limit: Optional[int] = 2,
    resume: bool = True,
    generator: GeneratorLike = 0,
    progress: bool = True,
    log_every: int = 100,
    use_ema_weights: bool = True,
    accelerator=None,
    recipe: Union[str, CachedFitRecipe, Dict[str, Any], None] = None,
) -> List[float]:
    """
    Trains the head of a `NoiseSquareHeadModel` (the backbone stays frozen) with Accelerate, by one of two recipes.

    **Cached** (`recipe="cached"` or a `CachedFitRecipe`; `head_fitting.fit_noise_square_head`): `recipe.num_draws`
    backbone passes, their draws shared among the processes, then a full-batch L-BFGS fit of the head's output conv
    on the ELBO's step KL over the steps of the scheduler's K = 10 and 25 trajectories. For heads without ResBlock. On
    the bundled digits model: about a minute of one CPU thread, NPR NLL 4.04 bits/dim against Analytic-DPM's 4.64 at
    K = 10 (the plain recipe needs about 5000 steps, 9 CPU minutes, to beat Analytic-DPM).

    **Plain** (`recipe="plain"`; the papers'): each optimizer step draws `gradient_accumulation_steps` micro-batches
    of `batch_size` images per process (with replacement), one fresh `t ~ U{0, ..., T-1}` and `eps ~ N(0, I)` per
    image, and regresses `h` on `eps^2` (SN) or on `(eps - eps_hat)^2` (NPR) with Adam. The EMA of the head's weights
    is diffusers' `EMAModel`: with `ema_warmup` its decay at step `s >= 1` (0-based) is `min(ema_decay, (1 + s) / (10
    + s))`, without it `ema_decay`; at step 0 it starts from the weights themselves.

    Run it under `accelerate launch` for several GPUs.

    Args:
        head_model (`NoiseSquareHeadModel`): the model to train; its `covariance_type` selects the loss.
        data (`torch.Tensor`, array or sequence): training images `[N, C, H, W]` in `[-1, 1]`, held in memory: a
            float tensor or array, a dict batch (`data.images_from_batch`), or a sequence of images or of dataset
            items (`(image, label)` tuples, dicts) read with `data.images_from_batch`.
        scheduler: the diffusers scheduler the backbone was trained with (its `alphas_cumprod` and
            `prediction_type` are read; the cached recipe also reads its spacing and clipping), or for the plain
            recipe an `alphas_cumprod` tensor (epsilon prediction assumed).
        num_steps (`int`, *optional*): plain recipe: the total number of optimizer steps (including resumed ones),
            1000 by default. Given without `recipe`, it selects the plain recipe (the budget of that recipe, so calls
            written for it keep their meaning).
        batch_size (`int`, defaults to 128): plain recipe: images per micro-batch and process.
        lr (`float`, defaults to 1e-4): plain recipe: Adam's learning rate.
        ema_decay (`float`, defaults to 0.9999): plain recipe: the EMA decay of the head's weights.
        ema_warmup (`bool`, defaults to `True`): plain recipe: warm the decay up as above, so that short runs get a
            useful EMA (the papers' 0.9999 assumes hundreds of thousands of steps).
        gradient_accumulation_steps (`int`, defaults to 1): plain recipe: micro-batches per optimizer step.
        mixed_precision (`str`, defaults to `"no"`): plain recipe: `"no"`, `"fp16"` or `"bf16"`, for the
            `Accelerator` built here.
        output_dir (`str`, *optional*): where the final head (a `NoiseSquareHead` folder), `loss_history.json` and
            (plain recipe) checkpoints go. `None` saves nothing.
        checkpoint_every (`int`, defaults to 1000): plain recipe: steps between checkpoints (also written at the
            end).
        checkpoints_total_limit (`int`, *optional*, defaults to 2): plain recipe: keep only the newest checkpoints.
        resume (`bool`, defaults to `True`): plain recipe: continue from the newest checkpoint in `output_dir`, if
            any. The cached recipe is one-shot: it always fits from the start, and refuses an `output_dir` that holds
            plain-recipe checkpoints.
        generator (`int` or `torch.Generator`, defaults to 0): the seed of the batches (or draws), timesteps and
            noise (one stream per process), read with `runtime.seed_of`.
        progress (`bool`, defaults to `True`): show a tqdm bar.
        log_every (`int`, defaults to 100): plain recipe: print the mean loss every this many steps (0: never). The
            losses are read back from the device only then, at checkpoints and at the end; nothing else waits for
            the device (with `mixed_precision="fp16"` the gradient scaler reads its overflow flag at every step;
            bf16 has no scaler).
        use_ema_weights (`bool`, defaults to `True`): plain recipe: leave `head_model` with the EMA weights at the
            end (the final saved head always has them).
        accelerator (`accelerate.Accelerator`, *optional*): the processes to train on; by default one is built (with
            `mixed_precision` and `gradient_accumulation_steps`). For the plain recipe a given one must accumulate
            `gradient_accumulation_steps` micro-batches.
        recipe (`str`, `CachedFitRecipe` or `dict`, *optional*): `"cached"` (the defaults of `CachedFitRecipe`), a
            `CachedFitRecipe` (or a dict of its fields), or `"plain"`. By default `"cached"`, unless `num_steps` is
            given. The plain recipe's arguments above must keep their defaults with the cached recipe.

    Returns:
        `List[float]`: plain: the loss of every optimizer step so far (resumed steps included), averaged over
        micro-batches and processes; cached: the loss at every L-BFGS evaluation (the mean over all rows).
    """
    arguments = locals()  # first: the arguments alone
    chosen = choose_recipe(recipe, num_steps, {name: arguments[name] for name in PLAIN_ARGUMENTS})
    output_dir = None if output_dir is None else os.fspath(output_dir)
    if isinstance(chosen, CachedFitRecipe):
        return _fit_cached(head_model, data, scheduler, chosen, output_dir, generator, progress, accelerator)
    num_steps = PLAIN_NUM_STEPS if num_steps is None else num_steps
    _check_arguments(num_steps, batch_size, gradient_accumulation_steps, lr, ema_decay, checkpoint_every, log_every)
    run = _set_up(head_model, data, scheduler, num_steps, batch_size, lr, ema_decay, ema_warmup,
                  gradient_accumulation_steps, mixed_precision, generator, accelerator)
    checkpoint = latest_checkpoint(output_dir) if (output_dir and resume) else None
    if checkpoint is not None:
        _resume(run, checkpoint)
    bar = _progress_bar(run, num_steps, progress)
    for step in range(run.start, num_steps):
        _optimizer_step(run, step)
        bar.update(1)
        done = step + 1
        if log_every and done % log_every == 0:
            _log(run, bar, done, log_every)
        if output_dir is not None and done % checkpoint_every == 0 and done < num_steps:
            _save_checkpoint(run, output_dir, done, checkpoints_total_limit)
    bar.close()
    if output_dir is not None and (checkpoint is None or run.start < num_steps):
        _save_checkpoint(run, output_dir, max(num_steps, run.start), checkpoints_total_limit)
    _finish(run, head_model, output_dir, num_steps, use_ema_weights)
    return run.losses


PLAIN_DEFAULTS = {name: inspect.signature(train_noise_square_head).parameters[name].default
                  for name in PLAIN_ARGUMENTS}


def choose_recipe(recipe, num_steps: Optional[int],
                  plain_arguments: Dict[str, Any]) -> Union[str, CachedFitRecipe]:
    """
    `"plain"` or the `CachedFitRecipe` to run: `recipe` as given, or by default the cached recipe unless `num_steps`
    (the plain recipe's budget) is given. Raises when the cached recipe would ignore an argument of the plain one.
    """
    if recipe is None:
        recipe = "plain" if num_steps is not None else "cached"
    if isinstance(recipe, str) and recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {RECIPES} or a CachedFitRecipe, got {recipe!r}.")
    if recipe == "plain":
        return "plain"
    cached = CachedFitRecipe.from_value(recipe)
    ignored = ["num_steps"] if num_steps is not None else []
    ignored += [name for name, value in plain_arguments.items() if value != PLAIN_DEFAULTS[name]]
    if ignored:
        raise ValueError(f"Arguments of the plain recipe given with the cached recipe: {', '.join(ignored)}. Pass "
                         "`recipe='plain'` to use them, or leave them out (the cached recipe's settings are the "
                         "fields of `CachedFitRecipe`).")
    return cached


def _fit_cached(head_model, data, scheduler, recipe: CachedFitRecipe, output_dir: Optional[str], generator,
                progress: bool, accelerator) -> List[float]:
    """The cached recipe (`head_fitting.fit_noise_square_head`), saved like the plain recipe's result."""
    require_head_model(head_model)
    if output_dir is not None and latest_checkpoint(output_dir) is not None:
        raise ValueError(f"{output_dir} holds checkpoints of a plain-recipe run, which a cached fit would leave beside "
                         "a head they did not make: use another `output_dir`, or resume that run with "
                         "`recipe='plain'`.")
    images = training_images(data, head_model.head.config.in_channels)
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    head_model.to(accelerator.device)
    fit = fit_noise_square_head(head_model, images, scheduler, recipe, generator, accelerator, progress)
    _save_result(accelerator, head_model.head, output_dir, "cached", fit.losses, fit=fit.to_dict(losses=False))
    accelerator.wait_for_everyone()
    return fit.losses


@dataclass
class _Run:
    """What the steps of one training run share."""

    accelerator: Any
    model: Any  # as prepared by the accelerator
    head: torch.nn.Module  # the head of the unwrapped model
    optimizer: Any
    ema: Any  # diffusers.training_utils.EMAModel of the head's parameters
    images: torch.Tensor  # [N, C, H, W] on the CPU
    alphas_cumprod: torch.Tensor  # [T], float64, on the CPU
    abar_on_device: torch.Tensor  # [T], the same in float32 on the accelerator's device
    prediction_type: str
    generator: torch.Generator  # this process's stream, on the CPU
    batch_size: int
    micro_batches: int
    history: torch.Tensor  # [num_steps] step losses on the device, read back into `losses` now and then
    settings: Dict[str, Any]  # hyperparameters recorded in checkpoints
    losses: List[float] = field(default_factory=list)
    start: int = 0

    @property
    def covariance_type(self) -> str:
        return self.head.config.covariance_type


def _check_arguments(num_steps, batch_size, gradient_accumulation_steps, lr, ema_decay, checkpoint_every,
                     log_every) -> None:
    if num_steps < 0 or batch_size < 1 or gradient_accumulation_steps < 1 or lr <= 0 or checkpoint_every < 1:
        raise ValueError("`num_steps` must be >= 0 and `batch_size`, `gradient_accumulation_steps`, `lr`, "
                         "`checkpoint_every` positive.")
    if log_every < 0:
        raise ValueError(f"`log_every` must be >= 0 (0: never), got {log_every}.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"`ema_decay` must lie in [0, 1), got {ema_decay}.")


def _set_up(head_model, data, scheduler, num_steps, batch_size, lr, ema_decay, ema_warmup, micro_batches,
            mixed_precision, generator, accelerator) -> _Run:
    """Checks the inputs, prepares model and Adam with the accelerator, and starts the EMA and the RNG stream."""
    from diffusers.training_utils import EMAModel

    require_head_model(head_model)
    images = training_images(data, head_model.head.config.in_channels)
    alphas_cumprod, prediction_type = _noise_schedule(scheduler)
    accelerator = _accelerator(accelerator, mixed_precision, micro_batches)
    seed = seed_of(generator)

    head_model.unet.requires_grad_(False)  # only the head trains
    head_model.train()
    optimizer = torch.optim.Adam(head_model.head.parameters(), lr=lr)
    model, optimizer = accelerator.prepare(head_model, optimizer)
    head = accelerator.unwrap_model(model).head
    # without warm-up the decay is constant: its floor `min_decay` equals it
    ema = EMAModel(head.parameters(), decay=float(ema_decay), min_decay=0.0 if ema_warmup else float(ema_decay))
    ema.to(dtype=torch.float32)
    settings = {"covariance_type": head.config.covariance_type, "batch_size": batch_size, "lr": lr, "seed": seed,
                "gradient_accumulation_steps": micro_batches, "num_processes": accelerator.num_processes,
                "mixed_precision": accelerator.mixed_precision, "ema_decay": ema_decay, "ema_warmup": ema_warmup}
    return _Run(
        accelerator=accelerator, model=model, head=head, optimizer=optimizer, ema=ema, images=images,
        alphas_cumprod=alphas_cumprod, abar_on_device=alphas_cumprod.to(accelerator.device, torch.float32),
        prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(seed + 1_000_003 * accelerator.process_index),
        batch_size=batch_size, micro_batches=micro_batches,
        history=torch.zeros(num_steps, device=accelerator.device), settings=settings,
    )


def _noise_schedule(scheduler) -> Tuple[torch.Tensor, str]:
    """`(alphas_cumprod in float64, prediction_type)` of a diffusers scheduler or of an `alphas_cumprod` tensor."""
    try:
        abar = alphas_cumprod_float64(scheduler)
    except TypeError:
        abar = torch.zeros(0)
    if len(abar) < 2 or not torch.isfinite(abar).all():
        raise ValueError("`scheduler` must be a diffusers scheduler with `alphas_cumprod`, or that tensor.")
    return abar, getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")


def _accelerator(accelerator, mixed_precision: str, gradient_accumulation_steps: int):
    """The given `Accelerator` (checked against the arguments), or a new one."""
    if accelerator is None:
        from accelerate import Accelerator

        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    if accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        raise ValueError(
            f"The accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
            f"`gradient_accumulation_steps` is {gradient_accumulation_steps}: pass the same number to both."
        )
    if mixed_precision not in ("no", accelerator.mixed_precision):
        raise ValueError(f"The accelerator's mixed precision is {accelerator.mixed_precision!r}, not "
                         f"{mixed_precision!r}: set it on the Accelerator.")
    return accelerator


def _optimizer_step(run: _Run, step: int) -> None:
    """One optimizer step over `micro_batches` micro-batches, then the EMA; the step's loss stays on the device."""
    C = run.head.config.in_channels
    step_loss = torch.zeros((), device=run.accelerator.device)
    for _ in range(run.micro_batches):
        x_t, t, eps, abar = _draw_batch(run)
        with run.accelerator.accumulate(run.model):
            prediction, h = call_model(run.model, x_t, t, dtype=x_t.dtype).split(C, dim=1)
            eps_hat, _ = eps_and_x0_from_model_output(prediction.float(), x_t, abar, run.prediction_type)
            loss = noise_square_head_loss(h, eps, eps_hat, run.covariance_type)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += run.accelerator.reduce(loss.detach(), "mean")
    run.ema.step(run.head.parameters())
    run.history[step] = step_loss / run.micro_batches


def _draw_batch(run: _Run) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x_t, t, eps, abar_t)` of one micro-batch: images with replacement, `t` uniform, fresh noise."""
    device = run.accelerator.device
    index = torch.randint(len(run.images), (run.batch_size,), generator=run.generator)
    t = torch.randint(len(run.alphas_cumprod), (run.batch_size,), generator=run.generator)
    x0 = to_device(run.images[index], device)  # drawn on the host, copied without waiting for the device
    eps = to_device(torch.randn(x0.shape, generator=run.generator), device)
    t = to_device(t, device)
    abar = run.abar_on_device[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return x_t, t, eps, abar


def _read_losses(run: _Run, until: int) -> List[float]:
    """`run.losses` filled up to step `until` from the device history (one read); raises on a non-finite loss."""
    begin = len(run.losses)
    if until > begin:
        new = run.history[begin:until].tolist()
        bad = next((i for i, value in enumerate(new) if not math.isfinite(value)), None)
        if bad is not None:
            raise FloatingPointError(f"The head's loss became {new[bad]} at step {begin + bad + 1}; lower `lr`.")
        run.losses.extend(new)
    return run.losses


def _progress_bar(run: _Run, num_steps: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=num_steps, initial=min(run.start, num_steps), desc=f"train {run.covariance_type} head",
                disable=not (progress and run.accelerator.is_local_main_process), dynamic_ncols=True)


def _log(run: _Run, bar, done: int, log_every: int) -> None:
    """Reads the window's losses back, shows the last on the bar and prints the window's mean."""
    window = _read_losses(run, done)[-log_every:]
    bar.set_postfix(loss=f"{window[-1]:.4f}")
    if run.accelerator.is_local_main_process:
        bar.write(f"step {done}: loss {sum(window) / len(window):.5f}")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and the end of a run
# ---------------------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The folder of the last complete checkpoint under `output_dir/checkpoints`, or `None`."""
    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    complete = [name for _, name in _checkpoint_names(folder) if is_checkpoint(os.path.join(folder, name))]
    return os.path.join(folder, complete[-1]) if complete else None


def _checkpoint_names(folder: str) -> List[Tuple[int, str]]:
    """`(step, name)` of the `checkpoint-<step>` folders in `folder` (complete or not), sorted; `[]` without it."""
    if not os.path.isdir(folder):
        return []
    return sorted((int(name[len(CHECKPOINT_PREFIX):]), name) for name in os.listdir(folder)
                  if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit())


def _save_checkpoint(run: _Run, output_dir: str, step: int, keep: Optional[int]) -> None:
    """Writes `checkpoints/checkpoint-<step>` (every process's RNG state included) and prunes old ones."""
    losses = _read_losses(run, step)
    states = run.accelerator.gather(run.generator.get_state().to(run.accelerator.device)[None]).cpu()
    if run.accelerator.is_main_process:
        optimizer_tensors, optimizer_state = _split_optimizer_state(run.optimizer.state_dict())
        names = [name for name, _ in run.head.named_parameters()]
        tensors = {"head": run.head.state_dict(), "ema": dict(zip(names, run.ema.shadow_params)),
                   "optimizer": optimizer_tensors, "rng": {f"generator.{r}": s for r, s in enumerate(states)}}
        state = {"step": step, "losses": losses, **run.settings, "optimizer": optimizer_state,
                 "ema_optimization_step": run.ema.optimization_step}
        if run.accelerator.scaler is not None:
            state["grad_scaler"] = run.accelerator.scaler.state_dict()
        save_checkpoint(os.path.join(output_dir, CHECKPOINTS_DIR, f"{CHECKPOINT_PREFIX}{step}"), tensors, state)
        _prune_checkpoints(output_dir, keep)
    run.accelerator.wait_for_everyone()


def _resume(run: _Run, checkpoint: str) -> None:
    """Restores head, EMA, Adam, grad scaler and this process's RNG stream from a checkpoint."""
    tensors, state = load_checkpoint(checkpoint)
    if "ema_optimization_step" not in state:
        raise ValueError(f"The checkpoint {checkpoint} was written by analytic-schedulers 0.1, whose checkpoints do not "
                         "resume here: use another `output_dir` or `resume=False`.")
    if state.get("covariance_type") != run.covariance_type:
        raise ValueError(
            f"The checkpoint {checkpoint} trained a {state.get('covariance_type')!r} head, this model is "
            f"{run.covariance_type!r}; use another `output_dir` or `resume=False`."
        )
    device = run.accelerator.device
    run.head.load_state_dict(tensors["head"])
    shadow = [tensors["ema"][name].to(device) for name, _ in run.head.named_parameters()]
    run.ema.load_state_dict({"optimization_step": int(state["ema_optimization_step"]), "shadow_params": shadow})
    run.optimizer.load_state_dict(_join_optimizer_state(tensors["optimizer"], state["optimizer"]))
    if run.accelerator.scaler is not None and "grad_scaler" in state:
        run.accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng_key = f"generator.{run.accelerator.process_index}"
    if rng_key in tensors["rng"]:
        run.generator.set_state(tensors["rng"][rng_key])
    run.start, run.losses = int(state["step"]), [float(x) for x in state["losses"]]
    run.accelerator.print(f"Resuming from {checkpoint} (step {run.start}).")


def _finish(run: _Run, head_model, output_dir: Optional[str], num_steps: int, use_ema_weights: bool) -> None:
    """Saves the head with the EMA weights and the loss history, and leaves `head_model` in `eval()` mode."""
    _read_losses(run, num_steps)
    parameters = list(run.head.parameters())
    if not use_ema_weights:
        run.ema.store(parameters)
    run.ema.copy_to(parameters)
    _save_result(run.accelerator, run.head, output_dir, "plain", run.losses)
    if not use_ema_weights:
        run.ema.restore(parameters)
    run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)  # restores the model's own forward
    head_model.eval()
    run.accelerator.wait_for_everyone()


def _save_result(accelerator, head, output_dir: Optional[str], recipe: str, losses: List[float], **record) -> None:
    """The main process writes the head and `loss_history.json` (the recipe, its losses, `record`) to `output_dir`."""
    if output_dir is not None and accelerator.is_main_process:
        head.save_pretrained(output_dir)
        write_json_atomically(os.path.join(output_dir, LOSS_HISTORY), {
            "covariance_type": head.config.covariance_type, "recipe": recipe, "losses": losses, **record})


def _split_optimizer_state(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(tensors: Dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of `_split_optimizer_state`."""
    state: Dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    if not keep:
        return
    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    for _, name in _checkpoint_names(folder)[:-keep]:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
