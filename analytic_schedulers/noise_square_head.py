"""`NoiseSquareHeadModel`: a frozen noise-prediction `UNet2DModel` plus a small trained head that outputs `h`.

SN-DPM / NPR-DPM (Bao et al., ICML 2022) keep the pretrained noise network frozen and add a head on its last feature
map, the input of the output normalisation (`unet.conv_norm_out`): GroupNorm -> SiLU -> 3x3 conv to C channels, the
conv zero-initialised, optionally after one ResBlock. The model's output is `cat([eps_hat, h], dim=1)`, 2C channels,
with `h ~ E[eps^2 | x_t]` (`"sn"`) or `h ~ E[(eps - eps_hat)^2 | x_t]` (`"npr"`): what `SNDPMScheduler` consumes.

Saving: the head's folder holds `config.json` (the head's hyperparameters and where its backbone lives) and
`diffusion_pytorch_model.safetensors` (the head's weights only). The backbone is either saved alongside, in the
`unet/` subfolder, or referenced: a Hub id or folder (`backbone_path`, with `backbone_subfolder`), or a folder relative
to the head's own (`backbone_path=None`, `backbone_subfolder="../unet"` for a sibling folder).
"""

from __future__ import annotations

import math
import os
import posixpath
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.hub_utils import _get_model_file
from safetensors.torch import load_file, save_file

COVARIANCE_TYPES = ("sn", "npr")
OUTPUT_ACTIVATIONS = ("softplus", "identity")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BACKBONE_SUBFOLDER = "unet"

# softplus(0 + SOFTPLUS_SHIFT) = 1: the zero-initialised head starts at h = 1 = E[eps^2]
SOFTPLUS_SHIFT = math.log(math.e - 1.0)

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


class NoiseSquareHead(nn.Module):
    """The trainable part: [ResBlock ->] GroupNorm -> SiLU -> zero-initialised 3x3 conv, on the backbone's features.

    Returns the raw output `r`; `NoiseSquareHeadModel` maps it to `h` with its output activation.
    """

    def __init__(self, feature_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float,
                 resblock: bool = False, temb_channels: Optional[int] = None):
        super().__init__()
        self.resblock = (
            ResnetBlock2D(in_channels=feature_channels, out_channels=feature_channels, temb_channels=temb_channels,
                          groups=norm_num_groups, eps=norm_eps)
            if resblock else None
        )
        self.norm = nn.GroupNorm(norm_num_groups, feature_channels, eps=norm_eps)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(feature_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.resblock is not None:
            features = self.resblock(features, temb)
        return self.conv(self.act(self.norm(features)))


class NoiseSquareHeadModel(ModelMixin, ConfigMixin):
    """
    A pretrained `UNet2DModel` (frozen) with a noise-square head: `forward(sample, timestep)` returns a
    `UNet2DOutput` whose `.sample` is `cat([eps_hat, h], dim=1)` (2C channels), `eps_hat` bit for bit the backbone's
    output. Use it with `SNDPMScheduler` in any pipeline that drives a `UNet2DModel`, e.g.
    `DDPMPipeline(unet=head_model, scheduler=SNDPMScheduler.from_config(scheduler.config))`.

    Build it with `NoiseSquareHeadModel.from_unet(unet, covariance_type="sn")`, train the head with
    `train_noise_square_head`, and load a saved one with `NoiseSquareHeadModel.from_pretrained(path)` (the backbone
    found from the head's config) or `NoiseSquareHeadModel.from_pretrained(head_path, unet=unet)`.

    Output activation: `"softplus"` (default) gives `h = softplus(r + log(e - 1)) > 0`, which is 1 = E[eps^2] for the
    zero-initialised head, so training starts from a sensible, positive `h` with a well-scaled gradient.
    `"identity"` gives `h = r` as in the official code (starts at 0; `h` may go negative, which the scheduler's
    bounds clip). The loss is a plain regression on `h` either way.

    Args:
        in_channels (`int`, defaults to 3): C, the sample's channels (also the head's output channels).
        sample_size (`int`, *optional*): the sample's height and width, copied from the backbone for pipelines.
        feature_channels (`int`, defaults to 128): channels of the backbone's last feature map
            (`block_out_channels[0]`).
        norm_num_groups (`int`, defaults to 32): groups of the head's GroupNorm (the backbone's `conv_norm_out`).
        norm_eps (`float`, defaults to 1e-5): epsilon of the head's normalisations.
        covariance_type (`str`, defaults to `"sn"`): `"sn"` (`h ~ E[eps^2 | x_t]`) or `"npr"`
            (`h ~ E[(eps - eps_hat)^2 | x_t]`).
        resblock (`bool`, defaults to `False`): add one time-conditioned ResBlock before the output layers (the
            papers' "complex" head).
        temb_channels (`int`, *optional*): channels of the backbone's time embedding, needed when `resblock`.
        output_activation (`str`, defaults to `"softplus"`): `"softplus"` or `"identity"`, see above.
        backbone_path (`str`, *optional*): Hub id or folder of the backbone; `None` means relative to the head's
            own folder.
        backbone_subfolder (`str`, *optional*): subfolder of `backbone_path` (or, when `backbone_path` is `None`,
            a path relative to the head's folder such as `"unet"` or `"../unet"`).
    """

    ignore_for_config = ["unet"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: Optional[int] = None,
        feature_channels: int = 128,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        covariance_type: str = "sn",
        resblock: bool = False,
        temb_channels: Optional[int] = None,
        output_activation: str = "softplus",
        backbone_path: Optional[str] = None,
        backbone_subfolder: Optional[str] = None,
        unet: Optional[UNet2DModel] = None,
    ):
        super().__init__()
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"`covariance_type` must be one of {COVARIANCE_TYPES}, got {covariance_type!r}.")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"`output_activation` must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}.")
        if resblock and temb_channels is None:
            raise ValueError("`resblock=True` needs `temb_channels`, the channels of the backbone's time embedding.")
        self.head = NoiseSquareHead(feature_channels, in_channels, norm_num_groups, norm_eps, resblock, temb_channels)
        self.unet: Optional[UNet2DModel] = None
        # where the backbone was loaded from, (path, subfolder), to reference it when saving the head alone
        self._backbone_source: Optional[Tuple[str, Optional[str]]] = None
        if unet is not None:
            self.attach_backbone(unet)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DModel,
        covariance_type: str = "sn",
        resblock: bool = False,
        output_activation: str = "softplus",
        backbone_path: Optional[str] = None,
        backbone_subfolder: Optional[str] = None,
    ) -> "NoiseSquareHeadModel":
        """
        Wraps a pretrained noise-prediction `UNet2DModel` with a new, zero-initialised head.

        The backbone is frozen (`requires_grad_(False)`, `eval()`).

        Args:
            unet (`UNet2DModel`): the backbone; it must predict `epsilon` with C output channels (or 2C for a
                learned-variance model, whose first C channels are used).
            covariance_type (`str`, defaults to `"sn"`): `"sn"` or `"npr"`.
            resblock (`bool`, defaults to `False`): add one ResBlock before the output layers.
            output_activation (`str`, defaults to `"softplus"`): `"softplus"` or `"identity"`.
            backbone_path, backbone_subfolder (`str`, *optional*): where the backbone can be found when the head is
                shared alone (a Hub id or folder, and a subfolder in it).

        Returns:
            `NoiseSquareHeadModel` on the backbone's device and dtype.
        """
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"`unet` must be a diffusers `UNet2DModel`, got {type(unet).__name__}.")
        norm = unet.conv_norm_out
        model = cls(
            in_channels=unet.config.in_channels,
            sample_size=unet.config.sample_size,
            feature_channels=norm.num_channels,
            norm_num_groups=norm.num_groups,
            norm_eps=norm.eps,
            covariance_type=covariance_type,
            resblock=resblock,
            temb_channels=unet.time_embedding.linear_2.out_features if resblock else None,
            output_activation=output_activation,
            backbone_path=backbone_path,
            backbone_subfolder=backbone_subfolder,
            unet=unet,
        )
        return model

    def attach_backbone(self, unet: UNet2DModel) -> None:
        """Attaches (and freezes) the backbone `UNet2DModel`, after checking that it fits the head."""
        config = self.config
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"The backbone must be a diffusers `UNet2DModel`, got {type(unet).__name__}.")
        C = unet.config.in_channels
        problems = []
        if C != config.in_channels:
            problems.append(f"in_channels {C} != {config.in_channels}")
        if unet.conv_norm_out.num_channels != config.feature_channels:
            problems.append(f"last feature channels {unet.conv_norm_out.num_channels} != {config.feature_channels}")
        if unet.config.out_channels not in (C, 2 * C):
            problems.append(f"out_channels {unet.config.out_channels} is neither C={C} nor 2C")
        if config.resblock and unet.time_embedding.linear_2.out_features != config.temb_channels:
            problems.append(f"time embedding {unet.time_embedding.linear_2.out_features} != {config.temb_channels}")
        if problems:
            raise ValueError("This head was trained on another backbone: " + "; ".join(problems) + ".")
        unet.requires_grad_(False)
        unet.eval()
        self.unet = unet
        self.head.to(device=next(unet.parameters()).device, dtype=next(unet.parameters()).dtype)

    def train(self, mode: bool = True):
        """Sets the head's training mode; the frozen backbone always stays in `eval()` mode."""
        super().train(mode)
        if self.unet is not None:
            self.unet.eval()
        return self

    def head_parameters(self):
        """The trainable parameters (the head's only)."""
        return self.head.parameters()

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, Tuple]:
        """
        Args:
            sample (`torch.Tensor`): the noisy sample `x_t`, `(batch, C, height, width)`.
            timestep (`torch.Tensor`, `float` or `int`): the timestep(s) `t`.
            class_labels (`torch.Tensor`, *optional*): passed to a class-conditional backbone.
            return_dict (`bool`, defaults to `True`): return a `UNet2DOutput` instead of a tuple.

        Returns:
            `UNet2DOutput` (or a 1-tuple) with `sample = cat([eps_hat, h], dim=1)`, 2C channels.
        """
        if self.unet is None:
            raise RuntimeError(
                "This NoiseSquareHeadModel has no backbone: load it with "
                "`NoiseSquareHeadModel.from_pretrained(head_path, unet=UNet2DModel.from_pretrained(...))` or call "
                "`attach_backbone(unet)`."
            )
        captured = {}

        def keep_features(module, args):
            captured["features"] = args[0]

        def keep_temb(module, args, output):
            captured["temb"] = output

        # one backbone forward gives both eps_hat and the feature map at the input of its output normalisation
        hooks = [self.unet.conv_norm_out.register_forward_pre_hook(keep_features)]
        if self.config.resblock:
            hooks.append(self.unet.time_embedding.register_forward_hook(keep_temb))
        try:
            eps = self.unet(sample, timestep, class_labels=class_labels).sample
        finally:
            for hook in hooks:
                hook.remove()
        C = self.config.in_channels
        if eps.shape[1] == 2 * C:  # a learned-variance backbone: its first C channels are eps
            eps = eps.split(C, dim=1)[0]
        features = captured["features"].to(self.head.conv.weight.dtype)
        temb = captured.get("temb")
        raw = self.head(features, None if temb is None else temb.to(features.dtype))
        h = self._activation(raw).to(eps.dtype)
        out = torch.cat([eps, h], dim=1)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def _activation(self, raw: torch.Tensor) -> torch.Tensor:
        if self.config.output_activation == "softplus":
            return F.softplus(raw.float() + SOFTPLUS_SHIFT)
        return raw

    # ------------------------------------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        save_backbone: bool = True,
        backbone_path: Optional[str] = None,
        backbone_subfolder: Optional[str] = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """
        Saves the head's config (`config.json`) and weights (`diffusion_pytorch_model.safetensors`, the head only).

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            save_backbone (`bool`, defaults to `True`): also save the backbone in `save_directory/unet` (a
                self-contained folder). With `False`, only the head is written and the config references the backbone:
                by `backbone_path`/`backbone_subfolder` if given, else by the reference in the config, else by where
                the backbone was loaded from.
            backbone_path (`str`, *optional*): a Hub id or folder of the backbone, or `None` for a folder relative to
                the head's folder.
            backbone_subfolder (`str`, *optional*): a subfolder of `backbone_path`, or relative to the head's folder
                (`"../unet"` for a sibling folder, as in a diffusers pipeline folder).
            is_main_process (`bool`, defaults to `True`): only the main process writes (distributed training).
            push_to_hub (`bool`, defaults to `False`): upload the folder to the Hub afterwards (`repo_id`, `token`,
                `private`, `commit_message`, `create_pr` taken from `kwargs`).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) must be a folder, not a file.")
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        if save_backbone:
            if self.unet is None:
                raise ValueError("There is no backbone to save; use `save_backbone=False`.")
            self.unet.save_pretrained(os.path.join(save_directory, BACKBONE_SUBFOLDER), safe_serialization=True)
            reference = (None, BACKBONE_SUBFOLDER)
        elif backbone_path is not None or backbone_subfolder is not None:
            reference = (backbone_path, backbone_subfolder)
        elif self.config.backbone_path is not None:
            reference = (self.config.backbone_path, self.config.backbone_subfolder)
        elif self._backbone_source is not None:
            reference = self._backbone_source
        else:
            raise ValueError(
                "`save_backbone=False` needs to know where the backbone lives: pass `backbone_path` (a Hub id or "
                "folder) and/or `backbone_subfolder` (e.g. '../unet' for a sibling folder)."
            )
        # write the config with the reference, without changing this model's own config
        internal = self._internal_dict
        try:
            self.register_to_config(backbone_path=reference[0], backbone_subfolder=reference[1])
            self.save_config(save_directory)
        finally:
            self._internal_dict = internal
        state = {f"head.{name}": tensor.detach().contiguous().cpu() for name, tensor in self.head.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip("/").split("/")[-1])
            token = kwargs.pop("token", None)
            repo_id = create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None), token=token).repo_id
            self._upload_folder(str(save_directory), repo_id, token=token,
                                commit_message=kwargs.pop("commit_message", None),
                                create_pr=kwargs.pop("create_pr", False))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        unet: Optional[UNet2DModel] = None,
        subfolder: Optional[str] = None,
        torch_dtype: Optional[torch.dtype] = None,
        **kwargs,
    ) -> "NoiseSquareHeadModel":
        """
        Loads a saved head and attaches its backbone.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a Hub id or folder written by `save_pretrained`.
            unet (`UNet2DModel`, *optional*): the backbone to attach. Without it, the backbone is loaded from the
                reference in the head's config (the `unet/` subfolder when saved alongside).
            subfolder (`str`, *optional*): the head's subfolder in the repository or folder.
            torch_dtype (`torch.dtype`, *optional*): cast the model to this dtype.
            kwargs: Hub options (`cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`,
                `revision`), also used for the backbone. Other pipeline-loading options are ignored.

        Returns:
            `NoiseSquareHeadModel`, in `eval()` mode.
        """
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        weights_file = _get_model_file(pretrained_model_name_or_path, weights_name=WEIGHTS_NAME, subfolder=subfolder,
                                       **hub_kwargs)
        source = None
        if unet is None:
            source = cls._resolve_backbone(pretrained_model_name_or_path, subfolder, config)
            backbone_kwargs = dict(hub_kwargs)
            if source[0] != str(pretrained_model_name_or_path):
                backbone_kwargs.pop("revision", None)  # a revision of the head's repository, not the backbone's
            try:
                unet = UNet2DModel.from_pretrained(source[0], subfolder=source[1], **backbone_kwargs)
            except (OSError, ValueError, EnvironmentError) as error:
                where = source[0] + (f" (subfolder {source[1]!r})" if source[1] else "")
                raise OSError(
                    f"Could not load the head's backbone UNet2DModel from {where}: {error}. Pass it yourself: "
                    "`NoiseSquareHeadModel.from_pretrained(head_path, unet=UNet2DModel.from_pretrained(...))`."
                ) from error
        model = cls.from_config(config)
        model.attach_backbone(unet)
        if source is not None:
            model._backbone_source = source
        state = load_file(weights_file)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if key.startswith("head.")]
        if missing or unexpected:
            raise ValueError(
                f"The head's weights do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        model.eval()
        return model

    @staticmethod
    def _resolve_backbone(head_path, head_subfolder: Optional[str], config) -> Tuple[str, Optional[str]]:
        """`(path_or_repo_id, subfolder)` of the backbone from the head's location and config."""
        backbone_path, backbone_subfolder = config.get("backbone_path"), config.get("backbone_subfolder")
        if backbone_path is not None:
            return str(backbone_path), backbone_subfolder
        if backbone_subfolder is None:
            raise ValueError(
                "The head's config does not say where its backbone is: pass "
                "`NoiseSquareHeadModel.from_pretrained(head_path, unet=UNet2DModel.from_pretrained(...))`."
            )
        head_path = str(head_path)
        if os.path.isdir(head_path):
            folder = os.path.normpath(os.path.join(head_path, head_subfolder or "", backbone_subfolder))
            return folder, None
        # a Hub repository: the backbone is another subfolder of the same repository
        relative = posixpath.normpath(posixpath.join(head_subfolder or "", backbone_subfolder))
        if relative.startswith(".."):
            raise ValueError(
                f"The backbone reference {backbone_subfolder!r} leaves the repository {head_path}; pass `unet=`."
            )
        return head_path, None if relative == "." else relative
