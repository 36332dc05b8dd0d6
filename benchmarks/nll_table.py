"""NLL (bits/dim, negative ELBO) per number of steps K for DDPM and Analytic-DDPM: the paper's Table 1, for one model.

    python benchmarks/nll_table.py                        # bundled digits model, its Gamma table, sklearn digits test
    python benchmarks/nll_table.py --quick                # 64 images, K = 10, 25
    python benchmarks/nll_table.py --model <folder> --gamma <scheduler folder> --data <image folder>

Rows: DDPM with `tilde_beta` (fixed_small) and `beta` (fixed_large), Analytic-DDPM on the model's spacing, and
Analytic-DDPM on the optimal trajectory. The paper's orderings (Analytic-DPM, Table 1) are checked and reported:
at each K, Analytic < DDPM beta < DDPM tilde_beta (the last may flip at large K, where tilde_beta catches up), and
the optimal trajectory improves Analytic further.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

ROWS = (
    ("DDPM, tilde_beta (fixed_small)", "ddpm"),
    ("DDPM, beta (fixed_large)", "ddpm-large"),
    ("Analytic-DDPM", "analytic-ddpm"),
    ("Analytic-DDPM, optimal trajectory", "analytic-ddpm-optimal"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline or UNet2DModel folder / Hub id (default: bundled)")
    parser.add_argument("--gamma", default=None, help="scheduler folder with the Gamma table (default: the model's)")
    parser.add_argument("--data", default="sklearn-digits", help="'sklearn-digits' or an image folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--steps", default="10,25,50,100", help="comma-separated K (default: 10,25,50,100)")
    parser.add_argument("--num-images", type=int, default=None, help="default: the whole split")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="64 images and K = 10, 25")
    args = parser.parse_args(argv)

    from analytic_schedulers.data import load_images, quantize_8bit
    from analytic_schedulers.likelihood import dataset_nll_bits_per_dim
    from analytic_schedulers.loading import load
    from analytic_schedulers.sampling import build_sampler

    steps = [10, 25] if args.quick else [int(k) for k in args.steps.split(",")]
    num_images = 64 if args.quick and args.num_images is None else args.num_images
    try:
        loaded = load(args.model, gamma=args.gamma)
        images = quantize_8bit(load_images(args.data, loaded.sample_shape, args.split, num_images, resize=False))
    except ValueError as error:
        print(f"nll_table: {error}", file=sys.stderr)
        return 2
    unet, base_config, gamma = loaded.unet.to(args.device), loaded.scheduler_config, loaded.gamma
    if gamma is None:
        print("nll_table: no Gamma table for this model; pass --gamma <scheduler folder> (estimate one with "
              "`analytic-schedulers estimate-gamma`).", file=sys.stderr)
        return 2
    print(f"model {args.model or 'bundled'}, {len(images)} images of {args.data}, seed {args.seed}, "
          f"spacing {base_config.get('timestep_spacing')} (optimal for the last row)\n")

    table = {}
    for _, name in ROWS:
        for K in steps:
            scheduler = build_sampler(name, base_config, gamma).scheduler
            scheduler.set_timesteps(K)
            start = time.perf_counter()
            nll = dataset_nll_bits_per_dim(unet, scheduler, images, batch_size=args.batch_size, generator=args.seed)
            table[name, K] = (nll.mean().item(), nll.std().item() / math.sqrt(len(nll)))
            print(f"  {name:<24} K={K:<4} {table[name, K][0]:8.3f} bits/dim  ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr)

    print("| method | " + " | ".join(f"K = {K}" for K in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for label, name in ROWS:
        print(f"| {label} | " + " | ".join(f"{table[name, K][0]:.3f} ± {table[name, K][1]:.3f}" for K in steps) + " |")
    print()
    for K in steps:
        value = {name: table[name, K][0] for _, name in ROWS}
        checks = {
            "Analytic < DDPM beta": value["analytic-ddpm"] < value["ddpm-large"],
            "DDPM beta < DDPM tilde_beta": value["ddpm-large"] < value["ddpm"],
            "optimal <= Analytic": value["analytic-ddpm-optimal"] <= value["analytic-ddpm"],
        }
        print(f"K = {K}: " + ", ".join(f"{text}: {'yes' if ok else 'NO'}" for text, ok in checks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
