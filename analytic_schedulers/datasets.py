"""Tiny, offline image datasets used by the bundled model, tests and benchmarks.

The only dataset here is scikit-learn's 8x8 handwritten digits
(:func:`sklearn.datasets.load_digits`, 1797 images, shipped inside
scikit-learn so no download is needed).  Images are upsampled to a small square
resolution and mapped to ``[-1, 1]``, the range diffusion models are trained on.

Splits are fixed and deterministic: a permutation of the 1797 images drawn from
a :class:`torch.Generator` seeded with ``0``; ``"test"`` is its first 297
entries, ``"train"`` the remaining 1500, and ``"all"`` is every image in the
original scikit-learn order.

scikit-learn is an optional dependency (``pip install analytic-schedulers[data]``)
and is imported lazily.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["digits_images", "digits_labels", "DIGITS_SPLITS", "NUM_DIGITS", "NUM_TEST"]

#: Valid values for the ``split`` argument.
DIGITS_SPLITS: Tuple[str, ...] = ("train", "test", "all")
#: Number of images in scikit-learn's digits dataset.
NUM_DIGITS = 1797
#: Number of images in the ``"test"`` split (the rest, 1500, are ``"train"``).
NUM_TEST = 297
_SPLIT_SEED = 0


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(
            "The digits dataset needs scikit-learn: pip install 'analytic-schedulers[data]' "
            "(or pip install scikit-learn)."
        ) from e
    return load_digits()


def _check_split(split: str) -> str:
    if not isinstance(split, str) or split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(map(repr, DIGITS_SPLITS))}.")
    return split


def _split_indices(split: str, n: int = NUM_DIGITS) -> torch.Tensor:
    if split == "all":
        return torch.arange(n)
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    perm = torch.randperm(n, generator=generator)
    return perm[:NUM_TEST] if split == "test" else perm[NUM_TEST:]


def digits_images(split: str = "train", size: int = 16) -> torch.Tensor:
    """Return scikit-learn's handwritten digits as a float32 image tensor.

    Args:
        split: ``"train"`` (1500 images), ``"test"`` (297 images) or ``"all"``
            (all 1797 images, in scikit-learn's order).  Train and test are
            disjoint and fixed (a permutation seeded with 0).
        size: Output height and width in pixels; must be an integer ``>= 8``
            (the native resolution).  Images are upsampled bilinearly
            (``align_corners=False``).

    Returns:
        A ``torch.float32`` tensor of shape ``[N, 1, size, size]`` with values
        in ``[-1, 1]`` (``-1`` is background, ``1`` full ink).

    Raises:
        ValueError: for an unknown ``split`` or a ``size`` smaller than 8.
        ImportError: if scikit-learn is not installed.

    Example:
        >>> x = digits_images("train", size=16)
        >>> x.shape
        torch.Size([1500, 1, 16, 16])
    """
    _check_split(split)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (digits are 8x8 natively), got {size!r}.")
    digits = _load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)  # [1797, 8, 8], values 0..16
    images = images[_split_indices(split, images.shape[0])]
    x = (images / 16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0)
    return x.contiguous()


def digits_labels(split: str = "train") -> torch.Tensor:
    """Return the ``int64`` class labels (0-9) matching :func:`digits_images`.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``; same order as
            ``digits_images(split)``.

    Returns:
        A ``torch.int64`` tensor of shape ``[N]``.

    Raises:
        ValueError: for an unknown ``split``.
    """
    _check_split(split)
    digits = _load_digits()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return labels[_split_indices(split, labels.shape[0])].clone()
