"""Likelihood (bits/dim) of a pretrained DDPM under DDPM and Analytic-DDPM, at a few numbers of steps.

    python examples/compute_nll.py --model google/ddpm-cifar10-32 --gamma ./ddpm-cifar10-gamma --data cifar10

The data is quantized to 8 bits in [-1, 1], as the ELBO's discrete decoder expects.
"""

import argparse

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from analytic_schedulers import AnalyticDPMScheduler, nll_bits_per_dim
from analytic_schedulers.data import load_images, quantize_8bit
from analytic_schedulers.loading import load_gamma


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32")
    parser.add_argument("--gamma", required=True, help="scheduler folder or Hub id with the Gamma table")
    parser.add_argument("--data", default="cifar10", help="a Hugging Face dataset (needs `pip install datasets`), "
                        "an image folder, or sklearn-digits")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--steps", default="10,100")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = DDPMPipeline.from_pretrained(args.model)
    config = pipe.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    x0 = quantize_8bit(load_images(args.data, shape, "test", num_samples=args.num_images, resize=False))
    gamma = load_gamma(args.gamma)
    schedulers = {
        "DDPM tilde_beta": DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small"),
        "DDPM beta": DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_large"),
        "Analytic-DDPM": AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=gamma),
        "Analytic-DDPM optimal": AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=gamma,
                                                                  timestep_spacing="optimal"),
    }
    for K in [int(k) for k in args.steps.split(",")]:
        for name, scheduler in schedulers.items():
            scheduler.set_timesteps(K)
            nll = nll_bits_per_dim(pipe.unet, scheduler, x0, generator=args.seed)
            print(f"K={K:<5} {name:<24} {nll.mean():.3f} bits/dim (± {nll.std() / len(nll) ** 0.5:.3f})")


if __name__ == "__main__":
    main()
