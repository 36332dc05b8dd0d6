#!/usr/bin/env python
"""Train the small DDPM that ships inside ``analytic_schedulers/assets/ddpm-digits-16``.

The model is an epsilon-prediction ``diffusers.UNet2DModel`` trained on the
1500-image ``"train"`` split of scikit-learn's handwritten digits, upsampled to
16x16 (:func:`analytic_schedulers.datasets.digits_images`).  It is deliberately
tiny (under 1M parameters) so that it trains in about half an hour on a single
CPU core and lets the package sample offline, with no Hugging Face Hub access.

The output folder is a regular diffusers pipeline folder::

    <output-dir>/model_index.json
    <output-dir>/unet/{config.json, diffusion_pytorch_model.safetensors}   # EMA weights
    <output-dir>/scheduler/scheduler_config.json                           # DDPMScheduler
    <output-dir>/README.md                                                 # model card

and loads with ``diffusers.DDPMPipeline.from_pretrained(<output-dir>)``.

Reproduce the bundled model with::

    python scripts/train_bundled_model.py            # all defaults
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = "analytic_schedulers/assets/ddpm-digits-16"

# Architecture of the bundled model (kept here, not on the command line, so the
# shipped asset is fully described by this file plus the arguments in its model card).
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=True,
    clip_sample_range=1.0,
    prediction_type="epsilon",
    variance_type="fixed_small",
)


def _import_digits_images():
    """Import ``digits_images`` without requiring the package to be installed.

    Falls back to loading ``analytic_schedulers/datasets.py`` by path, so this
    script does not depend on the rest of the package importing cleanly.
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from analytic_schedulers.datasets import digits_images

        return digits_images
    except Exception:  # pragma: no cover - only when the package __init__ is broken
        path = REPO_ROOT / "analytic_schedulers" / "datasets.py"
        spec = importlib.util.spec_from_file_location("_analytic_schedulers_datasets", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.digits_images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="where to write the pipeline folder")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=100, help="linear LR warmup, then cosine decay to 10%% of --lr")
    p.add_argument("--ema-decay", type=float, default=0.999, help="max EMA decay (with the usual (1+n)/(10+n) warmup)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--log-every", type=int, default=50, help="print a log line every N steps")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be positive")
    return args


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema_model.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def write_model_card(output_dir: Path, info: dict) -> None:
    cfg = info["unet_config"]
    text = f"""# ddpm-digits-16

A tiny epsilon-prediction DDPM bundled with `analytic-schedulers` so that the
package can sample offline. It is a test/benchmark fixture, not a
high-quality generative model.

- **Data**: scikit-learn's handwritten digits (`sklearn.datasets.load_digits`),
  the fixed 1500-image `"train"` split of `analytic_schedulers.datasets.digits_images`
  (8x8 images, values 0..16, scaled to [0, 1], bilinearly upsampled to 16x16,
  mapped to [-1, 1]). The 297-image `"test"` split was not used for training.
  No data augmentation (digits are not flip-symmetric).
- **Architecture**: `diffusers.UNet2DModel`, 1 channel, 16x16,
  `block_out_channels={tuple(cfg["block_out_channels"])}`, `layers_per_block={cfg["layers_per_block"]}`,
  down `{tuple(cfg["down_block_types"])}`, up `{tuple(cfg["up_block_types"])}`,
  `norm_num_groups={cfg["norm_num_groups"]}`, `attention_head_dim={cfg["attention_head_dim"]}`;
  {info["num_parameters"]:,} parameters.
- **Noise schedule** (`scheduler/`): `DDPMScheduler`, 1000 training timesteps, linear
  betas 1e-4 .. 0.02, `prediction_type="epsilon"`, `clip_sample=True`.
- **Training**: {info["steps"]} AdamW steps, batch size {info["batch_size"]}, peak lr {info["lr"]}
  ({info["warmup_steps"]} warmup steps then cosine decay to 10%), weight decay {info["weight_decay"]},
  grad-norm clip {info["grad_clip"]}, uniform timesteps, MSE on the noise, seed {info["seed"]},
  {info["threads"]} CPU thread(s). The weights in `unet/` are the EMA weights (decay {info["ema_decay"]}).
- **Final training loss** (mean of the last {info["final_loss_window"]} steps, raw weights): {info["final_loss"]:.4f}
- **Training wall time**: {info["wall_time_s"] / 60:.1f} min on {info["machine"]}
  (torch {info["torch_version"]}, diffusers {info["diffusers_version"]}).

## Usage

```python
from pathlib import Path
import analytic_schedulers
from diffusers import DDPMPipeline

path = Path(analytic_schedulers.__file__).parent / "assets" / "ddpm-digits-16"
pipe = DDPMPipeline.from_pretrained(path)
images = pipe(batch_size=16, num_inference_steps=1000).images
```

## Reproduce

```bash
{info["command"]}
```

Bit-exact reproduction is only expected with the same torch version, thread count and CPU.
"""
    (output_dir / "README.md").write_text(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import diffusers
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    digits_images = _import_digits_images()
    data = digits_images("train", size=16)  # [1500, 1, 16, 16] in [-1, 1]
    n_data = data.shape[0]

    model = UNet2DModel(**UNET_CONFIG)
    model.train()
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    num_parameters = sum(p.numel() for p in model.parameters())
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.steps))
    gen = torch.Generator().manual_seed(args.seed)

    print(
        f"training UNet2DModel ({num_parameters:,} params) on {n_data} digits for {args.steps} steps, "
        f"batch {args.batch_size}, {args.threads} thread(s)",
        flush=True,
    )
    losses = []
    perm, pos = torch.randperm(n_data, generator=gen), 0
    t_start = time.time()
    bar = tqdm(range(args.steps), dynamic_ncols=True, mininterval=5.0)
    smoothed = None
    for step in bar:
        # Sample a batch without replacement (epoch-wise shuffling).
        if pos + args.batch_size > n_data:
            perm, pos = torch.randperm(n_data, generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise

        pred = model(xt, t).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        lr_sched.step()
        ema_update(ema_model, model, min(args.ema_decay, (1.0 + step) / (10.0 + step)))

        loss_val = loss.item()
        losses.append(loss_val)
        smoothed = loss_val if smoothed is None else 0.98 * smoothed + 0.02 * loss_val
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}", refresh=False)
        if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            elapsed = time.time() - t_start
            print(
                f"step {step + 1}/{args.steps} loss {smoothed:.4f} lr {lr_sched.get_last_lr()[0]:.2e} "
                f"elapsed {elapsed / 60:.1f} min ({elapsed / (step + 1):.3f} s/step)",
                flush=True,
            )
    bar.close()
    wall_time = time.time() - t_start
    window = min(100, len(losses))
    final_loss = sum(losses[-window:]) / window

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = DDPMPipeline(unet=ema_model, scheduler=scheduler)
    pipe.save_pretrained(output_dir, safe_serialization=True)

    cmd_args = ["python", "scripts/train_bundled_model.py"]
    for k in ("output_dir", "steps", "batch_size", "lr", "seed", "threads"):
        cmd_args += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    info = dict(
        vars(args),
        unet_config=dict(ema_model.config),
        num_parameters=num_parameters,
        final_loss=final_loss,
        final_loss_window=window,
        wall_time_s=wall_time,
        machine=f"{platform.machine()} CPU",
        torch_version=torch.__version__,
        diffusers_version=diffusers.__version__,
        command=" ".join(shlex.quote(c) for c in cmd_args),
    )
    write_model_card(output_dir, info)

    # Sanity check: the folder must load back as a pipeline with identical weights.
    loaded = DDPMPipeline.from_pretrained(output_dir)
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        tt = torch.tensor([10, 900])
        ok = torch.allclose(loaded.unet(x, tt).sample, ema_model(x, tt).sample, atol=1e-5)
    if not ok:
        raise RuntimeError(f"reloaded pipeline in {output_dir} does not reproduce the trained EMA model")
    print(json.dumps({"output_dir": str(output_dir), "final_loss": round(final_loss, 5), "wall_time_min": round(wall_time / 60, 2), "num_parameters": num_parameters}), flush=True)


if __name__ == "__main__":
    main()
