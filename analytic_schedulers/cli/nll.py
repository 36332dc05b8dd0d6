"""`analytic-schedulers nll`: the negative ELBO in bits/dim of a test set, on a K-step trajectory."""

from __future__ import annotations

import argparse
import math
import os

import torch

from . import CommandError, _images

#: The samplers of `analytic_schedulers.sampling` whose ELBO is finite (eta = 1).
LIKELIHOOD_SAMPLERS = ("analytic-ddpm", "analytic-ddpm-optimal", "ddpm", "ddpm-large", "sn-ddpm", "npr-ddpm")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "nll",
        help="negative ELBO (bits/dim) of a test set on a K-step trajectory",
        description=(
            "Upper bound on the negative log-likelihood, in bits/dim, of 8-bit images under a diffusion model sampled "
            "with K steps (Analytic-DPM, Section 6.1). Prints the mean and its standard error over the images.\n\n"
            "Schedulers: " + ", ".join(LIKELIHOOD_SAMPLERS) + " (ddpm = tilde_beta, ddpm-large = beta), or a folder "
            "or Hub id holding an AnalyticDPMScheduler config with a Gamma table (Analytic-DDPM with that table)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="pipeline or UNet2DModel folder, or Hub id (default: the bundled 16x16 digits model)")
    parser.add_argument("--subfolder", default=None, help="subfolder of the UNet in --model (default: unet/ if any)")
    parser.add_argument("--scheduler", default="analytic-ddpm", metavar="NAME_OR_FOLDER",
                        help="a name above, or a scheduler folder / Hub id with a Gamma table (default: analytic-ddpm)")
    parser.add_argument("--gamma", default=None,
                        help="scheduler folder or Hub id with the Gamma table (default: the model's "
                             "analytic_scheduler/ folder)")
    parser.add_argument("--head", default=None, help="noise-square head folder for sn-ddpm / npr-ddpm")
    parser.add_argument("--data", default="sklearn-digits",
                        help="'sklearn-digits' or a folder of images of the model's size (default: sklearn-digits)")
    parser.add_argument("--split", default="test", help="split of sklearn-digits: train, test, all (default: test)")
    parser.add_argument("--steps", type=int, default=10, help="number of steps K (default: 10)")
    parser.add_argument("--spacing", default=None, choices=["linspace", "leading", "trailing", "optimal"],
                        help="timestep spacing (default: the model's scheduler config); 'optimal' needs a Gamma table")
    parser.add_argument("--num-images", type=int, default=None, help="use the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward noise (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def load_images(data: str, split: str, channels: int, size: int) -> torch.Tensor:
    """8-bit images in `[-1, 1]`, `[N, channels, size, size]`: sklearn's digits or an image folder (not resized)."""
    x = _images.load_images(data, split, channels, size, size, resize=False)
    return torch.round((x + 1) * 127.5) / 127.5 - 1  # the 8-bit grid


def _scheduler_and_model(args, unet, base_config, gamma):
    """The scheduler named (or located) by --scheduler and the model it drives."""
    from .. import pretrained
    from ..sampling import build_sampler

    name = args.scheduler
    if name not in LIKELIHOOD_SAMPLERS:
        if name in ("ddim", "analytic-ddim", "sn-ddim", "npr-ddim"):
            raise CommandError(f"{name} has eta = 0: a deterministic step, so its ELBO is infinite. Use the DDPM "
                               "(eta = 1) counterpart.")
        if not (os.path.isdir(name) or name.count("/") == 1):
            raise CommandError(f"--scheduler must be one of {', '.join(LIKELIHOOD_SAMPLERS)} or a scheduler folder "
                               f"with a Gamma table; got {name!r}.")
        try:
            gamma = pretrained.load_gamma(name)
        except ValueError as error:
            raise CommandError(str(error)) from None
        name = "analytic-ddpm"
    model = unet
    if name.startswith(("sn-", "npr-")):
        from ..noise_square_head import NoiseSquareHeadModel

        covariance_type = name.split("-")[0]
        head = args.head or pretrained.head_location(args.model, covariance_type)
        if head is None:
            raise CommandError(f"{name} needs a trained {covariance_type} noise-square head: train one with "
                               f"`analytic-schedulers train-head --covariance-type {covariance_type}` and pass --head.")
        model = NoiseSquareHeadModel.from_pretrained(head, unet=unet)
    try:
        scheduler = build_sampler(name, base_config, gamma).scheduler
    except ValueError as error:
        raise CommandError(str(error)) from None
    return scheduler, model, name


def _set_trajectory(scheduler, steps: int, gamma) -> None:
    from diffusers import DDPMScheduler

    from ..trajectory import optimal_trajectory

    if isinstance(scheduler, DDPMScheduler) and scheduler.config.timestep_spacing == "optimal":
        if gamma is None:
            raise CommandError("--spacing optimal needs the model's Gamma table (--gamma).")
        abar = torch.cumprod(1.0 - scheduler.betas.double(), dim=0)
        scheduler.set_timesteps(timesteps=optimal_trajectory(gamma, abar, steps)[0].tolist())
        return
    try:
        scheduler.set_timesteps(steps)
    except ValueError as error:
        raise CommandError(str(error)) from None


def run(args) -> int:
    from .. import pretrained
    from ..likelihood import dataset_nll_bits_per_dim

    if args.steps < 1 or args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise CommandError("--steps, --batch-size and --num-images must be positive.")
    accelerator = None
    if args.device in (None, "cpu", "cuda"):
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.device == "cpu")
        device = accelerator.device
    else:
        device = torch.device(args.device)
    try:
        unet, base_config, gamma = pretrained.load_model_and_schedule(args.model, args.subfolder, args.gamma)
    except ValueError as error:
        raise CommandError(str(error)) from None
    unet = unet.to(device).eval()
    if args.spacing:
        base_config["timestep_spacing"] = args.spacing
    scheduler, model, name = _scheduler_and_model(args, unet, base_config, gamma)
    _set_trajectory(scheduler, args.steps, gamma)
    model = model.to(device).eval()

    images = load_images(args.data, args.split, unet.config.in_channels, unet.config.sample_size)
    if args.num_images is not None:
        images = images[: args.num_images]
    try:
        nll = dataset_nll_bits_per_dim(model, scheduler, images, accelerator=accelerator, batch_size=args.batch_size,
                                       seed=args.seed, progress=not args.no_progress)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    if accelerator is None or accelerator.is_main_process:
        stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
        spacing = base_config.get("timestep_spacing", "leading")
        print(f"{nll.mean().item():.4f} ± {stderr:.4f} bits/dim  ({name}, K={len(scheduler.timesteps)}, "
              f"spacing {spacing}, {len(nll)} images of {args.data}"
              f"{'/' + args.split if args.data == 'sklearn-digits' else ''}, seed {args.seed})")
    return 0
