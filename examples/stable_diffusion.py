"""Analytic-DPM in Stable Diffusion: Gamma of the guided prediction, estimated once (or data-free), then sampling at
10 and 25 steps beside DDIM and DPM-Solver++ from the same seeds.

    python examples/stable_diffusion.py --prompt "a photo of a cat" --data ./cat_photos --num-samples 256
    python examples/stable_diffusion.py --prompt "a photo of a cat" --data ./photos --captions captions.txt
    python examples/stable_diffusion.py --prompt "a photo of a cat"            # no data: gamma_from_batch=True

`--data` holds images like the model's training data (a folder, a Hugging Face dataset, `sklearn-digits`), resized to
the pipeline's resolution; `--captions` gives one caption per line for them (line i for image i: a folder's files in
sorted order, `--num-samples` taking the first), else every image is paired with `--prompt`. The table is estimated for `--guidance-scale`, the scale
this example then samples at, and only at the timesteps of the 10- and 25-step trajectories. Without `--data`,
`Gamma_t` is estimated at every step from the batch being sampled (`--num-images` images, the more the better).
"""

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from analytic_schedulers import AnalyticDPMScheduler, estimate_pipeline_gamma, use_analytic_dpm
from analytic_schedulers.data import load_captioned_images
from analytic_schedulers.images import grids_by_name, save_atomically


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--data", default=None, help="images to estimate Gamma on (default: none, data-free)")
    parser.add_argument("--captions", default=None, help="one caption per line for the --data images")
    parser.add_argument("--num-samples", type=int, default=64, help="images for the estimate (default 64)")
    parser.add_argument("--steps", default="10,25")
    parser.add_argument("--num-images", type=int, default=4, help="images per sampler (default 4)")
    parser.add_argument("--eta", type=float, default=0.0, help="0: Analytic-DDIM (default), 1: Analytic-DDPM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="stable_diffusion.png")
    return parser.parse_args()


def estimated_table(pipe, args, steps):
    """Gamma of the guided prediction on the latents of `--data`, at the timesteps the trajectories visit."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    captions = Path(args.captions).read_text(encoding="utf-8").splitlines() if args.captions else None
    images, captions = load_captioned_images(args.data, (3, size, size), captions, num_samples=args.num_samples,
                                             seed=args.seed, captions_name=f"--captions {args.captions!r}")
    timesteps = set()
    for K in steps:
        scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(K)
        timesteps.update(scheduler.timesteps.tolist())
    table = estimate_pipeline_gamma(pipe, images, captions=captions, prompt=None if captions else args.prompt,
                                    guidance_scale=args.guidance_scale, timesteps=sorted(timesteps),
                                    generator=args.seed, batch_size=8)
    print(f"Gamma of the guided prediction (scale {args.guidance_scale:g}) from {len(images)} images at "
          f"{len(timesteps)} timesteps; largest standard error {table.estimate.stderr.nan_to_num().max():.3g}")
    return table


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=torch.float16 if device == "cuda" else torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    base, steps = pipe.scheduler.config, [int(k) for k in args.steps.split(",")]
    table = estimated_table(pipe, args, steps) if args.data else None
    ours = f"Analytic-{'DDPM' if args.eta == 1.0 else 'DDIM'}" + ("" if table else " (data-free)")
    swaps = {
        "DDIM": lambda: setattr(pipe, "scheduler", DDIMScheduler.from_config(base)),
        "DPM-Solver++": lambda: setattr(pipe, "scheduler", DPMSolverMultistepScheduler.from_config(base)),
        # the swap: the pipeline's own schedule with the table (checked against the pipeline), or data-free
        ours: lambda: use_analytic_dpm(pipe, table, fill="interpolate", config=base, gamma_from_batch=table is None),
    }
    results = []
    for K in steps:
        for name, swap in swaps.items():
            swap()
            generators = [torch.Generator(device).manual_seed(args.seed + i) for i in range(args.num_images)]
            images = pipe([args.prompt] * args.num_images, num_inference_steps=K, guidance_scale=args.guidance_scale,
                          eta=args.eta, generator=generators, output_type="pt").images
            results.append((f"{name}, {K} steps", images.float().cpu() * 2 - 1))
    save_atomically(grids_by_name(results, scale=1), args.output)
    print(f"wrote {args.output}: {', '.join(swaps)} at {args.steps} steps, seed {args.seed}")


if __name__ == "__main__":
    main()
