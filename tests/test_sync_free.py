"""The schedulers never read a tensor back from the accelerator during a sampling loop.

A read-back is a call to `aten._local_scalar_dense` (`.item()`, `int(t)`, `float(t)`, `if tensor:`), `aten.is_nonzero`,
`aten.item`, `aten.nonzero`, `aten.equal`, or `.tolist()` / `.numpy()` / `.cpu()`; on an accelerator each one waits for
the device. These are dispatched or called on the CPU too, so `helpers.ReadBackCounter` proves the property without a
GPU. The model call stays outside the counted region.
"""

import pytest
import torch

from analytic_schedulers import AnalyticDPMScheduler, SNDPMScheduler
from helpers import ReadBackCounter

SHAPE = (2, 1, 4, 4)
KINDS = ["analytic-table", "analytic-batch", "sn", "npr"]


def make_scheduler(kind, **config):
    if kind == "analytic-table":
        return AnalyticDPMScheduler(gamma=torch.linspace(0.2, 0.95, 1000), **config)
    if kind == "analytic-batch":
        return AnalyticDPMScheduler(gamma_from_batch=True, **config)
    return SNDPMScheduler(covariance_type=kind, **config)


def toy_model(scheduler, x, t):
    """A model output of the right kind, without a read-back (`t` stays a tensor)."""
    prediction = 0.3 * x + 0.0007 * t - 0.2
    if isinstance(scheduler, SNDPMScheduler):
        return torch.cat([prediction, prediction.square() + 0.05], 1)
    return prediction


def read_backs_per_step(scheduler, timesteps=None, x=None, every_call=True, **step_kwargs):
    """Runs the loop over `timesteps` (default: all) and counts the read-backs of each step's scheduler calls
    (`every_call=False`: of `step` alone)."""
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator) if x is None else x
    noise = torch.randn(SHAPE, generator=generator)
    batch_timesteps = timesteps[:1].repeat(SHAPE[0])  # a batch of timesteps, as pipelines pass to add_noise
    counts = []
    for t in timesteps:
        model_output = toy_model(scheduler, x, t)
        with ReadBackCounter() as counter:
            if every_call:
                model_input = scheduler.scale_model_input(x, t)
                scheduler.add_noise(model_input, noise, batch_timesteps)
                scheduler.get_velocity(model_input, noise, batch_timesteps)
                scheduler.previous_timestep(t)
                scheduler.step_distribution(model_output, t, x)
            x = scheduler.step(model_output, t, x, generator=generator, **step_kwargs).prev_sample
        counts.append(counter.count)
    return counts


def test_counter_catches_a_read_back():
    x = torch.randn(3)
    with ReadBackCounter() as counter:
        x.sum().item()
    assert counter.count == 1
    with ReadBackCounter() as counter:
        if (x > 10).any():
            pass
        int(x[0])
    assert counter.count == 2

    class ReadingScheduler(AnalyticDPMScheduler):  # the pre-change step read Gamma_t with `.item()`
        def _x0_variance(self, t, abar_t, eps_hat, extra):
            return super()._x0_variance(t, abar_t, eps_hat, extra) + 0.0 * eps_hat.mean().item()

    scheduler = ReadingScheduler(gamma=[0.5] * 1000, check_finite=False)
    scheduler.set_timesteps(10, device="cpu")
    assert read_backs_per_step(scheduler, every_call=False) == [1] * 9 + [0]  # the last step returns x0_hat


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("x0_bound", ["none", "clip", "threshold"])
def test_sampling_loop_never_reads_the_accelerator(kind, eta, prediction_type, x0_bound):
    scheduler = make_scheduler(kind, eta=eta, prediction_type=prediction_type, clip_sample=x0_bound == "clip",
                               thresholding=x0_bound == "threshold", timestep_spacing="linspace",
                               check_finite=False)
    scheduler.set_timesteps(10, device="cpu")
    assert read_backs_per_step(scheduler) == [0] * 10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_finite_check_reads_one_flag_at_the_last_step(kind, set_alpha_to_one):
    scheduler = make_scheduler(kind, set_alpha_to_one=set_alpha_to_one, last_step_sigma_clip=1.0)
    scheduler.set_timesteps(10, device="cpu")
    assert read_backs_per_step(scheduler, every_call=False) == [0] * 9 + [1]
    assert read_backs_per_step(scheduler, every_call=False, use_clipped_model_output=True, eta=0.5) == [0] * 9 + [1]


@pytest.mark.parametrize("kind", ["analytic-table", "sn"])
def test_checking_the_tables_channels_reads_nothing(kind):
    scheduler = make_scheduler(kind, gamma_sample_shape=list(SHAPE[1:]), check_finite=False,
                               **({"gamma": [0.5] * 1000} if kind == "sn" else {}))
    scheduler.set_timesteps(10, device="cpu")
    assert read_backs_per_step(scheduler) == [0] * 10


def test_img2img_loop_never_reads_the_accelerator():
    scheduler = make_scheduler("analytic-table", check_finite=False)
    scheduler.set_timesteps(10, device="cpu")
    start = 4
    scheduler.set_begin_index(start)  # as StableDiffusionImg2ImgPipeline: set_begin_index, then add_noise
    timesteps = scheduler.timesteps[start:]
    with ReadBackCounter() as counter:
        x = scheduler.add_noise(torch.zeros(SHAPE), torch.randn(SHAPE), timesteps[:1].repeat(SHAPE[0]))
    assert counter.count == 0
    assert read_backs_per_step(scheduler, timesteps, x) == [0] * 6


def test_int_timesteps_never_read_and_foreign_tensors_are_read_once():
    scheduler = make_scheduler("analytic-table", check_finite=False)
    scheduler.set_timesteps(10, device="cpu")
    x = torch.randn(SHAPE)
    with ReadBackCounter() as counter:
        for t in scheduler._trajectory:
            x = scheduler.step(toy_model(scheduler, x, float(t)), t, x).prev_sample
    assert counter.count == 0
    # a tensor that is not an entry of `scheduler.timesteps` (a copy) is read: the fallback that stays correct
    with ReadBackCounter() as counter:
        scheduler.step(toy_model(scheduler, x, 900.0), scheduler.timesteps[0].clone(), x)
    assert counter.count == 1


# ------------------------------------------------------------------------------------------------ same samples

# final samples of a 10-step loop (seed 0, shape (2, 1, 2, 2)), recorded with the step as it was before it became
# sync-free (commit 63c9f83): the position tracking must not change the math
RECORDED = {
    "analytic-ddpm-clip-eps": [-0.7327327132225037, 0.5945680141448975, -0.6185367107391357, -0.2580292522907257,
                               0.22089074552059174, 1.0, 0.8137027025222778, 0.0683838278055191],
    "analytic-ddim-v": [0.1474657654762268, -0.042513035237789154, -1.1314401626586914, 0.396202951669693,
                        -0.1638467162847519, 0.12026407569646835, 0.6547590494155884, 0.43540462851524353],
    "analytic-batch-threshold-sample": [-0.2502288520336151, -0.24730731546878815, -0.28561797738075256,
                                        -0.22245462238788605, -0.19378836452960968, -0.14968982338905334,
                                        -0.16831019520759583, -0.25931787490844727],
    "analytic-eta05-lastclip-clipped": [0.875225305557251, 0.40865346789360046, -1.0, -0.6743111610412598,
                                        -0.6524332761764526, 0.6771790385246277, 1.0, -0.00010583333641989157],
    "sn-ddpm-eps": [-0.08993751555681229, 0.585237979888916, -0.7038186192512512, -0.5398798584938049,
                    -0.16615960001945496, 1.0, 0.9499521255493164, -0.0032332141418009996],
    "npr-ddim-v-threshold": [0.5771615505218506, -0.05213585123419762, -0.8275499939918518, 0.16915108263492584,
                             -0.3762478530406952, -0.17281094193458557, 0.42014116048812866, 0.29303881525993347],
}
RECORDED_CASES = {
    "analytic-ddpm-clip-eps": ("analytic-table", dict(eta=1.0, clip_sample=True), {}),
    "analytic-ddim-v": ("analytic-table", dict(eta=0.0, clip_sample=False, prediction_type="v_prediction"), {}),
    "analytic-batch-threshold-sample": ("analytic-batch", dict(eta=1.0, thresholding=True, prediction_type="sample"),
                                        {}),
    "analytic-eta05-lastclip-clipped": ("analytic-table", dict(eta=0.5, last_step_sigma_clip=1.0),
                                        dict(use_clipped_model_output=True)),
    "sn-ddpm-eps": ("sn", dict(eta=1.0), {}),
    "npr-ddim-v-threshold": ("npr", dict(eta=0.0, prediction_type="v_prediction", thresholding=True), {}),
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_same_samples_as_before_the_step_was_sync_free(name):
    kind, config, step_kwargs = RECORDED_CASES[name]
    scheduler = make_scheduler(kind, timestep_spacing="linspace", **config)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2, 1, 2, 2), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(scheduler, x, float(t)), t, x, generator=generator, **step_kwargs).prev_sample
    torch.testing.assert_close(x.flatten(), torch.tensor(RECORDED[name]), rtol=1e-6, atol=1e-6)
