"""The shared glue: one image reader (digits, folders, Hugging Face datasets), batches, seeds, model calls, files."""

import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from analytic_schedulers.data import (DataError, images_from_batch, load_captioned_images, load_images, quantize_8bit,
                                      shard_images)
from analytic_schedulers.runtime import (call_model, load_checkpoint, save_checkpoint, seed_of, stream_seed,
                                         write_json_atomically)


def write_pictures(folder, sizes, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        channels = 3 if mode == "RGB" else 1
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
        Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")


def test_a_folder_is_read_recursively_resized_and_scaled_to_minus_one_one(tmp_path):
    write_pictures(tmp_path / "a" / "b", [(12, 10), (8, 8), (20, 30)])
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    images = load_images(str(tmp_path / "a"), (3, 8, 8))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    grey = load_images(str(tmp_path / "a"), (1, 8, 8), num_samples=2, seed=1)
    assert grey.shape == (2, 1, 8, 8)
    with pytest.raises(DataError, match="resize the images first"):
        load_images(str(tmp_path / "a"), (3, 8, 8), resize=False)


def test_captions_stay_with_their_images_when_num_samples_takes_some(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):  # image i is flat grey 40 i, and line i of the captions names it
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    captions = [f"grey {40 * i}" for i in range(6)]
    for seed in range(3):
        images, chosen = load_captioned_images(str(folder), (1, 8, 8), captions, num_samples=3, seed=seed)
        assert len(images) == len(chosen) == 3
        for image, caption in zip(images, chosen):
            assert caption == f"grey {round((image[0, 0, 0].item() + 1) * 127.5)}"
    with pytest.raises(DataError, match="the caption list has 5 lines for 6 images"):
        load_captioned_images(str(folder), (1, 8, 8), captions[:5], num_samples=3)
    images, none = load_captioned_images(str(folder), (1, 8, 8), None, num_samples=3, seed=1)
    assert none is None and torch.equal(images, load_images(str(folder), (1, 8, 8), num_samples=3, seed=1))


def test_digits_are_replicated_to_the_models_channels():
    grey = load_images("sklearn-digits", (1, 16, 16), "test")
    rgb = load_images("digits", (3, 16, 16), "test", num_samples=5)
    assert grey.shape == (297, 1, 16, 16) and rgb.shape == (5, 3, 16, 16)
    assert torch.equal(rgb[:, 1], grey[:5, 0])


def test_a_hugging_face_dataset_name_is_read_with_datasets(monkeypatch):
    """The `datasets` path without the dependency: a stand-in `load_dataset` returns rows with PIL images."""
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"img": Image.new("RGB", (4, 4), (255, 0, 0)), "label": i} for i in range(3)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    images = load_images("cifar10", (3, 4, 4), "test", num_samples=2)
    assert calls == [("cifar10", "test")] and images.shape == (2, 3, 4, 4)
    torch.testing.assert_close(images[:, 0], torch.ones(2, 4, 4))  # red: 255 -> 1
    torch.testing.assert_close(images[:, 1], -torch.ones(2, 4, 4))


def test_bad_sources_say_what_would_work(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_images(str(tmp_path / "missing"), (3, 8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No images"):
        load_images(str(tmp_path / "empty"), (3, 8, 8))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_images("cifar10", (3, 8, 8))
    with pytest.raises(DataError, match="1 or 3 channels"):
        load_images(str(tmp_path / "empty"), (4, 8, 8))


def test_batches_of_every_shape_give_the_images():
    x = torch.zeros(2, 1, 4, 4)
    for batch in (x, (x, 1), [x], {"pixel_values": x}, {"images": x}, {"image": x}, x.numpy()):
        assert torch.equal(images_from_batch(batch), x)
    with pytest.raises(ValueError, match="uint8"):
        images_from_batch(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="keys"):
        images_from_batch({"label": x})


def test_shards_of_two_processes_partition_the_first_m_images():
    data = torch.arange(10.0).reshape(10, 1, 1, 1)
    shards = [shard_images(data, 7, rank, 2)[0].flatten().tolist() for rank in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    loader = [data[i:i + 3] for i in range(0, 10, 3)]  # an iterable of batches gives the same split
    assert [shard_images(loader, 7, rank, 2)[0].flatten().tolist() for rank in (0, 1)] == shards


def test_quantize_8bit_lands_on_the_grid():
    x = quantize_8bit(torch.linspace(-1.2, 1.2, 101))
    levels = (x + 1) * 127.5
    torch.testing.assert_close(levels, levels.round())
    assert x.min() == -1 and x.max() == 1


def test_seeds_and_streams():
    assert seed_of(None) == 0 and seed_of(7) == 7
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert seed_of(g1) == seed_of(g2)
    with pytest.raises(TypeError, match="int seed"):
        seed_of("3")
    assert stream_seed(0, 1, 0, 5) != stream_seed(0, 1, 0, 6) and stream_seed(0, 1) == stream_seed(0, 1)


def test_call_model_casts_and_unwraps():
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, sample, timestep, scale=1.0):
            seen.update(dtype=sample.dtype, timestep=timestep, scale=scale)
            return (sample * scale,)

    out = call_model(Model(), torch.ones(2, 1, 2, 2), 5, scale=2.0)
    assert seen["dtype"] == torch.float64 and seen["scale"] == 2.0
    assert seen["timestep"].tolist() == [5, 5] and out.dtype == torch.float64 and out.max() == 2


def test_checkpoints_and_json_are_written_whole(tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, {"head": {"w": torch.ones(2)}}, {"step": 3})
    save_checkpoint(folder, {"head": {"w": torch.zeros(2)}}, {"step": 4})  # replaces the old one
    tensors, state = load_checkpoint(folder)
    assert state == {"step": 4} and torch.equal(tensors["head"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    write_json_atomically(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError):
        write_json_atomically(tmp_path / "b.json", {"x": float("nan")})
    assert not (tmp_path / "b.json").exists() and len(list(tmp_path.iterdir())) == 2  # no temporary file left
