"""Training the noise-square head: the loss goes down, only the head changes, checkpoints resume, the CLI."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from analytic_schedulers.cli import main
from analytic_schedulers.head_fitting import fit_noise_square_head
from analytic_schedulers.noise_square_head import NoiseSquareHeadModel, load_head_model
from analytic_schedulers.training import latest_checkpoint, noise_square_head_loss, train_noise_square_head

SCHEDULER = DDPMScheduler()
TRAIN = dict(batch_size=32, lr=1e-3, progress=False, log_every=0)


def make_unet(seed=0, sample_size=8):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def toy_data(n=256):
    g = torch.Generator().manual_seed(0)
    return (0.4 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)


@torch.no_grad()
def eval_loss(model, data, seed=123, n=512):
    """The head's loss on a fixed batch of (x_0, t, eps)."""
    g = torch.Generator().manual_seed(seed)
    x0 = data[torch.randint(len(data), (n,), generator=g)]
    t = torch.randint(1000, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = SCHEDULER.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps_hat, h = model(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t).sample.split(1, dim=1)
    return noise_square_head_loss(h, eps, eps_hat, model.covariance_type).item()


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
def test_training_lowers_the_loss_and_changes_only_the_head(covariance_type):
    unet = make_unet()
    backbone_before = {k: v.clone() for k, v in unet.state_dict().items()}
    model = NoiseSquareHeadModel.from_unet(unet, covariance_type=covariance_type)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    data = toy_data()
    before = eval_loss(model, data)
    losses = train_noise_square_head(model, data, SCHEDULER, num_steps=40, **TRAIN)
    after = eval_loss(model, data)
    print(f"\n{covariance_type}: held-out loss {before:.4f} -> {after:.4f}; "
          f"train loss {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f}")
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert after < before - 0.01
    assert all(torch.equal(backbone_before[k], v) for k, v in unet.state_dict().items())  # bitwise unchanged
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())
    assert not model.training and not any(p.requires_grad for p in model.unet.parameters())


def test_checkpoints_resume_where_they_stopped(tmp_path):
    data = toy_data()
    # one run of 10 steps
    straight = NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr")
    full = train_noise_square_head(straight, data, SCHEDULER, num_steps=10, output_dir=tmp_path / "a",
                                   checkpoint_every=100, **TRAIN)
    # 6 steps (a checkpoint at 3 and at the end), then a new process resumes to 10
    first = NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr")
    part = train_noise_square_head(first, data, SCHEDULER, num_steps=6, output_dir=tmp_path / "b",
                                   checkpoint_every=3, **TRAIN)
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["checkpoint-3", "checkpoint-6"]
    files = {p.suffix for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}  # no pickles anywhere
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6

    second = NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr")
    resumed = train_noise_square_head(second, data, SCHEDULER, num_steps=10, output_dir=tmp_path / "b",
                                      checkpoint_every=3, **TRAIN)
    assert resumed[:6] == part and len(resumed) == 10
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full), rtol=1e-5, atol=1e-6)
    for a, b in zip(second.head.parameters(), straight.head.parameters()):  # EMA weights, same path
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the final head is saved as a NoiseSquareHead folder (EMA weights) beside checkpoints/ and the loss history
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "checkpoints", "config.json", "diffusion_pytorch_model.safetensors", "loss_history.json"]
    assert latest_checkpoint(tmp_path / "b").endswith("checkpoint-10")
    loaded = load_head_model(tmp_path / "b", make_unet())
    x, t = toy_data(4), torch.tensor([1, 10, 100, 999])
    assert torch.equal(loaded(x, t).sample, second(x, t).sample)
    history = json.loads((tmp_path / "b" / "loss_history.json").read_text())
    assert history["losses"] == resumed
    # a checkpoint of the other covariance type is refused
    with pytest.raises(ValueError, match="'npr' head"):
        train_noise_square_head(NoiseSquareHeadModel.from_unet(make_unet()), data, SCHEDULER, num_steps=12,
                                output_dir=tmp_path / "b", **TRAIN)


def test_gradient_accumulation_and_bad_arguments():
    data = toy_data()
    model = NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="sn")
    losses = train_noise_square_head(model, data, SCHEDULER, num_steps=3, gradient_accumulation_steps=2, **TRAIN)
    assert len(losses) == 3
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        train_noise_square_head(model, torch.zeros(4, 3, 8, 8), SCHEDULER, num_steps=1, **TRAIN)
    with pytest.raises(ValueError, match="x / 127.5 - 1"):
        train_noise_square_head(model, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), SCHEDULER, num_steps=1, **TRAIN)
    with pytest.raises(TypeError, match="NoiseSquareHeadModel"):
        train_noise_square_head(make_unet(), data, SCHEDULER, num_steps=1, **TRAIN)
    # the same message from the cached recipe, and from its fit alone
    message = (r"`head_model` must be a `NoiseSquareHeadModel` \(`NoiseSquareHeadModel.from_unet\(unet\)`\), "
               "got UNet2DModel")
    with pytest.raises(TypeError, match=message):
        train_noise_square_head(make_unet(), data, SCHEDULER, recipe="cached", progress=False)
    with pytest.raises(TypeError, match=message):
        fit_noise_square_head(make_unet(), data, SCHEDULER)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_noise_square_head(model, data, SCHEDULER, num_steps=1, checkpoint_every=0, **TRAIN)


def test_generator_data_forms_and_accelerator():
    from accelerate import Accelerator

    data = toy_data(64)

    def run(data, **kwargs):
        model = NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="sn")
        return train_noise_square_head(model, data, SCHEDULER, num_steps=2, **{**TRAIN, **kwargs})

    # a torch.Generator is read as the seed it yields (runtime.seed_of)
    assert run(data, generator=torch.Generator().manual_seed(3)) == run(data, generator=torch.Generator().manual_seed(3))
    assert run(data, generator=1) != run(data, generator=2)
    # a dataset of (image, label) items or a dict batch are the same images as the tensor
    assert run([(image, 0) for image in data]) == run(data) == run({"pixel_values": data})
    # a given accelerator is used, and must accumulate as many micro-batches as asked for
    assert len(run(data, accelerator=Accelerator(cpu=True), ema_warmup=False)) == 2
    with pytest.raises(ValueError, match="accumulates 1 micro-batches"):
        run(data, accelerator=Accelerator(cpu=True), gradient_accumulation_steps=2)


def test_losses_are_read_back_per_logged_window(capsys):
    model = NoiseSquareHeadModel.from_unet(make_unet(), covariance_type="npr")
    losses = train_noise_square_head(model, toy_data(), SCHEDULER, num_steps=4, **{**TRAIN, "log_every": 2})
    printed = capsys.readouterr().out
    assert f"step 2: loss {sum(losses[:2]) / 2:.5f}" in printed and f"step 4: loss {sum(losses[2:]) / 2:.5f}" in printed


def test_cli_train_head(tmp_path, capsys):
    pytest.importorskip("sklearn")
    DDPMPipeline(unet=make_unet(sample_size=16), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    args = ["train-head", "--model", str(tmp_path / "pipe"), "--data", "sklearn-digits", "--covariance-type", "sn",
            "--steps", "4", "--batch-size", "8", "--lr", "1e-3", "--output", str(tmp_path / "head"),
            "--checkpoint-every", "2", "--no-progress"]
    assert main(args) == 0
    assert "head saved to" in capsys.readouterr().out
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["_class_name"] == "NoiseSquareHead" and config["covariance_type"] == "sn"  # the head alone
    args_written = json.loads((tmp_path / "head" / "training_args.json").read_text())
    assert args_written["model"] == str(tmp_path / "pipe") and args_written["steps"] == 4
    model = load_head_model(tmp_path / "head", unet=UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet"))
    assert model.covariance_type == "sn" and model.config.sample_size == 16
    # existing checkpoints need --resume; with it, training continues
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([a if a != "4" else "6" for a in args] + ["--resume"]) == 0
    assert "Resuming" in capsys.readouterr().out
    state = json.loads((tmp_path / "head" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6
    # user-fixable errors: exit code 2 with one line
    assert main(["train-head", "--model", str(tmp_path / "nowhere"), "--data", "sklearn-digits",
                 "--output", str(tmp_path / "x")]) == 2
    assert main(["train-head", "--model", str(tmp_path / "pipe"), "--data", str(tmp_path / "no-images"),
                 "--output", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "train-head: error:" in err


def test_every_plain_argument_is_refused_with_the_cached_recipe():
    """`PLAIN_DEFAULTS` is read from the signature: each plain argument, given another value, is named in the error."""
    from analytic_schedulers.training import PLAIN_DEFAULTS

    model = NoiseSquareHeadModel.from_unet(make_unet())
    for name, default in PLAIN_DEFAULTS.items():
        other = (not default) if isinstance(default, bool) else ("fp16" if isinstance(default, str) else default + 1)
        with pytest.raises(ValueError, match=f"cached recipe: {name}\\. Pass"):
            train_noise_square_head(model, toy_data(8), SCHEDULER, recipe="cached", progress=False, **{name: other})
