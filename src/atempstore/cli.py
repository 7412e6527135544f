"""The ``atempstore`` command: ``serve``, ``clean``, ``sessions``, ``queue``.

Each subcommand lives in its own module under ``_commands`` and registers
itself with :func:`main`'s parser through its ``NAME``, ``HELP``,
``DESCRIPTION`` and ``add_arguments``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._commands import clean, queue, serve, sessions

__all__ = ("main",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atempstore",
        description="Async temp dirs, file queues, checkpoints and a copy-while-serving cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (serve, clean, sessions, queue):
        sub = commands.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
