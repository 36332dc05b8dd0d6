"""The exact noise-prediction model of Gaussian data, a diffusers model with no trained weights.

For data `x_0 ~ N(m, diag(s^2))` and `x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps`, per dimension:

- `E[eps | x_t] = sqrt(bbar_t) (x_t - sqrt(abar_t) m) / (abar_t s^2 + bbar_t)`,
- `Var[eps | x_t] = abar_t s^2 / (abar_t s^2 + bbar_t)`,
- `Gamma_t = E||E[eps | x_t]||^2 / d = mean over dims of bbar_t / (abar_t s^2 + bbar_t)`, for any mean `m`.

With this model the true reverse process is known, so it tells an exact sampler from an almost exact one
(`docs/method.md#checks-with-gaussian-data`).
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

OUTPUTS = ("epsilon", "v_prediction", "sample", "sn", "npr")


class GaussianDataModel(ModelMixin, ConfigMixin):
    """
    The Bayes-optimal model for Gaussian data, with the call signature of `UNet2DModel`.

    Args:
        sample_size (`int`): height and width of a sample.
        in_channels (`int`): channels of a sample.
        data_mean (`float` or `List[float]`): `m`, one value or one per dimension (`C*H*W`, row-major).
        data_std (`float` or `List[float]`): `s`, one value or one per dimension.
        alphas_cumprod (`List[float]`): the schedule's `abar_t`, e.g. `scheduler.alphas_cumprod.tolist()`.
        output (`str`, defaults to `"epsilon"`): what `forward` returns: `"epsilon"`, `"v_prediction"` or `"sample"`
            (C channels), or `"sn"` / `"npr"`: `[E[eps | x_t], h]` with `h = E[eps^2 | x_t]` (SN-DPM) or
            `h = Var[eps | x_t]` (NPR-DPM), 2C channels.
    """

    __module__ = "analytic_schedulers"  # the stable name pipelines record (see the package docstring)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        data_mean: Union[float, List[float]] = 0.0,
        data_std: Union[float, List[float]] = 0.3,
        alphas_cumprod: Optional[List[float]] = None,
        output: str = "epsilon",
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"`output` must be one of {OUTPUTS}, got {output!r}.")
        if alphas_cumprod is None:
            raise ValueError("Pass the schedule: `alphas_cumprod=scheduler.alphas_cumprod.tolist()`.")
        shape = (in_channels, sample_size, sample_size)
        self.register_buffer("mean_x0", self._per_dim(data_mean, shape), persistent=False)
        self.register_buffer("std_x0", self._per_dim(data_std, shape), persistent=False)
        self.register_buffer("abar", torch.tensor(alphas_cumprod, dtype=torch.float64), persistent=False)

    @staticmethod
    def _per_dim(value, shape) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float32)
        if tensor.numel() == 1:
            return tensor.reshape(1).expand(shape).clone()
        if tensor.numel() != shape[0] * shape[1] * shape[2]:
            raise ValueError(f"Expected one value or {shape[0] * shape[1] * shape[2]} values, got {tensor.numel()}.")
        return tensor.reshape(shape)

    @classmethod
    def from_scheduler(cls, scheduler, data_mean=0.0, data_std=0.3, sample_size=8, in_channels=1,
                       output="epsilon") -> "GaussianDataModel":
        """The exact model for `scheduler`'s noise schedule."""
        to_list = lambda v: v.flatten().tolist() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return cls(sample_size=sample_size, in_channels=in_channels, data_mean=to_list(data_mean),
                   data_std=to_list(data_std), alphas_cumprod=scheduler.alphas_cumprod.double().tolist(),
                   output=output)

    def sample_data(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """`num_samples` draws of `x_0`, float32, shape `[N, C, H, W]`."""
        noise = torch.randn((num_samples, *self.mean_x0.shape), generator=generator)
        return self.mean_x0 + self.std_x0 * noise

    def exact_gamma(self) -> torch.Tensor:
        """`Gamma_t = E||E[eps | x_t]||^2 / d` for every training timestep, float64, shape `[T]`."""
        abar = self.abar[:, None]
        var = self.std_x0.double().flatten()[None] ** 2
        # x_t - sqrt(abar) m has variance abar s^2 + bbar, so E[E[eps|x_t]^2] = bbar / (abar s^2 + bbar)
        return ((1 - abar) / (abar * var + (1 - abar))).mean(dim=1)

    def posterior_eps(self, sample: torch.Tensor, timestep) -> tuple:
        """`(E[eps | x_t], Var[eps | x_t])`, float64, for a batch."""
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        abar = self.abar.to(sample.device)[t].reshape(-1, 1, 1, 1)
        var = self.std_x0.double() ** 2
        denom = abar * var + (1 - abar)
        x = sample.double()
        eps_mean = (1 - abar).sqrt() * (x - abar.sqrt() * self.mean_x0.double()) / denom
        eps_var = (abar * var / denom).expand_as(x)
        return eps_mean, eps_var

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True, **unused) -> UNet2DOutput:
        eps_mean, eps_var = self.posterior_eps(sample, timestep)
        output = self.config.output
        if output in ("sn", "npr"):
            h = eps_var + eps_mean**2 if output == "sn" else eps_var
            out = torch.cat([eps_mean, h], dim=1)
        elif output == "epsilon":
            out = eps_mean
        else:
            t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
            abar = self.abar.to(sample.device)[t].reshape(-1, 1, 1, 1)
            x0 = (sample.double() - (1 - abar).sqrt() * eps_mean) / abar.sqrt()
            out = x0 if output == "sample" else abar.sqrt() * eps_mean - (1 - abar).sqrt() * x0
        out = out.to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)
