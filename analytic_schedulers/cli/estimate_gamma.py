"""`analytic-schedulers estimate-gamma`: the Gamma table of a model, written as a ready scheduler folder.

    analytic-schedulers estimate-gamma --model google/ddpm-cifar10-32 --data ./cifar10_train \\
        --num-samples 50000 --batch-size 256 --output ./ddpm-cifar10-analytic

The output folder holds `scheduler_config.json` (an `AnalyticDPMScheduler` with the model's schedule and the table:
`AnalyticDPMScheduler.from_pretrained(folder)`) and `gamma_estimate.json` (the table, its Monte-Carlo standard error
and the sums). While it runs, `gamma_partial.json` holds the finished timesteps; rerunning the same command resumes
from it. Every file is replaced atomically, so an interrupted run never leaves a half-written or stale
`scheduler_config.json`.

A pipeline with a VAE or a text encoder (`LDMPipeline`, Stable Diffusion) is estimated as it samples: on the latents
of the images (`--latent sample|mean`), and for text-to-image pipelines on the guided prediction at
`--guidance-scale` for `--prompt` (one for all images) or `--captions FILE` (one per image); the scheduler config
records what the table was estimated for (see `estimate_pipeline_gamma`).

    analytic-schedulers estimate-gamma --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data ./images \\
        --captions captions.txt --guidance-scale 7.5 --steps 25 --output ./sd15-analytic

Multi-process: `accelerate launch $(which analytic-schedulers) estimate-gamma ...` splits the images over processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..hub import GAMMA_ESTIMATE
from ..loading import GAMMA_SUBFOLDER, SCHEDULER_CONFIG
from . import DTYPES, CommandError, add_device_options, add_hub_options, add_model_options, hub_kwargs, load_from_args

PARTIAL_NAME = "gamma_partial.json"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate-gamma",
        help="Estimate a model's Gamma table and write a ready AnalyticDPMScheduler folder.",
        description="Estimate Gamma_t = E||eps_theta(x_t, t)||^2 / d (Analytic-DPM) by Monte Carlo over training "
                    "images, and write an AnalyticDPMScheduler folder (scheduler_config.json) with the table and "
                    "its standard error. Interrupted runs resume from the output folder.",
    )
    add_model_options(parser, required=True)
    parser.add_argument("--data", required=True,
                        help="A folder of PNG/JPEG training images (searched recursively), 'sklearn-digits', or a "
                             "Hugging Face dataset name (with `datasets` installed).")
    parser.add_argument("--split", default="train", help="split of the data set (default: train)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="M, the number of images (default: all). The papers used 50,000 on CIFAR10.")
    parser.add_argument("--batch-size", type=int, default=64, help="Inputs per model call (default 64).")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--timesteps", default=None,
                       help="Comma-separated timesteps to estimate (default: all training timesteps).")
    which.add_argument("--steps", type=int, default=None,
                       help="Estimate only the K timesteps of the scheduler's K-step trajectory (M*K calls).")
    parser.add_argument("--fill", default="interpolate",
                        help="With --timesteps/--steps, how the scheduler's table is completed at the other "
                             "timesteps: 'interpolate' (default) or a number.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise and of the image choice (default 0).")
    parser.add_argument("--output", required=True, help="The scheduler folder to write.")
    add_device_options(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="Discard an earlier estimate or partial run in --output instead of stopping.")
    parser.add_argument("--checkpoint-seconds", type=float, default=30.0,
                        help="Write partial results at most this often (default 30 s).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    pipeline = parser.add_argument_group("pipelines with a VAE or text encoder (Stable Diffusion, LDM)")
    text = pipeline.add_mutually_exclusive_group()
    text.add_argument("--prompt", default=None, help="One prompt for every image (default: the empty prompt, whose "
                      "table does not depend on the guidance scale).")
    text.add_argument("--captions", default=None, metavar="FILE",
                      help="A text file with one caption per line, line i for image i: a folder's images in sorted "
                           "path order (all are read; --num-samples takes the first), or a dataset's rows.")
    pipeline.add_argument("--guidance-scale", type=float, default=None,
                          help="The guidance scale you will sample with (required with --prompt or --captions).")
    pipeline.add_argument("--latent", default=None, choices=["sample", "mean"],
                          help="Encode each image as a draw from the VAE posterior (default: sample, what the "
                               "denoiser was trained on) or as its mean.")
    add_hub_options(parser, "the scheduler folder", GAMMA_SUBFOLDER)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import command_device, make_accelerator
    from ..scheduling_analytic_dpm import AnalyticDPMScheduler

    fill = _check_arguments(args)
    output = Path(args.output)
    accelerator = make_accelerator(args.device)
    loaded = load_from_args(args, gamma=False, pipeline=True)
    conditioning = _conditioning_options(args, loaded)
    device = command_device(accelerator, args.device)
    target = loaded.unet.to(device) if loaded.pipeline is None else loaded.pipeline.to(device)
    scheduler = AnalyticDPMScheduler.from_config(loaded.scheduler_config)
    timesteps = _parse_timesteps(args, scheduler)
    images = _load_data(args, loaded, conditioning, accelerator)
    settings = {
        "model": args.model, "subfolder": loaded.subfolder, "data": args.data, "num_samples": len(images),
        "seed": args.seed, "timesteps": timesteps, "prediction_type": scheduler.config.prediction_type,
        "num_train_timesteps": scheduler.config.num_train_timesteps, **_conditioning_settings(args, loaded),
    }
    resume_from = _resume_from(output, settings, args.overwrite, accelerator)
    estimate = functools.partial(
        _estimate_pipeline_gamma, target, images, scheduler=scheduler, num_samples=args.num_samples,
        generator=args.seed, batch_size=args.batch_size, timesteps=timesteps, dtype=DTYPES[args.dtype],
        accelerator=accelerator if accelerator.num_processes > 1 else None, progress=not args.no_progress,
        **conditioning,
    )
    estimate = _estimate_with_checkpoints(estimate, settings, resume_from, args, accelerator)
    if accelerator.is_main_process:
        _write_scheduler_folder(output, estimate, loaded.scheduler_config, settings, fill)
        if args.push_to_hub:
            from ..hub import push_gamma_to_hub

            commit = push_gamma_to_hub(output, args.push_to_hub, **hub_kwargs(args))
            print(f"Uploaded to {getattr(commit, 'commit_url', args.push_to_hub)}")
    accelerator.wait_for_everyone()
    return 0


def _estimate_pipeline_gamma(*args, **kwargs):
    """`estimate_pipeline_gamma`, its argument errors (captions that do not match the images, ...) as
    `CommandError`s."""
    from ..latent import estimate_pipeline_gamma

    try:
        return estimate_pipeline_gamma(*args, **kwargs)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _conditioning_options(args, loaded) -> Dict[str, Any]:
    """The keyword arguments of `estimate_pipeline_gamma` for `--prompt`, `--captions`, `--guidance-scale` and
    `--latent`; refused for a model this package samples in pixel space."""
    given = [f"--{name.replace('_', '-')}" for name in ("prompt", "captions", "guidance_scale", "latent")
             if getattr(args, name) is not None]
    if loaded.pipeline is None:
        if given:
            raise CommandError(f"{', '.join(given)} apply to pipelines with a VAE or text encoder (LDM, Stable "
                               f"Diffusion); {args.model} is a {type(loaded.unet).__name__} denoising pixels.")
        return {}
    captions = None if args.captions is None else _read_captions(args.captions)
    return {"captions": captions, "prompt": args.prompt, "guidance_scale": args.guidance_scale,
            "latent": args.latent or "sample"}


def _conditioning_settings(args, loaded) -> Dict[str, Any]:
    """What the conditioning options add to the settings a resumed run must repeat (nothing for pixel models)."""
    if loaded.pipeline is None:
        return {}
    return {"prompt": args.prompt, "captions": args.captions, "guidance_scale": args.guidance_scale,
            "latent": args.latent or "sample"}


def _read_captions(path: str) -> List[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise CommandError(f"Could not read --captions {path!r}: {error}.") from None


def _load_data(args, loaded, conditioning, accelerator):
    """The images at the size the pipeline decodes to (the model's own size for pixel models); with `--captions`,
    a folder is read whole and in order, so that line i is image i (see `load_captioned_images`)."""
    from ..data import load_captioned_images

    images, captions = load_captioned_images(args.data, loaded.image_shape, conditioning.get("captions"), args.split,
                                             args.num_samples, args.seed, captions_name=f"--captions {args.captions!r}")
    if args.num_samples is not None and len(images) < args.num_samples and accelerator.is_main_process:
        print(f"--num-samples {args.num_samples}: the data holds only {len(images)} images; using {len(images)}.")
    if captions is not None:
        conditioning["captions"] = captions
    return images


def _check_arguments(args):
    if args.num_samples is not None and args.num_samples < 1:
        raise CommandError(f"--num-samples must be at least 1, got {args.num_samples}.")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}.")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {args.output!r} exists and is not a folder.")
    finished = (output / SCHEDULER_CONFIG).exists() or (output / GAMMA_ESTIMATE).exists()
    if finished and not (output / PARTIAL_NAME).exists() and not args.overwrite:
        raise CommandError(f"{args.output!r} already holds a finished estimate; pass --overwrite to redo it.")
    if args.fill == "interpolate":
        return args.fill
    try:
        return float(args.fill)
    except ValueError:
        raise CommandError(f"--fill must be 'interpolate' or a number, got {args.fill!r}.") from None


def _parse_timesteps(args, scheduler) -> Optional[List[int]]:
    if args.steps is not None:
        try:
            scheduler.set_timesteps(args.steps)
        except ValueError as error:
            raise CommandError(str(error)) from None
        return sorted(int(t) for t in scheduler.timesteps)
    if args.timesteps is not None:
        try:
            return sorted({int(t) for t in args.timesteps.split(",") if t.strip()})
        except ValueError:
            raise CommandError(f"--timesteps must be comma-separated integers, got {args.timesteps!r}.") from None
    return None


def _resume_from(output: Path, settings: Dict[str, Any], overwrite: bool, accelerator):
    """The partial estimate of an interrupted run with the same settings, or `None`; clears the folder on
    `--overwrite` (after every process has read it)."""
    from ..gamma import GammaEstimate

    partial_path = output / PARTIAL_NAME
    resume_from = None
    if partial_path.exists() and not overwrite:
        try:
            state = json.loads(partial_path.read_text(encoding="utf-8"))
            resume_from = GammaEstimate.from_dict(state)
        except (ValueError, OSError) as error:
            raise CommandError(f"{str(partial_path)!r} is unreadable ({error}); pass --overwrite to start over.")
        if state.get("settings") != settings:
            raise CommandError(
                f"{str(partial_path)!r} is from a run with other settings ({state.get('settings')}); rerun with "
                "the same arguments to resume, or pass --overwrite to start over."
            )
        if accelerator.is_main_process:
            print(f"Resuming: {len(resume_from.timesteps_estimated)} timesteps already estimated.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (SCHEDULER_CONFIG, GAMMA_ESTIMATE, PARTIAL_NAME):
                (output / name).unlink(missing_ok=True)
    return resume_from


def _estimate_with_checkpoints(estimate, settings, resume_from, args, accelerator):
    """`estimate(resume_from=, callback=)`, writing the finished timesteps to `gamma_partial.json` every
    `--checkpoint-seconds` and when interrupted, so that rerunning the command loses nothing."""
    from ..gamma import GammaEstimate

    partial_path = Path(args.output) / PARTIAL_NAME
    latest: Dict[str, Any] = {"sums": None, "written": resume_from.sums if resume_from else None, "time": time.time()}

    def write_partial(sums) -> None:
        GammaEstimate.from_sums(sums).save(partial_path, extra={"settings": settings})
        latest["written"], latest["time"] = sums, time.time()

    def checkpoint(sums) -> None:
        latest["sums"] = sums
        if accelerator.is_main_process and time.time() - latest["time"] >= args.checkpoint_seconds:
            write_partial(sums)

    try:
        return estimate(resume_from=resume_from, callback=checkpoint)
    except BaseException:
        if accelerator.is_main_process and latest["sums"] is not None and latest["sums"] is not latest["written"]:
            write_partial(latest["sums"])  # keep every finished timestep
        raise


def _write_scheduler_folder(output: Path, estimate, scheduler_config, settings, fill) -> None:
    """The scheduler folder (see `hub.write_gamma_folder`), then drop the partial file."""
    from ..hub import write_gamma_folder

    table_fill = None if estimate.is_complete else fill
    write_gamma_folder(output, estimate, scheduler_config, settings, table_fill)
    (output / PARTIAL_NAME).unlink(missing_ok=True)
    sums = estimate.estimate  # the `GammaEstimate` of the `PipelineGammaEstimate`
    finite = sums.stderr[torch.isfinite(sums.stderr)]
    print(f"Gamma estimated at {len(sums.timesteps_estimated)} timesteps from {sums.num_samples} images; "
          f"largest standard error {finite.max().item() if len(finite) else float('nan'):.2g}.")
    if table_fill is not None:
        print(f"The other timesteps were filled ({table_fill!r}): sample with trajectories through the estimated "
              "timesteps, or estimate all timesteps.")
    print(f"Wrote {str(output / SCHEDULER_CONFIG)!r}: AnalyticDPMScheduler.from_pretrained({str(output)!r}).")
