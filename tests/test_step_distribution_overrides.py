"""Per-call overrides of `step_distribution` (`check_finite`), inherited by both schedulers, and `model_device_dtype`."""

import pytest
import torch

from analytic_schedulers import AnalyticDPMScheduler, SNDPMScheduler
from analytic_schedulers.runtime import model_device_dtype


def make(kind, **kwargs):
    if kind == "analytic":
        return AnalyticDPMScheduler(gamma=[0.5] * 1000, **kwargs), 1
    return SNDPMScheduler(covariance_type=kind, **kwargs), 2


@pytest.mark.parametrize("kind", ["analytic", "sn", "npr"])
def test_check_finite_overrides_the_config_per_call(kind):
    scheduler, factor = make(kind)  # check_finite=True in the config
    scheduler.set_timesteps(5)
    x = torch.zeros(1, 1, 4, 4)
    good = torch.full((1, factor, 4, 4), 0.5)
    bad = good.clone()
    bad[0, 0, 1, 1] = float("nan")

    def loop(**kwargs):
        return [scheduler.step_distribution(bad if i == 1 else good, t, x, **kwargs)
                for i, t in enumerate(scheduler.timesteps)]

    steps = loop(check_finite=False)  # no flag kept, nothing raised at the last step
    assert scheduler._first_nonfinite_step is None
    assert torch.isnan(steps[1].mean).any()
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        loop()  # the config's check

    unchecked, _ = make(kind, check_finite=False)
    unchecked.set_timesteps(5)
    scheduler = unchecked
    loop()  # the config's (off)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        loop(check_finite=True)


@pytest.mark.parametrize("kind", ["analytic", "sn", "npr"])
def test_check_finite_override_gives_the_same_numbers(kind):
    scheduler, factor = make(kind)
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    for t in scheduler.timesteps:
        output = torch.rand(2, factor, 4, 4, generator=g)
        a = scheduler.step_distribution(output, t, x, apply_last_step_sigma_clip=False)
        b = scheduler.step_distribution(output, t, x, apply_last_step_sigma_clip=False, check_finite=False)
        for u, v in zip((a.mean, a.variance, a.pred_original_sample), (b.mean, b.variance, b.pred_original_sample)):
            assert torch.equal(u, v)


def test_model_device_dtype_reads_the_first_floating_parameter_then_buffer():
    class Model(torch.nn.Module):
        def __init__(self, parameter_dtype=None, buffer_dtype=None):
            super().__init__()
            if parameter_dtype is not None:
                self.weight = torch.nn.Parameter(torch.zeros(2, dtype=parameter_dtype))
            if buffer_dtype is not None:
                self.register_buffer("count", torch.zeros(2, dtype=buffer_dtype))

    assert model_device_dtype(Model(torch.float16, torch.float64)) == (torch.device("cpu"), torch.float16)
    assert model_device_dtype(Model(None, torch.bfloat16)) == (torch.device("cpu"), torch.bfloat16)
    assert model_device_dtype(Model(None, torch.long)) == (torch.device("cpu"), torch.float32)
    assert model_device_dtype(lambda x, t: x) == (torch.device("cpu"), torch.float32)
