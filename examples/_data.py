"""Training/test images for the examples: CIFAR10 through `datasets`, an image folder, or scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_images(source: str, split: str, size: int, limit: int = 0) -> torch.Tensor:
    """Images `[N, C, size, size]` in `[-1, 1]` from `cifar10` (needs `pip install datasets` and the Hub), an image
    folder (PNG/JPEG, searched recursively), or `sklearn-digits` (offline)."""
    if source == "sklearn-digits":
        from analytic_schedulers.datasets import digits_images

        images = digits_images(split, size)
    elif source == "cifar10":
        try:
            from datasets import load_dataset
        except ImportError:
            raise SystemExit("CIFAR10 needs the `datasets` library: pip install datasets (or pass an image folder)")
        dataset = load_dataset("cifar10", split="train" if split == "train" else "test")
        count = limit or len(dataset)
        pixels = np.stack([np.asarray(dataset[i]["img"].convert("RGB")) for i in range(count)])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        from PIL import Image

        files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if not files:
            raise SystemExit(f"no PNG/JPEG images under {source!r}")
        files = files[:limit] if limit else files
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in files])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images[:limit] if limit else images
