"""`analytic-schedulers estimate-gamma`: the Gamma table of a model, written as a ready scheduler folder.

    analytic-schedulers estimate-gamma --model google/ddpm-cifar10-32 --data ./cifar10_train \\
        --num-samples 50000 --batch-size 256 --output ./ddpm-cifar10-analytic

The output folder holds `scheduler_config.json` (an `AnalyticDPMScheduler` with the model's schedule and the table:
`AnalyticDPMScheduler.from_pretrained(folder)`, or upload it as a repo's `scheduler/` folder) and
`gamma_estimate.json` (the table, its Monte-Carlo standard error and the sums). While it runs, `gamma_partial.json`
holds the finished timesteps; rerunning the same command resumes from it. Every file is replaced atomically, so an
interrupted run never leaves a half-written or stale `scheduler_config.json`.

Multi-process: `accelerate launch $(which analytic-schedulers) estimate-gamma ...` splits the images over processes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import CommandError, _images

CONFIG_NAME = "scheduler_config.json"
ESTIMATE_NAME = "gamma_estimate.json"
PARTIAL_NAME = "gamma_partial.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate-gamma",
        help="Estimate a model's Gamma table and write a ready AnalyticDPMScheduler folder.",
        description="Estimate Gamma_t = E||eps_theta(x_t, t)||^2 / d (Analytic-DPM) by Monte Carlo over training "
                    "images, and write an AnalyticDPMScheduler folder (scheduler_config.json) with the table and "
                    "its standard error. Interrupted runs resume from the output folder.",
    )
    parser.add_argument("--model", required=True, help="Hub id or local folder of a diffusers model or pipeline.")
    parser.add_argument("--subfolder", default=None,
                        help="The model's subfolder (default: 'unet' for a pipeline, else the root).")
    parser.add_argument("--scheduler", default=None,
                        help="Hub id or folder with the model's scheduler_config.json (default: the pipeline's "
                             "'scheduler' subfolder, or the model folder).")
    parser.add_argument("--data", required=True,
                        help="A folder of PNG/JPEG training images (searched recursively), or 'sklearn-digits'.")
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
    parser.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="The model's dtype.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Discard an earlier estimate or partial run in --output instead of stopping.")
    parser.add_argument("--checkpoint-seconds", type=float, default=30.0,
                        help="Write partial results at most this often (default 30 s).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------------------------------
# Loading the model, its schedule and the images
# ---------------------------------------------------------------------------------------------------------------------


def _is_pipeline(location: str) -> bool:
    if os.path.isdir(location):
        return os.path.isfile(os.path.join(location, "model_index.json"))
    return _hub_file_exists(location, "model_index.json")


def _hub_file_exists(repo_id: str, filename: str) -> bool:
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, filename)
        return True
    except Exception:  # not found, offline without a cached copy, gated: treat as absent
        return False


def _load_config(location: str, subfolder: Optional[str], config_name: str) -> Optional[Dict[str, Any]]:
    from diffusers.configuration_utils import ConfigMixin

    class _Reader(ConfigMixin):
        pass

    _Reader.config_name = config_name
    try:
        return dict(_Reader.load_config(location, subfolder=subfolder))
    except (OSError, EnvironmentError, ValueError):
        return None


def _model_class(name: str):
    import diffusers

    import analytic_schedulers

    cls = getattr(diffusers, name, None) or getattr(analytic_schedulers, name, None)
    if cls is None:
        raise CommandError(f"Unknown model class {name!r}: expected a diffusers model such as UNet2DModel.")
    return cls


def load_model(model: str, subfolder: Optional[str], scheduler: Optional[str], dtype: torch.dtype):
    """`(model, scheduler_config, subfolder)` for a hub id or folder of a model or pipeline."""
    pipeline = _is_pipeline(model)
    if subfolder is None and pipeline:
        subfolder = "unet"
    config = _load_config(model, subfolder, "config.json")
    if config is None:
        where = f"{model!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise CommandError(
            f"No model config.json found in {where}. Pass a diffusers model or pipeline (hub id or folder); use "
            "--subfolder for a model inside a pipeline."
        )
    if "_class_name" not in config:
        raise CommandError(f"{model!r} has a config.json without '_class_name': is it a diffusers model?")
    try:
        network = _model_class(config["_class_name"]).from_pretrained(model, subfolder=subfolder, torch_dtype=dtype)
    except (OSError, EnvironmentError) as error:
        raise CommandError(f"Could not load the model from {model!r}: {error}") from None
    candidates: List[Tuple[str, Optional[str]]] = []
    if scheduler is not None:
        candidates = [(scheduler, None), (scheduler, "scheduler")]
    else:
        if pipeline:
            candidates.append((model, "scheduler"))
        candidates.append((model, subfolder))
        candidates.append((model, None))
    for location, sub in candidates:
        scheduler_config = _load_config(location, sub, CONFIG_NAME)
        if scheduler_config is not None:
            return network.eval(), scheduler_config, subfolder
    raise CommandError(
        f"No scheduler_config.json found for {model!r}: the table depends on the noise schedule the model was "
        "trained with. Pass --scheduler <hub id or folder with scheduler_config.json>."
    )


def _sample_shape(model) -> Tuple[int, int, int]:
    config = getattr(model, "config", {})
    size, channels = config.get("sample_size"), config.get("in_channels")
    if size is None or channels is None:
        raise CommandError("The model config has no sample_size/in_channels: cannot size the images.")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(channels), int(h), int(w)


def load_images(data: str, shape: Tuple[int, int, int], num_samples: Optional[int], seed: int) -> torch.Tensor:
    """The training images `[M, C, H, W]` in `[-1, 1]`, resized to the model's sample size."""
    channels, height, width = shape
    return _images.load_images(data, "train", channels, height, width, num_samples, seed)


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


def _fill_value(fill: str):
    if fill == "interpolate":
        return fill
    try:
        return float(fill)
    except ValueError:
        raise CommandError(f"--fill must be 'interpolate' or a number, got {fill!r}.") from None


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..gamma import GammaEstimate, estimate_gamma, write_text_atomically
    from ..scheduling_analytic_dpm import AnalyticDPMScheduler

    if args.num_samples is not None and args.num_samples < 1:
        raise CommandError(f"--num-samples must be at least 1, got {args.num_samples}.")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}.")
    fill = _fill_value(args.fill)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {args.output!r} exists and is not a folder.")
    partial_path, estimate_path, config_path = output / PARTIAL_NAME, output / ESTIMATE_NAME, output / CONFIG_NAME
    if (config_path.exists() or estimate_path.exists()) and not partial_path.exists() and not args.overwrite:
        raise CommandError(f"{args.output!r} already holds a finished estimate; pass --overwrite to redo it.")

    accelerator = None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # launched by `accelerate launch` / torchrun
        from accelerate import Accelerator

        # without cpu=True, accelerate runs every process alone on a machine without CUDA
        accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available())
        if accelerator.num_processes != world_size:
            raise CommandError(
                f"Launched as {world_size} processes but Accelerate set up {accelerator.num_processes}: each would "
                "repeat the whole estimate. Check the `accelerate launch` configuration."
            )
    is_main = accelerator is None or accelerator.is_main_process
    device = args.device or (accelerator.device if accelerator else ("cuda" if torch.cuda.is_available() else "cpu"))

    # 1. model, schedule, images
    model, scheduler_config, subfolder = load_model(args.model, args.subfolder, args.scheduler, DTYPES[args.dtype])
    model.to(device)
    scheduler = AnalyticDPMScheduler.from_config(scheduler_config)
    timesteps = _parse_timesteps(args, scheduler)
    images = load_images(args.data, _sample_shape(model), args.num_samples, args.seed)
    if args.num_samples is not None and len(images) < args.num_samples and is_main:
        print(f"--num-samples {args.num_samples}: the data holds only {len(images)} images; using {len(images)}.")
    settings = {
        "model": args.model, "subfolder": subfolder, "data": args.data, "num_samples": len(images),
        "seed": args.seed, "timesteps": timesteps, "prediction_type": scheduler.config.prediction_type,
        "num_train_timesteps": scheduler.config.num_train_timesteps,
    }

    # 2. resume or start afresh
    resume_from = None
    if partial_path.exists() and not args.overwrite:
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
        if is_main:
            print(f"Resuming: {len(resume_from.timesteps_estimated)} timesteps already estimated.")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # everyone has read the partial file before anything is removed
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for path in (config_path, estimate_path, partial_path):
                path.unlink(missing_ok=True)

    # 3. estimate, checkpointing finished timesteps
    latest: Dict[str, Any] = {"sums": None, "written": resume_from.sums if resume_from else None, "time": time.time()}

    def checkpoint(sums) -> None:
        latest["sums"] = sums
        if is_main and time.time() - latest["time"] >= args.checkpoint_seconds:
            _write_partial(sums)

    def _write_partial(sums) -> None:
        GammaEstimate.from_sums(sums).save(partial_path, extra={"settings": settings})
        latest["written"], latest["time"] = sums, time.time()

    try:
        estimate = estimate_gamma(
            model, images, scheduler, batch_size=args.batch_size, timesteps=timesteps, generator=args.seed,
            accelerator=accelerator, device=device, dtype=DTYPES[args.dtype], progress=not args.no_progress,
            resume_from=resume_from, callback=checkpoint,
        )
    except BaseException:
        if is_main and latest["sums"] is not None and latest["sums"] is not latest["written"]:
            _write_partial(latest["sums"])  # keep every finished timestep
        raise

    # 4. the scheduler folder: estimate first, then the config (the file loaders look for), then drop the partial
    if is_main:
        table_fill = None if estimate.is_complete else fill
        analytic = estimate.to_scheduler(scheduler_config, fill=table_fill)
        estimate.save(estimate_path, extra={"settings": settings, "fill": table_fill})
        write_text_atomically(config_path, analytic.to_json_string())
        partial_path.unlink(missing_ok=True)
        finite = estimate.stderr[torch.isfinite(estimate.stderr)]
        print(f"Gamma estimated at {len(estimate.timesteps_estimated)} timesteps from {estimate.num_samples} images; "
              f"largest standard error {finite.max().item() if len(finite) else float('nan'):.2g}.")
        if table_fill is not None:
            print(f"The other timesteps were filled ({table_fill!r}): sample with trajectories through the estimated "
                  "timesteps, or estimate all timesteps.")
        print(f"Wrote {str(config_path)!r}: AnalyticDPMScheduler.from_pretrained({str(output)!r}); upload with "
              f"huggingface_hub.upload_folder(repo_id=..., folder_path={str(output)!r}, path_in_repo='scheduler').")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return 0
