"""`analytic-schedulers train-head`: train an SN-DPM / NPR-DPM noise-square head on a frozen UNet2DModel."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

from . import CommandError, _images



def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-head",
        help="train a noise-square head (SN-DPM / NPR-DPM) on a frozen UNet2DModel",
        description=(
            "Wraps a pretrained noise-prediction UNet2DModel with a zero-initialised noise-square head and trains "
            "the head only (Accelerate: run under `accelerate launch` for several GPUs). The trained head (EMA "
            "weights) is saved to --output, referencing the backbone by --model; sample with SNDPMScheduler."
        ),
    )
    parser.add_argument("--model", required=True,
                        help="a DDPMPipeline folder or Hub id (with unet/ and scheduler/), or a UNet2DModel folder")
    parser.add_argument("--data", required=True, help="'sklearn-digits' (the train split) or a folder of images")
    parser.add_argument("--covariance-type", choices=["sn", "npr"], default="sn",
                        help="sn: h ~ E[eps^2|x_t]; npr: h ~ E[(eps - eps_hat)^2|x_t] (default: sn)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per micro-batch and process (128)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay, with warm-up (default: 0.9999)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--resblock", action="store_true", help="add one ResBlock before the head's output layers")
    parser.add_argument("--output", required=True, help="folder for the trained head and its checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default: 500)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument("--save-backbone", action="store_true",
                        help="also copy the backbone into --output/unet (a self-contained folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the images to this size (default: the model's sample_size)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--log-every", type=int, default=100, help="print the mean loss every N steps (100)")
    parser.set_defaults(func=run)


def load_backbone(model: str) -> Tuple["object", "object", str, Optional[str]]:
    """`(unet, noise_scheduler, path, subfolder)` from a pipeline folder / Hub id or a UNet2DModel folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    candidates = [("unet", "scheduler"), (None, None)]
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "unet", "config.json")):
            candidates = [("unet", "scheduler")]
        elif os.path.isfile(os.path.join(model, "config.json")):
            candidates = [(None, None)]
        else:
            raise CommandError(f"{model} has neither unet/config.json nor config.json: not a UNet2DModel folder.")
    errors = []
    for subfolder, scheduler_subfolder in candidates:
        try:
            unet = UNet2DModel.from_pretrained(model, subfolder=subfolder)
        except (OSError, ValueError) as error:
            errors.append(str(error).splitlines()[0])
            continue
        try:
            scheduler = DDPMScheduler.from_pretrained(model, subfolder=scheduler_subfolder or "scheduler")
        except (OSError, ValueError):
            print(f"warning: no scheduler config found next to {model}; assuming DDPMScheduler's defaults "
                  "(linear betas 1e-4..0.02, T=1000, epsilon).")
            scheduler = DDPMScheduler()
        return unet, scheduler, model, subfolder
    raise CommandError(f"could not load a UNet2DModel from {model}: {'; '.join(errors)}")


def load_images(data: str, channels: int, size: int):
    """Training images `[N, C, size, size]` in `[-1, 1]`."""
    return _images.load_images(data, "train", channels, size, size)


def run(args: argparse.Namespace) -> int:
    from ..noise_square_head import NoiseSquareHeadModel
    from ..training import latest_checkpoint, train_noise_square_head

    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or args.checkpoint_every < 1:
        raise CommandError("--steps, --batch-size, --lr and --checkpoint-every must be positive.")
    if os.path.isdir(args.output) and latest_checkpoint(args.output) and not args.resume:
        raise CommandError(f"{args.output} already has checkpoints: pass --resume to continue, or another --output.")
    unet, scheduler, path, subfolder = load_backbone(args.model)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise CommandError(f"unsupported prediction_type {scheduler.config.prediction_type!r}.")
    size = args.image_size or unet.config.sample_size
    if not isinstance(size, int):
        raise CommandError("the model's sample_size is not a single integer: pass --image-size.")
    images = load_images(args.data, unet.config.in_channels, size)
    head_model = NoiseSquareHeadModel.from_unet(unet, covariance_type=args.covariance_type, resblock=args.resblock)
    if args.save_backbone:
        save_kwargs = {"save_backbone": True}
    else:
        # a local model is referenced by its absolute path; a Hub id as it is
        reference = os.path.abspath(path) if os.path.isdir(path) else path
        save_kwargs = {"save_backbone": False, "backbone_path": reference, "backbone_subfolder": subfolder}
    print(f"train-head: {args.covariance_type} head on {args.model} ({len(images)} images of "
          f"{tuple(images.shape[1:])}), {args.steps} steps of batch {args.batch_size}")
    try:
        losses = train_noise_square_head(
            head_model, images, scheduler, num_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            ema_decay=args.ema_decay, gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision, output_dir=args.output, checkpoint_every=args.checkpoint_every,
            resume=args.resume, seed=args.seed, progress=not args.no_progress, log_every=args.log_every,
            save_kwargs=save_kwargs,
        )
    except ValueError as error:  # e.g. fp16 without a GPU, a checkpoint of the other covariance type
        raise CommandError(str(error)) from None
    window = max(1, min(100, len(losses) // 10))
    if losses:
        print(f"train-head: loss {sum(losses[:window]) / window:.5f} (first {window} steps) -> "
              f"{sum(losses[-window:]) / window:.5f} (last {window}); head saved to {args.output}")
    return 0
