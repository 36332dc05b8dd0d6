"""Likelihood (bits/dim) of a pretrained DDPM under DDPM and Analytic-DDPM, at a few numbers of steps.

    python examples/compute_nll.py --model google/ddpm-cifar10-32 --gamma ./ddpm-cifar10-gamma --data cifar10

The data is quantized to 8 bits in [-1, 1], as the ELBO's discrete decoder expects.
"""

import argparse

import torch
from diffusers import DDPMPipeline, DDPMScheduler

from _data import load_images
from analytic_schedulers import AnalyticDPMScheduler, nll_bits_per_dim


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32")
    parser.add_argument("--gamma", required=True, help="scheduler folder or Hub id with the Gamma table")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--steps", default="10,100")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = DDPMPipeline.from_pretrained(args.model)
    x0 = load_images(args.data, "test", pipe.unet.config.sample_size, limit=args.num_images)
    x0 = torch.round((x0.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    gamma = AnalyticDPMScheduler.load_config(args.gamma)["gamma"]
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
            nll = nll_bits_per_dim(pipe.unet, scheduler, x0, generator=torch.Generator().manual_seed(args.seed))
            print(f"K={K:<5} {name:<24} {nll.mean():.3f} bits/dim (± {nll.std() / len(nll) ** 0.5:.3f})")


if __name__ == "__main__":
    main()
