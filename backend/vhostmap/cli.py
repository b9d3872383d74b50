"""The ``vhostmap`` command line: ``serve`` runs the backend daemon, the other commands talk to it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vhostmap import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``vhostmap`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="vhostmap",
        description="netmap for virtual machines: a vhost-user virtio-net backend whose ports are netmap adapters",
    )
    parser.add_argument("--version", action="version", version=f"vhostmap {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhostmap`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
