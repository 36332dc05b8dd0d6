"""The cost of one scheduler step as a fraction of one UNet forward pass, measured side by side in one run.

The UNet has the architecture of google/ddpm-cifar10-32 (35.7M parameters, 3x32x32; config reproduced below, random
weights: the cost does not depend on the weights), batch 16. Each repetition times one forward pass and then one
`step` of every scheduler on the same tensors, interleaved so that machine noise hits all of them alike; the report
gives medians and the ratio step / forward. Also measured: `estimate_gamma` against the same number of bare forward
passes on the same inputs.

    python benchmarks/overhead.py [--reps 10] [--batch-size 16] [--threads N] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from analytic_schedulers import AnalyticDPMScheduler

CIFAR10_UNET = dict(  # google/ddpm-cifar10-32, unet/config.json
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional",
)
SMALL_UNET = dict(  # --quick: the same layout, narrower, so CI can run it in seconds
    CIFAR10_UNET, block_out_channels=(32, 64, 64, 64), norm_num_groups=16, layers_per_block=1,
)


def schedulers():
    base = DDPMScheduler().config
    gamma = [0.5] * 1000
    out = {
        "ddpm (diffusers)": (DDPMScheduler.from_config(base), {}, 1),
        "ddim (diffusers)": (DDIMScheduler.from_config(base), {"eta": 0.0}, 1),
        "analytic-ddpm": (AnalyticDPMScheduler.from_config(base, gamma=gamma), {}, 1),
        "analytic-ddim": (AnalyticDPMScheduler.from_config(base, gamma=gamma, eta=0.0), {}, 1),
    }
    try:
        from analytic_schedulers import SNDPMScheduler

        out["sn-ddpm"] = (SNDPMScheduler.from_config(base, covariance_type="sn"), {}, 2)
        out["npr-ddpm"] = (SNDPMScheduler.from_config(base, covariance_type="npr"), {}, 2)
    except ImportError:
        pass
    return out


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def step_overhead(unet, batch_size: int, reps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=generator)
    scheds = schedulers()
    for scheduler, _, _ in scheds.values():
        scheduler.set_timesteps(50)
    t = scheds["ddpm (diffusers)"][0].timesteps[10]
    outputs = {1: torch.randn(shape, generator=generator)}
    outputs[2] = torch.cat([outputs[1], torch.rand(shape, generator=generator) + 0.5], dim=1)
    unet(x, t)  # warm-up
    forward, steps = [], {name: [] for name in scheds}
    for _ in range(reps):
        forward.append(time_call(lambda: unet(x, t)))
        for name, (scheduler, kwargs, factor) in scheds.items():
            out = outputs[factor]
            steps[name].append(statistics.median(
                time_call(lambda: scheduler.step(out, t, x, generator=generator, **kwargs)) for _ in range(5)))
    forward_s = statistics.median(forward)
    return forward_s, {name: statistics.median(times) for name, times in steps.items()}


def gamma_overhead(unet, batch_size: int, num_timesteps: int, seed: int):
    """`estimate_gamma` over `num_timesteps` timesteps against the same number of bare forward passes."""
    from analytic_schedulers import estimate_gamma

    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    data = torch.rand(shape, generator=generator) * 2 - 1
    scheduler = DDPMScheduler()
    timesteps = list(range(0, 1000, 1000 // num_timesteps))[:num_timesteps]
    with torch.no_grad():
        unet(data, timesteps[0])
        bare = time_call(lambda: [unet(data, torch.full((batch_size,), t)) for t in timesteps])
    estimate = time_call(lambda: estimate_gamma(unet, data, scheduler, batch_size=batch_size, timesteps=timesteps,
                                                generator=torch.Generator().manual_seed(seed), progress=False))
    return bare, estimate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gamma-timesteps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a narrow UNet and 3 reps (CI)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = SMALL_UNET if args.quick else CIFAR10_UNET
    reps = 3 if args.quick else args.reps
    unet = UNet2DModel(**config).eval()
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"UNet: {'narrow quick-mode' if args.quick else 'google/ddpm-cifar10-32 architecture'}, {params:.1f}M "
          f"params, random weights, batch {args.batch_size}; torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}; seed {args.seed}; {reps} reps, medians")
    forward_s, step_s = step_overhead(unet, args.batch_size, reps, args.seed)
    print(f"{'':<20}{'median s':>12}{'/ forward':>12}")
    print(f"{'UNet forward':<20}{forward_s:>12.5f}{1:>12.2%}")
    rows = {"forward_s": forward_s, "steps": {}}
    for name, seconds in step_s.items():
        print(f"{name:<20}{seconds:>12.6f}{seconds / forward_s:>12.3%}")
        rows["steps"][name] = {"seconds": seconds, "fraction_of_forward": seconds / forward_s}
    try:
        bare, estimate = gamma_overhead(unet, args.batch_size, args.gamma_timesteps, args.seed)
        print(f"estimate_gamma over {args.gamma_timesteps} timesteps x {args.batch_size} images: {estimate:.3f} s vs "
              f"{bare:.3f} s of bare forward passes: ratio {estimate / bare:.3f}")
        rows["estimate_gamma"] = {"seconds": estimate, "bare_forward_seconds": bare, "ratio": estimate / bare}
    except ImportError:
        print("estimate_gamma not available in this version; skipped")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(rows, batch_size=args.batch_size, threads=args.threads, quick=args.quick, seed=args.seed),
                      handle, indent=2)


if __name__ == "__main__":
    main()
