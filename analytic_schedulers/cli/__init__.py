"""The `analytic-schedulers` command line: one module per subcommand, and the options they share.

Each module in `SUBCOMMANDS` defines `add_parser(subparsers)`, which registers its parser and sets `func=run` (a
function of the parsed arguments returning an exit code). Loading goes through `analytic_schedulers.loading` and
`analytic_schedulers.data`, whose errors are printed here, so the same bad input gives the same message in every
command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

import torch

SUBCOMMANDS = {
    # name: module under analytic_schedulers.cli
    "estimate-gamma": "estimate_gamma",
    "nll": "nll",
    "sample": "sample",
    "train-head": "train_head",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CommandError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


def add_model_options(parser: argparse.ArgumentParser, required: bool = False, gamma: bool = False,
                      head: bool = False) -> None:
    """`--model`, `--subfolder`, `--scheduler-config` (and `--gamma`, `--head`): where the model and its parts are."""
    parser.add_argument("--model", required=required, default=None,
                        help="pipeline or model folder, or Hub id" + ("" if required else
                                                                      " (default: the bundled 16x16 digits model)"))
    parser.add_argument("--subfolder", default=None, help="the model's subfolder (default: unet/ in a pipeline)")
    parser.add_argument("--scheduler-config", default=None, metavar="FOLDER_OR_ID",
                        help="folder or Hub id with the model's scheduler_config.json (default: the pipeline's "
                             "scheduler/ folder, or beside the model)")
    if gamma:
        parser.add_argument("--gamma", default=None, metavar="FOLDER_OR_ID",
                            help="scheduler folder or Hub id with the Gamma table (default: the model's "
                                 "analytic_scheduler/ folder)")
    if head:
        parser.add_argument("--head", default=None, metavar="FOLDER_OR_ID",
                            help="noise-square head folder or Hub id for sn-*/npr-* samplers (default: the model's "
                                 "sn_head/ or npr_head/ folder)")


def add_device_options(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """`--device` (and `--dtype`)."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps ... (default: cuda if available; under `accelerate launch`, "
                             "each process's device)")
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                            help="model precision; the schedulers' math stays in float32 (default: float32)")


def add_hub_options(parser: argparse.ArgumentParser, what: str, default_path: str) -> None:
    """`--push-to-hub` and the options of the upload (as in `huggingface_hub.HfApi.upload_folder`)."""
    group = parser.add_argument_group("publishing on the Hugging Face Hub")
    group.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                       help=f"upload {what} to this model repository (created if missing), in --path-in-repo")
    group.add_argument("--path-in-repo", default=None, help=f"folder in the repository (default: {default_path})")
    group.add_argument("--hub-token", default=None, help="Hub token (default: the one `hf auth login` stored)")
    group.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    group.add_argument("--revision", default=None, help="branch to upload to (created if missing; default: main)")
    group.add_argument("--commit-message", default=None, help="message of the upload's commit")


def hub_kwargs(args: argparse.Namespace) -> dict:
    """The upload options of `add_hub_options` as keyword arguments of `push_gamma_to_hub` / `push_head_to_hub`."""
    kwargs = dict(token=args.hub_token, private=args.private, revision=args.revision,
                  commit_message=args.commit_message)
    if args.path_in_repo is not None:
        kwargs["path_in_repo"] = args.path_in_repo
    return kwargs


def load_from_args(args: argparse.Namespace, gamma: bool = True, pipeline: bool = False):
    """The `LoadedModel` the options name (see `analytic_schedulers.loading.load`); without `gamma`, no table is
    read (the command takes none); with `pipeline`, a pipeline that runs its own `__call__` (a VAE or text encoder)
    is loaded whole."""
    from ..loading import load

    dtype = DTYPES[getattr(args, "dtype", "float32")]
    return load(args.model, args.subfolder, args.scheduler_config, getattr(args, "gamma", None) if gamma else False,
                torch_dtype=dtype, pipeline=pipeline)


def refuse_own_call_pipeline(args: argparse.Namespace, reason: str) -> None:
    """Raises `CommandError` for a `--model` pipeline with a VAE or text encoder (no `--subfolder`), which a command
    working on a denoiser of pixels cannot serve; `reason` says why and what works instead."""
    from ..loading import is_own_call_pipeline

    if args.subfolder is None and is_own_call_pipeline(args.model):
        raise CommandError(f"{args.model} is a pipeline with a VAE or text encoder: its denoiser sees latents (and "
                           f"prompts). {reason}")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="analytic-schedulers",
        description="Analytic-DPM / SN-DPM sampling, Gamma estimation, head training and likelihoods for diffusers.",
    )
    parser.add_argument("--version", action="version", version=f"analytic-schedulers {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"{__name__}.{module}").add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..data import DataError
    from ..loading import LoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CommandError, LoadError, DataError) as error:
        print(f"analytic-schedulers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"analytic-schedulers {args.command}: interrupted", file=sys.stderr)
        return 130
