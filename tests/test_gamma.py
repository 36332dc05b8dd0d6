"""estimate_gamma: exactness on Gaussian data, the math of the sums, data formats, errors, resuming, Accelerate."""

import json
import math
import warnings

import pytest
import torch

from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel
from analytic_schedulers.gamma import GammaEstimate, GammaSums, estimate_gamma, fill_missing, mean_square_per_sample
from helpers import run_two_processes, sample_loop

S = 0.3  # data std of the isotropic Gaussian check


def gaussian_setup(output="epsilon", **config):
    base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False, **config)
    return base, GaussianDataModel.from_scheduler(base, data_std=S, output=output)


def images_in_range(n, channels=1):
    return torch.linspace(-1, 1, n * channels * 64).reshape(n, channels, 8, 8)


def quiet_estimate(*args, **kwargs):
    """Gaussian data with s = 0.3 has a few values beyond [-1, 1]; the range warning is tested on its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return estimate_gamma(*args, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------ the must-show


@pytest.fixture(scope="module")
def full_estimate():
    base, model = gaussian_setup()
    data = model.sample_data(2048, torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2M small float64 evaluations: one thread is as fast, and much faster on a busy CPU
    try:
        return base, model, quiet_estimate(model, data, base, batch_size=8192, generator=0)
    finally:
        torch.set_num_threads(threads)


def test_estimate_is_within_0_02_of_exact_gamma_at_every_timestep(full_estimate):
    base, model, estimate = full_estimate
    exact = model.exact_gamma()
    error = (estimate.gamma - exact).abs()
    print(f"\nmax |estimate - exact| = {error.max().item():.4f} (t = {error.argmax().item()}), "
          f"max stderr = {estimate.stderr.max().item():.4f}, max |error| / stderr = "
          f"{(error / estimate.stderr).max().item():.2f}")
    assert estimate.is_complete and estimate.num_samples == 2048
    assert estimate.gamma.dtype == torch.float64 and estimate.gamma.shape == (1000,)
    assert error.max().item() < 0.02
    # the reported standard error is honest: errors are a few standard errors at most, and it shrinks like 1/sqrt(M)
    assert (error / estimate.stderr).max().item() < 5.5
    assert torch.all(estimate.stderr > 0) and estimate.stderr.max().item() < 0.01


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_scheduler_from_the_estimate_is_exact(full_estimate, eta):
    base, model, estimate = full_estimate
    scheduler = estimate.to_scheduler(base, eta=eta, clip_variance=True, last_step_sigma_clip=None)
    assert isinstance(scheduler, AnalyticDPMScheduler)
    scheduler.set_timesteps(10)
    std = sample_loop(scheduler, model, 8000).std().item()
    print(f"\nK=10 eta={eta}: estimated-Gamma sampler std {std:.4f} ({std / S - 1:+.2%}), target {S}")
    assert abs(std / S - 1) < 0.01


# ------------------------------------------------------------------------------------------------ the math


def test_sums_give_mean_and_standard_error():
    values = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sums = GammaSums.zeros(4)
    sums.add(torch.full((30,), 2), values[:30])
    other = GammaSums.zeros(4)
    other.add(torch.full((20,), 2), values[30:])
    other.add(torch.tensor([3]), torch.tensor([0.5]))
    merged = sums + other
    assert merged.count.tolist() == [0, 0, 50, 1]
    torch.testing.assert_close(merged.mean()[2], values.mean())
    torch.testing.assert_close(merged.stderr()[2], values.std() / math.sqrt(50))
    assert torch.isnan(merged.mean()[:2]).all() and torch.isnan(merged.stderr()[:2]).all()
    assert merged.stderr()[3].item() == math.inf  # one sample: the error is unknown
    torch.testing.assert_close(GammaSums.from_stacked(merged.stacked()).stacked(), merged.stacked())


def test_mean_square_per_sample():
    eps = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 3.0]]]])
    torch.testing.assert_close(mean_square_per_sample(eps), torch.tensor([2.5, 4.5], dtype=torch.float64))


def test_partial_table_needs_an_explicit_fill():
    sums = GammaSums.zeros(1000)
    sums.add(torch.tensor([0, 0, 500, 500, 999, 999]), torch.tensor([0.1, 0.1, 0.5, 0.5, 0.9, 0.9]))
    estimate = GammaEstimate.from_sums(sums)
    assert not estimate.is_complete and estimate.timesteps_estimated.tolist() == [0, 500, 999]
    assert torch.isnan(estimate.gamma[1:500]).all()
    with pytest.raises(ValueError, match="fill='interpolate'"):
        estimate.to_scheduler(AnalyticDPMScheduler().config)
    with pytest.raises(ValueError, match="non-finite"):  # the scheduler itself refuses NaN entries
        AnalyticDPMScheduler(gamma=estimate.gamma)
    scheduler = estimate.to_scheduler(AnalyticDPMScheduler().config, fill="interpolate")
    assert scheduler.gamma_table[250].item() == pytest.approx(0.3)
    assert estimate.filled(1.0)[1].item() == 1.0 and estimate.filled(1.0)[500].item() == 0.5
    with pytest.raises(ValueError, match="interpolate"):
        fill_missing(estimate.gamma, "nearest")


def test_json_round_trip(tmp_path):
    sums = GammaSums.zeros(10)
    sums.add(torch.tensor([1, 1, 4]), torch.tensor([0.25, 0.75, 1.0]))
    estimate = GammaEstimate.from_sums(sums)
    estimate.save(tmp_path / "g.json", extra={"note": "x"})
    state = json.loads((tmp_path / "g.json").read_text())  # strict JSON: NaN/inf written as null
    assert state["gamma"][0] is None and state["gamma_stderr"][4] is None and state["note"] == "x"
    loaded = GammaEstimate.load(tmp_path / "g.json")
    torch.testing.assert_close(loaded.sums.stacked(), sums.stacked())
    assert loaded.timesteps_estimated.tolist() == [1, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------ inputs


def test_every_data_format_gives_the_same_estimate():
    base, model = gaussian_setup()
    images = model.sample_data(40, torch.Generator().manual_seed(2)).clamp(-1, 1)
    kwargs = dict(timesteps=[10, 400, 900], batch_size=16, generator=3)
    reference = estimate_gamma(model, images, base, progress=False, **kwargs).gamma

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"pixel_values": images[i], "label": i}

    loaders = {
        "loader of tensors": torch.utils.data.DataLoader(images, batch_size=7),
        "loader of tuples": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=9),
        "list of dicts": [{"images": images[i:i + 8]} for i in range(0, 40, 8)],
        "generator of lists": ([images[i:i + 5], None] for i in range(0, 40, 5)),
        "map-style dataset of dicts": Pairs(),
        "numpy array": images.numpy(),
    }
    for name, data in loaders.items():
        got = estimate_gamma(model, data, base, progress=False, **kwargs).gamma
        torch.testing.assert_close(got, reference, msg=name, equal_nan=True)


@pytest.mark.parametrize("output", ["v_prediction", "sample"])
def test_any_prediction_type_is_turned_into_eps(output):
    base, eps_model = gaussian_setup()
    other_base, other_model = gaussian_setup(output=output, prediction_type=output)
    images = eps_model.sample_data(64, torch.Generator().manual_seed(4)).clamp(-1, 1)
    kwargs = dict(timesteps=[0, 300, 999], batch_size=64, generator=5, progress=False)
    expected = estimate_gamma(eps_model, images, base, **kwargs).gamma
    got = estimate_gamma(other_model, images, other_base, **kwargs).gamma
    torch.testing.assert_close(got[[0, 300, 999]], expected[[0, 300, 999]], rtol=1e-4, atol=1e-5)


def test_return_stderr_false_gives_the_bare_table_and_timesteps_subset():
    base, model = gaussian_setup()
    images = model.sample_data(32, torch.Generator().manual_seed(0)).clamp(-1, 1)
    base.set_timesteps(5)
    table = estimate_gamma(model, images, base, timesteps=base.timesteps, progress=False, return_stderr=False)
    assert isinstance(table, torch.Tensor) and table.shape == (1000,)
    assert (~torch.isnan(table)).nonzero().flatten().tolist() == sorted(base.timesteps.tolist())


def test_packing_several_timesteps_per_call_changes_nothing_but_the_call_count():
    base, model = gaussian_setup()
    images = model.sample_data(8, torch.Generator().manual_seed(0)).clamp(-1, 1)
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return model(x, t)

    one = estimate_gamma(counted, images, base, timesteps=range(0, 1000, 100), batch_size=8, generator=1,
                         progress=False)
    assert calls == [8] * 10
    calls.clear()
    packed = estimate_gamma(counted, images, base, timesteps=range(0, 1000, 100), batch_size=40, generator=1,
                            progress=False)
    assert calls == [40, 40]  # 5 timesteps x 8 images per call
    torch.testing.assert_close(packed.gamma, one.gamma, equal_nan=True)


def test_plain_tensor_and_tuple_model_outputs():
    base, model = gaussian_setup()
    images = model.sample_data(16, torch.Generator().manual_seed(0)).clamp(-1, 1)
    kwargs = dict(timesteps=[5, 50], generator=0, progress=False)
    reference = estimate_gamma(model, images, base, **kwargs).gamma
    plain = estimate_gamma(lambda x, t: model(x, t).sample, images, base, **kwargs).gamma
    as_tuple = estimate_gamma(lambda x, t: model(x, t, return_dict=False), images, base, **kwargs).gamma
    torch.testing.assert_close(plain, reference, equal_nan=True)
    torch.testing.assert_close(as_tuple, reference, equal_nan=True)


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_data():
    base, model = gaussian_setup()
    for empty in (torch.empty(0, 1, 8, 8), [], torch.utils.data.DataLoader(torch.empty(0, 1, 8, 8), batch_size=4)):
        with pytest.raises(ValueError, match="empty"):
            estimate_gamma(model, empty, base, progress=False)


def test_images_outside_minus_one_one_warn_with_how_to_rescale():
    base, model = gaussian_setup()
    pixels = torch.randint(0, 256, (8, 1, 8, 8)).float()
    with pytest.warns(UserWarning, match=r"x / 127\.5 - 1"):
        estimate_gamma(model, pixels, base, timesteps=[3], progress=False)
    with pytest.warns(UserWarning, match=r"\[0, 1\].*x \* 2 - 1"):
        estimate_gamma(model, pixels / 255, base, timesteps=[3], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_gamma(model, pixels / 127.5 - 1, base, timesteps=[3], progress=False)


def test_model_output_of_the_wrong_shape():
    base = AnalyticDPMScheduler()
    sn_model = GaussianDataModel.from_scheduler(base, output="sn")  # [eps, h]: twice the channels
    images = images_in_range(4)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        estimate_gamma(sn_model, images, base, timesteps=[3], progress=False)
    with pytest.raises(ValueError, match="expects 1"):
        estimate_gamma(sn_model, images_in_range(4, channels=3), base, timesteps=[3], progress=False)


def test_num_samples_larger_than_the_data_says_what_was_used():
    base, model = gaussian_setup()
    images = images_in_range(10)
    with pytest.warns(UserWarning, match="only 10 images; used all 10"):
        estimate = estimate_gamma(model, images, base, num_samples=50, timesteps=[3], progress=False)
    assert estimate.num_samples == 10
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    with pytest.warns(UserWarning, match="only 10 images"):
        estimate_gamma(model, loader, base, num_samples=50, timesteps=[3], progress=False)
    assert estimate_gamma(model, loader, base, num_samples=6, timesteps=[3], progress=False).num_samples == 6


@pytest.mark.parametrize("data,match", [([{"label": torch.zeros(2)}], "pixel_values"),
                                        ([torch.zeros(2, 1, 8, 8, dtype=torch.uint8)], "127.5"),
                                        ([["not a tensor"]], "tensors"),
                                        (42, "must be a tensor")])
def test_unusable_batches(data, match):
    base, model = gaussian_setup()
    with pytest.raises((TypeError, ValueError), match=match):
        estimate_gamma(model, data, base, progress=False)


def test_bad_arguments_and_non_finite_outputs():
    base, model = gaussian_setup()
    images = images_in_range(4)
    with pytest.raises(ValueError, match="num_samples"):
        estimate_gamma(model, images, base, num_samples=0, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        estimate_gamma(model, images, base, timesteps=[1000], progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        estimate_gamma(lambda x, t: torch.full_like(x, math.nan), images, base, timesteps=[3], progress=False)


# ------------------------------------------------------------------------------------------------ resuming


def test_interrupted_run_resumes_to_the_same_table():
    base, model = gaussian_setup()
    images = model.sample_data(16, torch.Generator().manual_seed(0)).clamp(-1, 1)
    kwargs = dict(timesteps=range(0, 1000, 50), batch_size=32, generator=7, progress=False)  # 2 timesteps a call
    full = estimate_gamma(model, images, base, **kwargs)
    saved = []

    def interrupt_after_three_groups(sums):
        saved.append(sums)
        if len(saved) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        estimate_gamma(model, images, base, callback=interrupt_after_three_groups, **kwargs)
    partial = GammaEstimate.from_sums(saved[-1])
    assert partial.timesteps_estimated.tolist() == [0, 50, 100, 150, 200, 250]
    calls = []
    resumed = estimate_gamma(lambda x, t: calls.append(t) or model(x, t), images, base, resume_from=partial,
                             **kwargs)
    assert sorted(torch.cat(calls).unique().tolist()) == list(range(300, 1000, 50))  # finished ones not redone
    torch.testing.assert_close(resumed.sums.stacked(), full.sums.stacked())
    with pytest.raises(ValueError, match="same data"):
        estimate_gamma(model, images[:8], base, resume_from=partial, **kwargs)


# ------------------------------------------------------------------------------------------------ Accelerate

ACCELERATE_SCRIPT = """
import json, math, sys, warnings
import torch
from accelerate import Accelerator
from analytic_schedulers import AnalyticDPMScheduler, GaussianDataModel
from analytic_schedulers.gamma import estimate_gamma

warnings.simplefilter("ignore", UserWarning)
torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
base = AnalyticDPMScheduler(timestep_spacing="linspace", clip_sample=False)
model = GaussianDataModel.from_scheduler(base, data_std=0.3)
calls = {"forward": 0, "inputs": 0}

def counted(x, t):
    calls["forward"] += 1
    calls["inputs"] += x.shape[0]
    return model(x, t)

data = model.sample_data(2048, torch.Generator().manual_seed(1))  # the same tensor on every process
estimate = estimate_gamma(counted, data, base, timesteps=range(0, 1000, 25), batch_size=2048, generator=0,
                          accelerator=accelerator, progress=False)
finite = lambda x: [v if math.isfinite(v) else None for v in x.tolist()]
with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"world": accelerator.num_processes, **calls, "num_samples": estimate.num_samples,
               "gamma": finite(estimate.gamma), "exact": model.exact_gamma().tolist()}, f)
"""


def test_accelerate_launch_two_processes_split_the_work(tmp_path):
    ranks = run_two_processes(ACCELERATE_SCRIPT, tmp_path)
    assert all(r["world"] == 2 and r["num_samples"] == 2048 for r in ranks)
    assert ranks[0]["gamma"] == ranks[1]["gamma"]  # every process returns the same table
    estimated = [t for t, g in enumerate(ranks[0]["gamma"]) if g is not None]
    assert estimated == list(range(0, 1000, 25))
    error = max(abs(ranks[0]["gamma"][t] - ranks[0]["exact"][t]) for t in estimated)
    print(f"\n2 processes: max |estimate - exact| = {error:.4f}; model inputs per process "
          f"{[r['inputs'] for r in ranks]}, calls {[r['forward'] for r in ranks]}")
    assert error < 0.02
    # the work is split, not repeated: 2048 images x 40 timesteps in all, half on each process
    assert [r["inputs"] for r in ranks] == [1024 * 40, 1024 * 40]
    assert ranks[0]["forward"] == ranks[1]["forward"] == 20
