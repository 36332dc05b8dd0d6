"""Images for the commands: scikit-learn's digits or a folder of PNG/JPEG files, as `[N, C, H, W]` in `[-1, 1]`."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

from . import CommandError

DIGITS = "sklearn-digits"
DIGITS_NAMES = (DIGITS, "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_images(data: str, split: str, channels: int, height: int, width: int, num_samples: Optional[int] = None,
                seed: int = 0, resize: bool = True) -> torch.Tensor:
    """
    `data` is `sklearn-digits` (its `split`, grey, replicated to `channels`) or an image folder searched recursively
    (a seeded random subset of `num_samples` files when the folder holds more). With `resize=False`, images of
    another size are an error (for likelihoods, where resizing would change the data set).
    """
    if data in DIGITS_NAMES:
        if height != width:
            raise CommandError(f"{DIGITS} gives square images; the model wants {height}x{width}.")
        from ..datasets import digits_images

        try:
            images = digits_images(split=split, size=height)
        except (ImportError, ValueError) as error:
            raise CommandError(str(error)) from None
        images = images.expand(-1, channels, -1, -1).contiguous() if channels != 1 else images
        return images[:num_samples] if num_samples is not None else images
    folder = Path(data)
    if not folder.is_dir():
        raise CommandError(f"--data {data!r} is neither an image folder nor {DIGITS!r}.")
    if channels not in (1, 3):
        raise CommandError(f"Image folders give 1 or 3 channels; the model wants {channels}.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise CommandError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {data!r}.")
    if num_samples is not None and num_samples < len(files):
        random.Random(seed).shuffle(files)
        files = files[:num_samples]
    return torch.stack([_load_image(path, channels, height, width, resize) for path in files])


def _load_image(path: Path, channels: int, height: int, width: int, resize: bool) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                if not resize:
                    raise CommandError(
                        f"{path.name} is {image.size[0]}x{image.size[1]}, the model takes {width}x{height}: resize "
                        "the images first (the likelihood of resized images is that of another data set)."
                    )
                image = _center_crop_resize(image, height, width)
            pixels = np.asarray(image, dtype=np.float32)
    except OSError as error:
        raise CommandError(f"Could not read image {str(path)!r}: {error}") from None
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def _center_crop_resize(image, height: int, width: int):
    from PIL import Image

    w, h = image.size
    scale = max(width / w, height / h)
    crop_w, crop_h = round(width / scale), round(height / scale)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
