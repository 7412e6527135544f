"""``atempstore clean``: remove the temp directories that dead processes left behind.

It looks where a `TempFileManager` with the same prefix would (same base
directory candidates, same user), decides liveness by each directory's lock
exactly as `TempFileManager.clean_userdir` does, and creates no process
directory of its own.  No event loop is needed: it is one blocking sweep.
"""

from __future__ import annotations

import argparse
import sys

from .._errors import AtempstoreError
from .._tempfiles import DEFAULT_GRACE, clean_for_command

__all__ = ("DESCRIPTION", "HELP", "NAME", "add_arguments", "run")


#: The subcommand's name, its one-line help and its description.
NAME = "clean"
HELP = "remove temp directories left by dead processes"
DESCRIPTION = (
    "Remove the per-process temp directories of this user whose process is gone"
    " (their .lock is not held). Live processes' directories are never touched."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``atempstore clean``."""
    parser.add_argument(
        "--prefix",
        default="atempstore",
        help="the TempFileManager prefix whose directories to clean (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only print what would be removed",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=(
            "spare directories without a .lock younger than this, whose process may still"
            " be starting (default: %(default)s)"
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Clean, print one line per directory and a summary; 1 if the directory is unsafe."""
    try:
        userdir, verdicts = clean_for_command(args.prefix, grace=args.grace, dry_run=args.dry_run)
    except (AtempstoreError, OSError, ValueError) as exc:
        print(f"atempstore clean: {exc}", file=sys.stderr)
        return 1
    if userdir is None:
        print(f"nothing to clean: no temp directories with prefix {args.prefix!r} for this user")
        return 0
    print(f"cleaning {userdir}")
    removed = 0
    for verdict in verdicts:
        if verdict.removed:
            removed += 1
            action = "would remove" if args.dry_run else "removed"
        else:
            action = "skipped"
        print(f"{action} {verdict.path}: {verdict.reason}")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed}, skipped {len(verdicts) - removed}")
    return 0
