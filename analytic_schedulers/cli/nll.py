"""`analytic-schedulers nll`: the negative ELBO in bits/dim of a test set, on a K-step trajectory."""

from __future__ import annotations

import argparse
import math
import os

from . import CommandError, add_device_options, add_model_options, load_from_args, refuse_own_call_pipeline
from .sample import SPACINGS, model_and_sampler, with_spacing


def _likelihood_samplers():
    from ..sampling import SAMPLERS

    return [name for name, spec in SAMPLERS.items() if spec.has_elbo]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "nll",
        help="negative ELBO (bits/dim) of a test set on a K-step trajectory",
        description=(
            "Upper bound on the negative log-likelihood, in bits/dim, of 8-bit images under a diffusion model sampled "
            "with K steps (Analytic-DPM, Section 6.1). Prints the mean and its standard error over the images.\n\n"
            "Schedulers: " + ", ".join(_likelihood_samplers()) + " (ddpm = tilde_beta, ddpm-large = beta), or a "
            "folder or Hub id holding an AnalyticDPMScheduler config with a Gamma table (Analytic-DDPM with that "
            "table)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, gamma=True, head=True)
    parser.add_argument("--scheduler", default="analytic-ddpm", metavar="NAME_OR_FOLDER",
                        help="a name above, or a scheduler folder / Hub id with a Gamma table (default: analytic-ddpm)")
    parser.add_argument("--data", default="sklearn-digits",
                        help="'sklearn-digits', a folder of images of the model's size, or a Hugging Face dataset "
                             "name (default: sklearn-digits)")
    parser.add_argument("--split", default="test", help="split of the data set (default: test)")
    parser.add_argument("--steps", type=int, default=10, help="number of steps K (default: 10)")
    parser.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="timestep spacing (default: the model's scheduler config); 'optimal' needs a Gamma table")
    parser.add_argument("--num-images", type=int, default=None, help="use the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward noise (default: 0)")
    add_device_options(parser, dtype=False)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..data import load_images, quantize_8bit
    from ..likelihood import dataset_nll_bits_per_dim
    from ..runtime import command_device, make_accelerator

    if args.steps < 1 or args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise CommandError("--steps, --batch-size and --num-images must be positive.")
    name, gamma_source = _sampler_name(args.scheduler)
    refuse_own_call_pipeline(args, "nll evaluates the ELBO of a denoiser of 8-bit pixels; the likelihood of a "
                                   "latent or text-conditional pipeline is not supported.")
    accelerator = make_accelerator(args.device)
    device = command_device(accelerator, args.device)
    if gamma_source is not None:
        args.gamma = gamma_source
    loaded = load_from_args(args)
    config = with_spacing(loaded.scheduler_config, args.spacing, args.steps)
    model, sampler = model_and_sampler(name, loaded, config, args.head, None)
    sampler.set_timesteps(args.steps)
    images = quantize_8bit(load_images(args.data, loaded.sample_shape, args.split, args.num_images, resize=False))
    try:
        nll = dataset_nll_bits_per_dim(model.to(device).eval(), sampler.scheduler, images, accelerator=accelerator,
                                       batch_size=args.batch_size, generator=args.seed,
                                       progress=not args.no_progress)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    if accelerator.is_main_process:
        stderr = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
        print(f"{nll.mean().item():.4f} ± {stderr:.4f} bits/dim  ({name}, K={len(sampler.scheduler.timesteps)}, "
              f"spacing {config.get('timestep_spacing', 'leading')}, {len(nll)} images of {args.data}/{args.split}, "
              f"seed {args.seed})")
    return 0


def _sampler_name(scheduler: str):
    """`(sampler name, Gamma source or None)` for `--scheduler`: a sampler with an ELBO, or a Gamma folder/Hub id."""
    from ..sampling import SAMPLERS

    if scheduler in SAMPLERS:
        if not SAMPLERS[scheduler].has_elbo:
            raise CommandError(f"{scheduler} has eta = 0 (or no Gaussian step): its step is deterministic, so its "
                               "ELBO is infinite. Use a DDPM-type (eta = 1) sampler: "
                               + ", ".join(_likelihood_samplers()) + ".")
        return scheduler, None
    if not (os.path.isdir(scheduler) or scheduler.count("/") == 1):
        raise CommandError(f"--scheduler must be one of {', '.join(_likelihood_samplers())} or a scheduler folder "
                           f"with a Gamma table; got {scheduler!r}.")
    return "analytic-ddpm", scheduler
