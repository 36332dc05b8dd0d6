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
