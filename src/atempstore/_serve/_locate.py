"""What a request path names under the served directory: always in a worker thread.

Locating names paths and opens files, so it is one blocking function,
`locate`, that a request runs in one hop.  The URL path is split into plain
names (``..`` refused, hidden names never served), confined to the served
directory with the physical resolution of ``_paths.confine``, then walked
with ``O_NOFOLLOW`` on every directory, and the last name is examined without
following it: a symlink is served only if it leads to a file inside the
directory (as that file, by the same rules), a FIFO or device never.  What
is answered is what was opened (``fstat``), not what the name meant a moment
before.  The checks of the directories the server is started with live here
too: they are the same question asked once at startup.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from .._errors import InvalidNameError, PathOutsideStoreError
from .._paths import confine, open_beneath
from ._http import media_type

__all__ = ("File", "Listing", "Refused", "check_dirs", "default_cache_dir", "locate")


@dataclass(frozen=True)
class File:
    """A regular file to serve, as it was when located."""

    path: str  # physical: no symlink anywhere in it
    size: int
    mtime_ns: int
    media_type: str


@dataclass(frozen=True)
class Listing:
    """A directory to list."""

    entries: tuple[tuple[str, bool], ...]  # (name, is a directory), hidden names left out


class Refused(Exception):
    """The request names something this server does not serve."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _split(rel: str) -> list[str]:
    parts = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue  # "a//b" and "a/./b" name a/b: nothing escapes through them
        if part == "..":
            # Refused outright rather than normalized: a client that sends it
            # (decoded from %2e%2e too) is probing, and "a/link/.." would mean
            # the link target's parent, as the kernel resolves it.
            raise Refused(403, "'..' is not allowed in a path")
        if part.startswith("."):
            # .git, .env, .htpasswd: never served, whatever DIR holds.
            raise Refused(404, "hidden files are not served")
        parts.append(part)
    return parts


def _inside(root: str, path: str) -> str | None:
    """``path`` relative to ``root`` if strictly inside it, else None."""
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return rel


def locate(root: str, rel: str, *, hops: int = 0) -> File | Listing:
    """What the URL path ``rel`` names under the physical directory ``root``.

    Raises `Refused` for what is never served, `OSError` for what the file
    system refuses (see ``_http.error_status``).
    """
    parts = _split(rel)
    if not parts:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _list(fd)
        finally:
            os.close(fd)
    try:
        where = confine(root, os.path.join(*parts))
    except PathOutsideStoreError:
        raise Refused(403, "a symlinked directory leads out of the served directory") from None
    except InvalidNameError:
        raise Refused(400, "the path contains a NUL byte") from None
    # confine() decided on names; the O_NOFOLLOW walk makes the decision hold
    # even if a directory is swapped for a symlink after it looked (ELOOP).
    dir_fd = open_beneath(where.root, where.parents)
    try:
        st = os.stat(where.name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = _inside(root, os.path.realpath(where.path))
            if target is None or hops:
                raise Refused(403, "a symlink that leads out of the served directory")
            # Served as its target, by the same rules (a link to .env is not a loophole).
            return locate(root, "" if target == os.curdir else target, hops=1)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise Refused(404, "not a regular file")  # a FIFO would hang a reader
        fd = os.open(where.name, _OPEN, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)  # what we opened, not what the name meant a moment ago
        if stat.S_ISDIR(st.st_mode):
            return _list(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(404, "not a regular file")
        return File(os.fspath(where.path), st.st_size, st.st_mtime_ns, media_type(where.name))
    finally:
        os.close(fd)


def _list(fd: int) -> Listing:
    entries = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue  # vanished while listing
            entries.append((entry.name, is_dir))
    entries.sort(key=lambda e: (not e[1], e[0]))
    return Listing(tuple(entries))


def check_dirs(directory: str, cache_dir: str | None) -> tuple[str, str]:
    """The physical served directory and the cache directory; refuses a cache inside DIR."""
    root = os.path.realpath(directory)
    if not os.path.isdir(root):
        if not os.path.exists(root):
            raise FileNotFoundError(errno.ENOENT, "no such directory to serve", directory)
        raise NotADirectoryError(
            errno.ENOTDIR, "not a directory; pass the directory to serve", directory
        )
    cache = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    real_cache = os.path.realpath(cache)
    inside = _inside(root, real_cache)
    # Below a hidden name (~/.cache when serving ~) it is never served: fine.
    if real_cache == root or (
        inside is not None and not any(p.startswith(".") for p in inside.split(os.sep))
    ):
        raise ValueError(
            f"the cache directory {cache!r} is inside the served directory {root!r}: its"
            " files would be served. Pass --cache with a directory outside it."
        )
    return root, cache


def default_cache_dir() -> str:
    """``${XDG_CACHE_HOME:-~/.cache}/atempstore/serve`` (it may read the password db: thread it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "atempstore", "serve")
