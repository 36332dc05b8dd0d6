"""`analytic-schedulers sample`: a PNG grid of samples, or one grid per sampler side by side with `--compare`.

What runs depends on what `--model` is:

- a denoiser of pixels (a `UNet2DModel`, or a pipeline of one such as `DDPMPipeline`): this package's sampling loop,
  `sampling.sample_images`;
- a pipeline with a VAE or a text encoder (`LDMPipeline`, Stable Diffusion): the pipeline's own `__call__`, with the
  sampler's scheduler swapped in (`use_analytic_dpm` for the Analytic samplers, which checks the table against the
  pipeline and warns at another guidance scale) and, for SN/NPR, the head model as its `unet`. `--prompt`,
  `--negative-prompt`, `--guidance-scale`, `--height` and `--width` go to that call.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

from . import DTYPES, CommandError, add_device_options, add_model_options, load_from_args

DEFAULT_COMPARE = "ddpm,ddim,analytic-ddpm,analytic-ddim,npr-ddpm"
DEFAULT_PIPELINE_COMPARE = "ddim,dpmsolver++,analytic-ddim,analytic-ddpm"
SPACINGS = ["linspace", "leading", "trailing", "optimal"]
#: options of a pipeline's own `__call__` (dest names), refused on the pixel route
CALL_OPTIONS = ("prompt", "negative_prompt", "guidance_scale", "height", "width")


def add_parser(subparsers) -> None:
    from ..sampling import SAMPLERS

    names = "\n".join(f"  {name:<22} {spec.description}" for name, spec in SAMPLERS.items())
    parser = subparsers.add_parser(
        "sample",
        help="sample images to a PNG grid (bundled digits model by default)",
        description="Sample images with a diffusers UNet2DModel (this package's loop) or a pipeline with a VAE or text "
                    "encoder such as Stable Diffusion (its own __call__, our scheduler swapped in) and write a PNG "
                    "grid.\n\nSamplers:\n" + names,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser, gamma=True, head=True)
    parser.add_argument("--scheduler", default=None, choices=list(SAMPLERS), metavar="NAME",
                        help="sampler to use (default: analytic-ddpm; analytic-ddim for pipelines with a VAE or text "
                             "encoder); see the list above")
    parser.add_argument("--compare", nargs="?", const="default", default=None, metavar="NAMES",
                        help="sample with several samplers at the same K and seed and write their grids side by "
                             f"side (default list: {DEFAULT_COMPARE}; for pipelines with a VAE or text encoder "
                             f"{DEFAULT_PIPELINE_COMPARE}); samplers whose Gamma table or head is missing are "
                             "skipped with a note")
    parser.add_argument("--gamma-from-batch", action="store_true",
                        help="analytic-* samplers without a Gamma table estimate Gamma_t from each batch instead "
                             "(data-free; the estimate needs several images per batch, see --batch-size)")
    parser.add_argument("--steps", type=int, default=10, help="number of inference steps K (default: 10)")
    parser.add_argument("--num-images", type=int, default=64, help="images per sampler (default: 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i uses seed + i (default: 0)")
    parser.add_argument("--output", default="grid.png", help="PNG file to write (default: grid.png)")
    parser.add_argument("--last-step-sigma-clip", type=_clip_value, default="auto", metavar="Y",
                        help="for this package's samplers, clip the std of the step onto the last timestep to "
                             "Y*2/255*sqrt(pi/2), as the papers do when sampling (they use 1, or 2 for CIFAR10 "
                             "and CelebA); 'none' switches it off (default: 1 for pixels; off for latent pipelines, "
                             "where the clip's pixel units mean nothing)")
    parser.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="timestep spacing (default: the model's scheduler config); 'optimal' needs a Gamma table")
    add_device_options(parser)
    parser.add_argument("--scale", type=int, default=None,
                        help="upscale factor of the PNG (default: 4; 1 for pipelines with a VAE or text encoder)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    call = parser.add_argument_group("pipelines with a VAE or text encoder (Stable Diffusion, LDM)")
    call.add_argument("--prompt", default=None, help="the prompt of every image (default: the empty prompt)")
    call.add_argument("--negative-prompt", default=None, help="the negative prompt (default: the pipeline's)")
    call.add_argument("--guidance-scale", type=float, default=None,
                      help="classifier-free guidance scale (default: the pipeline's, 7.5 for Stable Diffusion)")
    call.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    call.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    parser.set_defaults(func=run)


def _clip_value(text: str):
    if text.lower() == "none":
        return None
    if text.lower() == "auto":  # the argparse default, resolved by what the model is
        return "auto"
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("Y must be positive, or 'none'")
    return value


def run(args) -> int:
    from ..images import check_writable, grids_by_name, save_atomically
    from ..runtime import command_device, make_accelerator

    _check_counts(args)
    try:
        output = check_writable(args.output)
        accelerator = make_accelerator(args.device)
    except ValueError as error:
        raise CommandError(str(error)) from None
    device = command_device(accelerator, args.device)
    loaded = load_from_args(args, pipeline=True)
    _route_defaults(args, loaded, device, show_progress=not args.no_progress and accelerator.is_main_process)
    names = _sampler_names(args)
    config = with_spacing(loaded.scheduler_config, args.spacing, args.steps)
    indices = list(range(args.num_images))[accelerator.process_index::accelerator.num_processes]
    results, notes = [], []
    for name in names:
        try:
            sample_batch = batch_sampler(name, loaded, config, args, device, accelerator.is_main_process)
        except ValueError as error:  # no Gamma table or head for this sampler
            if not args.compare:
                raise CommandError(str(error)) from None
            notes.append(f"skipped {name}: {error}")
            continue
        start = time.perf_counter()
        images = _sample_everywhere(sample_batch, indices, args, accelerator, device)
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


def _check_counts(args) -> None:
    if args.steps < 1 or args.num_images < 1 or args.batch_size < 1:
        raise CommandError("--steps, --num-images and --batch-size must be positive.")


def _route_defaults(args, loaded, device, show_progress: bool) -> None:
    """Fills the options whose default depends on what the model is (sampler, compare list, last-step clip, PNG
    scale), refuses the options it does not take, and moves a pipeline to `device`."""
    own_call = loaded.pipeline is not None
    given = [f"--{name.replace('_', '-')}" for name in CALL_OPTIONS if getattr(args, name) is not None]
    if own_call:
        _check_call_options(loaded.pipeline, given)
        loaded.pipeline.to(device)
        loaded.pipeline.set_progress_bar_config(disable=not show_progress)
    elif given:
        raise CommandError(f"{', '.join(given)} apply to pipelines with a text encoder or VAE (Stable Diffusion); "
                           f"{loaded.name} is a {type(loaded.unet).__name__} that this package's loop samples.")
    args.scheduler = args.scheduler or ("analytic-ddim" if own_call else "analytic-ddpm")
    if args.compare == "default":
        args.compare = DEFAULT_PIPELINE_COMPARE if own_call else DEFAULT_COMPARE
    if args.last_step_sigma_clip == "auto":  # the clip is in 8-bit pixel levels: meaningless for latents
        args.last_step_sigma_clip = None if loaded.vae is not None else 1.0
    args.scale = args.scale or (1 if own_call else 4)


def _check_call_options(pipe, given) -> None:
    """The pipeline's `__call__` must take the options given and need nothing else (no input image)."""
    parameters = inspect.signature(pipe.__call__).parameters
    missing = [option for option in given if option[2:].replace("-", "_") not in parameters]
    if missing:
        raise CommandError(f"{type(pipe).__name__} takes no {', '.join(missing)}: leave these options out.")
    required = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "prompt"]
    if required:
        raise CommandError(f"{type(pipe).__name__} needs {', '.join(required)}: the sample command runs "
                           "unconditional and text-to-image pipelines.")


def _sampler_names(args):
    from ..sampling import SAMPLERS

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


def model_and_sampler(name: str, loaded, config: dict, head, last_step_sigma_clip, gamma_from_batch: bool = False):
    """The sampler `name` built on the model's schedule, and the model it drives (the head model for SN/NPR)."""
    from ..sampling import build_sampler, sampler_spec

    spec = sampler_spec(name)
    model = loaded.denoiser(spec.covariance_type, head)
    return model, build_sampler(name, config, loaded.gamma, last_step_sigma_clip, gamma_from_batch)


def batch_sampler(name: str, loaded, config: dict, args, device, is_main: bool):
    """`sample_batch(generators)`: one image per generator, `[N, C, H, W]` in `[-1, 1]`, with sampler `name`: by
    this package's loop, or by the pipeline's own `__call__` (`loaded.pipeline`). Raises `ValueError` when the
    sampler cannot run (no Gamma table, no head)."""
    from ..sampling import sample_images

    if loaded.pipeline is not None:
        return _pipeline_batch_sampler(name, loaded, config, args)
    model, sampler = model_and_sampler(name, loaded, config, args.head, args.last_step_sigma_clip,
                                       args.gamma_from_batch)
    model = model.to(device)
    progress = not args.no_progress and is_main
    return lambda generators: sample_images(model, sampler, args.steps, generators, device=device,
                                            dtype=DTYPES[args.dtype], progress=progress)


def _pipeline_batch_sampler(name: str, loaded, config: dict, args):
    """Runs the pipeline's own `__call__` with the scheduler of sampler `name` and, for SN/NPR, the head model as
    its `unet`; image i from its own generator."""
    from ..sampling import sampler_spec

    spec, pipe = sampler_spec(name), loaded.pipeline
    unet = loaded.denoiser(spec.covariance_type, args.head)
    scheduler = pipeline_scheduler(name, loaded, config, args)
    parameters = inspect.signature(pipe.__call__).parameters
    fixed = {"num_inference_steps": args.steps, "output_type": "np"}
    fixed.update({option: getattr(args, option) for option in ("guidance_scale", "height", "width")
                  if getattr(args, option) is not None})
    if "eta" in parameters and spec.eta is not None:
        fixed["eta"] = spec.eta

    def sample_batch(generators):
        count, kwargs = len(generators), dict(fixed)
        if "prompt" in parameters:
            kwargs["prompt"] = [args.prompt or ""] * count
            if args.negative_prompt is not None:
                kwargs["negative_prompt"] = [args.negative_prompt] * count
        else:
            kwargs["batch_size"] = count
        pipe.unet, pipe.scheduler = unet, scheduler
        images = pipe(generator=generators, **kwargs).images  # [N, H, W, C] in [0, 1]
        return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1

    return sample_batch


def pipeline_scheduler(name: str, loaded, config: dict, args):
    """The scheduler of sampler `name` for a pipeline's own `__call__`: this package's Analytic samplers through
    `use_analytic_dpm` (the table's checks and the guidance-scale warning), the others from the registry."""
    from ..pipeline_gamma import use_analytic_dpm
    from ..sampling import build_sampler, sampler_spec
    from ..scheduling_analytic_dpm import AnalyticDPMScheduler

    spec = sampler_spec(name)
    if spec.kind != "analytic":
        sampler = build_sampler(name, config, loaded.gamma, args.last_step_sigma_clip)
        if sampler.trajectory_gamma is not None:
            raise ValueError(f"{name} cannot follow the optimal trajectory in a pipeline (diffusers' schedulers take "
                             "it only as custom timesteps, which pipelines do not pass); use another --spacing.")
        return sampler.scheduler
    if loaded.gamma_config is None and not args.gamma_from_batch:
        raise ValueError(
            f"sampler {name!r} needs a Gamma table for this pipeline: estimate one with `analytic-schedulers "
            "estimate-gamma --model <pipeline> --data <images> [--prompt TEXT --guidance-scale S | --captions FILE] "
            "--output <folder>` and pass it as --gamma (or put it in the model's analytic_scheduler/), or sample "
            "data-free with --gamma-from-batch."
        )
    table = None if loaded.gamma_config is None else AnalyticDPMScheduler.from_config(loaded.gamma_config)
    overrides = dict(eta=spec.eta, last_step_sigma_clip=args.last_step_sigma_clip,
                     gamma_from_batch=table is None, timestep_spacing=spec.spacing or config.get("timestep_spacing"))
    return use_analytic_dpm(loaded.pipeline, table, config=config, **overrides)


def _sample_everywhere(sample_batch, indices, args, accelerator, device) -> torch.Tensor:
    """This process's images (image i always from seed + i), gathered in order on the main process."""
    from accelerate.utils import gather_object

    from ..runtime import make_generator

    chunks = []
    for begin in range(0, len(indices), args.batch_size):
        batch = indices[begin:begin + args.batch_size]
        chunks.append(sample_batch([make_generator(args.seed + i, device) for i in batch]).float().cpu())
    local = torch.cat(chunks) if chunks else torch.empty(0)
    parts = gather_object([(indices, local)]) if accelerator.num_processes > 1 else [(indices, local)]
    order = torch.tensor([i for part_indices, _ in parts for i in part_indices]).argsort()
    return torch.cat([images for _, images in parts if len(images)])[order]
