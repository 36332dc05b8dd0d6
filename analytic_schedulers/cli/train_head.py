"""`analytic-schedulers train-head`: train an SN-DPM / NPR-DPM noise-square head on a frozen UNet2DModel."""

from __future__ import annotations

import argparse
import os
import time

from ..hub import TRAINING_ARGS
from . import (CommandError, add_hub_options, add_model_options, hub_kwargs, load_from_args,
               refuse_own_call_pipeline)


# the plain recipe's options and their defaults (with the cached recipe they must keep them), and the cached recipe's
PLAIN_OPTIONS = {"batch_size": 128, "lr": 1e-4, "ema_decay": 0.9999, "gradient_accumulation_steps": 1,
                 "mixed_precision": "no", "checkpoint_every": 500, "log_every": 100, "resblock": False}
CACHED_OPTIONS = ("draws", "fit_steps", "loss")
PLAIN_STEPS = 2000


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-head",
        help="train a noise-square head (SN-DPM / NPR-DPM) on a frozen UNet2DModel",
        description=(
            "Wraps a pretrained noise-prediction UNet2DModel with a zero-initialised noise-square head and trains "
            "the head only (Accelerate: run under `accelerate launch` for several GPUs). Two recipes: 'cached' "
            "(default) caches the head's inputs from --draws backbone passes on the steps of the model's own K-step "
            "trajectories (--fit-steps) and fits the head's output layer by L-BFGS on the ELBO's step KL, in one "
            "shot; 'plain' is the papers' Adam regression for --steps steps, with checkpoints and --resume (the only "
            "recipe for --resblock). The head is saved to --output as a NoiseSquareHead folder: put it beside the "
            "model's unet/ as sn_head/ or npr_head/, or pass it as --head; sample with SNDPMScheduler."
        ),
    )
    add_model_options(parser, required=True)
    parser.add_argument("--data", required=True,
                        help="'sklearn-digits' (the train split), a folder of images, or a Hugging Face dataset name")
    parser.add_argument("--split", default="train", help="split of the data set (default: train)")
    parser.add_argument("--covariance-type", choices=["sn", "npr"], default="npr",
                        help="npr: h ~ E[(eps - eps_hat)^2|x_t] (default: the head that beats Analytic-DPM on the "
                             "bundled model); sn: h ~ E[eps^2|x_t]")
    parser.add_argument("--recipe", choices=["cached", "plain"], default=None,
                        help="cached (default; plain when --steps is given without --recipe) or plain")
    cached = parser.add_argument_group("the cached recipe")
    cached.add_argument("--draws", type=int, default=None,
                        help="backbone forward passes, one (x_0, t, eps) each (default: 20000)")
    cached.add_argument("--fit-steps", default=None, metavar="K,K,...",
                        help="the numbers of sampling steps whose trajectories are fitted (default: 10,25)")
    cached.add_argument("--loss", choices=["kl", "gnll", "mse"], default=None,
                        help="kl: the ELBO's step KL (with a small gnll term); gnll: log h + target/h; mse: the "
                             "papers' (h - target)^2 (default: kl)")
    plain = parser.add_argument_group("the plain recipe")
    plain.add_argument("--steps", type=int, default=None, help=f"optimizer steps in total (default: {PLAIN_STEPS})")
    plain.add_argument("--batch-size", type=int, default=PLAIN_OPTIONS["batch_size"],
                       help="images per micro-batch and process (128)")
    plain.add_argument("--lr", type=float, default=PLAIN_OPTIONS["lr"], help="Adam learning rate (default: 1e-4)")
    plain.add_argument("--ema-decay", type=float, default=PLAIN_OPTIONS["ema_decay"],
                       help="EMA decay, with warm-up (default: 0.9999)")
    plain.add_argument("--gradient-accumulation-steps", type=int, default=PLAIN_OPTIONS["gradient_accumulation_steps"])
    plain.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=PLAIN_OPTIONS["mixed_precision"])
    plain.add_argument("--resblock", action="store_true", help="add one ResBlock before the head's output layers")
    plain.add_argument("--checkpoint-every", type=int, default=PLAIN_OPTIONS["checkpoint_every"],
                       help="steps between checkpoints (default: 500)")
    plain.add_argument("--log-every", type=int, default=PLAIN_OPTIONS["log_every"],
                       help="print the mean loss every N steps (100)")
    plain.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in --output (the cached recipe is one-shot: it fits "
                            "again from the start)")
    parser.add_argument("--output", required=True, help="folder for the trained head (and the plain recipe's "
                                                        "checkpoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, or the accelerator's device (default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_hub_options(parser, "the trained head", "sn_head or npr_head")
    parser.set_defaults(func=run)


def choose_recipe(args: argparse.Namespace):
    """`"plain"` or the `CachedFitRecipe` the options ask for; `CommandError` for options of the other recipe."""
    from ..head_fitting import CachedFitRecipe

    recipe = args.recipe or ("plain" if args.steps is not None else "cached")
    option = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if recipe == "plain":
        given = [option(name) for name in CACHED_OPTIONS if getattr(args, name) is not None]
        if given:
            raise CommandError(f"options of the cached recipe: {', '.join(given)}; with --recipe plain leave them out "
                               "(or use --recipe cached).")
        return "plain"
    given = ([option("steps")] if args.steps is not None else []) + [
        option(name) for name, default in PLAIN_OPTIONS.items() if getattr(args, name) != default]
    if given:
        raise CommandError(f"options of the plain recipe: {', '.join(given)}; pass --recipe plain to use them, or "
                           "leave them out for the cached recipe (--draws, --fit-steps, --loss).")
    try:
        steps = None if args.fit_steps is None else tuple(int(k) for k in args.fit_steps.split(","))
        values = {"num_draws": args.draws, "num_inference_steps": steps, "loss": args.loss}
        return CachedFitRecipe(**{key: value for key, value in values.items() if value is not None})
    except ValueError as error:
        raise CommandError(f"--draws, --fit-steps or --loss: {error}") from None


def training_args(args: argparse.Namespace, recipe) -> dict:
    """What `training_args.json` records (the head's card reads it)."""
    record = {"model": args.model, "data": args.data, "split": args.split, "covariance_type": args.covariance_type,
              "recipe": "plain" if recipe == "plain" else "cached", "seed": args.seed}
    if recipe == "plain":
        record.update(steps=args.steps or PLAIN_STEPS, batch_size=args.batch_size, lr=args.lr)
    else:
        record.update(draws=recipe.num_draws, fit_steps=list(recipe.num_inference_steps), loss=recipe.loss)
    return record


def run(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from ..data import load_images
    from ..noise_square_head import NoiseSquareHeadModel
    from ..runtime import make_accelerator, write_json_atomically
    from ..training import train_noise_square_head

    recipe = choose_recipe(args)
    if recipe == "plain":
        _check_plain_options(args)
    try:
        accelerator = make_accelerator(args.device, mixed_precision=args.mixed_precision,
                                       gradient_accumulation_steps=args.gradient_accumulation_steps)
    except ValueError as error:  # e.g. fp16 without a GPU
        raise CommandError(str(error)) from None
    refuse_own_call_pipeline(args, "train-head trains on images in pixel space only: a head for such a pipeline "
                                   "composes and samples (NoiseSquareHeadModel.from_unet(pipe.unet)), but training "
                                   "one is not supported yet.")
    loaded = load_from_args(args, gamma=False)
    images = load_images(args.data, loaded.sample_shape, args.split)
    head_model = NoiseSquareHeadModel.from_unet(loaded.unet, covariance_type=args.covariance_type,
                                                resblock=args.resblock)
    record = training_args(args, recipe)
    args_path = os.path.join(args.output, TRAINING_ARGS)
    if accelerator.is_main_process:
        os.makedirs(args.output, exist_ok=True)
        write_json_atomically(args_path, record, indent=1)
    accelerator.print(f"train-head: {record['recipe']} recipe, {args.covariance_type} head on {loaded.name} "
                      f"({len(images)} images of {tuple(images.shape[1:])}), " + _plan(args, recipe))
    kwargs = dict(recipe=recipe)
    if recipe == "plain":
        kwargs.update(num_steps=record["steps"], batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, log_every=args.log_every)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    try:
        losses = train_noise_square_head(head_model, images, DDPMScheduler.from_config(loaded.scheduler_config),
                                         output_dir=args.output, generator=args.seed, progress=not args.no_progress,
                                         accelerator=accelerator, **kwargs)
    except ValueError as error:  # e.g. a checkpoint of the other covariance type, a ResBlock head for the cached fit
        raise CommandError(str(error)) from None
    record.update(cpu_seconds=time.process_time() - cpu_start, wall_seconds=time.perf_counter() - wall_start,
                  num_processes=accelerator.num_processes)
    if accelerator.is_main_process:
        write_json_atomically(args_path, record, indent=1)
    _report(accelerator, recipe, losses, record, args.output)
    if args.push_to_hub and accelerator.is_main_process:
        from ..hub import push_head_to_hub

        commit = push_head_to_hub(args.output, args.push_to_hub, base_model=args.model, **hub_kwargs(args))
        print(f"Uploaded to {getattr(commit, 'commit_url', args.push_to_hub)}")
    return 0


def _check_plain_options(args: argparse.Namespace) -> None:
    from ..training import latest_checkpoint

    if (args.steps is not None and args.steps < 1) or args.batch_size < 1 or args.lr <= 0 or args.checkpoint_every < 1:
        raise CommandError("--steps, --batch-size, --lr and --checkpoint-every must be positive.")
    if os.path.isdir(args.output) and latest_checkpoint(args.output) and not args.resume:
        raise CommandError(f"{args.output} already has checkpoints: pass --resume to continue, or another --output.")


def _plan(args: argparse.Namespace, recipe) -> str:
    if recipe == "plain":
        return f"{args.steps or PLAIN_STEPS} steps of batch {args.batch_size}"
    return (f"{recipe.num_draws} draws on the steps of K = {', '.join(map(str, recipe.num_inference_steps))}, loss "
            f"{recipe.loss}" + (" (one-shot: --resume has nothing to resume)" if args.resume else ""))


def _report(accelerator, recipe, losses, record: dict, output: str) -> None:
    cost = f"{record['cpu_seconds']:.1f} CPU s ({record['wall_seconds']:.1f} s wall) on the main process"
    if not losses:
        return
    if recipe == "plain":
        window = max(1, min(100, len(losses) // 10))
        accelerator.print(f"train-head: loss {sum(losses[:window]) / window:.5f} (first {window} steps) -> "
                          f"{sum(losses[-window:]) / window:.5f} (last {window}), {cost}; head saved to {output}")
    else:
        accelerator.print(f"train-head: loss {losses[0]:.5f} -> {losses[-1]:.5f} in {len(losses)} L-BFGS evaluations, "
                          f"{cost}; head saved to {output}")
