"""Names and order: where a store keeps each thing, how its files are named, which comes first.

Every name the package builds or parses is here: the areas and the layout of
a store's directory, the maildir name of a delivered message (time, a
per-process counter, the pid, randomness, the host), the ``<name>~<owner>``
of a claimed file, the hidden entries that are the store's own, and the
oldest-first order consumers take messages in.  Nothing here writes; the
listing helpers read one directory and are called in worker threads.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import socket
from typing import Literal

from .._paths import check_name

__all__ = (
    "AREAS",
    "DIR_MODE",
    "FILE_FLAGS",
    "LOCK_SUFFIX",
    "Area",
    "Layout",
    "OrderKey",
    "claimed_name",
    "maildir_name",
    "order_key",
    "parse_claimed",
    "sorted_names",
    "visible_names",
)

Area = Literal["tmp", "new", "cur"]
#: The three maildir areas, in the order a message travels through them.
AREAS: tuple[Area, Area, Area] = ("tmp", "new", "cur")
_CONSUMERS = ".consumers"
LOCK_SUFFIX = ".lock"
# A claimed file is ``<name>~<owner>``; owners are 16 lowercase hex digits.
_OWNER_SEP = "~"
_CLAIMED = re.compile(r"(?P<name>.+)~(?P<owner>[0-9a-f]{16})", re.DOTALL)
# Maildir names start with the delivery time: ``<sec>.M<usec>P<pid>Q<counter>...``.
# Parsing it orders messages oldest first without a stat per file.
_TIMED = re.compile(r"(?P<sec>\d+)\.(?:M(?P<usec>\d+))?(?:P\d+)?(?:Q(?P<count>\d+))?")
FILE_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW
#: The mode of every directory `FileStore.prepare` creates (the umask applies
#: too): messages are written 0600, so a store is its user's.
DIR_MODE = 0o700

#: Sorts messages oldest first: delivery second, microsecond, counter, name.
OrderKey = tuple[float, int, int, str]


class Layout:
    """The paths of one store: its root, its areas and its consumers' lock files (no I/O)."""

    __slots__ = ("consumers", "dirs", "root")

    def __init__(self, root: str) -> None:
        self.root = root
        self.dirs: dict[str, str] = {area: os.path.join(root, area) for area in AREAS}
        self.consumers = os.path.join(root, _CONSUMERS)

    def area(self, area: str) -> str:
        """The directory of ``area``; `ValueError` for an unknown one."""
        try:
            return self.dirs[area]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown area {area!r}: a FileStore has the areas 'tmp', 'new' and 'cur'"
            ) from None

    def path(self, name: str, area: str) -> str:
        """``<area>/<name>``, once ``name`` is checked (`InvalidNameError`) and ``area`` known."""
        check_name(name)
        return os.path.join(self.area(area), name)

    def lock_path(self, owner: str) -> str:
        return os.path.join(self.consumers, owner + LOCK_SUFFIX)


def claimed_name(name: str, owner: str) -> str:
    """The name of ``name``'s file in ``cur/`` while ``owner`` holds it."""
    return f"{name}{_OWNER_SEP}{owner}"


def parse_claimed(entry: str) -> tuple[str, str] | None:
    """``(name, owner)`` of a claimed file's name, or None if it is not one."""
    match = _CLAIMED.fullmatch(entry)
    return None if match is None else (match["name"], match["owner"])


def order_key(name: str, path: str) -> OrderKey | None:
    """Sort key putting the oldest message first, or None if ``path`` vanished.

    Maildir names carry their delivery time; other names fall back to the
    file's mtime (one ``lstat`` of ``path``).
    """
    match = _TIMED.match(name)
    if match is not None:
        return (float(match["sec"]), int(match["usec"] or 0), int(match["count"] or 0), name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    return (float(sec), nsec // 1000, 0, name)


def visible_names(directory: str) -> list[str]:
    """The entries of ``directory`` that are not the store's own (hidden)."""
    with os.scandir(directory) as entries:
        return [entry.name for entry in entries if not entry.name.startswith(".")]


def sorted_names(directory: str) -> list[str]:
    """The visible names in ``directory``, oldest first.

    A claimed file ``<name>~<owner>`` sorts by its message name.
    """
    keyed = []
    for entry in visible_names(directory):
        claimed = parse_claimed(entry)
        key = order_key(claimed[0] if claimed else entry, os.path.join(directory, entry))
        if key is not None:
            keyed.append((key, entry))
    keyed.sort()
    return [entry for _, entry in keyed]


_counter = itertools.count(1)
_hostname: str | None = None


def _host() -> str:
    # Maildir escapes '/' and ':' in the host part; the name must stay one component.
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "host"
    return _hostname


def maildir_name(now: float) -> str:
    """A unique maildir name for a message delivered at ``now`` (a ``time.time()``)."""
    sec = int(now)
    usec = min(int((now - sec) * 1_000_000), 999_999)
    # Time, a per-process counter, the pid, randomness and the host: unique
    # across processes, hosts sharing the directory, and pid reuse.
    return f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{_host()}"
