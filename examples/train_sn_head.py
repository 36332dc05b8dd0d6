"""Train an SN-DPM (or NPR-DPM) noise-square head on a frozen pretrained UNet, then sample with it.

    python examples/train_sn_head.py --model google/ddpm-cifar10-32 --data cifar10 --steps 50000 --output ./sn-head
    accelerate launch --num_processes 8 --mixed_precision bf16 examples/train_sn_head.py ...

The papers trained 500k iterations at batch 128; the loss keeps falling long after a CPU run would stop.
"""

import argparse

import torch
from diffusers import DDPMPipeline

from analytic_schedulers import NoiseSquareHeadModel, SNDPMScheduler, train_noise_square_head
from analytic_schedulers.data import load_images
from analytic_schedulers.noise_square_head import load_head_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32")
    parser.add_argument("--data", default="cifar10", help="a Hugging Face dataset (needs `pip install datasets`), "
                        "an image folder, or sklearn-digits")
    parser.add_argument("--covariance-type", default="sn", choices=["sn", "npr"])
    parser.add_argument("--steps", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-images", type=int, default=0, help="limit the training images (0: all)")
    parser.add_argument("--output", default="sn-head")
    parser.add_argument("--sample-steps", type=int, default=10)
    args = parser.parse_args()

    pipe = DDPMPipeline.from_pretrained(args.model)
    config = pipe.unet.config
    images = load_images(args.data, (config.in_channels, config.sample_size, config.sample_size), "train",
                         num_samples=args.num_images or None)
    head_model = NoiseSquareHeadModel.from_unet(pipe.unet, covariance_type=args.covariance_type)
    losses = train_noise_square_head(head_model, images, pipe.scheduler, num_steps=args.steps,
                                     batch_size=args.batch_size, lr=args.lr, output_dir=args.output)
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} after {len(losses)} steps; head in {args.output}")

    # the trained head is a small folder of its own; compose it with the backbone to sample
    head_model = load_head_model(args.output, unet=pipe.unet)
    sampler = DDPMPipeline(unet=head_model, scheduler=SNDPMScheduler.from_config(
        pipe.scheduler.config, covariance_type=args.covariance_type))
    images = sampler(batch_size=4, num_inference_steps=args.sample_steps, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    print(f"sampled {len(images)} images at {args.sample_steps} steps with SN-DPM ({args.covariance_type})")


if __name__ == "__main__":
    main()
