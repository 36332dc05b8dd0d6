"""Estimate the Gamma table of a pretrained pipeline once, and save it as a ready scheduler folder.

    python examples/estimate_gamma.py --model google/ddpm-cifar10-32 --data cifar10 --num-samples 50000 \
        --output ./ddpm-cifar10-gamma
    accelerate launch --num_processes 4 examples/estimate_gamma.py ...     # the same on 4 GPUs

`--data` is `cifar10` (needs `pip install datasets`), an image folder, or `sklearn-digits`. `--push-to-hub
you/ddpm-cifar10-analytic` shares the folder (as `analytic_scheduler/`, with a card saying how it was made).
"""

import argparse

import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline

from analytic_schedulers import estimate_gamma
from analytic_schedulers.data import load_images
from analytic_schedulers.hub import push_gamma_to_hub, write_gamma_folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/ddpm-cifar10-32")
    parser.add_argument("--data", default="cifar10", help="a Hugging Face dataset (needs `pip install datasets`), "
                        "an image folder, or sklearn-digits")
    parser.add_argument("--num-samples", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="ddpm-cifar10-gamma")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="then upload the folder to the Hub")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe = DDPMPipeline.from_pretrained(args.model).to(accelerator.device)
    config = pipe.unet.config
    images = load_images(args.data, (config.in_channels, config.sample_size, config.sample_size), "train",
                         num_samples=args.num_samples, seed=args.seed)
    estimate = estimate_gamma(pipe.unet, images, pipe.scheduler, num_samples=args.num_samples,
                              batch_size=args.batch_size, generator=args.seed, accelerator=accelerator,
                              progress=accelerator.is_main_process)
    if accelerator.is_main_process:
        settings = {"model": args.model, "data": args.data, "num_samples": estimate.num_samples, "seed": args.seed}
        write_gamma_folder(args.output, estimate, pipe.scheduler.config, settings)  # config, estimate and card
        print(f"Gamma from {estimate.num_samples} images; largest standard error {estimate.stderr.max():.4f}; "
              f"wrote {args.output}/scheduler_config.json")
        if args.push_to_hub:  # AnalyticDPMScheduler.from_pretrained(REPO_ID, subfolder="analytic_scheduler")
            push_gamma_to_hub(args.output, args.push_to_hub)


if __name__ == "__main__":
    main()
