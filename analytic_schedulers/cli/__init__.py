"""The `analytic-schedulers` command line: one module per subcommand.

Each module in `SUBCOMMANDS` defines `add_parser(subparsers)`, which registers its parser and sets
`func=run` (a function of the parsed arguments returning an exit code). Modules are imported only when listed here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    # name: module under analytic_schedulers.cli
    "estimate-gamma": "estimate_gamma",
    "nll": "nll",
    "sample": "sample",
    "train-head": "train_head",
}


class CommandError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"analytic-schedulers {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"analytic-schedulers {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
