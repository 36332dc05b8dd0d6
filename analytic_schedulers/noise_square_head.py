"""The noise-square head of SN-DPM / NPR-DPM and its composition with a frozen noise-prediction UNet.

SN-DPM / NPR-DPM (Bao et al., ICML 2022) keep the pretrained noise network frozen and add a head on its last feature
map, the input of the output normalisation (`unet.conv_norm_out`): GroupNorm -> SiLU -> 3x3 conv to C channels, the
conv zero-initialised, optionally after one time-conditioned ResBlock. The head outputs `h ~ E[eps^2 | x_t]` (`"sn"`)
or `h ~ E[(eps - eps_hat)^2 | x_t]` (`"npr"`) per dimension. The backbone is a `UNet2DModel` (pixel or latent
diffusion) or a `UNet2DConditionModel` (Stable Diffusion 1/2): both end in `conv_norm_out -> conv_act -> conv_out`.

- `NoiseSquareHead` is the trainable part alone. Its folder (`save_pretrained`) holds `config.json` and
  `diffusion_pytorch_model.safetensors` with the head's weights only (about 2 KB): a model folder keeps it beside its
  `unet/` as `sn_head/` or `npr_head/`, and `load_head_model(folder, unet, subfolder="sn_head")` composes the two.
- `NoiseSquareHeadModel` is backbone + head, `forward(sample, timestep, ...).sample = cat([eps_hat, h], dim=1)` (2C
  channels), what `SNDPMScheduler` consumes. Its config holds both configs, so diffusers' own `save_pretrained` /
  `from_pretrained` write and read it as one model (one safetensors file, `unet.*` and `head.*` keys), also as the
  `unet` of a pipeline (it passes the pipeline's conditioning on to the backbone).

Folders written by analytic-schedulers 0.1 (a `NoiseSquareHeadModel` config with `backbone_path` /
`backbone_subfolder` and the head's weights keyed `head.*`) still load, with either loader.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput

__all__ = ["NoiseSquareHead", "NoiseSquareHeadModel", "load_head_model"]

COVARIANCE_TYPES = ("sn", "npr")
OUTPUT_ACTIVATIONS = ("softplus", "identity")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# softplus(0 + SOFTPLUS_SHIFT) = 1: the zero-initialised head starts at h = 1 = E[eps^2]
SOFTPLUS_SHIFT = math.log(math.e - 1.0)

BACKBONES = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}
# backbone config entries that pipelines read from `pipe.unet.config`, recorded in the head model's config
PIPELINE_KEYS = ("in_channels", "sample_size", "time_cond_proj_dim")

# the Hub options of diffusers' loaders, and those of `huggingface_hub.hf_hub_download` among them
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


class NoiseSquareHead(ModelMixin, ConfigMixin):
    """
    The trainable part of SN-DPM / NPR-DPM: `h` from the backbone's last feature map,
    `[ResBlock ->] GroupNorm -> SiLU -> zero-initialised 3x3 conv -> output activation`.

    Output activation: `"softplus"` (default) gives `h = softplus(r + log(e - 1)) > 0`, which is 1 = E[eps^2] for the
    zero-initialised head, so training starts from a sensible, positive `h` with a well-scaled gradient.
    `"identity"` gives `h = r` as in the official code (starts at 0; `h` may go negative, which the scheduler's
    bounds clip). The loss is a plain regression on `h` either way.

    Build one for a backbone with `NoiseSquareHead.for_backbone(unet)`; compose the two with
    `NoiseSquareHeadModel(unet=unet, head=head)`.

    Args:
        in_channels (`int`, defaults to 3): C, the sample's channels (the head's output channels).
        feature_channels (`int`, defaults to 128): channels of the backbone's last feature map
            (`block_out_channels[0]`).
        norm_num_groups (`int`, defaults to 32): groups of the head's GroupNorm (those of `conv_norm_out`).
        norm_eps (`float`, defaults to 1e-5): epsilon of the head's normalisations.
        covariance_type (`str`, defaults to `"sn"`): `"sn"` (`h ~ E[eps^2 | x_t]`) or `"npr"`
            (`h ~ E[(eps - eps_hat)^2 | x_t]`).
        resblock (`bool`, defaults to `False`): add one time-conditioned ResBlock before the output layers (the
            papers' "complex" head).
        temb_channels (`int`, *optional*): channels of the backbone's time embedding, needed when `resblock`.
        output_activation (`str`, defaults to `"softplus"`): `"softplus"` or `"identity"`, see above.
    """

    __module__ = "analytic_schedulers"  # the stable name pipelines record (see the package docstring)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        feature_channels: int = 128,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        covariance_type: str = "sn",
        resblock: bool = False,
        temb_channels: Optional[int] = None,
        output_activation: str = "softplus",
    ):
        super().__init__()
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"`covariance_type` must be one of {COVARIANCE_TYPES}, got {covariance_type!r}.")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"`output_activation` must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}.")
        if resblock and temb_channels is None:
            raise ValueError("`resblock=True` needs `temb_channels`, the channels of the backbone's time embedding.")
        # not `self.resblock`: a module named like a config entry would be shadowed by the config's value
        self.resnet = (
            ResnetBlock2D(in_channels=feature_channels, out_channels=feature_channels, temb_channels=temb_channels,
                          groups=norm_num_groups, eps=norm_eps)
            if resblock else None
        )
        self.norm = nn.GroupNorm(norm_num_groups, feature_channels, eps=norm_eps)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(feature_channels, in_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    @classmethod
    def for_backbone(
        cls,
        unet: Union[UNet2DModel, UNet2DConditionModel],
        covariance_type: str = "sn",
        resblock: bool = False,
        output_activation: str = "softplus",
    ) -> "NoiseSquareHead":
        """
        A new, zero-initialised head sized for `unet`: its channels, its `conv_norm_out` (feature channels, groups,
        epsilon) and, with `resblock`, its time embedding.

        Args:
            unet (`UNet2DModel` or `UNet2DConditionModel`): the backbone the head will sit on.
            covariance_type (`str`, defaults to `"sn"`): `"sn"` or `"npr"`.
            resblock (`bool`, defaults to `False`): add one ResBlock before the output layers.
            output_activation (`str`, defaults to `"softplus"`): `"softplus"` or `"identity"`.

        Returns:
            `NoiseSquareHead` on the CPU in float32 (composing it with the backbone moves it to the backbone's).
        """
        norm = _output_norm(unet)
        return cls(
            in_channels=unet.config.in_channels,
            feature_channels=norm.num_channels,
            norm_num_groups=norm.num_groups,
            norm_eps=norm.eps,
            covariance_type=covariance_type,
            resblock=resblock,
            temb_channels=unet.time_embedding.linear_2.out_features if resblock else None,
            output_activation=output_activation,
        )

    def forward(self, features: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor`): the backbone's last feature map, `(batch, feature_channels, height, width)`.
            temb (`torch.Tensor`, *optional*): the backbone's time embedding, used by the ResBlock.

        Returns:
            `torch.Tensor`: `h`, `(batch, C, height, width)`; float32 with the softplus activation.
        """
        if self.resnet is not None:
            features = self.resnet(features, temb)
        raw = self.conv(self.act(self.norm(features)))
        return apply_output_activation(raw, self.config.output_activation)


def apply_output_activation(raw: torch.Tensor, output_activation: str) -> torch.Tensor:
    """`h` from the head's raw conv output `r`: `softplus(r + log(e - 1))` (in float32) or `r` itself (`"identity"`)."""
    if output_activation == "softplus":
        return F.softplus(raw.float() + SOFTPLUS_SHIFT)
    return raw


class NoiseSquareHeadModel(ModelMixin, ConfigMixin):
    """
    A pretrained `UNet2DModel` or `UNet2DConditionModel` (frozen) with a noise-square head: `forward(sample,
    timestep, ...)` returns the backbone's output class whose `.sample` is `cat([eps_hat, h], dim=1)` (2C channels),
    `eps_hat` bit for bit the backbone's output. Use it with `SNDPMScheduler` as the `unet` of any pipeline that
    drives such a backbone, e.g. `DDPMPipeline(unet=head_model, scheduler=SNDPMScheduler.from_config(
    scheduler.config))`, or `pipe.unet = NoiseSquareHeadModel(unet=pipe.unet, head=head)` in Stable Diffusion: the
    pipeline's conditioning (`encoder_hidden_states`, `timestep_cond`, `cross_attention_kwargs`,
    `added_cond_kwargs`) goes to the backbone, and the backbone's `in_channels`, `sample_size` and
    `time_cond_proj_dim` are in this model's config, where pipelines read them.

    Under classifier-free guidance a pipeline combines the whole output of its two branches,
    `out_u + s (out_c - out_u)`, so the scheduler gets the guided `eps_hat` and `h_u + s (h_c - h_u)`: the
    per-dimension variance of a guided prediction is not identifiable from the two heads, and this linear combination
    is an approximation (see `docs/method.md`, "SN/NPR under guidance"). `guidance_rescale > 0` rescales `h` with
    `eps_hat`: keep it at 0 with a head.

    Build it with `NoiseSquareHeadModel.from_unet(unet, covariance_type="sn")` (or `NoiseSquareHeadModel(unet=unet,
    head=head)`), train the head with `train_noise_square_head`, compose a saved head with
    `load_head_model(head_folder, unet)`. `save_pretrained` / `from_pretrained` store backbone and head together.

    The backbone is frozen (`requires_grad_(False)`) and stays in `eval()` mode; the head moves to its device and
    dtype.

    Args:
        unet (`UNet2DModel` or `UNet2DConditionModel`, *optional*): the backbone; it must predict `epsilon` (or
            `v`/`x_0`, see the scheduler) with C output channels, or 2C for a learned-variance model, whose first C
            channels are used.
        head (`NoiseSquareHead`, *optional*): the head, sized for the backbone (`NoiseSquareHead.for_backbone`).
        unet_config (`dict`, *optional*): the backbone's config (with `_class_name`), to build it when `unet` is
            `None`, as `from_pretrained` does.
        head_config (`dict`, *optional*): the head's config, to build it when `head` is `None`.
        in_channels (`int`, *optional*), sample_size (`int`, *optional*), time_cond_proj_dim (`int`, *optional*):
            recorded from the backbone for pipelines (which read them from `unet.config`); when given they must
            match it.
    """

    __module__ = "analytic_schedulers"  # the stable name pipelines record (see the package docstring)

    def __init__(
        self,
        unet: Optional[UNet2DModel] = None,
        head: Optional[NoiseSquareHead] = None,
        unet_config: Optional[Dict[str, Any]] = None,
        head_config: Optional[Dict[str, Any]] = None,
        in_channels: Optional[int] = None,
        sample_size: Optional[Union[int, Tuple[int, int]]] = None,
        time_cond_proj_dim: Optional[int] = None,
    ):
        super().__init__()
        unet = unet if unet is not None else _backbone_from_config(unet_config)
        head = head if head is not None else _head_from_config(head_config)
        problems = _incompatibilities(unet, head)
        recorded = dict(in_channels=in_channels, sample_size=sample_size, time_cond_proj_dim=time_cond_proj_dim)
        for name, value in recorded.items():
            if value is not None and json.dumps(value) != json.dumps(unet.config.get(name)):
                problems.append(f"{name} {value} recorded, the backbone's is {unet.config.get(name)}")
        if problems:
            raise ValueError("This head was trained on another backbone: " + "; ".join(problems) + ". Compose it "
                             "with the backbone it was trained on.")
        unet.requires_grad_(False)
        unet.eval()
        self.unet = unet
        self.head = head.to(next(unet.parameters()))  # the backbone's device and dtype
        self.register_to_config(unet_config=_config_dict(unet), head_config=_config_dict(head),
                                **{name: unet.config.get(name) for name in PIPELINE_KEYS})
        # one backbone forward gives eps_hat and, through the hooks of the backbone's capture, the input of its output
        # normalisation (and its time embedding)
        self._capture = _BackboneCapture.of(unet)

    @classmethod
    def from_unet(
        cls,
        unet: Union[UNet2DModel, UNet2DConditionModel],
        covariance_type: str = "sn",
        resblock: bool = False,
        output_activation: str = "softplus",
    ) -> "NoiseSquareHeadModel":
        """
        Wraps a pretrained noise-prediction `UNet2DModel` or `UNet2DConditionModel` with a new, zero-initialised
        head (`NoiseSquareHead.for_backbone`).

        Args:
            unet (`UNet2DModel` or `UNet2DConditionModel`): the backbone, frozen by this call.
            covariance_type (`str`, defaults to `"sn"`): `"sn"` or `"npr"`.
            resblock (`bool`, defaults to `False`): add one ResBlock before the output layers.
            output_activation (`str`, defaults to `"softplus"`): `"softplus"` or `"identity"`.

        Returns:
            `NoiseSquareHeadModel` on the backbone's device and dtype.
        """
        head = NoiseSquareHead.for_backbone(unet, covariance_type, resblock, output_activation)
        return cls(unet=unet, head=head)

    @property
    def covariance_type(self) -> str:
        """`"sn"` or `"npr"`: what the head's `h` estimates."""
        return self.head.config.covariance_type

    def train(self, mode: bool = True):
        """Sets the head's training mode; the frozen backbone always stays in `eval()` mode."""
        super().train(mode)
        self.unet.eval()
        return self

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        *args,
        return_dict: bool = True,
        **kwargs,
    ) -> Union[UNet2DOutput, Tuple]:
        """
        Args:
            sample (`torch.Tensor`): the noisy sample `x_t`, `(batch, C, height, width)`.
            timestep (`torch.Tensor`, `float` or `int`): the timestep(s) `t`.
            args, kwargs: passed to the backbone as they come: `class_labels` for a `UNet2DModel`;
                `encoder_hidden_states`, `timestep_cond`, `cross_attention_kwargs`, `added_cond_kwargs`, ... for a
                `UNet2DConditionModel`, as Stable Diffusion pipelines pass them.
            return_dict (`bool`, defaults to `True`): return the backbone's output class (`UNet2DOutput`,
                `UNet2DConditionOutput`) instead of a tuple.

        Returns:
            The backbone's output class (or a 1-tuple) with `sample = cat([eps_hat, h], dim=1)`, 2C channels.
        """
        capture = self._capture
        capture.active = True
        try:
            output = self.unet(sample, timestep, *args, return_dict=True, **kwargs)
        finally:
            capture.active = False
            captured, capture.values = capture.values, {}
        C, eps = self.head.config.in_channels, output.sample
        if eps.shape[1] == 2 * C:  # a learned-variance backbone: its first C channels are eps
            eps = eps.split(C, dim=1)[0]
        features = captured["features"].to(self.head.conv.weight.dtype)
        temb = captured["temb"].to(features.dtype) if self.head.config.resblock else None
        h = self.head(features, temb).to(eps.dtype)
        out = torch.cat([eps, h], dim=1)
        return type(output)(sample=out) if return_dict else (out,)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike],
                        unet: Optional[Union[UNet2DModel, UNet2DConditionModel]] = None,
                        **kwargs) -> "NoiseSquareHeadModel":
        """
        Loads a `NoiseSquareHeadModel` saved with `save_pretrained` (diffusers' `ModelMixin.from_pretrained`, all
        its options). Also reads a `NoiseSquareHead` folder composed with `unet`, and folders written by
        analytic-schedulers 0.1 (with `unet`, or with the backbone they reference).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a Hub id or folder.
            unet (`UNet2DModel` or `UNet2DConditionModel`, *optional*): the backbone for a `NoiseSquareHead`
                folder or an old head folder; a saved `NoiseSquareHeadModel` holds its own.
            kwargs: as for `ModelMixin.from_pretrained` (`subfolder`, `torch_dtype`, Hub options, ...).

        Returns:
            `NoiseSquareHeadModel` in `eval()` mode.
        """
        subfolder = kwargs.get("subfolder")
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        is_head_folder = config.get("_class_name") == NoiseSquareHead.__name__
        if not (is_head_folder or _is_legacy_config(config)):
            if unet is not None:
                raise ValueError(f"{pretrained_model_name_or_path} holds a whole NoiseSquareHeadModel, backbone "
                                 "included: load it without `unet=`.")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if is_head_folder and unet is None:
            raise ValueError(f"{pretrained_model_name_or_path} holds a NoiseSquareHead alone: pass its backbone, "
                             "`from_pretrained(path, unet=pipe.unet)`, or use "
                             "`load_head_model(path, unet)`.")
        model = load_head_model(pretrained_model_name_or_path, unet, subfolder=subfolder, **hub_kwargs)
        torch_dtype = kwargs.get("torch_dtype")
        return model.to(torch_dtype) if torch_dtype is not None else model


def require_head_model(head_model) -> None:
    """Raises `TypeError` unless `head_model` is a `NoiseSquareHeadModel` (what training and fitting a head need)."""
    if not isinstance(head_model, NoiseSquareHeadModel):
        raise TypeError(f"`head_model` must be a `NoiseSquareHeadModel` (`NoiseSquareHeadModel.from_unet(unet)`), "
                        f"got {type(head_model).__name__}.")


class _BackboneCapture:
    """
    The input of a backbone's output normalisation (`"features"`) and its time embedding (`"temb"`) during the forward
    of a `NoiseSquareHeadModel`, read by two hooks on the backbone.

    One per backbone, shared by all the head models on it (`_BackboneCapture.of(unet)`): its hooks are registered once,
    when the first head model is built on the backbone, not per head model (they would pile up on a shared backbone)
    nor per call (so that `torch.compile` traces them). They keep what they see only while a head model's forward has
    switched `active` on, not in a forward of the bare backbone. It lives in the backbone's `__dict__`, not as a
    submodule or config entry: the backbone's `state_dict`, config and saved folders do not see it.
    """

    _KEY = "_noise_square_head_capture"

    def __init__(self, unet):
        self.active = False
        self.values: Dict[str, torch.Tensor] = {}
        unet.conv_norm_out.register_forward_pre_hook(self._keep_features)
        unet.time_embedding.register_forward_hook(self._keep_time_embedding)

    @classmethod
    def of(cls, unet) -> "_BackboneCapture":
        """The backbone's capture, made (and its hooks registered) on the first call."""
        capture = unet.__dict__.get(cls._KEY)
        if capture is None:
            capture = unet.__dict__[cls._KEY] = cls(unet)
        return capture

    def _keep_features(self, module, args) -> None:
        if self.active:
            self.values["features"] = args[0]

    def _keep_time_embedding(self, module, args, output) -> None:
        if self.active:
            self.values["temb"] = output


def load_head_model(location: Union[str, os.PathLike], unet, subfolder: Optional[str] = None,
                    **hub_kwargs) -> NoiseSquareHeadModel:
    """
    Composes a saved head with its backbone: `NoiseSquareHeadModel(unet=unet, head=NoiseSquareHead.from_pretrained(
    location, subfolder=subfolder))`.

    Args:
        location (`str` or `os.PathLike`): a folder or Hub id holding the head, e.g. a model folder with
            `subfolder="sn_head"`.
        unet (`UNet2DModel` or `UNet2DConditionModel`): the backbone the head was trained on. Only a folder written
            by analytic-schedulers 0.1 may leave it `None`: its backbone is then loaded from the reference in its
            config.
        subfolder (`str`, *optional*): the head's subfolder of `location`.
        hub_kwargs: Hub options (`cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`,
            `revision`).

    Returns:
        `NoiseSquareHeadModel` in `eval()` mode.
    """
    config = NoiseSquareHead.load_config(location, subfolder=subfolder, **hub_kwargs)
    if _is_legacy_config(config):
        return _load_legacy(location, subfolder, config, unet, hub_kwargs)
    if config.get("_class_name") != NoiseSquareHead.__name__:
        raise ValueError(
            f"{_where(location, subfolder)} holds a {config.get('_class_name')!r}, not a NoiseSquareHead (a folder "
            "written by `NoiseSquareHead.save_pretrained`). A saved NoiseSquareHeadModel loads with "
            "`NoiseSquareHeadModel.from_pretrained`."
        )
    if unet is None:
        raise ValueError(
            f"The head at {_where(location, subfolder)} is saved alone and needs the backbone it was trained on: pass "
            "`unet=` (e.g. `pipe.unet`, or `UNet2DModel.from_pretrained(<model>, subfolder=\"unet\")`)."
        )
    head = NoiseSquareHead.from_pretrained(location, subfolder=subfolder, **hub_kwargs)
    return NoiseSquareHeadModel(unet=unet, head=head).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Configs and compatibility
# ---------------------------------------------------------------------------------------------------------------------


def _config_dict(model: ConfigMixin) -> Dict[str, Any]:
    """A model's config as a JSON-able dict with its `_class_name`, without the other private entries."""
    public = {key: value for key, value in model.config.items() if not key.startswith("_")}
    return {"_class_name": type(model).__name__, **public}


def _backbone_from_config(config: Optional[Dict[str, Any]]):
    if config is None:
        raise ValueError("A NoiseSquareHeadModel needs its backbone: pass `unet=` (or `unet_config=`).")
    name = config.get("_class_name", UNet2DModel.__name__)
    if name not in BACKBONES:
        raise ValueError(f"The backbone must be one of {', '.join(BACKBONES)}; the config describes a {name!r}.")
    return BACKBONES[name].from_config(config)


def _output_norm(unet) -> nn.GroupNorm:
    """The backbone's output normalisation, whose input the head reads; `TypeError` for an unsupported backbone."""
    if not isinstance(unet, tuple(BACKBONES.values())):
        raise TypeError(f"The backbone must be a diffusers {' or '.join(BACKBONES)}, got {type(unet).__name__}.")
    if not isinstance(unet.conv_norm_out, nn.GroupNorm):
        raise TypeError(f"This {type(unet).__name__} has no GroupNorm `conv_norm_out` (norm_num_groups=None): the "
                        "head reads the input of that normalisation, so it cannot sit on this backbone.")
    return unet.conv_norm_out


def _head_from_config(config: Optional[Dict[str, Any]]) -> NoiseSquareHead:
    if config is None:
        raise ValueError("A NoiseSquareHeadModel needs its head: pass `head=` (`NoiseSquareHead.for_backbone(unet)`) "
                         "or `head_config=`, or use `NoiseSquareHeadModel.from_unet(unet)`.")
    return NoiseSquareHead.from_config(config)


def _incompatibilities(unet, head: NoiseSquareHead) -> list:
    """What keeps `head` from sitting on `unet` (channels, feature map, time embedding); empty when it fits."""
    norm = _output_norm(unet)
    if not isinstance(head, NoiseSquareHead):
        raise TypeError(f"The head must be a `NoiseSquareHead`, got {type(head).__name__}.")
    config, C = head.config, unet.config.in_channels
    problems = []
    if C != config.in_channels:
        problems.append(f"in_channels {C} != {config.in_channels}")
    if norm.num_channels != config.feature_channels:
        problems.append(f"last feature channels {norm.num_channels} != {config.feature_channels}")
    if unet.config.out_channels not in (C, 2 * C):
        problems.append(f"out_channels {unet.config.out_channels} is neither C={C} nor 2C")
    if config.resblock and unet.time_embedding.linear_2.out_features != config.temb_channels:
        problems.append(f"time embedding {unet.time_embedding.linear_2.out_features} != {config.temb_channels}")
    return problems


def _where(location, subfolder: Optional[str]) -> str:
    return f"{location}" + (f" (subfolder {subfolder!r})" if subfolder else "")


# ---------------------------------------------------------------------------------------------------------------------
# Folders written by analytic-schedulers 0.1
# ---------------------------------------------------------------------------------------------------------------------


_LEGACY_HEAD_KEYS = ("in_channels", "feature_channels", "norm_num_groups", "norm_eps", "covariance_type", "resblock",
                     "temb_channels", "output_activation")


def _is_legacy_config(config) -> bool:
    """A 0.1 head folder: a `NoiseSquareHeadModel` config with the head's entries and a backbone reference."""
    return config.get("_class_name") == NoiseSquareHeadModel.__name__ and "backbone_subfolder" in config


def _load_legacy(location, subfolder: Optional[str], config, unet: Optional[UNet2DModel],
                 hub_kwargs: Dict[str, Any]) -> NoiseSquareHeadModel:
    """A 0.1 folder: the head from its config's entries and its weights (`head.*`), on `unet` or the referenced one."""
    from safetensors.torch import load_file

    head = NoiseSquareHead(**{key: config[key] for key in _LEGACY_HEAD_KEYS if key in config})
    if os.path.isdir(location):
        weights = os.path.join(location, subfolder or "", WEIGHTS_NAME)
    else:
        from huggingface_hub import hf_hub_download

        download = {key: hub_kwargs[key] for key in _DOWNLOAD_KWARGS if hub_kwargs.get(key) is not None}
        weights = hf_hub_download(str(location), WEIGHTS_NAME, subfolder=subfolder, **download)
    # 0.1 keyed the head's weights `head.*` and called its ResBlock `resblock`
    state = {key.replace("head.", "", 1).replace("resblock.", "resnet.", 1): value
             for key, value in load_file(weights).items()}
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"The head's weights at {_where(location, subfolder)} do not match its config: "
                         f"{error}") from None
    if unet is None:
        unet = _legacy_backbone(location, subfolder, config, hub_kwargs)
    return NoiseSquareHeadModel(unet=unet, head=head).eval()


def _legacy_backbone(location, subfolder: Optional[str], config, hub_kwargs: Dict[str, Any]) -> UNet2DModel:
    """The backbone a 0.1 head folder references: `backbone_path` (with its subfolder), or a folder relative to the
    head's (`unet` inside it, `../unet` beside it)."""
    backbone_path, backbone_subfolder = config.get("backbone_path"), config.get("backbone_subfolder")
    if backbone_path is None and backbone_subfolder is None:
        raise ValueError(f"The head at {_where(location, subfolder)} does not say where its backbone is: pass "
                         "`unet=UNet2DModel.from_pretrained(...)`.")
    kwargs = dict(hub_kwargs)
    if backbone_path is not None:
        source = (str(backbone_path), backbone_subfolder)
        kwargs.pop("revision", None)  # a revision of the head's repository, not the backbone's
    elif os.path.isdir(location):
        source = (os.path.normpath(os.path.join(location, subfolder or "", backbone_subfolder)), None)
    else:  # another subfolder of the same Hub repository
        relative = posixpath.normpath(posixpath.join(subfolder or "", backbone_subfolder))
        if relative.startswith(".."):
            raise ValueError(f"The backbone reference {backbone_subfolder!r} leaves the repository {location}; "
                             "pass `unet=`.")
        source = (str(location), None if relative == "." else relative)
    try:
        return UNet2DModel.from_pretrained(source[0], subfolder=source[1], **kwargs)
    except (OSError, ValueError) as error:
        raise OSError(f"Could not load the head's backbone UNet2DModel from {_where(*source)}: {error}. Pass it "
                      "yourself: `unet=UNet2DModel.from_pretrained(...)`.") from error
