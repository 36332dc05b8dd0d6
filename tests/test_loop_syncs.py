"""The loops of `estimate_gamma`, `dataset_nll_bits_per_dim` and `train_noise_square_head` read nothing back from the
device per batch or step: their number of host reads is the same for N and 2N batches (steps), apart from explicit
reporting (`callback`, `log_every`). Counted on the CPU with `helpers.ReadBackCounter`; on a GPU, the same loops are
counted with `torch.cuda.set_sync_debug_mode("warn")`, which also sees copies from the host that wait for the device.
"""

import warnings

import pytest
import torch
from diffusers import DDPMScheduler

import analytic_schedulers.likelihood as likelihood
from analytic_schedulers import AnalyticDPMScheduler, estimate_gamma
from analytic_schedulers.likelihood import check_8bit_data, dataset_nll_bits_per_dim
from analytic_schedulers.noise_square_head import NoiseSquareHeadModel
from analytic_schedulers.training import train_noise_square_head
from helpers import ReadBackCounter

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def counted(fn, **counter_kwargs) -> ReadBackCounter:
    with ReadBackCounter(**counter_kwargs) as counter:
        fn()
    return counter


def images(num_images: int) -> torch.Tensor:
    """Images in [-1, 1] on the 8-bit grid, `[N, 1, 8, 8]`."""
    x = torch.linspace(-1, 1, num_images * 64).reshape(num_images, 1, 8, 8)
    return torch.round((x + 1) * 127.5) / 127.5 - 1


# ------------------------------------------------------------------------------------------------ estimate_gamma


def gamma_run(model, num_images, timesteps, callback=None, prediction_type="epsilon", device=None):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    return lambda: estimate_gamma(model, images(num_images), scheduler, batch_size=2, timesteps=timesteps,
                                  progress=False, callback=callback, device=device)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_estimate_gamma_reads_do_not_grow_with_batches_or_timesteps(tiny_unet, prediction_type):
    # 2 images a call, one timestep a group: 2 x 2 calls, then 4 x 4
    small = counted(gamma_run(tiny_unet, 4, [10, 500], prediction_type=prediction_type))
    large = counted(gamma_run(tiny_unet, 8, [10, 300, 600, 900], prediction_type=prediction_type))
    assert large.count == small.count, (small.where, large.where)
    assert large.host_data_copies == small.host_data_copies == 0


def test_estimate_gamma_callback_reads_the_sums_once_per_group(tiny_unet):
    def ignore(sums):
        pass

    small = counted(gamma_run(tiny_unet, 4, [10, 500], callback=ignore))
    large = counted(gamma_run(tiny_unet, 8, [10, 300, 600, 900], callback=ignore))
    assert large.count - small.count == 2  # two more groups of timesteps, one read each


# ------------------------------------------------------------------------------------------------ the likelihood


@pytest.mark.parametrize("kind", ["analytic", "ddpm"])
def test_dataset_nll_reads_do_not_grow_with_batches(tiny_unet, kind):
    scheduler = AnalyticDPMScheduler(gamma=[0.5] * 1000) if kind == "analytic" else DDPMScheduler()
    scheduler.set_timesteps(3)
    # each batch is checked on its host copy (before it moves to the device): those reads are not the device's
    runs = [counted(lambda: dataset_nll_bits_per_dim(tiny_unet, scheduler, images(n), batch_size=2),
                    host_side=(check_8bit_data,)) for n in (4, 8)]
    assert runs[1].count == runs[0].count, (runs[0].where, runs[1].where)
    assert runs[1].host_data_copies == runs[0].host_data_copies == 0


def test_dataset_nll_checks_each_batch_before_moving_it(tiny_unet, monkeypatch):
    checked, moved = [], []

    def check(x):
        checked.append(check_8bit_data(x))
        return checked[-1]

    def move(x, device):
        moved.append(x)
        return x.to(device)

    monkeypatch.setattr(likelihood, "check_8bit_data", check)
    monkeypatch.setattr(likelihood, "to_device", move)
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(2)
    dataset_nll_bits_per_dim(tiny_unet, scheduler, images(6), batch_size=2)
    assert len(moved) == 3 and all(m is c for m, c in zip(moved, checked))


def test_dataset_nll_checks_the_results_once_for_nan():
    scheduler = AnalyticDPMScheduler(gamma=[0.5] * 1000)
    scheduler.set_timesteps(3)

    def model(x, t):
        return torch.where(x[:, :1, :1, :1] > 0, torch.nan, 0.0).expand_as(x)  # NaN for the bright images only

    data = images(4).clone()
    data[2:] = 1.0
    with pytest.raises(ValueError, match=r"NLL of images \[2, 3\] is NaN or Inf.*bf16"):
        dataset_nll_bits_per_dim(model, scheduler, data, batch_size=2)


# ------------------------------------------------------------------------------------------------ head training


def train(unet, num_steps, log_every=0):
    model = NoiseSquareHeadModel.from_unet(unet, covariance_type="sn")
    return lambda: train_noise_square_head(model, images(8), DDPMScheduler(), num_steps=num_steps, batch_size=2,
                                           progress=False, log_every=log_every)


def test_head_training_reads_do_not_grow_with_steps(tiny_unet, capsys):
    # Adam keeps its step count on the host (not `capturable`): its reads do not wait for the device
    host_side = ("torch.optim",)
    small, large = (counted(train(tiny_unet, n), host_side=host_side) for n in (2, 4))
    assert large.count == small.count, (small.where, large.where)
    assert large.host_data_copies == small.host_data_copies
    # `log_every` reads the window's losses back: one read per log line
    small, large = (counted(train(tiny_unet, n, log_every=2), host_side=host_side) for n in (2, 4))
    assert large.count - small.count == 1


# ------------------------------------------------------------------------------------------------ on a GPU


def cuda_syncs(fn) -> int:
    """The synchronising CUDA calls `fn` makes, counted with `torch.cuda.set_sync_debug_mode("warn")`."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@CUDA
def test_loops_do_not_synchronise_per_batch_on_cuda(tiny_unet):
    unet = tiny_unet.to("cuda")
    gamma = [cuda_syncs(gamma_run(unet, n, [10, 500])) for n in (4, 8)]
    scheduler = AnalyticDPMScheduler(gamma=[0.5] * 1000)
    scheduler.set_timesteps(3, device="cuda")
    nll = [cuda_syncs(lambda: dataset_nll_bits_per_dim(unet, scheduler, images(n), batch_size=2)) for n in (4, 8)]
    training = [cuda_syncs(train(unet, n)) for n in (2, 4)]
    assert gamma[0] == gamma[1] and nll[0] == nll[1] and training[0] == training[1], (gamma, nll, training)
