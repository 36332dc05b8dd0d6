"""A `torch.compile`d UNet in a sampling loop with our scheduler compiles once: no recompilation across steps.

The timesteps passed to the model are the entries of `scheduler.timesteps` (0-dim int64 tensors), so dynamo does not
specialise on their values. The backend is `aot_eager`: it traces the same graph as inductor (the one that would
recompile) but skips code generation; inductor took about 90 s on a 2-core CI machine, over this test's budget.
"""

import torch

from torch._dynamo.utils import counters

from analytic_schedulers import AnalyticDPMScheduler
from helpers import sample_loop


def eager_and_compiled_loops(model, scheduler):
    """A 10-step loop with `model`, then the same loop with `torch.compile(model)` on fresh dynamo counters."""
    scheduler.set_timesteps(10)
    with torch.no_grad():
        eager = sample_loop(scheduler, model, 2)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    scheduler.set_timesteps(10)
    with torch.no_grad():
        out = sample_loop(scheduler, compiled, 2)
    return eager, compiled, out


def test_compiled_unet_compiles_once_across_the_sampling_loop(tiny_unet):
    """`tiny_unet` (conftest): sample_size 8, 1 channel, block_out_channels (8, 16), DownBlock2D / UpBlock2D."""
    scheduler = AnalyticDPMScheduler(gamma=[0.9] * 1000)
    eager, compiled, out = eager_and_compiled_loops(tiny_unet, scheduler)
    assert counters["frames"]["total"] == 1 and counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)

    # a second loop, and an img2img loop from the middle, reuse the graph
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps[4:]:
            x = scheduler.step(compiled(x, t).sample, t, x, generator=generator).prev_sample
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compiled_head_model_compiles_once_and_matches_eager(tiny_unet):
    """The head model reads the backbone's features through hooks registered once, which dynamo traces."""
    from analytic_schedulers import NoiseSquareHeadModel, SNDPMScheduler

    model = NoiseSquareHeadModel.from_unet(tiny_unet, covariance_type="npr", resblock=True)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05)
    eager, _, out = eager_and_compiled_loops(model, SNDPMScheduler(covariance_type="npr"))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
