"""Swap Analytic-DPM into a pretrained DDPM pipeline and sample in 10 steps.

    python examples/swap_scheduler.py --model google/ddpm-cifar10-32 --gamma ./ddpm-cifar10-gamma --steps 10

`--gamma` is a scheduler folder or Hub id with the Gamma table (written by examples/estimate_gamma.py or
`analytic-schedulers estimate-gamma`). Writes one grid per sampler: DDPM and Analytic-DDPM, same noise.
"""

import argparse

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

from analytic_schedulers import AnalyticDPMScheduler
from analytic_schedulers.images import grids_by_name, save_atomically
from analytic_schedulers.loading import load_gamma


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32")
    parser.add_argument("--gamma", required=True, help="scheduler folder or Hub id with the Gamma table")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="swap_scheduler.png")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    pipe = DDPMPipeline.from_pretrained(args.model).to(device)
    base_config = pipe.scheduler.config
    results = []
    generator = lambda: torch.Generator(device).manual_seed(args.seed)  # noqa: E731
    images = pipe(batch_size=args.num_images, num_inference_steps=args.steps, generator=generator(),
                  output_type="np").images
    results.append(("DDPM", images))

    # the swap: same betas, spacing and prediction type as the model's own scheduler, plus the Gamma table
    gamma = load_gamma(args.gamma)
    pipe.scheduler = AnalyticDPMScheduler.from_config(base_config, gamma=gamma)
    images = pipe(batch_size=args.num_images, num_inference_steps=args.steps, generator=generator(),
                  output_type="np").images
    results.append(("Analytic-DDPM", images))

    # Analytic-DDIM: DDIMPipeline converts the scheduler it is built with, so assign it afterwards
    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(base_config))
    ddim.scheduler = AnalyticDPMScheduler.from_config(base_config, gamma=gamma)
    images = ddim(batch_size=args.num_images, num_inference_steps=args.steps, eta=0.0, generator=generator(),
                  output_type="np").images
    results.append(("Analytic-DDIM", images))

    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2) * 2 - 1  # noqa: E731
    save_atomically(grids_by_name([(n, as_tensor(a)) for n, a in results], scale=2), args.output)
    print(f"wrote {args.output}: DDPM, Analytic-DDPM and Analytic-DDIM at {args.steps} steps, seed {args.seed}")


if __name__ == "__main__":
    main()
