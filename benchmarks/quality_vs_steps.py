"""Sample quality, likelihood and wall time per number of steps, for this package's samplers and diffusers' own.

For each method and K: FID of `--num-samples` samples against the held-out digits (see `digits_fid.py`: the feature
space of a small classifier trained on the same data), NLL in bits/dim of the held-out digits (8-bit, where the
method has an ELBO: DDIM-type samplers and DPM-Solver have none), and the wall time of sampling. A 1000-step DDPM
(`ddpm-small`) row is the reference; a `data` row gives the FID of as many real train images as each row scores,
the floor of this FID.

Conventions, fixed before any result was seen: every method uses the model's own timestep spacing (`leading` for
the bundled model), except `analytic-ddpm-optimal` (the likelihood-optimal trajectory); this package's samplers clip
the std of the step onto the last timestep with `y = --last-step-sigma-clip` (default 1, the papers' value for
datasets other than CIFAR10/CelebA) when sampling, never for NLL.

Seeds and common random numbers: every row is measured once per seed of `--seeds` and reported as mean ± std over
seeds. Within a seed s every method gets the same random numbers: image i starts from (and draws its step noise
from) the generator seeded `s * 100000 + i`, and the NLL's forward noise from the generator seeded `s`. So the
difference between two methods is measured per seed, with less noise than the rows themselves: `write_results`
prints the paired differences of the comparisons that matter (mean ± std over seeds) and marks those larger than
twice their spread. The FID's classifier is the same for every seed (trained with seed 0).

    python benchmarks/quality_vs_steps.py [--model FOLDER] [--steps 10,25,50,100] [--seeds 0,1,2] [--quick]
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

from common import (  # noqa: E402
    apply_quick_defaults, digits_evaluation, mean_std, paired_difference, seeded_nll, seeded_samples)
from digits_fid import DigitsFID  # noqa: E402

from analytic_schedulers.loading import load  # noqa: E402
from analytic_schedulers.runtime import write_json_atomically  # noqa: E402
from analytic_schedulers.sampling import build_sampler, sampler_spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {  # benchmark name: sampler name (see analytic_schedulers.sampling.SAMPLERS)
    "ddpm-small": "ddpm",
    "ddpm-large": "ddpm-large",
    "ddim": "ddim",
    "dpmsolver++": "dpmsolver++",
    "analytic-ddpm": "analytic-ddpm",
    "analytic-ddim": "analytic-ddim",
    "analytic-ddpm-optimal": "analytic-ddpm-optimal",
    "sn-ddpm": "sn-ddpm",
    "npr-ddpm": "npr-ddpm",
}


#: Comparisons whose per-seed (paired) differences the results report: (method, baseline).
COMPARISONS = [("analytic-ddpm", "ddpm-small"), ("analytic-ddpm", "ddpm-large"), ("analytic-ddim", "ddim"),
               ("analytic-ddpm-optimal", "analytic-ddpm"), ("npr-ddpm", "analytic-ddpm"), ("sn-ddpm", "analytic-ddpm"),
               ("dpmsolver++", "analytic-ddim")]
SEED_STRIDE = 100_000  # image i of seed s: generator s * SEED_STRIDE + i


def model_for(name, loaded):
    """The model the benchmark method drives (the head model for SN/NPR), or None when it has no head."""
    spec = sampler_spec(METHODS[name])
    return loaded.head_model(spec.covariance_type) if spec.needs_head else loaded.unet


def measure(name, K, seed, loaded, fid, test_x0, args):
    """`{fid, nll_bpd, seconds}` of one method at K steps with the random numbers of `seed`."""
    sampler_name, model = METHODS[name], model_for(name, loaded)
    spec = sampler_spec(sampler_name)
    base_config, gamma = loaded.scheduler_config, loaded.gamma
    sampler = build_sampler(sampler_name, base_config, gamma, last_step_sigma_clip=args.last_step_sigma_clip)
    start = time.perf_counter()
    samples = seeded_samples(model, sampler, K, args.num_samples, args.batch_size, seed, SEED_STRIDE)
    result = {"seconds": time.perf_counter() - start, "fid": fid(samples), "nll_bpd": None}
    if spec.has_elbo and args.nll_images > 0:
        sampler = build_sampler(sampler_name, base_config, gamma, last_step_sigma_clip=None)
        result["nll_bpd"] = seeded_nll(model, sampler, K, test_x0, seed)
    return result


def run_method(name, K, loaded, fid, test_x0, args, seeds):
    """The row of one method at K steps: mean and std over `seeds`, and every seed's values."""
    if model_for(name, loaded) is None:
        return None
    per_seed = {str(seed): measure(name, K, seed, loaded, fid, test_x0, args) for seed in seeds}
    row = {"method": name, "steps": K, "per_seed": per_seed}
    for key in ("fid", "nll_bpd", "seconds"):
        row[key], row[f"{key}_std"] = mean_std([m[key] for m in per_seed.values()], torch_float64=True)
    return row


def paired_differences(rows):
    """For each comparison of `COMPARISONS` and K: the per-seed difference method - baseline, as mean ± std over
    the seeds both rows share, and whether it is larger than twice its spread."""
    by_key = {(r["method"], r["steps"]): r for r in rows if r.get("per_seed")}
    out = []
    for method, baseline in COMPARISONS:
        for K in sorted({k for (m, k) in by_key if m == method}):
            a, b = by_key.get((method, K)), by_key.get((baseline, K))
            if a is None or b is None:
                continue
            seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]), key=int)
            for key in ("fid", "nll_bpd"):
                mean, std = paired_difference({s: a["per_seed"][s][key] for s in seeds},
                                              {s: b["per_seed"][s][key] for s in seeds}, seeds, torch_float64=True)
                if mean is None:
                    continue
                out.append({"method": method, "baseline": baseline, "steps": K, "metric": key, "seeds": len(seeds),
                            "difference": mean, "difference_std": std,
                            "beyond_spread": len(seeds) > 1 and abs(mean) > 2 * std})
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    reference = next((r for r in rows if r["method"] == "ddpm-small" and r["steps"] == 1000), None)
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(METHODS):
        points = sorted((r["steps"], r) for r in rows if r["method"] == method and r["steps"] != 1000)
        if not points:
            continue
        style = "-o" if method.startswith(("analytic", "sn", "npr")) else "--s"
        for axis, key in zip(axes, ("fid", "nll_bpd")):
            kept = [(k, r) for k, r in points if r[key] is not None]
            if kept:
                axis.errorbar([k for k, _ in kept], [r[key] for _, r in kept],
                              yerr=[r.get(f"{key}_std") or 0.0 for _, r in kept], fmt=style, label=method,
                              markersize=4, color=colors(index), capsize=2, lw=1)
    for axis, key, title in zip(axes, ("fid", "nll_bpd"), ("FID (digits classifier features)", "NLL (bits/dim)")):
        if reference and reference[key] is not None:
            axis.axhline(reference[key], color="gray", lw=1, ls=":", label="ddpm-small, 1000 steps")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("steps K")
        steps = sorted({r["steps"] for r in rows if r["steps"] not in (None, 1000)})
        axis.set_xticks(steps, [str(k) for k in steps])
        axis.minorticks_off()
        axis.set_title(title)
        axis.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled digits model)")
    parser.add_argument("--steps", default="10,25,50,100")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--nll-images", type=int, default=297, help="held-out images for NLL (all 297 by default)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the random numbers; rows are mean ± std over them")
    parser.add_argument("--last-step-sigma-clip", type=float, default=1.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the 1000-step DDPM row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="K = 10, 25; 64 samples; 32 NLL images; seed 0 (CI)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the JSON files of runs over disjoint --methods (e.g. one per core) into "
                             "--output and --plot, instead of measuring")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/...json)")
    parser.add_argument("--plot", default=None, help="PNG path (default: benchmarks/results/...png)")
    args = parser.parse_args()
    if args.quick:  # smaller defaults; what the command line sets explicitly stays
        apply_quick_defaults(args, parser, {"steps": "10,25", "num_samples": 64, "nll_images": 32,
                                            "no_reference": True, "seeds": "0"})
    suffix = "_quick" if args.quick else ""
    output = Path(args.output or RESULTS / f"quality_vs_steps{suffix}.json")
    plot_path = Path(args.plot or RESULTS / f"quality_vs_steps{suffix}.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())["rows"]]
        meta = json.loads(Path(args.merge[0]).with_suffix(".meta.json").read_text())
        # the data row again, with as many train images as each run scored per row, by the same classifier: trained
        # with the runs' thread count (another count sums in another order and gives another classifier)
        torch.set_num_threads(meta["threads"])
        fid = DigitsFID(seed=0, num_samples=meta["num_samples"])
        rows = [data_row(fid)] + [r for r in rows if r["method"] != "data"]
        write_results(rows, meta, output, plot_path)
        return
    torch.set_num_threads(args.threads)

    loaded = load(args.model)
    heads = [kind for kind in ("sn", "npr") if loaded.head_model(kind) is not None]
    size = loaded.unet.config.sample_size
    fid, test_x0 = digits_evaluation(size, args.num_samples, args.nll_images)
    steps = [int(k) for k in args.steps.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"model {loaded.name}; {args.num_samples} samples per row, seeds {seeds} (common random numbers); NLL on "
          f"{len(test_x0)} held-out images; classifier test accuracy {fid.test_accuracy:.3f}; FID floor (train "
          f"split) {fid.data_fid:.2f}; torch {torch.__version__}, {args.threads} threads, {platform.machine()}; "
          f"heads: {heads or 'none'}")
    rows = [data_row(fid)]
    print(f"{'method':<24}{'K':>6}{'NLL bpd':>18}{'FID':>18}{'seconds':>10}")
    show(rows[0])
    for K in steps:
        for method in methods:
            row = run_method(method, K, loaded, fid, test_x0, args, seeds)
            if row is None:
                print(f"{method:<24}{K:>6}  skipped: no trained head in the model folder")
                continue
            rows.append(row)
            show(row)
    if not args.no_reference:
        rows.append(run_method("ddpm-small", 1000, loaded, fid, test_x0, args, seeds[:1]))
        show(rows[-1])
    meta = {"model": args.model or "bundled", "seeds": seeds, "seed_stride": SEED_STRIDE,
            "num_samples": args.num_samples, "nll_images": len(test_x0),
            "last_step_sigma_clip": args.last_step_sigma_clip, "classifier_test_accuracy": fid.test_accuracy,
            "threads": args.threads, "torch": torch.__version__}
    write_results(rows, meta, output, plot_path)


def data_row(fid):
    return {"method": "data", "steps": None, "nll_bpd": None, "fid": fid.data_fid, "seconds": None}


def show(row):
    def fmt(key, spec):
        value, std = row.get(key), row.get(f"{key}_std")
        if value is None:
            return "-"
        return format(value, spec) + ("" if std is None else f" ± {format(std, spec)}")

    print(f"{row['method']:<24}{row['steps'] or '':>6}{fmt('nll_bpd', '.3f'):>18}{fmt('fid', '.2f'):>18}"
          f"{'-' if row['seconds'] is None else format(row['seconds'], '.1f'):>10}", flush=True)


def write_results(rows, meta, output: Path, plot_path: Path) -> None:
    differences = paired_differences(rows)
    results = {"rows": rows, "differences": differences}
    write_json_atomically(output, results, indent=1)
    write_json_atomically(output.with_suffix(".meta.json"), meta, indent=1)
    plot(rows, plot_path)
    if differences:
        print("\npaired differences (same random numbers per seed), mean ± std over seeds; * = larger than twice the "
              "spread")
        for d in differences:
            print(f"  {d['method']:<22} - {d['baseline']:<15} K={d['steps']:<4} {d['metric']:<8}"
                  f"{d['difference']:+9.3f} ± {d['difference_std']:.3f}{' *' if d['beyond_spread'] else ''}")
    print(f"wrote {output} and {plot_path}")


if __name__ == "__main__":
    main()
