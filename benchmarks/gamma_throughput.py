"""Throughput of `estimate_gamma` against the bare forward passes of the same model on the same inputs.

    python benchmarks/gamma_throughput.py            # the UNet2DModel architecture of google/ddpm-cifar10-32
    python benchmarks/gamma_throughput.py --quick    # a small UNet, a few seconds

Both sides make the same model calls (same batch sizes, same timesteps); the bare side gets its inputs precomputed, so
the ratio `estimator / bare` is the estimator's whole overhead (noise, x_t, eps conversion, sums, bookkeeping).
Weights are random (no download): the cost of a forward pass does not depend on them. Runs alternate; the ratio uses
the fastest run of each side (the least disturbed by other load on a shared machine), the medians are printed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch
from diffusers import UNet2DModel

from analytic_schedulers import AnalyticDPMScheduler
from analytic_schedulers.gamma import estimate_gamma

# the UNet2DModel config of google/ddpm-cifar10-32 (35.7M parameters)
CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
)
SMALL_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Small UNet, few images: a few seconds on a CPU.")
    parser.add_argument("--model", choices=["cifar10", "small"], default=None,
                        help="UNet architecture (default: cifar10, or small with --quick).")
    parser.add_argument("--num-images", type=int, default=None, help="M (default 32, 16 with --quick).")
    parser.add_argument("--num-timesteps", type=int, default=4, help="Timesteps estimated (evenly spaced).")
    parser.add_argument("--batch-size", type=int, default=16, help="Inputs per model call.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs of each side (default 3, 2 quick).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model_name = args.model or ("small" if args.quick else "cifar10")
    num_images = args.num_images or (16 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = UNet2DModel(**(CIFAR10_UNET if model_name == "cifar10" else SMALL_UNET)).eval().to(args.device)
    scheduler = AnalyticDPMScheduler()
    images = torch.rand((num_images, 3, 32, 32), generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    timesteps = torch.linspace(0, 999, args.num_timesteps).round().long().tolist()

    # the bare side: the same calls estimate_gamma makes, inputs ready in advance
    calls = []

    def recording(x, t):
        calls.append((x.clone(), t.clone()))
        return model(x, t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate_gamma(recording, images, scheduler, timesteps=timesteps, batch_size=args.batch_size,
                       generator=args.seed, device=args.device, progress=False)

    def bare() -> None:
        with torch.inference_mode():
            for x, t in calls:
                model(x, t)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def estimator() -> None:
        estimate_gamma(model, images, scheduler, timesteps=timesteps, batch_size=args.batch_size,
                       generator=args.seed, device=args.device, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    bare()  # warm-up
    times = {"bare": [], "estimator": []}
    for _ in range(repeats):
        for name, fn in (("bare", bare), ("estimator", estimator)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    bare_s, est_s = min(times["bare"]), min(times["estimator"])
    median = {name: statistics.median(values) for name, values in times.items()}

    params = sum(p.numel() for p in model.parameters())
    print(f"model: UNet2DModel '{model_name}' ({params / 1e6:.1f}M parameters, random weights), 3x32x32")
    print(f"work: {num_images} images x {len(timesteps)} timesteps = {len(calls)} calls of <= {args.batch_size}")
    print(f"seed {args.seed}; torch {torch.__version__}, {torch.get_num_threads()} threads; device {args.device}; "
          f"machine {platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs, "
          f"{platform.platform()}")
    for name, label in (("bare", "bare forward passes"), ("estimator", "estimate_gamma     ")):
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(f"{label}: fastest {min(times[name]):.3f} s, median {median[name]:.3f} s ({repeats} runs: {runs})")
    print(f"ratio estimator / bare: {est_s / bare_s:.3f} "
          f"(fastest runs; medians {median['estimator'] / median['bare']:.3f})")


if __name__ == "__main__":
    main()
