"""`analytic-schedulers sample`: a PNG grid of samples, or one grid per sampler side by side with `--compare`."""

from __future__ import annotations

import argparse
import time

import torch

from . import CommandError

DEFAULT_COMPARE = "ddpm,ddim,analytic-ddpm,analytic-ddim,sn-ddpm"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_parser(subparsers) -> None:
    from ..sampling import SAMPLERS

    names = "\n".join(f"  {name:<22} {spec.description}" for name, spec in SAMPLERS.items())
    parser = subparsers.add_parser(
        "sample",
        help="sample images to a PNG grid (bundled digits model by default)",
        description="Sample images with a diffusers UNet2DModel and write a PNG grid.\n\nSamplers:\n" + names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help="pipeline or UNet2DModel folder, or Hub id (default: the bundled 16x16 digits model)")
    parser.add_argument("--subfolder", default=None, help="subfolder of the UNet in --model (default: unet/ if any)")
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
    parser.add_argument("--gamma", default=None,
                        help="scheduler folder or Hub id with the Gamma table (default: the model's "
                             "analytic_scheduler/ folder)")
    parser.add_argument("--head", default=None,
                        help="noise-square head folder for sn-*/npr-* samplers (default: the model's "
                             "sn_head/ or npr_head/ folder)")
    parser.add_argument("--last-step-sigma-clip", type=_clip_value, default=1.0, metavar="Y",
                        help="for this package's samplers, clip the std of the step onto the last timestep to "
                             "Y*2/255*sqrt(pi/2), as the papers do when sampling (they use 1, or 2 for CIFAR10 "
                             "and CelebA); 'none' switches it off (default: 1)")
    parser.add_argument("--spacing", default=None, choices=["linspace", "leading", "trailing", "optimal"],
                        help="timestep spacing (default: the model's scheduler config)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="model precision; the scheduler math stays in float32 (default: float32)")
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


def _head_model(unet, head: str, covariance_type: str):
    from ..noise_square_head import NoiseSquareHeadModel

    model = NoiseSquareHeadModel.from_pretrained(head, unet=unet)
    if model.config.covariance_type != covariance_type:
        raise CommandError(f"The head at {head!r} is {model.config.covariance_type!r}, not {covariance_type!r}.")
    return model


def run(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .. import pretrained
    from ..images import check_writable, grids_by_name, save_atomically
    from ..sampling import SAMPLERS, build_sampler, sample_images

    if args.steps < 1 or args.num_images < 1 or args.batch_size < 1:
        raise CommandError("--steps, --num-images and --batch-size must be positive.")
    try:
        output = check_writable(args.output)
    except ValueError as error:
        raise CommandError(str(error)) from None
    names = [n.strip() for n in args.compare.split(",")] if args.compare else [args.scheduler]
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise CommandError(f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")

    state = PartialState(cpu=args.device == "cpu")
    device = torch.device(args.device) if args.device else state.device
    dtype = DTYPES[args.dtype]
    try:
        unet, base_config, gamma = pretrained.load_model_and_schedule(args.model, args.subfolder, args.gamma,
                                                                      torch_dtype=dtype)
    except ValueError as error:
        raise CommandError(str(error)) from None
    unet = unet.to(device).eval()
    if args.spacing:
        base_config["timestep_spacing"] = args.spacing
    if args.steps > base_config.get("num_train_timesteps", 1000):
        raise CommandError(f"--steps {args.steps} exceeds the model's {base_config['num_train_timesteps']} "
                           "training timesteps.")

    # this process's images; image i always uses seed + i, whatever the number of processes
    indices = list(range(args.num_images))[state.process_index::state.num_processes]
    results, notes = [], []
    for name in names:
        spec = SAMPLERS[name]
        model = unet
        if spec.needs == "head" or name.startswith(("sn-", "npr-")):
            covariance_type = name.split("-")[0]
            head = args.head or pretrained.head_location(args.model, covariance_type)
            if head is None:
                message = (f"{name} needs a trained {covariance_type} noise-square head: train one with "
                           f"`analytic-schedulers train-head --covariance-type {covariance_type}` and pass --head")
                if args.compare:
                    notes.append(f"skipped {name}: {message}")
                    continue
                raise CommandError(message)
            model = _head_model(unet, head, covariance_type).to(device)
        try:
            sampler = build_sampler(name, base_config, gamma, args.last_step_sigma_clip)
        except ValueError as error:
            if args.compare:
                notes.append(f"skipped {name}: {error}")
                continue
            raise CommandError(str(error)) from None
        start = time.perf_counter()
        chunks = []
        for begin in range(0, len(indices), args.batch_size):
            batch = indices[begin:begin + args.batch_size]
            generators = [torch.Generator(device).manual_seed(args.seed + i) for i in batch]
            chunks.append(sample_images(model, sampler, args.steps, generators, device=device, dtype=dtype,
                                        progress=not args.no_progress and state.is_main_process).cpu())
        local = torch.cat(chunks) if chunks else torch.empty(0)
        gathered = gather_object([(indices, local)]) if state.num_processes > 1 else [(indices, local)]
        seconds = time.perf_counter() - start
        if state.is_main_process:
            order = [i for part_indices, _ in gathered for i in part_indices]
            images = torch.cat([part for _, part in gathered if len(part)])
            images = images[torch.tensor(order).argsort()]
            results.append((name, images))
            print(f"{name:<22} K={args.steps:<4} {len(images)} images  {seconds:7.1f} s")

    if state.is_main_process:
        for note in notes:
            print(note)
        if not results:
            raise CommandError("no sampler could run; see the notes above")
        save_atomically(grids_by_name(results, args.scale), output)
        model_name = args.model or f"bundled ({pretrained.BUNDLED_MODEL.name})"
        print(f"wrote {output} ({len(results)} sampler(s), model {model_name}, seed {args.seed}, device {device}, "
              f"{args.dtype})")
    return 0
