"""`analytic-schedulers train-head`: train an SN-DPM / NPR-DPM noise-square head on a frozen UNet2DModel."""

from __future__ import annotations

import argparse
import os

from . import (CommandError, add_hub_options, add_model_options, hub_kwargs, load_from_args,
               refuse_own_call_pipeline)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-head",
        help="train a noise-square head (SN-DPM / NPR-DPM) on a frozen UNet2DModel",
        description=(
            "Wraps a pretrained noise-prediction UNet2DModel with a zero-initialised noise-square head and trains "
            "the head only (Accelerate: run under `accelerate launch` for several GPUs). The trained head (EMA "
            "weights) is saved to --output as a NoiseSquareHead folder: put it beside the model's unet/ as "
            "sn_head/ or npr_head/, or pass it as --head; sample with SNDPMScheduler."
        ),
    )
    add_model_options(parser, required=True)
    parser.add_argument("--data", required=True,
                        help="'sklearn-digits' (the train split), a folder of images, or a Hugging Face dataset name")
    parser.add_argument("--split", default="train", help="split of the data set (default: train)")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, or the accelerator's device (default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--log-every", type=int, default=100, help="print the mean loss every N steps (100)")
    add_hub_options(parser, "the trained head", "sn_head or npr_head")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from ..data import load_images
    from ..noise_square_head import NoiseSquareHeadModel
    from ..runtime import make_accelerator
    from ..training import latest_checkpoint, train_noise_square_head

    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or args.checkpoint_every < 1:
        raise CommandError("--steps, --batch-size, --lr and --checkpoint-every must be positive.")
    if os.path.isdir(args.output) and latest_checkpoint(args.output) and not args.resume:
        raise CommandError(f"{args.output} already has checkpoints: pass --resume to continue, or another --output.")
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
    if accelerator.is_main_process:
        from ..runtime import write_json_atomically

        os.makedirs(args.output, exist_ok=True)
        write_json_atomically(os.path.join(args.output, "training_args.json"), {
            "model": args.model, "data": args.data, "split": args.split, "covariance_type": args.covariance_type,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}, indent=1)
    accelerator.print(f"train-head: {args.covariance_type} head on {loaded.name} ({len(images)} images of "
                      f"{tuple(images.shape[1:])}), {args.steps} steps of batch {args.batch_size}")
    try:
        losses = train_noise_square_head(
            head_model, images, DDPMScheduler.from_config(loaded.scheduler_config), num_steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, output_dir=args.output,
            checkpoint_every=args.checkpoint_every, resume=args.resume, generator=args.seed,
            progress=not args.no_progress, log_every=args.log_every, accelerator=accelerator,
        )
    except ValueError as error:  # e.g. a checkpoint of the other covariance type
        raise CommandError(str(error)) from None
    window = max(1, min(100, len(losses) // 10))
    if losses:
        accelerator.print(f"train-head: loss {sum(losses[:window]) / window:.5f} (first {window} steps) -> "
                          f"{sum(losses[-window:]) / window:.5f} (last {window}); head saved to {args.output}")
    if args.push_to_hub and accelerator.is_main_process:
        from ..hub import push_head_to_hub

        commit = push_head_to_hub(args.output, args.push_to_hub, base_model=args.model, **hub_kwargs(args))
        print(f"Uploaded to {getattr(commit, 'commit_url', args.push_to_hub)}")
    return 0
