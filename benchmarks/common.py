"""What the digits benchmarks (`quality_vs_steps.py`, `heads.py`, `data_free.py`) share: the held-out data and the
FID, seeded sampling and NLL (common random numbers), statistics over seeds, and the `--quick` defaults."""

from __future__ import annotations

import statistics

import torch
from digits_fid import DigitsFID

from analytic_schedulers import nll_bits_per_dim
from analytic_schedulers.data import quantize_8bit
from analytic_schedulers.datasets import digits_images
from analytic_schedulers.sampling import sample_images


def digits_evaluation(size: int, num_samples: int, nll_images: int, fid_epochs: int = 30):
    """`(fid, test_x0)`: the FID (`DigitsFID`, classifier seed 0) for `num_samples` samples, and the first
    `nll_images` held-out digits on the 8-bit grid, for the NLL."""
    fid = DigitsFID(size=size, seed=0, epochs=fid_epochs, num_samples=num_samples)
    return fid, quantize_8bit(digits_images("test", size))[:nll_images]


def seeded_samples(model, sampler, K: int, num_samples: int, batch_size: int, seed: int, stride: int) -> torch.Tensor:
    """`num_samples` samples at K steps, in batches of `batch_size`: image i starts from (and draws its step noise
    from) the generator seeded `seed * stride + i`, whatever the batch size."""
    chunks = []
    for begin in range(0, num_samples, batch_size):
        images = range(begin, min(begin + batch_size, num_samples))
        generators = [torch.Generator().manual_seed(seed * stride + i) for i in images]
        chunks.append(sample_images(model, sampler, K, generators))
    return torch.cat(chunks)


def seeded_nll(model, sampler, K: int, x0: torch.Tensor, seed: int) -> float:
    """The NLL bound (bits/dim, mean over `x0`) on the sampler's K-step trajectory, the forward noise from the
    generator seeded `seed`."""
    sampler.set_timesteps(K)
    return nll_bits_per_dim(model, sampler.scheduler, x0, generator=torch.Generator().manual_seed(seed)).mean().item()


def mean_std(values, one_value_std=0.0, torch_float64=False):
    """`(mean, std)` over seeds, the std `one_value_std` for one value; `(None, None)` when there is no value or one
    is None. `statistics.fmean` and `stdev`, or with `torch_float64` a float64 tensor's `mean` and `std` (their last
    bits differ: `quality_vs_steps.py` has always used torch)."""
    if not values or any(v is None for v in values):
        return None, None
    if torch_float64:
        tensor = torch.tensor(values, dtype=torch.float64)
        return tensor.mean().item(), (tensor.std().item() if len(values) > 1 else one_value_std)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else one_value_std)


def paired_difference(values, baseline, seeds, **mean_std_options):
    """`mean_std` over `seeds` of the paired differences `values[s] - baseline[s]` (two measurements with the same
    random numbers); `(None, None)` when a value is missing."""
    diffs = [None if values[s] is None or baseline[s] is None else values[s] - baseline[s] for s in seeds]
    return mean_std(diffs, **mean_std_options)


def apply_quick_defaults(args, parser, quick: dict) -> None:
    """Sets each argument of `quick` (`{dest: value}`) that the command line left at its default; what it sets
    explicitly stays."""
    for name, value in quick.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
