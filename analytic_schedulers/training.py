"""Training the noise-square head of a `NoiseSquareHeadModel` (SN-DPM / NPR-DPM), with Accelerate.

The recipe of Bao et al. (ICML 2022): the pretrained noise network stays frozen; only the head trains, on
`||h - eps^2||^2` (SN) or `||h - (eps - eps_hat)^2||^2` (NPR), `t` uniform over the training timesteps, Adam, EMA of the
head's weights. The loss here is the mean over all elements (a constant multiple of the papers' sum of squares).

Checkpoints are safetensors and JSON only: tensors (head, EMA, Adam's moments, RNG state) in safetensors files, scalars and the
optimizer's hyperparameters in JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

__all__ = ["train_noise_square_head", "noise_square_head_loss", "latest_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINTS_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------------------------------
# The loss, as a pure function
# ---------------------------------------------------------------------------------------------------------------------


def eps_from_prediction(prediction: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    """`eps_hat` from a backbone output of `prediction_type`; `abar_t` broadcasts against the sample (per sample)."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(bbar) x_0
        return abar_t.sqrt() * prediction + (1 - abar_t).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - abar_t.sqrt() * prediction) / (1 - abar_t).sqrt()
    raise ValueError(f"Unknown `prediction_type` {prediction_type!r}.")


def noise_square_head_loss(h: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor,
                           covariance_type: str) -> torch.Tensor:
    """The head's regression loss, the mean over all elements.

    SN: `(h - eps^2)^2`, so that `h -> E[eps^2 | x_t]`. NPR: `(h - (eps - eps_hat)^2)^2`, so that
    `h -> E[(eps - eps_hat)^2 | x_t]`; `eps_hat` is the frozen backbone's prediction (no gradient).
    """
    if covariance_type == "sn":
        target = eps.square()
    elif covariance_type == "npr":
        target = (eps - eps_hat.detach()).square()
    else:
        raise ValueError(f"`covariance_type` must be 'sn' or 'npr', got {covariance_type!r}.")
    return F.mse_loss(h.float(), target.float())


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON)
# ---------------------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The folder of the last complete checkpoint under `output_dir/checkpoints`, or `None`."""
    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(folder, name, "trainer_state.json")):
            try:
                steps.append((int(name[len(CHECKPOINT_PREFIX):]), name))
            except ValueError:
                continue
    return os.path.join(folder, max(steps)[1]) if steps else None


def _optimizer_to_files(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Splits an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _save_checkpoint(folder: str, head, ema: Sequence[torch.Tensor], optimizer, scaler,
                     generators: Dict[int, torch.Tensor], trainer_state: dict) -> None:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = [name for name, _ in head.named_parameters()]
    save_file({f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
              os.path.join(tmp, "head.safetensors"))
    save_file({f"head.{n}": e.detach().contiguous().cpu() for n, e in zip(names, ema)},
              os.path.join(tmp, "ema.safetensors"))
    tensors, meta = _optimizer_to_files(optimizer.state_dict())
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    if scaler is not None:
        meta["grad_scaler"] = scaler.state_dict()
    with open(os.path.join(tmp, "optimizer.json"), "w") as f:
        json.dump(meta, f, indent=1)
    save_file({f"generator.{rank}": state for rank, state in generators.items()}, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(trainer_state, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    if not keep:
        return
    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    names = sorted((n for n in os.listdir(folder) if n.startswith(CHECKPOINT_PREFIX) and not n.endswith(".tmp")),
                   key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _as_image_tensor(data, in_channels: int) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        try:
            data = torch.stack([torch.as_tensor(data[i]) for i in range(len(data))])
        except (TypeError, RuntimeError) as error:
            raise TypeError(
                "`data` must be a float tensor [N, C, H, W] in [-1, 1] or a sequence of [C, H, W] tensors: "
                f"{error}"
            ) from None
    if data.ndim != 4 or data.shape[1] != in_channels or len(data) == 0:
        raise ValueError(
            f"`data` must have shape [N, {in_channels}, H, W] (the backbone's channels), got {tuple(data.shape)}."
        )
    return data.float()


def _alphas_cumprod(noise_scheduler) -> torch.Tensor:
    abar = getattr(noise_scheduler, "alphas_cumprod", noise_scheduler)
    abar = torch.as_tensor(abar, dtype=torch.float64).flatten()
    if abar.ndim != 1 or len(abar) < 2 or not torch.isfinite(abar).all():
        raise ValueError("`noise_scheduler` must be a diffusers scheduler with `alphas_cumprod`, or that tensor.")
    return abar


def train_noise_square_head(
    head_model,
    data,
    noise_scheduler,
    num_steps: int = 1000,
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
    seed: int = 0,
    progress: bool = True,
    log_every: int = 100,
    use_ema_weights: bool = True,
    save_kwargs: Optional[dict] = None,
) -> List[float]:
    """
    Trains the head of a `NoiseSquareHeadModel` (the backbone stays frozen) with Accelerate.

    Each optimizer step draws `gradient_accumulation_steps` micro-batches of `batch_size` images per process (with
    replacement), one fresh `t ~ U{0, ..., T-1}` and `eps ~ N(0, I)` per image, and regresses `h` on `eps^2` (SN) or on
    `(eps - eps_hat)^2` (NPR). Run it under `accelerate launch` for several GPUs.

    Args:
        head_model (`NoiseSquareHeadModel`): the model to train; its `covariance_type` selects the loss.
        data (`torch.Tensor` or sequence): training images `[N, C, H, W]` in `[-1, 1]`, held in memory.
        noise_scheduler: the diffusers scheduler the backbone was trained with (its `alphas_cumprod` and
            `prediction_type` are read), or an `alphas_cumprod` tensor (epsilon prediction assumed).
        num_steps (`int`, defaults to 1000): the total number of optimizer steps (including resumed ones).
        batch_size (`int`, defaults to 128): images per micro-batch and process.
        lr (`float`, defaults to 1e-4): Adam's learning rate.
        ema_decay (`float`, defaults to 0.9999): the EMA decay of the head's weights.
        ema_warmup (`bool`, defaults to `True`): use `min(ema_decay, (1 + step) / (10 + step))`, so that short runs
            get a useful EMA (the papers' 0.9999 assumes hundreds of thousands of steps).
        gradient_accumulation_steps (`int`, defaults to 1): micro-batches per optimizer step.
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"`, passed to `Accelerator`.
        output_dir (`str`, *optional*): where checkpoints (`checkpoints/checkpoint-<step>`), `loss_history.json` and
            the final head (`save_pretrained`, EMA weights) go. `None` saves nothing.
        checkpoint_every (`int`, defaults to 1000): steps between checkpoints (also written at the end).
        checkpoints_total_limit (`int`, *optional*, defaults to 2): keep only the newest checkpoints.
        resume (`bool`, defaults to `True`): continue from the newest checkpoint in `output_dir`, if any.
        seed (`int`, defaults to 0): seeds the batches, timesteps and noise (per process).
        progress (`bool`, defaults to `True`): show a tqdm bar with the loss.
        log_every (`int`, defaults to 100): print the mean loss every this many steps (0: never).
        use_ema_weights (`bool`, defaults to `True`): leave `head_model` with the EMA weights at the end (the final
            saved head always has them).
        save_kwargs (`dict`, *optional*): arguments of `head_model.save_pretrained` for the final head, e.g.
            `{"save_backbone": False, "backbone_path": "google/ddpm-cifar10-32"}`.

    Returns:
        `List[float]`: the loss of every optimizer step so far (resumed steps included), averaged over micro-batches
        and processes.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if num_steps < 0 or batch_size < 1 or gradient_accumulation_steps < 1 or lr <= 0:
        raise ValueError("`num_steps` must be >= 0 and `batch_size`, `gradient_accumulation_steps`, `lr` positive.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"`ema_decay` must lie in [0, 1), got {ema_decay}.")
    if getattr(head_model, "unet", None) is None or not hasattr(head_model, "head"):
        raise TypeError("`head_model` must be a `NoiseSquareHeadModel` with its backbone attached.")
    config = head_model.config
    images = _as_image_tensor(data, config.in_channels)
    abar_table = _alphas_cumprod(noise_scheduler)
    T = len(abar_table)
    prediction_type = getattr(getattr(noise_scheduler, "config", None), "prediction_type", "epsilon")

    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    device = accelerator.device

    # only the head trains: freeze the backbone and check the optimizer's parameter list
    head_model.unet.requires_grad_(False)
    head_params = list(head_model.head.parameters())
    optimizer = torch.optim.Adam(head_params, lr=lr)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if in_optimizer != {id(p) for p in head_params} or in_optimizer & {id(p) for p in head_model.unet.parameters()}:
        raise RuntimeError("The optimizer must hold exactly the head's parameters.")
    head_model.train()
    model, optimizer = accelerator.prepare(head_model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = [p.detach().clone().float() for p in unwrapped.head.parameters()]

    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    losses: List[float] = []
    start = 0
    output_dir = None if output_dir is None else os.fspath(output_dir)
    checkpoint = latest_checkpoint(output_dir) if (output_dir and resume) else None
    if checkpoint is not None:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            trainer_state = json.load(f)
        if trainer_state.get("covariance_type") != config.covariance_type:
            raise ValueError(
                f"The checkpoint {checkpoint} trained a {trainer_state.get('covariance_type')!r} head, this model is "
                f"{config.covariance_type!r}; use another `output_dir` or `resume=False`."
            )
        unwrapped.load_state_dict(load_file(os.path.join(checkpoint, "head.safetensors")), strict=False)
        ema_state = load_file(os.path.join(checkpoint, "ema.safetensors"))
        ema = [ema_state[f"head.{name}"].to(device) for name, _ in unwrapped.head.named_parameters()]
        with open(os.path.join(checkpoint, "optimizer.json")) as f:
            meta = json.load(f)
        optimizer.load_state_dict(_optimizer_from_files(load_file(os.path.join(checkpoint, "optimizer.safetensors")),
                                                        meta))
        if accelerator.scaler is not None and "grad_scaler" in meta:
            accelerator.scaler.load_state_dict(meta["grad_scaler"])
        rng = load_file(os.path.join(checkpoint, "rng.safetensors"))
        if f"generator.{rank}" in rng:
            generator.set_state(rng[f"generator.{rank}"])
        start, losses = int(trainer_state["step"]), [float(x) for x in trainer_state["losses"]]
        accelerator.print(f"Resuming from {checkpoint} (step {start}).")
    ema = [e.to(device) for e in ema]

    def checkpoint_now(step: int) -> None:
        if output_dir is None:
            return
        # every process's generator state goes into the checkpoint
        states = accelerator.gather(generator.get_state().to(device)[None]).cpu()
        if accelerator.is_main_process:
            folder = os.path.join(output_dir, CHECKPOINTS_DIR, f"{CHECKPOINT_PREFIX}{step}")
            _save_checkpoint(folder, unwrapped.head, ema, optimizer, accelerator.scaler,
                             {r: states[r] for r in range(len(states))},
                             {"step": step, "losses": losses, "covariance_type": config.covariance_type,
                              "batch_size": batch_size, "lr": lr, "seed": seed,
                              "gradient_accumulation_steps": gradient_accumulation_steps,
                              "num_processes": accelerator.num_processes, "mixed_precision": mixed_precision})
            _prune_checkpoints(output_dir, checkpoints_total_limit)
        accelerator.wait_for_everyone()

    bar = tqdm(total=num_steps, initial=min(start, num_steps), desc=f"train {config.covariance_type} head",
               disable=not (progress and accelerator.is_local_main_process), dynamic_ncols=True)
    C = config.in_channels
    for step in range(start, num_steps):
        step_loss = 0.0
        for _ in range(gradient_accumulation_steps):
            index = torch.randint(len(images), (batch_size,), generator=generator)
            t = torch.randint(T, (batch_size,), generator=generator)
            x0 = images[index].to(device)
            eps = torch.randn(x0.shape, generator=generator).to(device)
            abar = abar_table[t].to(device=device, dtype=torch.float32).reshape(-1, 1, 1, 1)
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
            with accelerator.accumulate(model):
                output = model(x_t, t.to(device)).sample
                prediction, h = output.split(C, dim=1)
                eps_hat = eps_from_prediction(prediction.float(), x_t, abar, prediction_type)
                loss = noise_square_head_loss(h, eps, eps_hat, config.covariance_type)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / gradient_accumulation_steps
        # 2. EMA of the head's weights, after the optimizer step
        decay = min(ema_decay, (1.0 + step) / (10.0 + step)) if ema_warmup else ema_decay
        with torch.no_grad():
            for e, p in zip(ema, unwrapped.head.parameters()):
                e.mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        if log_every and done % log_every == 0:
            window = losses[-log_every:]
            bar.write(f"step {done}: loss {sum(window) / len(window):.5f}")
        if done % checkpoint_every == 0 and done < num_steps:
            checkpoint_now(done)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"The head's loss became {step_loss} at step {done}; lower `lr`.")
    bar.close()

    if output_dir is not None and (checkpoint is None or start < num_steps):
        checkpoint_now(max(num_steps, start))
    ema_weights = [e.to(p.dtype) for e, p in zip(ema, unwrapped.head.parameters())]
    if output_dir is not None and accelerator.is_main_process:
        trained = [p.detach().clone() for p in unwrapped.head.parameters()]
        _copy_into(unwrapped.head, ema_weights)
        unwrapped.save_pretrained(output_dir, **(save_kwargs or {}))
        _copy_into(unwrapped.head, trained)
        with open(os.path.join(output_dir, "loss_history.json"), "w") as f:
            json.dump({"covariance_type": config.covariance_type, "losses": losses}, f)
    if use_ema_weights:
        _copy_into(unwrapped.head, ema_weights)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # restores the model's own forward
    unwrapped.eval()
    accelerator.wait_for_everyone()
    return losses


def _copy_into(module, tensors: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(module.parameters(), tensors):
            p.copy_(value)
