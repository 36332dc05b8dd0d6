"""The cached recipe (`head_fitting.py`): it recovers the exact head on Gaussian data, its rows are what the head and
the scheduler see, it runs on a random UNet and writes a loadable head, bad inputs are refused, the command line."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from analytic_schedulers import GaussianDataModel, NoiseSquareHeadModel, SNDPMScheduler
from analytic_schedulers import reverse_step as rs
from analytic_schedulers.cli import main
from analytic_schedulers.head_fitting import (CachedFitRecipe, collect_head_cache, fit_noise_square_head,
                                              fit_transitions, neighbourhoods)
from analytic_schedulers.noise_square_head import SOFTPLUS_SHIFT, load_head_model
from analytic_schedulers.sampling import build_sampler, sample_images
from analytic_schedulers.training import train_noise_square_head
from helpers import run_two_processes

STD = [0.1, 0.2, 0.35, 0.6]  # per pixel of a 2x2 sample
K = 10


class OneHotStepUNet(UNet2DModel):
    """
    A `UNet2DModel` whose forward is the exact noise predictor of anisotropic Gaussian data (`GaussianDataModel`),
    and whose last feature map (passed through its own `conv_norm_out`, where the head's hook reads it) is a one-hot
    code of the step: channel k holds a 1 at pixel (0, 0) when t is the k-th timestep of `steps`, else zeros.

    After the head's GroupNorm (one channel per group) and SiLU, the 3x3 conv sees that pattern at another tap from
    each output pixel, so it can output any value per (pixel, step): the exact NPR head, `h = Var[eps | x_t] =
    abar s^2 / (abar s^2 + bbar)` per pixel (whatever x_t), lies in the head's class.
    """

    def set_up(self, exact: GaussianDataModel, steps):
        self.exact, self.steps = exact, torch.tensor(steps)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        t = torch.as_tensor(timestep).reshape(-1).long().expand(sample.shape[0])
        batch, _, height, width = sample.shape
        features = torch.zeros(batch, self.conv_norm_out.num_channels, height, width)
        match = t[:, None] == self.steps[None, :]  # [B, steps]
        rows, codes = match.nonzero(as_tuple=True)
        features[rows, codes, 0, 0] = 1.0
        self.conv_norm_out(features)
        prediction = self.exact(sample, t).sample
        return UNet2DOutput(sample=prediction) if return_dict else (prediction,)


def gaussian_set_up(prediction_type="epsilon", channels=1, data_mean=0.0, **config):
    scheduler = DDPMScheduler(clip_sample=False, prediction_type=prediction_type, **config)
    exact = GaussianDataModel.from_scheduler(scheduler, data_mean=data_mean, data_std=torch.tensor(STD * channels),
                                             sample_size=2, in_channels=channels, output=prediction_type)
    steps = fit_transitions(scheduler.config, 1000, [K])[:, 0].tolist()  # 900 .. 100
    unet = OneHotStepUNet(sample_size=2, in_channels=channels, out_channels=channels, block_out_channels=(len(steps),),
                          down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1,
                          norm_num_groups=len(steps))
    unet.set_up(exact, steps)
    return scheduler, exact, unet.eval(), steps


@pytest.fixture(scope="module")
def fitted_gaussian_head():
    scheduler, exact, unet, steps = gaussian_set_up()
    head_model = NoiseSquareHeadModel.from_unet(unet, covariance_type="npr")
    data = exact.sample_data(20000, generator=torch.Generator().manual_seed(0))
    recipe = CachedFitRecipe(num_draws=144000, pixels_per_draw=4, num_inference_steps=(K,), batch_size=4000)
    fit = fit_noise_square_head(head_model, data, scheduler, recipe, generator=0)
    return scheduler, exact, head_model, steps, fit


def test_the_recipe_recovers_the_exact_head_and_step_variance_on_gaussian_data(fitted_gaussian_head):
    scheduler, exact, head_model, steps, fit = fitted_gaussian_head
    exact_npr = GaussianDataModel.from_scheduler(scheduler, data_std=torch.tensor(STD), sample_size=2, output="npr")
    sampler = SNDPMScheduler.from_config(scheduler.config, covariance_type="npr")
    sampler.set_timesteps(K)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    worst_h = worst_variance = 0.0
    with torch.no_grad():
        for t in steps:
            ours, reference = head_model(x, t).sample, exact_npr(x, t).sample
            worst_h = max(worst_h, (ours[:, 1] / reference[:, 1] - 1).abs().max().item())
            # what the sampler uses: sigma^2 = lambda^2 + gamma^2 clip(v), v from h
            variance = [sampler.step_distribution(out, t, x).variance for out in (ours, reference)]
            worst_variance = max(worst_variance, (variance[0] / variance[1] - 1).abs().max().item())
    print(f"\n{fit.rows} rows, {fit.cpu_seconds:.1f} s CPU, {len(fit.losses)} evaluations; worst relative error of h "
          f"{worst_h:.2%}, of sigma^2 {worst_variance:.2%}")
    assert fit.losses[-1] < fit.losses[0]
    # 16,000 rows per (pixel, step): the target's mean is known to about 1.1% (its relative std is sqrt(2))
    assert worst_h < 0.08 and worst_variance < 0.03


def test_samples_with_the_fitted_head_keep_every_pixels_std(fitted_gaussian_head):
    scheduler, _, head_model, _, _ = fitted_gaussian_head
    sampler = build_sampler("npr-ddpm", scheduler.config)
    samples = sample_images(head_model, sampler, K, torch.Generator().manual_seed(0), batch_size=8000)
    relative = samples.flatten(1).std(0) / torch.tensor(STD) - 1
    print(f"\nK = {K}: per-pixel std off by {[f'{v:+.2%}' for v in relative.tolist()]}")
    assert relative.abs().max() < 0.03


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_cached_rows_are_what_the_head_and_the_scheduler_see(prediction_type):
    # data around 0.8, so that dynamic thresholding often divides x0_hat by more than 1
    scheduler, exact, unet, steps = gaussian_set_up(prediction_type, channels=3, data_mean=0.8, thresholding=True,
                                                    dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    head_model = NoiseSquareHeadModel.from_unet(unet, covariance_type="sn")
    with torch.no_grad():
        head_model.head.conv.weight.normal_(generator=torch.Generator().manual_seed(0))
    data = exact.sample_data(64, generator=torch.Generator().manual_seed(0))
    recipe = CachedFitRecipe(num_draws=50, pixels_per_draw=4, num_inference_steps=(K,), batch_size=16)
    cache = collect_head_cache(head_model, data, scheduler, recipe, generator=0)
    assert len(cache) == 200 and cache.features.shape == (200, len(steps) * 9)
    # the rows' features times the conv's weights are the head's raw output at the row's pixel
    t = torch.tensor(steps)[cache.step.reshape(50, 4)[:, 0]]
    order = cache.pixel.reshape(50, 4).argsort(1)  # all 4 pixels of every draw, in the image's order
    take = lambda v: v.reshape(50, 4, 3).gather(1, order[..., None].expand(-1, -1, 3)).transpose(1, 2).reshape(  # noqa
        50, 3, 2, 2)
    x_t = exact.abar[t].float().sqrt().reshape(-1, 1, 1, 1) * take(cache.x0) + (
        1 - exact.abar[t].float()).sqrt().reshape(-1, 1, 1, 1) * take(cache.eps)
    with torch.no_grad():
        h = head_model(x_t, t).sample[:, 3:]
    raw = cache.features @ head_model.head.conv.weight.flatten(1).T + head_model.head.conv.bias
    torch.testing.assert_close(take(F.softplus(raw + SOFTPLUS_SHIFT)), h, rtol=1e-4, atol=1e-5)
    # eps_hat is the model's prediction as noise, x0_hat processed (dynamic thresholding) on the whole image
    eps_mean, _ = exact.posterior_eps(x_t, t)
    torch.testing.assert_close(take(cache.eps_hat), eps_mean.float(), rtol=1e-4, atol=1e-4)
    abar = exact.abar[t].float().reshape(-1, 1, 1, 1)
    x0_mean = (x_t - (1 - abar).sqrt() * eps_mean.float()) / abar.sqrt()
    torch.testing.assert_close(take(cache.x0_hat), rs.dynamic_threshold(x0_mean, 0.9, 1.5), rtol=1e-4, atol=1e-4)


def test_neighbourhoods_are_the_unfolded_conv_input():
    z = torch.randn(2, 5, 4, 3)
    pixels = torch.tensor([[0, 11, 5], [7, 2, 9]])
    unfolded = F.unfold(z, 3, padding=1)  # [2, 45, 12]
    expected = torch.stack([unfolded[i, :, pixels[i]].T for i in range(2)]).reshape(6, 45)
    torch.testing.assert_close(neighbourhoods(z, pixels), expected)


def test_transitions_follow_the_schedulers_spacing():
    leading = fit_transitions(DDPMScheduler(steps_offset=1).config, 1000, [4])
    assert leading.tolist() == [[751, 501], [501, 251], [251, 1]]
    trailing = fit_transitions(DDPMScheduler(timestep_spacing="trailing").config, 1000, [2, 3])
    assert trailing.tolist() == [[999, 499], [999, 666], [666, 332]]


# ------------------------------------------------------------------------------------------------ a random UNet


def make_unet(channels=1, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def toy_data(n=64, channels=1):
    return (0.4 * torch.randn(n, channels, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)


@pytest.mark.parametrize("covariance_type", ["sn", "npr"])
def test_the_recipe_on_a_random_unet_writes_a_loadable_head(tmp_path, covariance_type):
    unet = make_unet(channels=3)
    backbone = {k: v.clone() for k, v in unet.state_dict().items()}
    model = NoiseSquareHeadModel.from_unet(unet, covariance_type=covariance_type)
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    recipe = CachedFitRecipe(num_draws=48, pixels_per_draw=8, num_inference_steps=(3, 5), max_evaluations=20)
    losses = train_noise_square_head(model, toy_data(channels=3), scheduler, output_dir=tmp_path, recipe=recipe,
                                     progress=False)
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert all(torch.equal(backbone[k], v) for k, v in unet.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                           "loss_history.json"]
    history = json.loads((tmp_path / "loss_history.json").read_text())
    assert history["recipe"] == "cached" and history["losses"] == losses
    assert history["fit"]["rows"] == 48 * 8 and history["fit"]["recipe"]["num_inference_steps"] == [3, 5]
    assert history["fit"]["cpu_seconds"] > 0
    loaded = load_head_model(tmp_path, make_unet(channels=3))
    x, t = toy_data(4, channels=3), torch.tensor([1, 10, 100, 999])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)
    # the same seed gives the same head
    again = NoiseSquareHeadModel.from_unet(make_unet(channels=3), covariance_type=covariance_type)
    assert train_noise_square_head(again, toy_data(channels=3), scheduler, recipe=recipe, progress=False) == losses


TWO_PROCESSES = """
import json, sys
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from analytic_schedulers import CachedFitRecipe, NoiseSquareHeadModel, train_noise_square_head

torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                   norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D")).eval()
inputs = []
unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].shape[0]))
model = NoiseSquareHeadModel.from_unet(unet, covariance_type="npr")
data = (0.4 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
recipe = CachedFitRecipe(num_draws=61, pixels_per_draw=4, num_inference_steps=(3,), max_evaluations=15, batch_size=8)
losses = train_noise_square_head(model, data, DDPMScheduler(), recipe=recipe, output_dir=sys.argv[1] + "/head",
                                 accelerator=accelerator, progress=False)
with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"world": accelerator.num_processes, "inputs": sum(inputs), "losses": losses,
               "weight": model.head.conv.weight.flatten().tolist()}, f)
"""


def test_two_processes_share_the_draws_and_fit_one_head(tmp_path):
    ranks = run_two_processes(TWO_PROCESSES, tmp_path)
    assert all(r["world"] == 2 for r in ranks)
    assert [r["inputs"] for r in ranks] == [31, 30]  # draws 0, 2, ... and 1, 3, ...: split, not repeated
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["weight"] == ranks[1]["weight"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
    history = json.loads((tmp_path / "head" / "loss_history.json").read_text())
    assert history["fit"]["rows"] == 61 * 4 and history["fit"]["num_processes"] == 2
    assert history["losses"] == ranks[0]["losses"]


def test_bad_inputs_are_refused_with_what_to_do(tmp_path):
    data, scheduler = toy_data(), DDPMScheduler()
    recipe = CachedFitRecipe(num_draws=4, pixels_per_draw=2, num_inference_steps=(3,), max_evaluations=2)
    resblock = NoiseSquareHeadModel.from_unet(make_unet(), resblock=True)
    with pytest.raises(ValueError, match="ResBlock.*recipe=\"plain\""):
        train_noise_square_head(resblock, data, scheduler, recipe=recipe, progress=False)
    model = NoiseSquareHeadModel.from_unet(make_unet())
    with pytest.raises(ValueError, match="plain recipe given with the cached recipe: lr, log_every"):
        train_noise_square_head(model, data, scheduler, recipe="cached", lr=1e-3, log_every=0)
    with pytest.raises(ValueError, match="cached recipe: num_steps[.]"):
        train_noise_square_head(model, data, scheduler, num_steps=3, recipe=recipe)
    with pytest.raises(ValueError, match="`recipe` must be one of"):
        train_noise_square_head(model, data, scheduler, recipe="fast")
    with pytest.raises(TypeError, match="diffusers scheduler"):
        train_noise_square_head(model, data, scheduler.alphas_cumprod, recipe=recipe, progress=False)
    identity = NoiseSquareHeadModel.from_unet(make_unet(), output_activation="identity")
    with pytest.raises(ValueError, match="h > 0"):
        train_noise_square_head(identity, data, scheduler, recipe=recipe, progress=False)
    with pytest.raises(ValueError, match="'optimal'"):
        fit_noise_square_head(model, data, SNDPMScheduler(timestep_spacing="optimal", gamma=[0.5] * 1000), recipe)
    with pytest.raises(ValueError, match="exceeds the 8x8 pixels"):
        fit_noise_square_head(model, data, scheduler, CachedFitRecipe(pixels_per_draw=65))
    for bad in (dict(loss="nll"), dict(num_inference_steps=(1,)), dict(num_draws=0)):
        with pytest.raises(ValueError):
            CachedFitRecipe(**bad)
    # a plain run's checkpoints are not overwritten by a cached fit
    train_noise_square_head(model, data, scheduler, num_steps=1, batch_size=4, output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoints of a plain-recipe run"):
        train_noise_square_head(model, data, scheduler, recipe=recipe, output_dir=tmp_path, progress=False)


def test_cli_train_head_cached(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=make_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    args = ["train-head", "--model", str(tmp_path / "pipe"), "--data", "sklearn-digits", "--covariance-type", "npr",
            "--recipe", "cached", "--draws", "32", "--fit-steps", "4,6", "--loss", "gnll",
            "--output", str(tmp_path / "head"), "--no-progress"]
    assert main(args) == 0
    assert "head saved to" in capsys.readouterr().out
    written = json.loads((tmp_path / "head" / "training_args.json").read_text())
    assert written["recipe"] == "cached" and written["draws"] == 32 and written["fit_steps"] == [4, 6]
    assert written["loss"] == "gnll" and written["cpu_seconds"] > 0
    history = json.loads((tmp_path / "head" / "loss_history.json").read_text())
    assert history["fit"]["recipe"]["loss"] == "gnll"
    from analytic_schedulers.hub import head_card

    card = head_card(tmp_path / "head")
    assert "cached" in card and "draws 32" in card and "CPU seconds" in card
    model = load_head_model(tmp_path / "head", unet=UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet"))
    assert model.covariance_type == "npr"
    # options of the other recipe are refused, in one line
    assert main(args[:-3] + ["--lr", "1e-3", "--output", str(tmp_path / "x"), "--no-progress"]) == 2
    assert main(["train-head", "--model", str(tmp_path / "pipe"), "--data", "sklearn-digits", "--recipe", "plain",
                 "--draws", "8", "--output", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "options of the plain recipe: --lr" in err and "options of the cached recipe: --draws" in err
