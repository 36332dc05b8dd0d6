"""Sample quality, likelihood and wall time per number of steps, for this package's samplers and diffusers' own.

For each method and K: FID of `--num-samples` samples against the held-out digits (see `digits_fid.py`: the feature
space of a small classifier trained on the same data), NLL in bits/dim of the held-out digits (8-bit, where the
method has an ELBO: DDIM-type samplers and DPM-Solver have none), and the wall time of sampling. A 1000-step DDPM
(`ddpm-small`) row is the reference; a `data` row gives the FID of as many real train images as each row scores,
the floor of this FID.

Conventions, fixed before any result was seen: every method uses the model's own timestep spacing (`leading` for
the bundled model), except `analytic-ddpm-optimal` (the likelihood-optimal trajectory); this package's samplers clip
the std of the step onto the last timestep with `y = --last-step-sigma-clip` (default 1, the papers' value for
datasets other than CIFAR10/CelebA) when sampling, never for NLL; image i of every method starts from seed + i.

    python benchmarks/quality_vs_steps.py [--model FOLDER] [--steps 10,25,50,100] [--num-samples 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_fid import DigitsFID  # noqa: E402

from analytic_schedulers.data import quantize_8bit  # noqa: E402
from analytic_schedulers.datasets import digits_images  # noqa: E402
from analytic_schedulers.loading import load  # noqa: E402
from analytic_schedulers.sampling import build_sampler, sample_images, sampler_spec  # noqa: E402

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


def run_method(name, K, loaded, fid, test_x0, args, sample=True):
    sampler_name = METHODS[name]
    spec = sampler_spec(sampler_name)
    model = loaded.head_model(spec.covariance_type) if spec.needs_head else loaded.unet
    if model is None:
        return None
    base_config, gamma = loaded.scheduler_config, loaded.gamma
    row = {"method": name, "steps": K, "nll_bpd": None, "fid": None, "seconds": None}
    if sample:
        sampler = build_sampler(sampler_name, base_config, gamma, last_step_sigma_clip=args.last_step_sigma_clip)
        start = time.perf_counter()
        chunks = []
        for begin in range(0, args.num_samples, args.batch_size):
            seeds = range(args.seed + begin, args.seed + min(begin + args.batch_size, args.num_samples))
            chunks.append(sample_images(model, sampler, K, [torch.Generator().manual_seed(s) for s in seeds]))
        row["seconds"] = time.perf_counter() - start
        row["fid"] = fid(torch.cat(chunks))
    if spec.has_elbo and args.nll_images > 0:
        from analytic_schedulers import nll_bits_per_dim

        sampler = build_sampler(sampler_name, base_config, gamma, last_step_sigma_clip=None)
        sampler.set_timesteps(K)
        nll = nll_bits_per_dim(model, sampler.scheduler, test_x0, generator=torch.Generator().manual_seed(args.seed))
        row["nll_bpd"] = nll.mean().item()
    return row


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
            xs = [k for k, r in points if r[key] is not None]
            if xs:
                axis.plot(xs, [r[key] for k, r in points if r[key] is not None], style, label=method,
                          markersize=4, color=colors(index))
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--last-step-sigma-clip", type=float, default=1.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the 1000-step DDPM row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="K = 10, 25; 64 samples; 32 NLL images (CI)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the JSON files of runs over disjoint --methods (e.g. one per core) into "
                             "--output and --plot, instead of measuring")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/...json)")
    parser.add_argument("--plot", default=None, help="PNG path (default: benchmarks/results/...png)")
    args = parser.parse_args()
    if args.quick:  # smaller defaults; what the command line sets explicitly stays
        quick = {"steps": "10,25", "num_samples": 64, "nll_images": 32, "no_reference": True}
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    suffix = "_quick" if args.quick else ""
    output = Path(args.output or RESULTS / f"quality_vs_steps{suffix}.json")
    plot_path = Path(args.plot or RESULTS / f"quality_vs_steps{suffix}.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [r for path in args.merge for r in json.loads(Path(path).read_text())]
        meta = json.loads(Path(args.merge[0]).with_suffix(".meta.json").read_text())
        # the data row again, with as many train images as each run scored per row
        fid = DigitsFID(seed=meta["seed"], num_samples=meta["num_samples"])
        rows = [{"method": "data", "steps": None, "nll_bpd": None, "fid": fid.data_fid, "seconds": None}] + [
            r for r in rows if r["method"] != "data"]
        write_results(rows, meta, output, plot_path)
        return
    torch.set_num_threads(args.threads)

    loaded = load(args.model)
    heads = [kind for kind in ("sn", "npr") if loaded.head_model(kind) is not None]
    size = loaded.unet.config.sample_size
    fid = DigitsFID(size=size, seed=args.seed, num_samples=args.num_samples)
    test_x0 = quantize_8bit(digits_images("test", size))[: args.nll_images]
    steps = [int(k) for k in args.steps.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    print(f"model {loaded.name}; {args.num_samples} samples per row, "
          f"seed {args.seed}; NLL on {len(test_x0)} held-out images; classifier test accuracy "
          f"{fid.test_accuracy:.3f}; FID floor (train split) {fid.data_fid:.2f}; torch {torch.__version__}, "
          f"{args.threads} threads, {platform.machine()}; heads: {heads or 'none'}")
    rows = [{"method": "data", "steps": None, "nll_bpd": None, "fid": fid.data_fid, "seconds": None}]
    print(f"{'method':<24}{'K':>6}{'NLL bpd':>10}{'FID':>10}{'seconds':>10}")

    def show(row):
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{row['method']:<24}{row['steps'] or '':>6}{fmt(row['nll_bpd'], '.3f'):>10}"
              f"{fmt(row['fid'], '.2f'):>10}{fmt(row['seconds'], '.1f'):>10}", flush=True)

    show(rows[0])
    for K in steps:
        for method in methods:
            row = run_method(method, K, loaded, fid, test_x0, args)
            if row is None:
                print(f"{method:<24}{K:>6}  skipped: no trained head in the model folder")
                continue
            rows.append(row)
            show(row)
    if not args.no_reference:
        rows.append(run_method("ddpm-small", 1000, loaded, fid, test_x0, args))
        show(rows[-1])
    meta = {"model": args.model or "bundled", "seed": args.seed, "num_samples": args.num_samples,
            "nll_images": len(test_x0), "last_step_sigma_clip": args.last_step_sigma_clip,
            "classifier_test_accuracy": fid.test_accuracy, "threads": args.threads, "torch": torch.__version__}
    write_results(rows, meta, output, plot_path)


def write_results(rows, meta, output: Path, plot_path: Path) -> None:
    for path, content in ((output, rows), (output.with_suffix(".meta.json"), meta)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(content, indent=1))
        os.replace(tmp, path)
    plot(rows, plot_path)
    print(f"wrote {output} and {plot_path}")


if __name__ == "__main__":
    main()
