"""Analytic-DPM against diffusers' DDPM and DDIM on Gaussian data, where the exact answer is known.

Data x0 ~ N(0, 0.3^2 I) (8x8, one channel) and the exact noise-prediction model. A sampler that reverses the
diffusion exactly returns samples of std 0.3 at any number of steps; fixed-variance samplers do not.

    python examples/gaussian_check.py [--num-samples 8000] [--seed 0]
"""

import argparse

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel


def sample(scheduler, model, num_samples, seed, eta=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((num_samples, 1, 8, 8), generator=generator)
    kwargs = {} if eta is None else {"eta": eta}
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=generator, **kwargs).prev_sample
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.3)
    args = parser.parse_args()

    ddpm = DDPMScheduler(clip_sample=False, timestep_spacing="linspace")
    model = GaussianDataModel.from_scheduler(ddpm, data_std=args.std)
    analytic = AnalyticDPMScheduler.from_config(ddpm.config, gamma=model.exact_gamma())
    ddim = DDIMScheduler.from_config(ddpm.config, timestep_spacing="trailing")
    samplers = [("DDPM (fixed_small)", ddpm, None), ("Analytic-DDPM", analytic, 1.0),
                ("DDIM", ddim, 0.0), ("Analytic-DDIM", analytic, 0.0)]
    print(f"target std {args.std}, {args.num_samples} samples, seed {args.seed}")
    print(f"{'sampler':<20}" + "".join(f"{f'K={K}':>18}" for K in (10, 25, 100)))
    for name, scheduler, eta in samplers:
        row = f"{name:<20}"
        for K in (10, 25, 100):
            scheduler.set_timesteps(K)
            std = sample(scheduler, model, args.num_samples, args.seed, eta).std().item()
            row += f"{std:>10.4f} ({std / args.std - 1:+.1%})"
        print(row)


if __name__ == "__main__":
    main()
