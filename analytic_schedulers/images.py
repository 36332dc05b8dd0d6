"""Turning sample tensors into PNG grids (PIL only)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from .runtime import write_atomically


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`[N, C, H, W]` in `[-1, 1]` -> `[N, H, W, C]` uint8, rounding to the nearest 8-bit level."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int = 0, scale: int = 1, padding: int = 1) -> Image.Image:
    """A grid of `images` (`[N, C, H, W]` in `[-1, 1]`), `nrow` images a row (square by default), with white
    `padding` between and around the images, upscaled by `scale` (diffusers' `make_image_grid` lays it out)."""
    from diffusers.utils import make_image_grid

    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    tiles = [Image.fromarray(p[..., 0] if c == 1 else p).convert("RGB") for p in pixels]
    tiles += [Image.new("RGB", (w, h), "white")] * (rows * nrow - n)
    tiles = [ImageOps.expand(tile, border=(0, 0, padding, padding), fill="white") for tile in tiles]
    grid = ImageOps.expand(make_image_grid(tiles, rows=rows, cols=nrow), border=(padding, padding, 0, 0), fill="white")
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def labelled_panels(panels: Sequence[Tuple[str, Image.Image]], gap: int = 8, label_height: int = 16) -> Image.Image:
    """Panels side by side, each with its label above it."""
    width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    height = max(p.height for _, p in panels) + label_height + 2 * gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for label, panel in panels:
        draw.text((x, gap // 2), label, fill="black")
        canvas.paste(panel.convert("RGB"), (x, gap + label_height))
        x += panel.width + gap
    return canvas


def check_writable(path: str) -> Path:
    """Fails early, before any work, when `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"Output {str(path)!r} is a directory; give a file name such as grid.png.")
    if not parent.is_dir():
        raise ValueError(f"Output folder {str(parent)!r} does not exist; create it first.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"Cannot write {str(path)!r}: permission denied.")
    return path


def save_atomically(image: Image.Image, path: str) -> None:
    """Writes a PNG so that a reader never sees a half-written file (see `runtime.write_atomically`)."""
    write_atomically(path, lambda handle: image.save(handle, format="PNG"))


def grids_by_name(named_images: List[Tuple[str, torch.Tensor]], scale: int) -> Image.Image:
    """One labelled grid per sampler, side by side (a single grid when there is one sampler)."""
    if len(named_images) == 1:
        return image_grid(named_images[0][1], scale=scale)
    return labelled_panels([(name, image_grid(images, scale=scale)) for name, images in named_images])
