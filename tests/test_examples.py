"""The examples run as written, here on the bundled model (or a tiny Stable Diffusion folder) and scikit-learn's
digits, offline."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "analytic_schedulers" / "assets" / "ddpm-digits-16"


def run_example(name, *args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "examples"))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_swap_scheduler(tmp_path):
    out = run_example("swap_scheduler.py", "--model", str(BUNDLED), "--gamma", str(BUNDLED / "analytic_scheduler"),
                      "--steps", "3", "--num-images", "2", "--output", "grid.png", cwd=tmp_path)
    assert (tmp_path / "grid.png").stat().st_size > 0 and "Analytic-DDIM" in out


def test_estimate_gamma_then_compute_nll(tmp_path):
    out = run_example("estimate_gamma.py", "--model", str(BUNDLED), "--data", "sklearn-digits", "--num-samples", "4",
                      "--batch-size", "256", "--output", "gamma", cwd=tmp_path)
    assert (tmp_path / "gamma" / "scheduler_config.json").is_file() and "standard error" in out
    # a 4-image table is too noisy for the optimal trajectory (Gamma > 1 early): the NLL uses the bundled one
    out = run_example("compute_nll.py", "--model", str(BUNDLED), "--gamma", str(BUNDLED / "analytic_scheduler"),
                      "--data", "sklearn-digits",
                      "--num-images", "4", "--steps", "5", cwd=tmp_path)
    assert out.count("bits/dim") == 4


def test_train_sn_head(tmp_path):
    out = run_example("train_sn_head.py", "--model", str(BUNDLED), "--data", "sklearn-digits", "--draws", "64",
                      "--batch-size", "32", "--num-images", "64", "--output", "head", "--sample-steps", "2",
                      cwd=tmp_path)
    assert "sampled 4 images" in out and "cached recipe" in out


def test_stable_diffusion_estimates_swaps_and_compares(tmp_path):
    from tiny_pipelines import saved_tiny_stable_diffusion

    model = saved_tiny_stable_diffusion(tmp_path / "sd")
    (tmp_path / "captions.txt").write_text("cat\ndog\ncat\ndog\n")
    out = run_example("stable_diffusion.py", "--model", str(model), "--prompt", "cat", "--guidance-scale", "3",
                      "--steps", "2,3", "--num-images", "2", "--data", "sklearn-digits", "--num-samples", "4",
                      "--captions", "captions.txt", "--output", "sd.png", cwd=tmp_path)
    assert "from 4 images at 4 timesteps" in out and "DDIM, DPM-Solver++, Analytic-DDIM at 2,3 steps" in out
    assert (tmp_path / "sd.png").stat().st_size > 0
