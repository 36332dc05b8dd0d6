"""The data-free route (`gamma_from_batch=True`) against the estimated Gamma table, on the bundled digits model.

For each K and seed: FID (digits classifier features, see `digits_fid.py`) of `--num-samples` samples of
Analytic-DDPM and Analytic-DDIM, and the NLL (bits/dim, Analytic-DDPM) of the held-out digits, once with the model's
bundled table and once with `Gamma_t` estimated at every step from the current batch.

Common random numbers: both routes start from the same noise and draw the same step noise (image i of seed r always
from generator `r * 1_000_000 + i`), and the NLL of both draws the same forward noise (generator `r`); so the paired
difference `batch - table` measures the route, not the seed. The data-free route's batch is the evaluation batch:
`--batch-size` samples when sampling, all `--nll-images` held-out images at once for the NLL (there each step's
Gamma is the mean of `||eps_hat||^2 / d` over the noised held-out images themselves). Both routes use the last-step
clip `y = --last-step-sigma-clip` when sampling (never for the NLL), as `quality_vs_steps.py` does.

    python benchmarks/data_free.py [--steps 10,25] [--seeds 3] [--num-samples 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import digits_evaluation, mean_std, paired_difference, seeded_nll, seeded_samples  # noqa: E402

from analytic_schedulers.loading import load  # noqa: E402
from analytic_schedulers.runtime import write_json_atomically  # noqa: E402
from analytic_schedulers.sampling import build_sampler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROUTES = ("table", "batch")
SAMPLERS = ("analytic-ddpm", "analytic-ddim")
SEED_STRIDE = 1_000_000


def make_sampler(name, route, loaded, last_step_sigma_clip):
    gamma = loaded.gamma if route == "table" else None
    return build_sampler(name, loaded.scheduler_config, gamma, last_step_sigma_clip, gamma_from_batch=route == "batch")


def timed(function):
    """`(result, wall seconds, CPU seconds of this process)` of `function()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def fid_of(name, route, K, seed, loaded, fid, args):
    sampler = make_sampler(name, route, loaded, args.last_step_sigma_clip)
    return timed(lambda: fid(seeded_samples(loaded.unet, sampler, K, args.num_samples, args.batch_size, seed,
                                            SEED_STRIDE)))


def nll_of(route, K, seed, loaded, test_x0):
    sampler = make_sampler("analytic-ddpm", route, loaded, None)
    return timed(lambda: seeded_nll(loaded.unet, sampler, K, test_x0, seed))


def measure(args, loaded, fid, test_x0):
    rows = []
    for K in args.steps:
        for seed in range(args.seeds):
            for route in ROUTES:
                for name in SAMPLERS:
                    value, wall, cpu = fid_of(name, route, K, seed, loaded, fid, args)
                    rows.append(dict(metric="fid", sampler=name, route=route, steps=K, seed=seed, value=value,
                                     wall_seconds=wall, cpu_seconds=cpu))
                    show(rows[-1])
                value, wall, cpu = nll_of(route, K, seed, loaded, test_x0)
                rows.append(dict(metric="nll_bpd", sampler="analytic-ddpm", route=route, steps=K, seed=seed,
                                 value=value, wall_seconds=wall, cpu_seconds=cpu))
                show(rows[-1])
    return rows


def show(row):
    print(f"{row['metric']:<8}{row['sampler']:<15}{row['route']:<7}K={row['steps']:<4}seed {row['seed']}  "
          f"{row['value']:9.4f}  {row['cpu_seconds']:7.1f} CPU s", flush=True)


def summarize(rows):
    """Per metric, sampler and K: mean and std over seeds of each route, and of the paired difference batch - table."""
    summary = []
    keys = sorted({(r["metric"], r["sampler"], r["steps"]) for r in rows})
    for metric, sampler, K in keys:
        by_route = {route: {r["seed"]: r["value"] for r in rows if (r["metric"], r["sampler"], r["steps"], r["route"])
                            == (metric, sampler, K, route)} for route in ROUTES}
        seeds = sorted(by_route["table"])
        entry = dict(metric=metric, sampler=sampler, steps=K, seeds=len(seeds))
        for route in ROUTES:
            entry[f"{route}_mean"], entry[f"{route}_std"] = mean_std([by_route[route][s] for s in seeds])
        difference = paired_difference(by_route["batch"], by_route["table"], seeds)
        entry["difference_mean"], entry["difference_std"] = difference
        summary.append(entry)
    return summary


def print_summary(summary):
    print(f"\n{'metric':<8}{'sampler':<15}{'K':>4}{'table':>18}{'batch (data-free)':>22}{'batch - table':>20}")
    for e in summary:
        cell = lambda m, s: f"{m:.3f} ± {s:.3f}"  # noqa: E731
        print(f"{e['metric']:<8}{e['sampler']:<15}{e['steps']:>4}{cell(e['table_mean'], e['table_std']):>18}"
              f"{cell(e['batch_mean'], e['batch_std']):>22}{cell(e['difference_mean'], e['difference_std']):>20}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,25")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1 (default 3)")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per FID (default 1000)")
    parser.add_argument("--batch-size", type=int, default=500, help="samples per batch (default 500)")
    parser.add_argument("--nll-images", type=int, default=297, help="held-out images for the NLL (all 297)")
    parser.add_argument("--last-step-sigma-clip", type=float, default=1.0)
    parser.add_argument("--fid-epochs", type=int, default=30, help="epochs of the FID classifier (default 30)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="K = 10, one seed, 32 samples, 16 NLL images (CI)")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/data_free.json)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.num_samples, args.batch_size = "10", 1, 32, 32
        args.nll_images, args.fid_epochs = 16, 2
    args.steps = [int(k) for k in args.steps.split(",")]
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output or RESULTS / f"data_free{'_quick' if args.quick else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    loaded = load(None)
    size = loaded.unet.config.sample_size
    fid, test_x0 = digits_evaluation(size, args.num_samples, args.nll_images, args.fid_epochs)
    print(f"bundled model; {args.num_samples} samples per FID in batches of {args.batch_size}; NLL of {len(test_x0)} "
          f"held-out images in one batch; seeds 0..{args.seeds - 1}; FID floor {fid.data_fid:.2f}; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}")
    start = time.process_time()
    rows = measure(args, loaded, fid, test_x0)
    summary = summarize(rows)
    print_summary(summary)
    meta = dict(model="bundled", steps=args.steps, seeds=args.seeds, num_samples=args.num_samples,
                batch_size=args.batch_size, nll_images=len(test_x0), last_step_sigma_clip=args.last_step_sigma_clip,
                fid_floor=fid.data_fid, classifier_test_accuracy=fid.test_accuracy, threads=args.threads,
                torch=torch.__version__, total_cpu_seconds=time.process_time() - start,
                command="python benchmarks/data_free.py " + " ".join(sys.argv[1:]))
    write_json_atomically(output, dict(meta=meta, summary=summary, rows=rows), indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
