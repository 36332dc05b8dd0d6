"""Tests for ``analytic_schedulers.datasets`` and the bundled ``ddpm-digits-16`` model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

# Load datasets.py by path so these tests do not depend on the package __init__.
_PKG_DIR = Path(__file__).resolve().parents[1] / "analytic_schedulers"
_spec = importlib.util.spec_from_file_location("_as_datasets_under_test", _PKG_DIR / "datasets.py")
datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(datasets)

ASSET_DIR = _PKG_DIR / "assets" / "ddpm-digits-16"


@pytest.fixture(scope="module")
def splits():
    return {s: datasets.digits_images(s, 16) for s in ("train", "test", "all")}


def test_shapes_dtype_range(splits):
    expected = {"train": 1500, "test": 297, "all": 1797}
    for name, x in splits.items():
        assert x.shape == (expected[name], 1, 16, 16)
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all()
        assert x.min() >= -1.0 and x.max() <= 1.0
    # Background is -1 and some pixels reach full ink.
    assert splits["all"].min() == -1.0
    assert splits["all"].max() > 0.9


def test_size_argument():
    x8 = datasets.digits_images("test", size=8)
    assert x8.shape == (297, 1, 8, 8)
    x28 = datasets.digits_images("test", size=28)
    assert x28.shape == (297, 1, 28, 28)
    assert x28.min() >= -1.0 and x28.max() <= 1.0
    # size=8 is the native data: exactly k/16 mapped to [-1, 1].
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32)
    torch.testing.assert_close(datasets.digits_images("all", 8)[:, 0], raw / 8.0 - 1.0)


def test_splits_deterministic_and_disjoint(splits):
    assert torch.equal(datasets.digits_images("train", 16), splits["train"])
    assert torch.equal(datasets.digits_labels("test"), datasets.digits_labels("test"))

    test_idx = datasets._split_indices("test")
    train_idx = datasets._split_indices("train")
    assert len(set(test_idx.tolist()) & set(train_idx.tolist())) == 0
    assert sorted(test_idx.tolist() + train_idx.tolist()) == list(range(1797))
    # The splits really are the images at those indices of "all".
    torch.testing.assert_close(splits["all"][test_idx], splits["test"], rtol=0, atol=0)
    torch.testing.assert_close(splits["all"][train_idx], splits["train"], rtol=0, atol=0)


def test_labels_match_images():
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target, dtype=torch.int64)
    for split in ("train", "test", "all"):
        y = datasets.digits_labels(split)
        assert y.dtype == torch.int64
        assert y.shape == (datasets.digits_images(split, 8).shape[0],)
        assert y.min() >= 0 and y.max() <= 9
        assert torch.equal(y, target[datasets._split_indices(split)])
    assert torch.equal(datasets.digits_labels("all"), target)
    # Both splits contain every class.
    assert set(datasets.digits_labels("test").tolist()) == set(range(10))


@pytest.mark.parametrize("split", ["val", "Train", "", None])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        datasets.digits_images(split)
    with pytest.raises(ValueError, match="split"):
        datasets.digits_labels(split)


@pytest.mark.parametrize("size", [7, 0, -16, 16.0, True])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        datasets.digits_images("train", size)


def test_bundled_model_layout():
    assert (ASSET_DIR / "model_index.json").is_file(), f"missing bundled model in {ASSET_DIR}"
    index = json.loads((ASSET_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    weights = ASSET_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size < 5 * 2**20
    sched = json.loads((ASSET_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert sched["num_train_timesteps"] == 1000
    assert sched["prediction_type"] == "epsilon"
    assert sched["beta_schedule"] == "linear"
    assert (ASSET_DIR / "README.md").is_file()


def test_bundled_model_forward():
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(ASSET_DIR, subfolder="unet").eval()
    assert unet.config.sample_size == 16
    assert unet.config.in_channels == 1 and unet.config.out_channels == 1
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(x, torch.tensor([999, 10])).sample
    assert out.shape == (2, 1, 16, 16)
    assert torch.isfinite(out).all()
    # At t=999 x_t is almost pure noise, so a trained eps-model predicts roughly x_t itself.
    assert torch.nn.functional.cosine_similarity(out[0].flatten(), x[0].flatten(), dim=0) > 0.9
