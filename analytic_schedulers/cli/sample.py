"""`analytic-schedulers sample`: a PNG grid of samples, or one grid per sampler side by side with `--compare`."""

from __future__ import annotations

import argparse
import time

import torch

from . import DTYPES, CommandError, add_device_options, add_model_options, load_from_args

DEFAULT_COMPARE = "ddpm,ddim,analytic-ddpm,analytic-ddim,sn-ddpm"
SPACINGS = ["linspace", "leading", "trailing", "optimal"]


def add_parser(subparsers) -> None:
    from ..sampling import SAMPLERS

    names = "\n".join(f"  {name:<22} {spec.description}" for name, spec in SAMPLERS.items())
    parser = subparsers.add_parser(
        "sample",
        help="sample images to a PNG grid (bundled digits model by default)",
        description="Sample images with a diffusers UNet2DModel and write a PNG grid.\n\nSamplers:\n" + names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, gamma=True, head=True)
    parser.add_argument("--scheduler", default="analytic-ddpm", choices=list(SAMPLERS), metavar="NAME",
                        help="sampler to use (default: analytic-ddpm); see the list above")
    parser.add_argument("--compare", nargs="?", const=DEFAULT_COMPARE, default=None, metavar="NAMES",
                        help="sample with several samplers at the same K and seed and write their grids side by "
                             f"side (default list: {DEFAULT_COMPARE}); samplers whose Gamma table or head is "
                             "missing are skipped with a note")
    parser.add_argument("--steps", type=int, default=10, help="number of inference steps K (default: 10)")
    parser.add_argument("--num-images", type=int, default=64, help="images per sampler (default: 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i uses seed + i (default: 0)")
    parser.add_argument("--output", default="grid.png", help="PNG file to write (default: grid.png)")
    parser.add_argument("--last-step-sigma-clip", type=_clip_value, default=1.0, metavar="Y",
                        help="for this package's samplers, clip the std of the step onto the last timestep to "
                             "Y*2/255*sqrt(pi/2), as the papers do when sampling (they use 1, or 2 for CIFAR10 "
                             "and CelebA); 'none' switches it off (default: 1)")
    parser.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="timestep spacing (default: the model's scheduler config); 'optimal' needs a Gamma table")
    add_device_options(parser)
    parser.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG (default: 4)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=run)


def _clip_value(text: str):
    if text.lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("Y must be positive, or 'none'")
    return value


def run(args) -> int:
    from ..images import check_writable, grids_by_name, save_atomically
    from ..runtime import command_device, make_accelerator

    names = _sampler_names(args)
    try:
        output = check_writable(args.output)
        accelerator = make_accelerator(args.device)
    except ValueError as error:
        raise CommandError(str(error)) from None
    device = command_device(accelerator, args.device)
    loaded = load_from_args(args)
    config = with_spacing(loaded.scheduler_config, args.spacing, args.steps)
    indices = list(range(args.num_images))[accelerator.process_index::accelerator.num_processes]
    results, notes = [], []
    for name in names:
        try:
            model, sampler = model_and_sampler(name, loaded, config, args.head, args.last_step_sigma_clip)
        except ValueError as error:  # no Gamma table or head for this sampler
            if not args.compare:
                raise CommandError(str(error)) from None
            notes.append(f"skipped {name}: {error}")
            continue
        start = time.perf_counter()
        images = _sample_everywhere(model.to(device), sampler, indices, args, accelerator, device)
        if accelerator.is_main_process:
            results.append((name, images))
            print(f"{name:<22} K={args.steps:<4} {len(images)} images  {time.perf_counter() - start:7.1f} s")
    if accelerator.is_main_process:
        for note in notes:
            print(note)
        if not results:
            raise CommandError("no sampler could run; see the notes above")
        save_atomically(grids_by_name(results, args.scale), output)
        print(f"wrote {output} ({len(results)} sampler(s), model {loaded.name}, seed {args.seed}, device {device}, "
              f"{args.dtype})")
    return 0


def _sampler_names(args):
    from ..sampling import SAMPLERS

    if args.steps < 1 or args.num_images < 1 or args.batch_size < 1:
        raise CommandError("--steps, --num-images and --batch-size must be positive.")
    names = [n.strip() for n in args.compare.split(",")] if args.compare else [args.scheduler]
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise CommandError(f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    return names


def with_spacing(scheduler_config, spacing, steps: int) -> dict:
    """The model's scheduler config with `--spacing`, after checking `--steps` against its training timesteps."""
    config = dict(scheduler_config)
    if spacing:
        config["timestep_spacing"] = spacing
    if steps > config.get("num_train_timesteps", 1000):
        raise CommandError(f"--steps {steps} exceeds the model's {config.get('num_train_timesteps', 1000)} "
                           "training timesteps.")
    return config


def model_and_sampler(name: str, loaded, config: dict, head, last_step_sigma_clip):
    """The sampler `name` built on the model's schedule, and the model it drives (the head model for SN/NPR)."""
    from ..sampling import build_sampler, sampler_spec

    spec = sampler_spec(name)
    model = loaded.denoiser(spec.covariance_type, head)
    return model, build_sampler(name, config, loaded.gamma, last_step_sigma_clip)


def _sample_everywhere(model, sampler, indices, args, accelerator, device) -> torch.Tensor:
    """This process's images (image i always from seed + i), gathered in order on the main process."""
    from accelerate.utils import gather_object

    from ..sampling import sample_images

    chunks = []
    for begin in range(0, len(indices), args.batch_size):
        generators = [torch.Generator(device).manual_seed(args.seed + i) for i in indices[begin:begin + args.batch_size]]
        chunks.append(sample_images(model, sampler, args.steps, generators, device=device, dtype=DTYPES[args.dtype],
                                    progress=not args.no_progress and accelerator.is_main_process).cpu())
    local = torch.cat(chunks) if chunks else torch.empty(0)
    parts = gather_object([(indices, local)]) if accelerator.num_processes > 1 else [(indices, local)]
    order = torch.tensor([i for part_indices, _ in parts for i in part_indices]).argsort()
    return torch.cat([images for _, images in parts if len(images)])[order]
