"""`analytic-schedulers estimate-gamma`: a ready scheduler folder, resuming, bad input, loading it from a Hub cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel
from analytic_schedulers.cli import main
from analytic_schedulers.cli import estimate_gamma as cli
from analytic_schedulers.gamma import GammaEstimate
from analytic_schedulers.loading import LoadedModel

TIMESTEPS = ",".join(str(t) for t in range(0, 1000, 100))


class InterruptibleGaussianModel(GaussianDataModel):
    """The exact Gaussian model, which raises KeyboardInterrupt once `calls_left` calls have been made."""

    calls_left = None
    calls = 0

    def forward(self, sample, timestep, **kwargs):
        cls = InterruptibleGaussianModel
        if cls.calls_left is not None:
            if cls.calls_left == 0:
                raise KeyboardInterrupt
            cls.calls_left -= 1
        cls.calls += 1
        return super().forward(sample, timestep, **kwargs)


@pytest.fixture
def gaussian_cli(monkeypatch):
    """The CLI with the exact Gaussian model in place of a downloaded one (the rest of the command is real)."""
    config = DDPMScheduler().config

    def load_from_args(args, gamma=True, pipeline=False):
        model = InterruptibleGaussianModel.from_scheduler(DDPMScheduler(), data_std=0.3, sample_size=16)
        return LoadedModel(model, dict(config), None, args.model, None, args.model)

    monkeypatch.setattr(cli, "load_from_args", load_from_args)
    InterruptibleGaussianModel.calls_left, InterruptibleGaussianModel.calls = None, 0
    return InterruptibleGaussianModel


def estimate_command(output, *extra):
    return ["estimate-gamma", "--model", "gaussian", "--data", "sklearn-digits", "--num-samples", "32",
            "--batch-size", "64", "--timesteps", TIMESTEPS, "--seed", "3", "--output", str(output), "--no-progress",
            "--checkpoint-seconds", "0", *extra]


def test_interrupted_run_resumes_without_losing_finished_timesteps(gaussian_cli, tmp_path, capsys):
    assert main(estimate_command(tmp_path / "uninterrupted")) == 0
    reference = GammaEstimate.load(tmp_path / "uninterrupted" / "gamma_estimate.json")
    assert gaussian_cli.calls == 5  # 10 timesteps x 32 images, 2 timesteps per call of 64

    out = tmp_path / "run"
    gaussian_cli.calls_left, gaussian_cli.calls = 3, 0
    assert main(estimate_command(out)) == 130  # interrupted during the 4th call
    assert sorted(p.name for p in out.iterdir()) == ["gamma_partial.json"]  # no scheduler config, no temp files
    partial = GammaEstimate.load(out / "gamma_partial.json")
    assert partial.timesteps_estimated.tolist() == [0, 100, 200, 300, 400, 500]

    gaussian_cli.calls_left, gaussian_cli.calls = None, 0
    capsys.readouterr()
    assert main(estimate_command(out)) == 0
    assert "Resuming: 6 timesteps" in capsys.readouterr().out
    assert gaussian_cli.calls == 2  # only the 4 remaining timesteps
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "gamma_estimate.json", "scheduler_config.json"]
    resumed = GammaEstimate.load(out / "gamma_estimate.json")
    torch.testing.assert_close(resumed.sums.stacked(), reference.sums.stacked())

    scheduler = AnalyticDPMScheduler.from_pretrained(out)
    assert torch.isfinite(scheduler.gamma_table).all()
    estimated = resumed.timesteps_estimated
    torch.testing.assert_close(scheduler.gamma_table[estimated], resumed.gamma[estimated])
    state = json.loads((out / "gamma_estimate.json").read_text())
    assert state["fill"] == "interpolate" and state["settings"]["num_samples"] == 32
    assert len(state["gamma_stderr"]) == 1000


def test_other_settings_do_not_resume_and_finished_runs_are_kept(gaussian_cli, tmp_path, capsys):
    out = tmp_path / "run"
    gaussian_cli.calls_left = 1
    assert main(estimate_command(out)) == 130
    gaussian_cli.calls_left = None
    assert main(estimate_command(out, "--num-samples", "16")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(estimate_command(out, "--num-samples", "16", "--overwrite")) == 0
    assert main(estimate_command(out)) == 2
    assert "already holds a finished estimate" in capsys.readouterr().err
    assert GammaEstimate.load(out / "gamma_estimate.json").num_samples == 16


def test_full_table_with_steps_and_num_samples_larger_than_data(gaussian_cli, tmp_path, capsys):
    out = tmp_path / "steps"
    assert main(["estimate-gamma", "--model", "g", "--data", "sklearn-digits", "--num-samples", "5000", "--steps",
                 "4", "--output", str(out), "--no-progress", "--batch-size", "1500"]) == 0
    printed = capsys.readouterr().out
    assert "holds only 1500 images; using 1500" in printed
    estimate = GammaEstimate.load(out / "gamma_estimate.json")
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(4)
    assert estimate.timesteps_estimated.tolist() == sorted(scheduler.timesteps.tolist())
    assert estimate.num_samples == 1500


@pytest.mark.parametrize("args,match", [(["--data", "/no/such/folder"], "does not exist"),
                                        (["--num-samples", "0"], "at least 1"),
                                        (["--timesteps", "1,x"], "comma-separated"),
                                        (["--fill", "nearest"], "--fill")])
def test_errors_the_user_can_fix(gaussian_cli, tmp_path, capsys, args, match):
    command = ["estimate-gamma", "--model", "g", "--data", "sklearn-digits", "--output", str(tmp_path / "o")]
    assert main(command + args) == 2
    assert match in capsys.readouterr().err


def test_real_pipeline_folder_and_image_folder(tiny_unet, tmp_path):
    """No stand-ins: a diffusers pipeline folder on disk, PNG/JPEG files of another size and mode."""
    pipe = tmp_path / "pipe"
    tiny_unet.save_pretrained(pipe / "unet")
    DDPMScheduler(prediction_type="epsilon", beta_schedule="squaredcos_cap_v2").save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]
    }))
    images = tmp_path / "images" / "class_a"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.{'png' if i % 2 else 'jpg'}")
    (images / "notes.txt").write_text("not an image")

    out = tmp_path / "scheduler"
    assert main(["estimate-gamma", "--model", str(pipe), "--data", str(tmp_path / "images"), "--timesteps",
                 "0,500,999", "--output", str(out), "--no-progress", "--fill", "0.5"]) == 0
    scheduler = AnalyticDPMScheduler.from_pretrained(out)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"  # the model's own schedule
    estimate = GammaEstimate.load(out / "gamma_estimate.json")
    assert estimate.num_samples == 5 and estimate.timesteps_estimated.tolist() == [0, 500, 999]
    assert scheduler.gamma_table[1].item() == 0.5

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["estimate-gamma", "--model", str(pipe), "--data", str(empty), "--output", str(tmp_path / "x")]) == 2
    assert main(["estimate-gamma", "--model", str(tmp_path / "nothing"), "--data", "sklearn-digits",
                 "--output", str(tmp_path / "y")]) == 2


HUB_SCRIPT = """
import json, sys
from analytic_schedulers import AnalyticDPMScheduler
scheduler = AnalyticDPMScheduler.from_pretrained("analytic-org/ddpm-analytic", subfolder="scheduler")
print(json.dumps({"gamma": scheduler.gamma_table.tolist(), "eta": scheduler.config.eta}))
"""


def test_from_pretrained_loads_from_an_offline_hub_cache(tmp_path):
    table = torch.linspace(0.01, 0.99, 1000)
    source = tmp_path / "upload"
    AnalyticDPMScheduler(gamma=table, eta=0.0).save_pretrained(source)
    # the layout huggingface_hub gives a downloaded repo: models--org--name/{refs/main, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--analytic-org--ddpm-analytic"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit / "scheduler")

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["eta"] == 0.0
    torch.testing.assert_close(torch.tensor(loaded["gamma"], dtype=torch.float64), table.double())

    # in this process the hub constants were read at import; cache_dir= points at the same cache
    scheduler = AnalyticDPMScheduler.from_pretrained("analytic-org/ddpm-analytic", subfolder="scheduler",
                                                     cache_dir=tmp_path / "hf_home" / "hub", local_files_only=True)
    torch.testing.assert_close(scheduler.gamma_table, table.double())


# ------------------------------------------------------------------------------------------------ pipelines with a VAE


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from tiny_pipelines import saved_tiny_stable_diffusion

    return saved_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "pipe")


def image_folder(folder, count):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def estimate_sd(sd_dir, data, output, *extra):
    return main(["estimate-gamma", "--model", str(sd_dir), "--data", str(data), "--steps", "2", "--output",
                 str(output), "--no-progress", "--device", "cpu", *extra])


@pytest.mark.parametrize("text", ["prompt", "captions"])
def test_stable_diffusion_table_records_its_conditioning_and_samples_in_its_pipeline(sd_dir, tmp_path, text):
    data = image_folder(tmp_path / "images", 3)
    (tmp_path / "captions.txt").write_text("cat\ndog\na b\n")
    conditioning = ["--prompt", "cat"] if text == "prompt" else ["--captions", str(tmp_path / "captions.txt")]
    out = tmp_path / "table"
    assert estimate_sd(sd_dir, data, out, "--guidance-scale", "3", *conditioning) == 0
    config = json.loads((out / "scheduler_config.json").read_text())
    assert config["gamma_guidance_scale"] == 3.0 and config["gamma_conditioning"] == text
    assert config["gamma_sample_shape"] == [4, 4, 4] and config["gamma_latent"] == "sample"
    assert config["clip_sample"] is False and config["max_x0_variance"] != 1.0  # the latents' own bound
    card = (out / "README.md").read_text()
    assert "| guidance scale | 3" in card and "latents [4, 4, 4]" in card
    assert main(["sample", "--model", str(sd_dir), "--gamma", str(out), "--prompt", "cat", "--guidance-scale", "3",
                 "--steps", "2", "--num-images", "2", "--output", str(tmp_path / "grid.png"), "--no-progress"]) == 0


def test_stable_diffusion_arguments_that_do_not_fit_are_refused(sd_dir, tmp_path, capsys):
    data = image_folder(tmp_path / "images", 3)
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    assert estimate_sd(sd_dir, data, tmp_path / "a", "--guidance-scale", "3", "--captions",
                       str(tmp_path / "two.txt")) == 2
    assert "has 2 lines for 3 images" in capsys.readouterr().err
    assert estimate_sd(sd_dir, data, tmp_path / "b", "--prompt", "cat") == 2  # the table depends on the scale
    assert "Pass the `guidance_scale` you will sample with" in capsys.readouterr().err
    bundled = Path(__file__).resolve().parents[1] / "analytic_schedulers" / "assets" / "ddpm-digits-16"
    assert main(["estimate-gamma", "--model", str(bundled), "--data", "sklearn-digits", "--prompt", "cat",
                 "--output", str(tmp_path / "c")]) == 2
    assert "--prompt apply to pipelines" in capsys.readouterr().err


def test_stable_diffusion_estimate_resumes_after_an_interruption(sd_dir, tmp_path, monkeypatch, capsys):
    from diffusers import UNet2DConditionModel

    data, forward, calls = image_folder(tmp_path / "images", 3), UNet2DConditionModel.forward, {"left": None, "n": 0}

    def interruptible(self, *args, **kwargs):
        if calls["left"] == 0:
            raise KeyboardInterrupt
        calls["left"] = None if calls["left"] is None else calls["left"] - 1
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", interruptible)
    common = ["--batch-size", "3", "--checkpoint-seconds", "0", "--latent", "mean"]  # one call per timestep
    assert estimate_sd(sd_dir, data, tmp_path / "whole", *common) == 0
    calls.update(left=1, n=0)
    assert estimate_sd(sd_dir, data, tmp_path / "run", *common) == 130
    assert GammaEstimate.load(tmp_path / "run" / cli.PARTIAL_NAME).timesteps_estimated.numel() == 1
    assert estimate_sd(sd_dir, data, tmp_path / "run", "--batch-size", "3", "--latent", "sample") == 2
    assert "other settings" in capsys.readouterr().err
    calls.update(left=None, n=0)
    assert estimate_sd(sd_dir, data, tmp_path / "run", *common) == 0
    assert calls["n"] == 1 and "Resuming: 1 timesteps" in capsys.readouterr().out
    resumed, whole = (GammaEstimate.load(tmp_path / name / "gamma_estimate.json") for name in ("run", "whole"))
    torch.testing.assert_close(resumed.sums.stacked(), whole.sums.stacked())
