"""Loading like a native diffusers component: pipelines that name this package in model_index.json, the released
module paths, folders and an offline Hugging Face cache; and the errors of bad locations."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

import analytic_schedulers
from analytic_schedulers import AnalyticDPMScheduler, NoiseSquareHeadModel, SNDPMScheduler, load_head_model
from analytic_schedulers.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: Where the released version (0.1) recorded each class in model_index.json: its private module paths.
RELEASED_PATHS = {"AnalyticDPMScheduler": "analytic_schedulers.scheduling_analytic_dpm",
                  "SNDPMScheduler": "analytic_schedulers.scheduling_sn_dpm",
                  "NoiseSquareHeadModel": "analytic_schedulers.noise_square_head"}


def perturbed_head_model(unet):
    model = NoiseSquareHeadModel.from_unet(unet, covariance_type="npr")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def pipeline(kind, unet):
    if kind == "analytic":  # our scheduler beside a native UNet2DModel
        return DDPMPipeline(unet=unet, scheduler=AnalyticDPMScheduler(gamma=torch.linspace(0.99, 0.01, 1000)))
    # our head model as the pipeline's unet, driven by our SN scheduler
    return DDPMPipeline(unet=perturbed_head_model(unet), scheduler=SNDPMScheduler(covariance_type="npr"))


def images(pipe):
    return pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def in_hub_cache(folder, cache, repo_id="org/tiny-analytic"):
    """The layout huggingface_hub gives a downloaded repository: models--org--name/{refs/main, snapshots/<commit>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    return repo_id


@pytest.mark.parametrize("place", ["folder", "hub cache"])
@pytest.mark.parametrize("names", ["top-level", "released paths"])
@pytest.mark.parametrize("kind", ["analytic", "sn head"])
def test_pipelines_naming_our_components_load_and_sample_the_same_images(tiny_unet, tmp_path, kind, names, place):
    pipe = pipeline(kind, tiny_unet)
    expected = images(pipe)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    ours = {name: entry for name, entry in index.items() if isinstance(entry, list) and entry[0] != "diffusers"}
    assert all(entry[0] == "analytic_schedulers" for entry in ours.values()), index  # the stable name is written
    assert len(ours) == (1 if kind == "analytic" else 2)
    if names == "released paths":
        for name, (_, class_name) in ours.items():
            index[name] = [RELEASED_PATHS[class_name], class_name]
        (folder / "model_index.json").write_text(json.dumps(index))

    if place == "folder":
        loaded = DiffusionPipeline.from_pretrained(folder)
    else:
        repo_id = in_hub_cache(folder, tmp_path / "hub")
        loaded = DiffusionPipeline.from_pretrained(repo_id, cache_dir=tmp_path / "hub")  # HF_HUB_OFFLINE=1 (conftest)
    for name, (_, class_name) in ours.items():
        assert type(getattr(loaded, name)) is getattr(analytic_schedulers, class_name)
    np.testing.assert_array_equal(images(loaded), expected)


def test_a_published_table_loads_from_its_subfolder_beside_a_native_pipeline(tiny_unet, tmp_path):
    """The publishing layout: model_index.json names only diffusers' classes, the table sits in
    analytic_scheduler/, and the component is passed as `scheduler=` (the recipe of the README)."""
    folder = tmp_path / "repo"
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    table = AnalyticDPMScheduler.from_config(DDPMScheduler().config, gamma=torch.linspace(0.99, 0.01, 1000))
    table.save_pretrained(folder / "analytic_scheduler")
    repo_id = in_hub_cache(folder, tmp_path / "hub")
    scheduler = AnalyticDPMScheduler.from_pretrained(repo_id, subfolder="analytic_scheduler",
                                                     cache_dir=tmp_path / "hub")
    pipe = DDPMPipeline.from_pretrained(repo_id, scheduler=scheduler, cache_dir=tmp_path / "hub")
    assert isinstance(pipe.scheduler, AnalyticDPMScheduler)
    np.testing.assert_array_equal(images(pipe), images(DDPMPipeline(unet=tiny_unet, scheduler=table)))


def test_a_repo_without_the_subfolder_says_where_tables_are(tiny_unet, tmp_path):
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "repo")
    repo_id = in_hub_cache(tmp_path / "repo", tmp_path / "hub")
    for location in (str(tmp_path / "repo"), repo_id):
        with pytest.raises(OSError, match='subfolder="analytic_scheduler"') as error:
            AnalyticDPMScheduler.from_pretrained(location, subfolder="analytic_scheduler",
                                                 cache_dir=tmp_path / "hub")
        assert "analytic_scheduler" in str(error.value)


def test_a_hub_id_while_offline_says_so(tmp_path, capsys):
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        AnalyticDPMScheduler.from_pretrained("org/never-downloaded", subfolder="analytic_scheduler",
                                             cache_dir=tmp_path)
    assert main(["sample", "--model", "org/never-downloaded", "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "org/never-downloaded" in err and "HF_HUB_OFFLINE=1" in err and "local folder" in err


def test_a_table_of_another_schedule_is_refused(tiny_unet, tmp_path, capsys):
    model = tmp_path / "model"
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler()).save_pretrained(model)
    AnalyticDPMScheduler(beta_schedule="squaredcos_cap_v2", gamma=[0.5] * 1000).save_pretrained(tmp_path / "cosine")
    for command in (["sample", "--output", str(tmp_path / "x.png")], ["nll", "--num-images", "2"]):
        assert main([*command, "--model", str(model), "--gamma", str(tmp_path / "cosine"), "--steps", "2"]) == 2
        err = capsys.readouterr().err
        assert "another noise schedule" in err and "beta_schedule" in err and "estimate-gamma" in err


@pytest.mark.parametrize("command", [
    ["estimate-gamma", "--num-samples", "2", "--timesteps", "500", "--no-progress"],
    ["train-head", "--recipe", "plain", "--steps", "1", "--batch-size", "2", "--split", "test", "--no-progress"],
])
def test_commands_that_take_no_table_neither_read_nor_check_the_models_own(tmp_path, capsys, command):
    """The bundled model's analytic_scheduler/ table was estimated under its own schedule; these commands use only
    the --scheduler-config schedule, so another one is no reason to stop."""
    from analytic_schedulers.loading import BUNDLED_MODEL, LoadError, load

    config = json.loads((BUNDLED_MODEL / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 0.025}))
    with pytest.raises(LoadError, match="another noise schedule"):
        load(str(BUNDLED_MODEL), scheduler=str(tmp_path / "other"))
    assert load(str(BUNDLED_MODEL), scheduler=str(tmp_path / "other"), gamma=False).gamma is None
    assert main([*command, "--model", str(BUNDLED_MODEL), "--scheduler-config", str(tmp_path / "other"),
                 "--data", "sklearn-digits", "--device", "cpu", "--output", str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err


def test_a_head_saved_alone_needs_its_backbone(tiny_unet, tmp_path):
    model = perturbed_head_model(tiny_unet)
    model.head.save_pretrained(tmp_path / "npr_head")
    with pytest.raises(ValueError, match="unet="):
        load_head_model(tmp_path / "npr_head", unet=None)
    with pytest.raises(ValueError, match="unet="):
        NoiseSquareHeadModel.from_pretrained(tmp_path / "npr_head")
    composed = load_head_model(tmp_path / "npr_head", unet=tiny_unet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(composed(x, t).sample, model(x, t).sample, rtol=0, atol=0)


@pytest.mark.parametrize("sampler,ok", [("ddpm", True), ("dpmsolver++", True), ("analytic-ddpm", True),
                                        ("ddim", False)])
def test_spacing_optimal_with_diffusers_own_schedulers(tmp_path, capsys, sampler, ok):
    """diffusers' schedulers that take custom timesteps follow the optimal trajectory; DDIM stops with a message."""
    out = tmp_path / "grid.png"
    code = main(["sample", "--scheduler", sampler, "--spacing", "optimal", "--steps", "3", "--num-images", "1",
                 "--no-progress", "--output", str(out)])
    if ok:
        assert code == 0 and out.is_file()
    else:
        assert code == 2 and "custom timesteps" in capsys.readouterr().err and not out.exists()


def readme_block(marker):
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


def test_the_readmes_hub_recipe_runs_verbatim_against_an_offline_cache(tiny_unet, tmp_path):
    """The README's recipe, word for word, in a fresh process whose Hugging Face cache holds the two repositories it
    names (here with a tiny UNet under the model's name) and whose Hub is switched off."""
    recipe = readme_block("hub-recipe")
    cache = tmp_path / "hf_home" / "hub"
    model = tmp_path / "model"
    DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler()).save_pretrained(model)
    in_hub_cache(model, cache, "google/ddpm-cifar10-32")
    tables = tmp_path / "tables"
    AnalyticDPMScheduler.from_config(DDPMScheduler().config, gamma=torch.linspace(0.99, 0.01, 1000)).save_pretrained(
        tables / "analytic_scheduler")
    in_hub_cache(tables, cache, "you/ddpm-cifar10-analytic")
    script = recipe + "\nprint(type(pipe.scheduler).__name__, len(images), images[0].size)\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "AnalyticDPMScheduler 1 (8, 8)"
