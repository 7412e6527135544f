"""``atempstore sessions``: list checkpoint storages, or break a stale lock.

``atempstore sessions [--repository DIR]`` prints one line per storage,
youngest first: its id, when it was last saved (UTC), the checkpoint's size in
bytes, and ``locked`` when a ``session.next`` is present (a save in progress,
or one a crash interrupted).  ``--break-lock ID`` removes that file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

from .._errors import InvalidNameError
from .._paths import check_name
from .._session import NEXT_FILE, SessionStorage, SessionStorageRepository
from .._threads import run_sync

__all__ = ("DESCRIPTION", "HELP", "NAME", "add_arguments", "run")

_HEADER = ("ID", "LAST SAVED (UTC)", "SIZE", "STATE")


#: The subcommand's name, its one-line help and its description.
NAME = "sessions"
HELP = "list checkpoint storages (SessionStorage), or break a stale lock"
DESCRIPTION = (
    "List the session storages of a repository, youngest first, with when each was"
    " last saved, its size and whether a save left its lock (session.next) behind."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository",
        metavar="DIR",
        type=Path,
        default=None,
        help=(
            "the repository directory (default: $ATEMPSTORE_SESSION_REPOSITORY, else"
            " ${XDG_CACHE_HOME:-~/.cache}/atempstore/sessions)"
        ),
    )
    parser.add_argument(
        "--break-lock",
        metavar="ID",
        default=None,
        help=(
            "remove the stale session.next of storage ID; only when no process is saving"
            " into it any more"
        ),
    )


def run(args: argparse.Namespace) -> int:
    repository = SessionStorageRepository(args.repository)
    try:
        if args.break_lock is not None:
            return asyncio.run(_break_lock(repository, args.break_lock))
        return asyncio.run(_list(repository))
    except OSError as exc:  # permissions, a repository that is a file...: say it, no traceback
        print(f"atempstore sessions: {exc}", file=sys.stderr)
        return 1


class _Row(NamedTuple):
    id: str
    saved: str
    size: str
    state: str


def _describe(storage: SessionStorage) -> _Row | None:
    try:
        st = os.stat(storage.session_file)
    except FileNotFoundError:
        if not storage.location.is_dir():
            return None  # removed since it was listed
        saved, size = "never", "-"
    else:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime))
        size = str(st.st_size)
    locked = os.path.lexists(storage.location / NEXT_FILE)
    return _Row(storage.id, saved, size, "locked" if locked else "-")


def _describe_all(storages: list[SessionStorage]) -> list[_Row]:
    return [row for row in map(_describe, storages) if row is not None]


async def _list(repository: SessionStorageRepository) -> int:
    storages = await repository.get_storage_list()
    rows = await run_sync(_describe_all, storages, abandon_on_cancel=True)
    if not rows:
        print(f"no session storages in {repository.location}")
        return 0
    table = [_HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_HEADER))]
    for row in table:
        cells = [
            cell.rjust(width) if column == 2 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    return 0


async def _break_lock(repository: SessionStorageRepository, storage_id: str) -> int:
    try:
        check_name(storage_id)
    except InvalidNameError as exc:
        print(f"atempstore sessions: {exc}; pass a storage ID as listed", file=sys.stderr)
        return 2
    storage = SessionStorage(repository.location / storage_id)
    try:
        removed = await storage.break_lock()
    except (FileNotFoundError, NotADirectoryError):
        print(
            f"atempstore sessions: no session storage {storage_id!r} in {repository.location};"
            " run `atempstore sessions` to list them",
            file=sys.stderr,
        )
        return 1
    if removed:
        print(f"removed the stale lock ({NEXT_FILE}) of {storage_id}")
    else:
        print(f"{storage_id} was not locked")
    return 0
