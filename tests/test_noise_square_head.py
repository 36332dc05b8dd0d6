"""NoiseSquareHeadModel: wrapping a frozen UNet2DModel, the [eps, h] output, saving/loading, pipelines."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from analytic_schedulers.noise_square_head import NoiseSquareHeadModel
from analytic_schedulers.scheduling_sn_dpm import SNDPMScheduler


def make_unet(channels=1, out_channels=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=out_channels or channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def perturb_head(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(channels=1, batch=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, 8, 8, generator=g), torch.tensor([0, 400, 999])[:batch]


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resblock", [False, True])
def test_output_is_backbone_eps_and_h(channels, resblock):
    unet = make_unet(channels)
    model = NoiseSquareHeadModel.from_unet(unet, covariance_type="sn", resblock=resblock)
    x, t = inputs(channels)
    out = model(x, t)
    assert out.sample.shape == (3, 2 * channels, 8, 8)
    eps, h = out.sample.split(channels, dim=1)
    assert torch.equal(eps, unet(x, t).sample)  # bit for bit the backbone's prediction
    torch.testing.assert_close(h, torch.ones_like(h))  # zero-initialised conv + shifted softplus: h = 1 = E[eps^2]
    assert model.config.in_channels == channels and model.config.sample_size == 8
    assert model(x, t, return_dict=False)[0].shape == out.sample.shape
    perturb_head(model)
    assert (model(x, t).sample[:, channels:] > 0).all()


def test_backbone_frozen_and_only_head_trainable():
    unet = make_unet()
    model = NoiseSquareHeadModel.from_unet(unet)
    assert not any(p.requires_grad for p in model.unet.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()} and trainable
    model.train()
    assert model.head.training and not model.unet.training  # the backbone stays in eval mode
    x, t = inputs()
    model(x, t).sample[:, 1:].sum().backward()
    assert all(p.grad is None for p in model.unet.parameters())
    assert model.head.conv.weight.grad is not None


def test_identity_activation_and_learned_variance_backbone():
    unet = make_unet(1, out_channels=2)  # a learned-variance backbone: its first C channels are eps
    model = NoiseSquareHeadModel.from_unet(unet, covariance_type="npr", output_activation="identity")
    x, t = inputs()
    out = model(x, t).sample
    assert out.shape == (3, 2, 8, 8)
    assert torch.equal(out[:, :1], unet(x, t).sample[:, :1])
    assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))  # identity: h starts at 0
    with pytest.raises(ValueError, match="output_activation"):
        NoiseSquareHeadModel.from_unet(unet, output_activation="exp")


def test_mismatched_backbone_and_missing_backbone():
    model = NoiseSquareHeadModel.from_unet(make_unet(1))
    with pytest.raises(ValueError, match="another backbone"):
        model.attach_backbone(make_unet(3))
    bare = NoiseSquareHeadModel.from_config(model.config)
    with pytest.raises(RuntimeError, match="no backbone"):
        bare(*inputs())


# ------------------------------------------------------------------------------------------------ saving


def test_save_with_backbone_round_trip(tmp_path):
    model = perturb_head(NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr", resblock=True))
    model.save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["_class_name"] == "NoiseSquareHeadModel" and config["backbone_subfolder"] == "unet"
    assert config["covariance_type"] == "npr" and config["backbone_path"] is None
    weights = load_file(tmp_path / "head" / "diffusion_pytorch_model.safetensors")
    assert weights and all(key.startswith("head.") for key in weights)  # the head's weights only
    assert (tmp_path / "head" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    loaded = NoiseSquareHeadModel.from_pretrained(tmp_path / "head")
    x, t = inputs()
    torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert model.config.backbone_subfolder is None  # saving did not change the model's own config

    half = NoiseSquareHeadModel.from_pretrained(tmp_path / "head", torch_dtype=torch.float64)
    assert half.dtype == torch.float64 and half(x.double(), t).sample.dtype == torch.float64


def test_share_head_alone_and_attach_backbone(tmp_path):
    unet = make_unet()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    model = perturb_head(NoiseSquareHeadModel.from_unet(unet))
    # a sibling of the backbone's folder, as for the bundled model: pipe/sn_head next to pipe/unet
    model.save_pretrained(tmp_path / "pipe" / "sn_head", save_backbone=False, backbone_subfolder="../unet")
    assert sorted(p.name for p in (tmp_path / "pipe" / "sn_head").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    x, t = inputs()
    expected = model(x, t).sample
    torch.testing.assert_close(NoiseSquareHeadModel.from_pretrained(tmp_path / "pipe" / "sn_head")(x, t).sample,
                               expected, rtol=0, atol=0)
    # the same folder, addressed as a subfolder of the pipeline folder
    torch.testing.assert_close(
        NoiseSquareHeadModel.from_pretrained(tmp_path / "pipe", subfolder="sn_head")(x, t).sample, expected)
    # a backbone given explicitly (e.g. from the Hub), whatever the reference says
    attached = NoiseSquareHeadModel.from_pretrained(tmp_path / "pipe" / "sn_head",
                                                    unet=UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet"))
    torch.testing.assert_close(attached(x, t).sample, expected, rtol=0, atol=0)
    # an absolute reference (a Hub id or folder)
    model.save_pretrained(tmp_path / "elsewhere", save_backbone=False, backbone_path=str(tmp_path / "pipe"),
                          backbone_subfolder="unet")
    torch.testing.assert_close(NoiseSquareHeadModel.from_pretrained(tmp_path / "elsewhere")(x, t).sample, expected)
    # a loaded head remembers where its backbone came from
    reloaded = NoiseSquareHeadModel.from_pretrained(tmp_path / "pipe" / "sn_head")
    reloaded.save_pretrained(tmp_path / "again", save_backbone=False)
    torch.testing.assert_close(NoiseSquareHeadModel.from_pretrained(tmp_path / "again")(x, t).sample, expected)


def test_errors_when_the_backbone_cannot_be_found(tmp_path):
    model = NoiseSquareHeadModel.from_unet(make_unet())
    with pytest.raises(ValueError, match="where the backbone lives"):
        model.save_pretrained(tmp_path / "head", save_backbone=False)
    model.save_pretrained(tmp_path / "head", save_backbone=False, backbone_subfolder="../missing")
    with pytest.raises(OSError, match="unet=UNet2DModel.from_pretrained"):
        NoiseSquareHeadModel.from_pretrained(tmp_path / "head")


# ------------------------------------------------------------------------------------------------ pipelines


def test_ddpm_pipeline_samples_and_round_trips(tmp_path):
    model = perturb_head(NoiseSquareHeadModel.from_unet(make_unet()))
    scheduler = SNDPMScheduler.from_config(DDPMScheduler().config, covariance_type="sn")
    pipe = DDPMPipeline(unet=model, scheduler=scheduler)
    image = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (2, 8, 8, 1) and np.isfinite(image).all()

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"][0].startswith("analytic_schedulers") and index["unet"][1] == "NoiseSquareHeadModel"
    assert index["scheduler"][0].startswith("analytic_schedulers") and index["scheduler"][1] == "SNDPMScheduler"
    reloaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.unet, NoiseSquareHeadModel) and isinstance(reloaded.scheduler, SNDPMScheduler)
    again = reloaded(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    np.testing.assert_allclose(again, image, atol=1e-6)
