"""`atempstore queue DIR [--recover]`: what a FileStore work queue holds.

Prints the files per area, the age of the oldest waiting message, and the
claims held by consumers that died; ``--recover`` gives those back to
``new/`` first.  It never creates a store: pointing it at the wrong
directory is an error, not a new empty queue.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .._filestore import AREAS, FileStore, QueueStatus

__all__ = ("DESCRIPTION", "HELP", "NAME", "add_arguments", "run")


#: The subcommand's name, its one-line help and its description.
NAME = "queue"
HELP = "show a FileStore queue: counts per area, oldest message, dead consumers' claims"
DESCRIPTION = (
    "Show what a FileStore work queue holds: files per area, the age of the oldest"
    " waiting message and the claims held by consumers that died."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the store's directory")
    parser.add_argument(
        "--recover",
        action="store_true",
        help="give messages held by dead consumers back to new/ first",
    )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _report(status: QueueStatus) -> str:
    lines = [f"{status.path}"]
    for area in AREAS:
        line = f"  {area + ':':5} {status.counts[area]:>8}"
        if area == "new" and status.oldest_age is not None:
            line += f"   oldest waiting {_age(status.oldest_age)}"
        if area == "cur":
            line += (
                f"   claims: {status.live_claims} by live consumers,"
                f" {len(status.dead_claims)} by dead consumers"
            )
        lines.append(line)
    if status.dead_claims:
        shown = ", ".join(status.dead_claims[:5])
        more = f" and {len(status.dead_claims) - 5} more" if len(status.dead_claims) > 5 else ""
        lines.append(f"dead consumers hold: {shown}{more}")
        lines.append(f"run `atempstore queue {status.path} --recover` to give them back to new/")
    if status.unknown_claims:
        lines.append(
            f"{len(status.unknown_claims)} file(s) in cur/ look claimed by a consumer without"
            " a lock file in .consumers/; they are left alone"
        )
    return "\n".join(lines)


async def _main(directory: str, recover: bool) -> int:
    store = FileStore(directory)
    try:
        if recover:
            recovered = await store.recover()
            print(f"gave {len(recovered)} message(s) back to new/")
        status = await store.status()
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(
            f"atempstore queue: {directory!r} is not a FileStore ({exc.strerror}: {exc.filename});"
            " pass the directory that holds tmp/, new/ and cur/",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:  # EACCES, ELOOP, EIO...: say what and where, no traceback
        where = exc.filename if exc.filename is not None else directory
        print(f"atempstore queue: cannot read {where!r}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(_report(status))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``atempstore queue``; returns the exit status."""
    return asyncio.run(_main(args.directory, args.recover))
