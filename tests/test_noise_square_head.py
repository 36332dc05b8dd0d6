"""NoiseSquareHead and NoiseSquareHeadModel: the [eps, h] output, composing, saving/loading, pipelines, old folders."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from analytic_schedulers.noise_square_head import NoiseSquareHead, NoiseSquareHeadModel, load_head_model
from analytic_schedulers.scheduling_sn_dpm import SNDPMScheduler

BUNDLED = Path(__file__).resolve().parents[1] / "analytic_schedulers" / "assets" / "ddpm-digits-16"


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


def inputs(channels=1, batch=3, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, size, size, generator=g), torch.tensor([0, 400, 999, 10])[:batch]


def assert_same_output(a, b, x, t):
    with torch.no_grad():
        assert torch.equal(a(x, t).sample, b(x, t).sample)


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
    assert model.config.in_channels == channels and model.config.sample_size == 8  # what pipelines read
    assert model.covariance_type == "sn"
    assert model(x, t, return_dict=False)[0].shape == out.sample.shape
    perturb_head(model)
    assert (model(x, t).sample[:, channels:] > 0).all()


def test_the_head_alone_computes_h_from_the_feature_map():
    unet = make_unet()
    head = NoiseSquareHead.for_backbone(unet, covariance_type="npr", resblock=True)
    assert head.config.feature_channels == 8 and head.config.temb_channels == 32 and head.config.in_channels == 1
    features, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 32)
    torch.testing.assert_close(head(features, temb), torch.ones(2, 1, 8, 8))
    composed = perturb_head(NoiseSquareHeadModel(unet=unet, head=head))
    assert composed.head is head and composed.covariance_type == "npr"
    assert not torch.equal(head(features, temb), torch.ones(2, 1, 8, 8))


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


def test_mismatched_or_missing_parts_are_refused():
    head = NoiseSquareHead.for_backbone(make_unet(1))
    with pytest.raises(ValueError, match="another backbone: in_channels 3 != 1"):
        NoiseSquareHeadModel(unet=make_unet(3), head=head)
    with pytest.raises(ValueError, match="needs its backbone"):
        NoiseSquareHeadModel(head=head)
    with pytest.raises(ValueError, match="needs its head"):
        NoiseSquareHeadModel(unet=make_unet(1))
    with pytest.raises(TypeError, match="UNet2DModel"):
        NoiseSquareHeadModel.from_unet(torch.nn.Conv2d(1, 1, 1))


def test_head_models_on_one_backbone_share_its_two_hooks_and_keep_their_own_heads(tmp_path):
    """Head models built on one backbone (`from_unet`, loads) reuse its two hooks instead of adding their own."""
    unet = make_unet()
    hooks_before = (len(unet.conv_norm_out._forward_pre_hooks), len(unet.time_embedding._forward_hooks))
    models = [perturb_head(NoiseSquareHeadModel.from_unet(unet, covariance_type="npr", resblock=seed % 2 == 1), seed)
              for seed in range(1, 6)]
    models[0].head.save_pretrained(tmp_path)
    models.append(load_head_model(tmp_path, unet))
    assert len(unet.conv_norm_out._forward_pre_hooks) == hooks_before[0] + 1
    assert len(unet.time_embedding._forward_hooks) == hooks_before[1] + 1
    assert not any(key.startswith("_noise_square") for key in unet.state_dict())
    assert not any(key.startswith("_noise_square") for key in models[0].state_dict())
    x, t = inputs()
    with torch.no_grad():
        outputs = [model(x, t).sample for model in models]
        eps = unet(x, t).sample  # the bare backbone, with the hooks idle
    for model, out in zip(models, outputs):
        # each model's own head, on the features of its own forward: what a head model alone on a copy would give
        alone = NoiseSquareHeadModel(unet=make_unet(), head=model.head)
        with torch.no_grad():
            assert torch.equal(out, alone(x, t).sample)
        assert torch.equal(out[:, :1], eps)
    assert not torch.equal(outputs[0][:, 1:], outputs[1][:, 1:])


# ------------------------------------------------------------------------------------------------ saving


def test_save_with_backbone_round_trip(tmp_path):
    model = perturb_head(NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr", resblock=True))
    model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["_class_name"] == "NoiseSquareHeadModel" and config["unet_config"]["_class_name"] == "UNet2DModel"
    assert config["head_config"]["covariance_type"] == "npr" and config["head_config"]["resblock"] is True
    weights = load_file(tmp_path / "model" / "diffusion_pytorch_model.safetensors")
    assert {key.split(".")[0] for key in weights} == {"unet", "head"}  # one file: backbone and head
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    loaded = NoiseSquareHeadModel.from_pretrained(tmp_path / "model")
    x, t = inputs()
    assert_same_output(loaded, model, x, t)
    assert not any(p.requires_grad for p in loaded.unet.parameters()) and not loaded.training
    double = NoiseSquareHeadModel.from_pretrained(tmp_path / "model", torch_dtype=torch.float64)
    assert double.dtype == torch.float64 and double(x.double(), t).sample.dtype == torch.float64
    with pytest.raises(ValueError, match="without `unet=`"):
        NoiseSquareHeadModel.from_pretrained(tmp_path / "model", unet=make_unet())


def test_head_folder_beside_unet_is_composed_at_load_time(tmp_path):
    unet = make_unet()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    model = perturb_head(NoiseSquareHeadModel.from_unet(unet))
    model.head.save_pretrained(tmp_path / "pipe" / "sn_head")
    folder = tmp_path / "pipe" / "sn_head"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 4096  # the head's weights only
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "NoiseSquareHead"

    x, t = inputs()
    backbone = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet")
    assert_same_output(load_head_model(tmp_path / "pipe", backbone, subfolder="sn_head"), model, x, t)
    assert_same_output(load_head_model(folder, backbone), model, x, t)
    assert_same_output(NoiseSquareHeadModel.from_pretrained(folder, unet=backbone), model, x, t)
    head = NoiseSquareHead.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), model.head.state_dict().values()))


def test_errors_name_the_missing_piece(tmp_path):
    model = NoiseSquareHeadModel.from_unet(make_unet())
    model.head.save_pretrained(tmp_path / "head")
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="pass its backbone"):
        NoiseSquareHeadModel.from_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="pass `unet=`"):
        load_head_model(tmp_path / "head", None)
    with pytest.raises(ValueError, match="not a NoiseSquareHead.*NoiseSquareHeadModel.from_pretrained"):
        load_head_model(tmp_path / "model", make_unet())
    with pytest.raises(ValueError, match="another backbone"):
        load_head_model(tmp_path / "head", make_unet(3))


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
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json",
                                                                     "diffusion_pytorch_model.safetensors"]
    reloaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.unet, NoiseSquareHeadModel) and isinstance(reloaded.scheduler, SNDPMScheduler)
    again = reloaded(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    np.testing.assert_array_equal(again, image)


def sd_call(pipe, **kwargs):
    return pipe("cat", num_images_per_prompt=2, num_inference_steps=3, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("resblock", [False, True])
def test_conditional_backbone_gets_the_pipelines_conditioning_and_gives_eps_and_h(tmp_path, resblock):
    from tiny_pipelines import tiny_conditional_unet

    unet, x, t = tiny_conditional_unet(), torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    embeds = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    model = perturb_head(NoiseSquareHeadModel.from_unet(unet, covariance_type="npr", resblock=resblock))
    with torch.no_grad():
        out = model(x, t, encoder_hidden_states=embeds, timestep_cond=None, cross_attention_kwargs=None,
                    added_cond_kwargs=None)
        eps, h = out.sample.split(4, dim=1)
        assert torch.equal(eps, unet(x, t, encoder_hidden_states=embeds).sample)
        assert torch.equal(model(x, t, embeds, return_dict=False)[0], out.sample)  # positional, as the backbone
    assert type(out).__name__ == "UNet2DConditionOutput" and (h > 0).all()
    assert not torch.allclose(h[0], h[1]) and model.config.time_cond_proj_dim is None


def test_stable_diffusion_samples_with_a_head_and_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline
    from tiny_pipelines import tiny_stable_diffusion

    pipe = tiny_stable_diffusion(tmp_path)
    pipe.unet = perturb_head(NoiseSquareHeadModel.from_unet(pipe.unet, covariance_type="sn"))
    pipe.scheduler = SNDPMScheduler.from_config(pipe.scheduler.config, covariance_type="sn")
    latents = [sd_call(pipe, eta=eta) for eta in (0.0, 1.0)]
    assert latents[0].shape == (2, 4, 4, 4) and all(torch.isfinite(x).all() for x in latents)
    assert not torch.allclose(latents[0], latents[1])

    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.unet, NoiseSquareHeadModel) and isinstance(reloaded.scheduler, SNDPMScheduler)
    torch.testing.assert_close(sd_call(reloaded, eta=1.0), latents[1])


def test_sn_scheduler_on_stable_diffusion_without_a_head_says_how_to_add_one(tmp_path):
    from tiny_pipelines import tiny_stable_diffusion

    pipe = tiny_stable_diffusion(tmp_path)
    pipe.scheduler = SNDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"2C = 8 channels.*UNet2DConditionModel.*load_head_model"):
        sd_call(pipe)


# ------------------------------------------------------------------------------------------------ analytic-schedulers 0.1


def write_legacy_head(folder, model, backbone_subfolder="unet", backbone_path=None, save_backbone=True):
    """A head folder exactly as analytic-schedulers 0.1 wrote it: the head's hyperparameters and where its backbone
    lives in a `NoiseSquareHeadModel` config, the head's weights keyed `head.*` (its ResBlock called `resblock`)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    head = model.head.config
    config = {
        "_class_name": "NoiseSquareHeadModel", "_diffusers_version": "0.42.1", "backbone_path": backbone_path,
        "backbone_subfolder": backbone_subfolder, "covariance_type": head.covariance_type,
        "feature_channels": head.feature_channels, "in_channels": head.in_channels, "norm_eps": head.norm_eps,
        "norm_num_groups": head.norm_num_groups, "output_activation": head.output_activation,
        "resblock": head.resblock, "sample_size": model.unet.config.sample_size, "temb_channels": head.temb_channels,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {"head." + key.replace("resnet.", "resblock.", 1): value.contiguous()
             for key, value in model.head.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if save_backbone:
        model.unet.save_pretrained(folder / "unet")


@pytest.mark.parametrize("resblock", [False, True])
def test_folders_of_version_0_1_still_load(tmp_path, resblock):
    model = perturb_head(NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr", resblock=resblock))
    x, t = inputs()
    # a self-contained folder (the backbone in unet/), both ways
    write_legacy_head(tmp_path / "alone", model)
    assert_same_output(NoiseSquareHeadModel.from_pretrained(tmp_path / "alone"), model, x, t)
    assert_same_output(load_head_model(tmp_path / "alone", model.unet), model, x, t)
    # a head beside the backbone's folder (as the bundled heads were), and one referencing a folder by path
    model.unet.save_pretrained(tmp_path / "pipe" / "unet")
    write_legacy_head(tmp_path / "pipe" / "npr_head", model, backbone_subfolder="../unet", save_backbone=False)
    assert_same_output(NoiseSquareHeadModel.from_pretrained(tmp_path / "pipe" / "npr_head"), model, x, t)
    assert_same_output(load_head_model(tmp_path / "pipe", model.unet, subfolder="npr_head"), model, x, t)
    write_legacy_head(tmp_path / "far", model, backbone_path=str(tmp_path / "pipe"), save_backbone=False)
    assert_same_output(load_head_model(tmp_path / "far", None), model, x, t)
    # a pipeline whose unet/ is such a folder, loaded by diffusers
    write_legacy_head(tmp_path / "old_pipe" / "unet", model)
    scheduler = SNDPMScheduler.from_config(DDPMScheduler().config, covariance_type="npr")
    scheduler.save_pretrained(tmp_path / "old_pipe" / "scheduler")
    (tmp_path / "old_pipe" / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["analytic_schedulers.scheduling_sn_dpm", "SNDPMScheduler"],
        "unet": ["analytic_schedulers.noise_square_head", "NoiseSquareHeadModel"]}))
    old = DDPMPipeline.from_pretrained(tmp_path / "old_pipe")
    new = DDPMPipeline(unet=model, scheduler=scheduler)
    images = [p(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
              .images for p in (old, new)]
    np.testing.assert_array_equal(*images)


def test_folder_of_version_0_1_without_its_backbone(tmp_path):
    model = NoiseSquareHeadModel.from_unet(make_unet())
    write_legacy_head(tmp_path / "head", model, backbone_subfolder="../missing", save_backbone=False)
    with pytest.raises(OSError, match="unet=UNet2DModel.from_pretrained"):
        NoiseSquareHeadModel.from_pretrained(tmp_path / "head")
    assert_same_output(NoiseSquareHeadModel.from_pretrained(tmp_path / "head", unet=model.unet), model, *inputs())


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
def test_a_head_folder_exactly_as_version_0_1_wrote_it_loads(tmp_path, covariance_type):
    """The 0.1 format as it was released (the bundled heads shipped in it), rebuilt by hand for the digits backbone."""
    unet = UNet2DModel.from_pretrained(BUNDLED, subfolder="unet")
    model = perturb_head(NoiseSquareHeadModel.from_unet(unet, covariance_type=covariance_type))
    subfolder = f"{covariance_type}_head"
    write_legacy_head(tmp_path / subfolder, model, backbone_subfolder="../unet", save_backbone=False)
    released = dict(RELEASED_HEAD_CONFIG, covariance_type=covariance_type)
    assert json.loads((tmp_path / subfolder / "config.json").read_text()) == released
    assert_same_output(NoiseSquareHeadModel.from_pretrained(tmp_path / subfolder, unet=unet), model,
                       *inputs(batch=4, size=16))


RELEASED_HEAD_CONFIG = {
    "_class_name": "NoiseSquareHeadModel", "_diffusers_version": "0.42.1", "backbone_path": None,
    "backbone_subfolder": "../unet", "feature_channels": 32, "in_channels": 1, "norm_eps": 1e-05,
    "norm_num_groups": 8, "output_activation": "softplus", "resblock": False, "sample_size": 16, "temb_channels": None,
}


# ------------------------------------------------------------------------------------------------ the bundled heads

# the bundled heads, fitted by the cached recipe as the model card says: sha256 over (name, bytes) of their tensors,
# so that replacing them is a decision recorded here, not an accident
BUNDLED_HEAD_DIGESTS = {
    "sn": "3ee0de23a2839688e5ce2d09fb520d85a372cb3b6c1339be6c3f468454e0235f",
    "npr": "d860680ecccd0e3bac475f9cfb5630e252a16bd9ae205a17cdd8f05716ad4633",
}


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
def test_bundled_heads_load_bit_for_bit_as_saved(covariance_type):
    unet = UNet2DModel.from_pretrained(BUNDLED, subfolder="unet")
    subfolder = f"{covariance_type}_head"
    weights = load_file(BUNDLED / subfolder / "diffusion_pytorch_model.safetensors")
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].contiguous().numpy().tobytes())
    assert digest.hexdigest() == BUNDLED_HEAD_DIGESTS[covariance_type]
    model = load_head_model(BUNDLED, unet, subfolder=subfolder)
    assert model.covariance_type == covariance_type and not model.head.config.resblock
    state = model.head.state_dict()
    assert sorted(state) == sorted(weights) and all(torch.equal(state[key], weights[key]) for key in weights)
    # the cached recipe fits the output conv only: the GroupNorm keeps its initial identity affine
    assert torch.equal(state["norm.weight"], torch.ones(32)) and torch.equal(state["norm.bias"], torch.zeros(32))
    x, t = inputs(batch=4, size=16)
    with torch.no_grad():
        eps, h = model(x, t).sample.split(1, dim=1)
        assert torch.equal(eps, unet(x, t).sample) and (h > 0).all()
