"""Do the heads pay off? Analytic-DDPM against NPR-DDPM and SN-DDPM on the bundled digits model, with heads from the
cached recipe and from the plain recipe at the same CPU budget: NLL and FID at K = 10 and 25, over several seeds.

Protocol for seed s, fixed before any result was seen (the research for issue #14 used the same):

- Heads: the cached recipe (`CachedFitRecipe()` defaults, draws seeded with s; at s = 0 these are the bundled heads),
  one cache shared by the SN and NPR fits (each head's CPU time counts the cache and its own fit, as a run of
  `train-head --recipe cached` would). The plain recipe (Adam, lr 1e-3, batch 64, EMA with warm-up, seeded with s)
  for as many steps as that head's cached CPU seconds buy, at the per-step cost measured at the start.
- NLL: the 297 held-out digits on the 8-bit grid; the forward noise of every sampler comes from generator s.
- FID (`digits_fid.DigitsFID`, seed 0): image i starts from generator `s * 100000 + i`, which also draws every step's
  noise, so all samplers of a seed see the same noise (common random numbers); the std of the step onto tau_1 is
  clipped at y = 1 (the papers'), and for Analytic and cached NPR also sampled without the clip.
- Differences to Analytic-DDPM (with its clip) are paired within a seed; over seeds, mean ± std. A difference
  *exceeds the spread* when |mean| > t(0.975, n - 1) * std / sqrt(n), a paired t-test at 5%.

    python benchmarks/heads.py [--seeds 0,1,2] [--num-samples 300] [--quick]

One CPU thread by default; the full run takes about 20 minutes on one core, training included
(`benchmarks/results/heads.json`).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    apply_quick_defaults, digits_evaluation, mean_std, paired_difference, seeded_nll, seeded_samples)

from analytic_schedulers import NoiseSquareHeadModel, train_noise_square_head  # noqa: E402
from analytic_schedulers.datasets import digits_images  # noqa: E402
from analytic_schedulers.head_fitting import CachedFitRecipe, collect_head_cache, fit_output_layer  # noqa: E402
from analytic_schedulers.loading import load  # noqa: E402
from analytic_schedulers.runtime import write_json_atomically  # noqa: E402
from analytic_schedulers.sampling import build_sampler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED_STRIDE = 100_000  # image i of seed s: generator s * SEED_STRIDE + i
PLAIN = dict(batch_size=64, lr=1e-3)  # the plain recipe as the bundled heads were first trained
# label: (sampler, which model, last-step clip y, scored by NLL)
ROWS = {
    "analytic": ("analytic-ddpm", None, 1.0, True),
    "npr-cached": ("npr-ddpm", "npr-cached", 1.0, True),
    "sn-cached": ("sn-ddpm", "sn-cached", 1.0, True),
    "npr-plain": ("npr-ddpm", "npr-plain", 1.0, True),
    "sn-plain": ("sn-ddpm", "sn-plain", 1.0, True),
    "analytic-noclip": ("analytic-ddpm", None, None, False),
    "npr-cached-noclip": ("npr-ddpm", "npr-cached", None, False),
}


class Bench:
    """The bundled model, its data, the FID and the settings every measurement shares."""

    def __init__(self, args):
        self.args = args
        self.loaded = load(None)
        self.unet = self.loaded.unet.eval()
        self.scheduler = self._ddpm_scheduler()
        self.train_images = digits_images("train", 16)
        self.fid, self.test_x0 = digits_evaluation(16, args.num_samples, args.nll_images, args.fid_epochs)
        self.recipe = CachedFitRecipe(num_draws=args.draws, max_evaluations=args.max_evaluations)

    def _ddpm_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.loaded.scheduler_config)

    def plain_seconds_per_step(self, steps: int) -> float:
        """CPU seconds of one plain-recipe step, from a short run."""
        model = NoiseSquareHeadModel.from_unet(self.unet, covariance_type="npr")
        start = time.process_time()
        train_noise_square_head(model, self.train_images, self.scheduler, recipe="plain", num_steps=steps,
                                progress=False, log_every=0, **PLAIN)
        return (time.process_time() - start) / steps


def train_heads(bench: Bench, seed: int, seconds_per_step: float):
    """The four heads of one seed: `{label: model}` and `{label: {"cpu_seconds", "wall_seconds", "steps"}}`."""
    models, costs = {}, {}
    cache_model = NoiseSquareHeadModel.from_unet(bench.unet, covariance_type="npr")
    cache = collect_head_cache(cache_model, bench.train_images, bench.scheduler, bench.recipe, generator=seed)
    for kind in ("npr", "sn"):
        model = NoiseSquareHeadModel.from_unet(bench.unet, covariance_type=kind)
        fit = fit_output_layer(model, cache, bench.scheduler, bench.recipe)
        models[f"{kind}-cached"] = model.eval()
        budget = cache.cpu_seconds + fit.cpu_seconds
        costs[f"{kind}-cached"] = {"cpu_seconds": budget, "wall_seconds": cache.wall_seconds + fit.wall_seconds,
                                   "evaluations": len(fit.losses)}
        plain = NoiseSquareHeadModel.from_unet(bench.unet, covariance_type=kind)
        steps = max(1, round(budget / seconds_per_step))
        cpu, wall = time.process_time(), time.perf_counter()
        train_noise_square_head(plain, bench.train_images, bench.scheduler, recipe="plain", num_steps=steps,
                                generator=seed, progress=False, log_every=0, **PLAIN)
        models[f"{kind}-plain"] = plain.eval()
        costs[f"{kind}-plain"] = {"cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall,
                                  "steps": steps}
        print(f"seed {seed} {kind}: cached {budget:.1f} CPU s ({costs[f'{kind}-cached']['evaluations']} "
              f"evaluations), plain {steps} steps {costs[f'{kind}-plain']['cpu_seconds']:.1f} CPU s", flush=True)
    return models, costs


@torch.no_grad()
def score(bench: Bench, label: str, model, K: int, seed: int) -> dict:
    """NLL (bits/dim, mean over the held-out digits) and FID of one sampler at K steps, seed `seed`."""
    sampler_name, _, clip, with_nll = ROWS[label]
    row = {"label": label, "K": K, "seed": seed, "nll_bpd": None}
    if with_nll:
        sampler = build_sampler(sampler_name, bench.loaded.scheduler_config, bench.loaded.gamma)
        row["nll_bpd"] = seeded_nll(model, sampler, K, bench.test_x0, seed)
    sampler = build_sampler(sampler_name, bench.loaded.scheduler_config, bench.loaded.gamma, last_step_sigma_clip=clip)
    args = bench.args
    row["fid"] = bench.fid(seeded_samples(model, sampler, K, args.num_samples, args.batch_size, seed, SEED_STRIDE))
    return row


def exceeds_spread(mean, std, n):
    """Whether a paired difference over n seeds exceeds its spread, |mean| > t(0.975, n - 1) std / sqrt(n); None
    for one seed (std None)."""
    if std is None:
        return None
    from scipy.stats import t as student_t

    return bool(abs(mean) > student_t.ppf(0.975, n - 1) * std / math.sqrt(n))


def summarise(rows, costs):
    """One entry per (K, label): NLL, FID and their paired differences to Analytic-DDPM, with the head's cost."""
    summary = []
    for K in sorted({r["K"] for r in rows}):
        base = {r["seed"]: r for r in rows if r["K"] == K and r["label"] == "analytic"}
        for label in ROWS:
            mine = {r["seed"]: r for r in rows if r["K"] == K and r["label"] == label}
            seeds = sorted(mine)
            entry = {"K": K, "label": label, "seeds": seeds}
            for metric in ("nll_bpd", "fid"):
                values = [mine[s][metric] for s in seeds if mine[s][metric] is not None]
                if not values:
                    continue
                entry[metric] = dict(zip(("mean", "std"), mean_std(values, one_value_std=None)))
                if label != "analytic":
                    mean, std = paired_difference({s: mine[s][metric] for s in seeds},
                                                  {s: base[s][metric] for s in seeds}, seeds, one_value_std=None)
                    entry[f"{metric}_vs_analytic"] = {"mean": mean, "std": std,
                                                      "exceeds_spread": exceeds_spread(mean, std, len(seeds))}
            model = ROWS[label][1]
            if model is not None and model in costs[seeds[0]] and label == model:
                entry["head_cpu_seconds"] = statistics.fmean(costs[s][model]["cpu_seconds"] for s in seeds)
                if "steps" in costs[seeds[0]][model]:
                    entry["plain_steps"] = statistics.fmean(costs[s][model]["steps"] for s in seeds)
            summary.append(entry)
    return summary


def show(summary) -> None:
    def fmt(value, digits, signed=False):
        if value is None:
            return "-"
        text = f"{value['mean']:{'+' if signed else ''}.{digits}f}"
        text += "" if value["std"] is None else f" ± {value['std']:.{digits}f}"
        return text + (" *" if value.get("exceeds_spread") else "")

    def cost(entry):
        if "head_cpu_seconds" not in entry:
            return "-"
        steps = f" ({entry['plain_steps']:.0f} steps)" if "plain_steps" in entry else ""
        return f"{entry['head_cpu_seconds']:.0f}{steps}"

    print(f"\n{'K':>3} {'sampler':<18}{'NLL bits/dim':>16}{'ΔNLL vs Analytic':>20}{'FID':>15}{'ΔFID vs Analytic':>19}"
          f"{'head CPU s':>20}")
    for e in summary:
        print(f"{e['K']:>3} {e['label']:<18}{fmt(e.get('nll_bpd'), 3):>16}"
              f"{fmt(e.get('nll_bpd_vs_analytic'), 3, True):>20}{fmt(e.get('fid'), 2):>15}"
              f"{fmt(e.get('fid_vs_analytic'), 2, True):>19}{cost(e):>20}")
    print("mean ± std over seeds; * = the paired difference exceeds the spread (|mean| > t(0.975, n-1) std/sqrt(n)); "
          "-noclip: sampled without the last-step clip, compared with Analytic with it")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", default="10,25", help="K's to evaluate")
    parser.add_argument("--draws", type=int, default=CachedFitRecipe().num_draws, help="the cached recipe's draws")
    parser.add_argument("--max-evaluations", type=int, default=CachedFitRecipe().max_evaluations,
                        help="the cached recipe's L-BFGS evaluations")
    parser.add_argument("--num-samples", type=int, default=300, help="samples per FID")
    parser.add_argument("--nll-images", type=int, default=297, help="held-out images for NLL (all 297 by default)")
    parser.add_argument("--batch-size", type=int, default=300)
    parser.add_argument("--calibration-steps", type=int, default=40, help="plain steps timed for the per-step cost")
    parser.add_argument("--fid-epochs", type=int, default=30, help="epochs of the FID classifier (default 30)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, K = 10, 200 draws, 30 L-BFGS evaluations, 32 samples, 16 NLL images, a 2-epoch "
                             "FID classifier (CI)")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/heads.json)")
    args = parser.parse_args()
    if args.quick:  # smaller defaults; what the command line sets explicitly stays
        apply_quick_defaults(args, parser, {"seeds": "0", "steps": "10", "draws": 200, "max_evaluations": 30,
                                            "num_samples": 32, "nll_images": 16, "calibration_steps": 3,
                                            "fid_epochs": 2})
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    bench = Bench(args)
    seeds, steps = [int(s) for s in args.seeds.split(",")], [int(k) for k in args.steps.split(",")]
    seconds_per_step = bench.plain_seconds_per_step(args.calibration_steps)
    print(f"bundled digits model; seeds {seeds}; K {steps}; {args.draws} draws; FID of {args.num_samples} samples "
          f"(floor {bench.fid.data_fid:.2f}); NLL on {len(bench.test_x0)} held-out digits; plain recipe "
          f"{seconds_per_step:.3f} CPU s/step; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    rows, costs = [], {}
    for seed in seeds:
        models, costs[seed] = train_heads(bench, seed, seconds_per_step)
        for K in steps:
            for label, (_, model_label, _, _) in ROWS.items():
                row = score(bench, label, bench.unet if model_label is None else models[model_label], K, seed)
                rows.append(row)
                nll = "-" if row["nll_bpd"] is None else f"{row['nll_bpd']:.3f}"
                print(f"seed {seed} K {K:3d} {label:<18} NLL {nll} FID {row['fid']:.2f}", flush=True)
    summary = summarise(rows, costs)
    show(summary)
    meta = {"seeds": seeds, "steps": steps, "recipe": bench.recipe.to_dict(), "plain": PLAIN,
            "plain_cpu_seconds_per_step": seconds_per_step, "num_samples": args.num_samples,
            "nll_images": len(bench.test_x0), "fid_floor": bench.fid.data_fid,
            "classifier_test_accuracy": bench.fid.test_accuracy, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "wall_seconds": time.perf_counter() - wall_start}
    output = Path(args.output or RESULTS / ("heads_quick.json" if args.quick else "heads.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(output, {"meta": meta, "summary": summary, "training": {str(s): c for s, c in costs.items()},
                                   "rows": rows}, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
