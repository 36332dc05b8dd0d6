"""Train an NPR-DPM (or SN-DPM) noise-square head on a frozen pretrained UNet, then sample with it.

    python examples/train_sn_head.py --model google/ddpm-cifar10-32 --data cifar10 --output ./npr-head
    python examples/train_sn_head.py ... --recipe plain --steps 50000          # the papers' recipe
    accelerate launch --num_processes 8 examples/train_sn_head.py ...

The default, cached recipe runs the frozen UNet once per draw on the model's own 10- and 25-step trajectories and
fits the head's output layer in one shot (about a minute of CPU on the bundled digits model); the papers' plain
recipe trained 500k iterations at batch 128. NPR is the head that beats Analytic-DPM's likelihood (README, Results).
"""

import argparse

import torch
from diffusers import DDPMPipeline

from analytic_schedulers import NoiseSquareHeadModel, SNDPMScheduler, train_noise_square_head
from analytic_schedulers.head_fitting import CachedFitRecipe
from analytic_schedulers.data import load_images
from analytic_schedulers.noise_square_head import load_head_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32")
    parser.add_argument("--data", default="cifar10", help="a Hugging Face dataset (needs `pip install datasets`), "
                        "an image folder, or sklearn-digits")
    parser.add_argument("--covariance-type", default="npr", choices=["sn", "npr"])
    parser.add_argument("--recipe", default="cached", choices=["cached", "plain"])
    parser.add_argument("--draws", type=int, default=20000, help="cached recipe: backbone passes")
    parser.add_argument("--steps", type=int, default=50000, help="plain recipe: optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-images", type=int, default=0, help="limit the training images (0: all)")
    parser.add_argument("--output", default="npr-head")
    parser.add_argument("--sample-steps", type=int, default=10)
    args = parser.parse_args()

    pipe = DDPMPipeline.from_pretrained(args.model)
    config = pipe.unet.config
    images = load_images(args.data, (config.in_channels, config.sample_size, config.sample_size), "train",
                         num_samples=args.num_images or None)
    head_model = NoiseSquareHeadModel.from_unet(pipe.unet, covariance_type=args.covariance_type)
    if args.recipe == "cached":
        recipe = dict(recipe=CachedFitRecipe(num_draws=args.draws, batch_size=args.batch_size))
    else:
        recipe = dict(recipe="plain", num_steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    losses = train_noise_square_head(head_model, images, pipe.scheduler, output_dir=args.output, **recipe)
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} ({args.recipe} recipe); head in {args.output}")

    # the trained head is a small folder of its own; compose it with the backbone to sample
    head_model = load_head_model(args.output, unet=pipe.unet)
    sampler = DDPMPipeline(unet=head_model, scheduler=SNDPMScheduler.from_config(
        pipe.scheduler.config, covariance_type=args.covariance_type))
    images = sampler(batch_size=4, num_inference_steps=args.sample_steps, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    print(f"sampled {len(images)} images at {args.sample_steps} steps with SN-DPM ({args.covariance_type})")


if __name__ == "__main__":
    main()
