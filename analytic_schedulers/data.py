"""Image data for the package's tasks and commands: one reader of image sources, one unpacker of batches.

A source is `sklearn-digits` (offline, see `datasets.py`), a folder of image files (searched recursively), or the name
of a Hugging Face dataset (`cifar10`, `user/name`) when the `datasets` library is installed. Images come back as
float32 `[N, C, H, W]` in `[-1, 1]`, the range diffusion models are trained on.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .loading import looks_like_path

DIGITS = "sklearn-digits"
DIGITS_NAMES = (DIGITS, "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Keys under which a dict batch (or a Hugging Face dataset row) holds its images, in the order they are tried.
IMAGE_KEYS = ("pixel_values", "images", "image", "img", "input")

__all__ = ["DIGITS", "DataError", "images_from_batch", "load_captioned_images", "load_images", "quantize_8bit",
           "shard_images", "training_images"]


class DataError(ValueError):
    """Image data that cannot be used, with what to do about it."""


def load_images(
    source: str,
    shape: Tuple[int, int, int],
    split: str = "train",
    num_samples: Optional[int] = None,
    seed: int = 0,
    resize: bool = True,
) -> torch.Tensor:
    """
    Images `[N, C, H, W]` in `[-1, 1]` (float32) from a named source.

    Args:
        source: `"sklearn-digits"`, a folder of images, or a Hugging Face dataset name (needs `datasets`).
        shape: `(C, H, W)` the model takes; C is 1 (grey) or 3 (RGB); digits are replicated to C channels.
        split: the split of digits (`train`, `test`, `all`) or of a Hugging Face dataset; ignored for folders.
        num_samples: at most this many images: a seeded random subset of a folder, the first of a dataset.
        seed: seeds the choice of that subset.
        resize: center-crop and resize images of another size; `False` makes that an error (for likelihoods,
            where resized images are another data set).

    Raises:
        DataError: a source that does not exist or holds no usable images, saying what would work.
    """
    channels, height, width = shape
    if num_samples is not None and num_samples < 1:
        raise DataError(f"The number of images must be at least 1, got {num_samples}.")
    if source in DIGITS_NAMES:
        images = _digits(split, channels, height, width)
        return images[:num_samples] if num_samples is not None else images
    if channels not in (1, 3):
        raise DataError(f"Image files give 1 or 3 channels; the model takes {channels}.")
    if os.path.isdir(source):
        pictures = _folder_pictures(Path(source), num_samples, seed)
    elif looks_like_path(source):  # a missing folder, not a dataset name
        raise DataError(f"The data folder {source!r} does not exist. " + _SOURCES_HELP)
    else:
        pictures = _hf_dataset_pictures(source, split, num_samples)
    return torch.stack([_to_tensor(picture, name, channels, height, width, resize) for name, picture in pictures])


def load_captioned_images(
    source: str,
    shape: Tuple[int, int, int],
    captions: Optional[Sequence[str]],
    split: str = "train",
    num_samples: Optional[int] = None,
    seed: int = 0,
    captions_name: str = "the caption list",
) -> Tuple[torch.Tensor, Optional[List[str]]]:
    """
    The images of `load_images` with their captions, caption i for image i. With captions, a folder is read whole
    and in sorted path order (not a random subset), so that line i of a captions file is image i; `num_samples`
    takes the first images. Without captions, this is `load_images` (and `None`).

    Args:
        captions: one caption per image of `source` (a folder's images in sorted path order, a dataset's rows), or
            `None`.
        captions_name: what the captions are called in the error (e.g. the file they were read from).

    Returns:
        `(images [n, C, H, W], their n captions or None)`, n = `min(num_samples, images in source)`.

    Raises:
        DataError: as `load_images`, or captions that do not match the images one to one.
    """
    if captions is None:
        return load_images(source, shape, split, num_samples, seed), None
    whole = os.path.isdir(source)
    images = load_images(source, shape, split, None if whole else num_samples, seed)
    used = len(images) if num_samples is None else min(num_samples, len(images))
    if len(captions) < used or (whole and len(captions) != len(images)):
        raise DataError(
            f"{captions_name} has {len(captions)} lines for {len(images)} images in {source!r}: give one caption per "
            "image, line i for image i (a folder's images in sorted path order)."
        )
    return images[:used], list(captions[:used])


_SOURCES_HELP = (f"Pass a folder of images ({', '.join(IMAGE_EXTENSIONS)}), {DIGITS!r}, or the name of a Hugging "
                 "Face dataset (with `pip install datasets`).")


def _digits(split: str, channels: int, height: int, width: int) -> torch.Tensor:
    from .datasets import digits_images

    if height != width:
        raise DataError(f"{DIGITS} gives square images; the model takes {height}x{width}.")
    try:
        images = digits_images(split=split, size=height)
    except (ImportError, ValueError) as error:
        raise DataError(str(error)) from None
    return images.expand(-1, channels, -1, -1).contiguous() if channels != 1 else images


def _folder_pictures(folder: Path, num_samples: Optional[int], seed: int):
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(folder)!r}.")
    if num_samples is not None and num_samples < len(files):
        random.Random(seed).shuffle(files)
        files = files[:num_samples]
    for path in files:
        try:
            with Image.open(path) as picture:
                picture.load()
                yield path.name, picture
        except OSError as error:
            raise DataError(f"Could not read image {str(path)!r}: {error}") from None


def _hf_dataset_pictures(name: str, split: str, num_samples: Optional[int]):
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name!r} is not a folder, and reading it as a Hugging Face dataset needs the `datasets` "
                        "library (pip install datasets). " + _SOURCES_HELP) from None
    try:
        dataset = load_dataset(name, split=split)
    except Exception as error:  # not found, offline, gated: say which and how to go on
        raise DataError(f"Could not load the Hugging Face dataset {name!r} (split {split!r}): {error}. "
                        + _SOURCES_HELP) from None
    count = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    if count == 0:
        raise DataError(f"The Hugging Face dataset {name!r} (split {split!r}) is empty.")
    key = next((k for k in IMAGE_KEYS if k in dataset[0]), None)
    if key is None:
        raise DataError(f"The Hugging Face dataset {name!r} has no image column (looked for {IMAGE_KEYS}).")
    for index in range(count):
        yield f"{name}[{index}]", dataset[index][key]


def _to_tensor(picture, name: str, channels: int, height: int, width: int, resize: bool) -> torch.Tensor:
    picture = picture.convert("L" if channels == 1 else "RGB")
    if picture.size != (width, height):
        if not resize:
            raise DataError(
                f"{name} is {picture.size[0]}x{picture.size[1]}, the model takes {width}x{height}: resize the images "
                "first (the likelihood of resized images is that of another data set)."
            )
        picture = _center_crop_resize(picture, height, width)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy())
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def _center_crop_resize(picture, height: int, width: int):
    from PIL import Image

    w, h = picture.size
    scale = max(width / w, height / h)
    crop_w, crop_h = round(width / scale), round(height / scale)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return picture.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in `[-1, 1]` rounded onto the 8-bit grid `{-1 + 2k/255}` that the discretised likelihood needs."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def images_from_batch(batch) -> torch.Tensor:
    """
    The image tensor `[B, C, H, W]` of a batch: a tensor or numpy array, the first element of a tuple/list, or a
    dict's entry under one of `IMAGE_KEYS` (`pixel_values`, `images`, `image`, `img`, `input`).

    Raises:
        ValueError / TypeError: for anything else, or images that are not floats (map uint8 with `x / 127.5 - 1`).
    """
    if isinstance(batch, dict):
        key = next((k for k in IMAGE_KEYS if k in batch), None)
        if key is None:
            raise ValueError(f"A dict batch needs one of the keys {IMAGE_KEYS}; got keys {sorted(batch)}.")
        batch = batch[key]
    elif isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("Got an empty tuple/list as a batch.")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"Expected image batches as tensors (or tuples/lists/dicts holding them), got {type(batch).__name__}."
        )
    if batch.ndim < 2:
        raise ValueError(f"Expected a batch of images `[B, C, H, W]`, got shape {tuple(batch.shape)}.")
    if not batch.is_floating_point():
        raise ValueError(
            f"Expected float images in [-1, 1], got dtype {batch.dtype}. For uint8 images use `x / 127.5 - 1`."
        )
    return batch


def training_images(data, in_channels: int) -> torch.Tensor:
    """
    `data` as one float tensor `[N, C, H, W]` held in memory, with its channels checked against the model's: a float
    tensor or array, a dict batch (`images_from_batch`), or a sequence of `[C, H, W]` images or of dataset items
    (`(image, label)` tuples, dicts) holding them.

    Raises:
        TypeError / ValueError: what `data` is instead, and what it must be.
    """
    if isinstance(data, (torch.Tensor, np.ndarray, dict)):
        images = images_from_batch(data)
    else:
        try:
            images = torch.stack([images_from_batch(data[i]) for i in range(len(data))])
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                "`data` must be float images [N, C, H, W] in [-1, 1]: a tensor or array, or a sequence of [C, H, W] "
                f"images (or of dataset items holding them): {error}"
            ) from None
    if images.ndim != 4 or images.shape[1] != in_channels or len(images) == 0:
        raise ValueError(
            f"`data` must have shape [N, {in_channels}, H, W] (the backbone's channels), got {tuple(images.shape)}."
        )
    return images.float()


def shard_images(data, num_samples: Optional[int], rank: int = 0, world_size: int = 1,
                 batch_size: int = 64) -> Tuple[torch.Tensor, int, Optional[int]]:
    """
    This process's images of `data`: the global indices `rank, rank + W, ...` below `M = min(num_samples, available)`.

    `data` is a tensor or numpy array `[N, ...]`, a map-style `Dataset`, or an iterable of batches (see
    `images_from_batch`). Tensors and map-style datasets load only this shard; other iterables are read up to M
    images by every process (the model calls are split, the reading is not).

    Returns:
        `(shard [n, ...] float32 on the CPU, M, available or None when the data ran out before num_samples)`.
    """
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}.")
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        data = images_from_batch(data)
        available = data.shape[0]
        used = available if num_samples is None else min(num_samples, available)
        return data[rank:used:world_size].float().cpu(), used, available
    map_style = isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
    if map_style and hasattr(data, "__len__"):
        available = len(data)
        used = available if num_samples is None else min(num_samples, available)
        subset = torch.utils.data.Subset(data, range(rank, used, world_size))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
        parts = [images_from_batch(b).float().cpu() for b in loader]
        if not parts:
            empty = torch.empty(0) if available == 0 else images_from_batch(
                torch.utils.data.default_collate([data[0]]))[:0].float()
            return empty, used, available
        return torch.cat(parts), used, available
    if not isinstance(data, Iterable):
        raise TypeError(
            f"`data` must be a tensor, a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}."
        )
    return _shard_of_iterable(data, num_samples, rank, world_size)


def _shard_of_iterable(data: Iterable, num_samples: Optional[int], rank: int,
                       world_size: int) -> Tuple[torch.Tensor, int, Optional[int]]:
    parts: List[torch.Tensor] = []
    seen, shape = 0, None
    for batch in data:
        images = images_from_batch(batch)
        if shape is not None and images.shape[1:] != shape:
            raise ValueError(f"Batches have different image shapes: {tuple(shape)} and {tuple(images.shape[1:])}.")
        shape = images.shape[1:]
        if num_samples is not None:
            images = images[: num_samples - seen]
        first = (rank - seen) % world_size  # the first index of this batch that is ours
        parts.append(images[first::world_size].float().cpu())
        seen += images.shape[0]
        if num_samples is not None and seen >= num_samples:
            return torch.cat(parts), seen, None
    if seen == 0:
        return torch.empty(0), 0, 0
    return torch.cat(parts), seen, seen
