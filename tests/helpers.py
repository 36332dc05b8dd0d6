"""Helpers shared by the tests (importable because pytest puts this folder on sys.path)."""

import io
import logging

import torch


def sample_loop(scheduler, model, num_samples, seed=0, shape=(1, 8, 8), **step_kwargs):
    """Runs `scheduler` over its timesteps from seeded noise with `model(x, t).sample`; returns the samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num_samples, *shape), generator=g)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=g, **step_kwargs).prev_sample
    return x


class DiffusersLog:
    """Captures what diffusers logs (its loggers do not propagate to the root logger)."""

    def __enter__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        logging.getLogger("diffusers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers").removeHandler(self.handler)

    @property
    def text(self):
        return self.stream.getvalue()
