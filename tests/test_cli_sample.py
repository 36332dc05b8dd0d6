"""`analytic-schedulers sample` on a tiny model folder laid out like a real pipeline."""

import os
import subprocess
import sys

import pytest
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from analytic_schedulers import AnalyticDPMScheduler
from analytic_schedulers.cli import main


@pytest.fixture
def model_dir(tmp_path, tiny_unet):
    folder = tmp_path / "model"
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    AnalyticDPMScheduler.from_config(DDPMScheduler().config, gamma=[0.9] * 1000).save_pretrained(
        folder / "analytic_scheduler")
    return folder


def test_sample_writes_a_png_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", str(model_dir), "--steps", "3", "--num-images", "4", "--output", str(out),
                 "--no-progress", "--device", "cpu"])
    assert code == 0
    image = Image.open(out)
    assert image.size == (4 * (2 * 9 + 1), 4 * (2 * 9 + 1))  # 2x2 grid of 8x8 images, 1-pixel padding, scale 4
    assert "analytic-ddpm" in capsys.readouterr().out


def test_compare_is_reproducible_and_skips_what_is_missing(model_dir, tmp_path, capsys):
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out, batch in zip(outs, ("4", "1")):
        assert main(["sample", "--model", str(model_dir), "--compare", "ddpm,analytic-ddpm,sn-ddpm", "--steps", "2",
                     "--num-images", "4", "--batch-size", batch, "--output", str(out), "--no-progress",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "skipped sn-ddpm" in printed and "train-head" in printed
    # image i uses seed + i: the batch size does not change the pictures
    assert Image.open(outs[0]).tobytes() == Image.open(outs[1]).tobytes()


def test_bad_input_exits_non_zero_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "never.png"
    common = ["--steps", "2", "--num-images", "1", "--no-progress", "--device", "cpu", "--output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(model_dir), "--scheduler", "euler-magic", *common])
    assert exit_info.value.code == 2
    assert main(["sample", "--model", str(tmp_path), *common]) == 2
    assert "holds no diffusers model" in capsys.readouterr().err

    (model_dir / "analytic_scheduler" / "scheduler_config.json").unlink()
    assert main(["sample", "--model", str(model_dir), *common]) == 2
    assert "estimate-gamma" in capsys.readouterr().err

    bad_out = ["--output", str(tmp_path / "missing-folder" / "x.png")]
    assert main(["sample", "--model", str(model_dir), "--scheduler", "ddpm", *common[:-2], *bad_out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--model", str(model_dir), "--scheduler", "ddpm", "--steps", "5000",
                 *common[2:]]) == 2
    assert not out.exists()


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "-m", "analytic_schedulers.cli", "sample", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ["--model", "--scheduler", "--compare", "--steps", "--num-images", "--seed", "--output", "--gamma",
                 "--head", "--device", "--dtype", "--last-step-sigma-clip", "--spacing"]:
        assert flag in result.stdout


def test_written_png_has_the_usual_permissions(model_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(model_dir), "--scheduler", "ddpm", "--steps", "2", "--num-images", "1",
                 "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------------ pipelines with a VAE


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder with a guided table (scale 3, prompt "cat") in analytic_scheduler/
    and an untrained SN head in sn_head/."""
    from analytic_schedulers import NoiseSquareHead, estimate_pipeline_gamma
    from tiny_pipelines import saved_tiny_stable_diffusion, tiny_images, tiny_stable_diffusion

    folder = saved_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "pipe")
    pipe = tiny_stable_diffusion(tmp_path_factory.mktemp("tokenizer"))
    table = estimate_pipeline_gamma(pipe, tiny_images(4), prompt="cat", guidance_scale=3.0, generator=0,
                                    timesteps=[0, 300, 600, 999], progress=False)
    table.to_scheduler(pipe.scheduler.config, fill="interpolate").save_pretrained(folder / "analytic_scheduler")
    NoiseSquareHead.for_backbone(pipe.unet).save_pretrained(folder / "sn_head")
    return folder


def sample_sd(sd_dir, out, *extra):
    return main(["sample", "--model", str(sd_dir), "--prompt", "cat", "--steps", "2", "--num-images", "2",
                 "--output", str(out), "--no-progress", "--device", "cpu", *extra])


def test_stable_diffusion_folder_runs_its_own_call_and_writes_a_png_grid(sd_dir, tmp_path, capsys):
    assert sample_sd(sd_dir, tmp_path / "grid.png", "--guidance-scale", "3") == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * 9 + 1, 9 + 1)  # two 8x8 images, 1-pixel padding
    assert "analytic-ddim" in capsys.readouterr().out
    assert sample_sd(sd_dir, tmp_path / "sn.png", "--guidance-scale", "3", "--scheduler", "sn-ddim") == 0


def test_stable_diffusion_compare_puts_ddim_dpm_solver_and_ours_side_by_side_from_the_same_seed(sd_dir, tmp_path,
                                                                                              capsys):
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out, batch in zip(outs, ("2", "1")):
        assert sample_sd(sd_dir, out, "--guidance-scale", "3", "--compare", "--batch-size", batch) == 0
    printed = capsys.readouterr().out
    assert all(f"{name} " in printed for name in ("ddim", "dpmsolver++", "analytic-ddim", "analytic-ddpm"))
    assert Image.open(outs[0]).width == 4 * (2 * 9 + 1) + 5 * 8  # four labelled panels with 8-pixel gaps
    assert Image.open(outs[0]).tobytes() == Image.open(outs[1]).tobytes()  # image i from seed + i


def test_stable_diffusion_errors_and_warnings_name_the_fix(sd_dir, tmp_path, capsys):
    from analytic_schedulers import AnalyticDPMScheduler
    from tiny_pipelines import SCALED_LINEAR, saved_tiny_stable_diffusion

    pixel_table = tmp_path / "pixel"
    AnalyticDPMScheduler(gamma=[0.5] * 1000, gamma_sample_shape=[3, 8, 8], **SCALED_LINEAR).save_pretrained(
        pixel_table)
    assert sample_sd(sd_dir, tmp_path / "x.png", "--gamma", str(pixel_table)) == 2
    error = capsys.readouterr().err
    assert "estimated in pixel space" in error and "estimate-gamma --model <pipeline>" in error
    with pytest.warns(UserWarning, match="estimated for guidance scale 3, but the pipeline samples at 5"):
        assert sample_sd(sd_dir, tmp_path / "y.png", "--guidance-scale", "5") == 0
    plain = saved_tiny_stable_diffusion(tmp_path / "plain")
    assert sample_sd(plain, tmp_path / "z.png") == 2
    error = capsys.readouterr().err  # no table: estimate one, or go data-free
    assert "estimate-gamma --model <pipeline>" in error and "--gamma-from-batch" in error
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "z.png").exists()
    assert sample_sd(plain, tmp_path / "z.png", "--gamma-from-batch") == 0


def test_prompt_on_a_pixel_model_is_refused(model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(model_dir), "--prompt", "cat", "--output", str(tmp_path / "x.png")]) == 2
    assert "--prompt apply to pipelines with a text encoder" in capsys.readouterr().err
