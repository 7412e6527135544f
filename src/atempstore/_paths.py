"""Name and confinement checks shared by every component.

Two questions come up everywhere a user hands us a name or a path:

* Is this a *single, plain* path component?  (:func:`check_name`)
* Does this path, resolved physically as the kernel would resolve it, name
  something *strictly inside* a given directory?  (:func:`confine`)

:func:`confine` resolves with ``realpath`` to decide, but deciding is not
enough: a symlink can be swapped in between the check and the use.  So the
action itself goes through :func:`open_beneath`, which walks from the
directory with ``O_NOFOLLOW`` on every component, and :func:`remove_at`,
which never follows a link.  These run in a worker thread (they do I/O).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from ._errors import InvalidNameError, PathOutsideStoreError

__all__ = ("Confined", "check_name", "confine", "open_beneath", "open_dir_nofollow", "remove_at")

_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep, "/") if sep)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(name: object, *, allow_hidden: bool = False) -> str:
    """Return ``name`` if it is one plain file name, else raise `InvalidNameError`.

    Refused: non-strings, the empty name, ``.`` and ``..``, anything holding a
    path separator or a NUL byte, and (unless ``allow_hidden``) names starting
    with ``.``, which stores reserve for their own files.
    """
    if not isinstance(name, str):
        raise InvalidNameError(
            f"name must be a str, not {type(name).__name__}: {name!r}", name=name
        )
    why = None
    if not name:
        why = "is empty"
    elif name in (".", ".."):
        why = "is a directory reference"
    elif "\0" in name:
        why = "contains a NUL byte"
    elif any(sep in name for sep in _SEPARATORS):
        why = "contains a path separator; pass a bare file name such as Path(p).name"
    elif name.startswith(".") and not allow_hidden:
        why = "starts with '.', which is reserved for the store's own files"
    if why is not None:
        raise InvalidNameError(f"invalid name {name!r}: it {why}", name=name)
    return name


class Confined:
    """Where a confined path lives: components below the root, then a last name."""

    __slots__ = ("name", "parents", "root")

    def __init__(self, root: str, parents: tuple[str, ...], name: str) -> None:
        self.root = root
        self.parents = parents
        self.name = name

    @property
    def path(self) -> Path:
        """The physical path this names (parents resolved, last name as given)."""
        return Path(self.root, *self.parents, self.name)


def confine(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Confined:
    """Resolve ``path`` (relative paths are taken from ``root``) and check it lies
    strictly inside ``root``.

    Parent directories are resolved physically, ``..`` after a symlink included
    (``a/link/..`` is the parent of the link's *target*, as the kernel sees it).
    The last component is not followed: a symlink named last stays the link.
    Raises `PathOutsideStoreError` when the result is ``root`` itself or lies
    outside it.  Does I/O (``realpath``): call it in a worker thread.
    """
    raw = os.fspath(path)
    if "\0" in raw:
        raise InvalidNameError(f"invalid path {raw!r}: it contains a NUL byte", name=raw)
    real_root = os.path.realpath(root)
    full = os.path.join(real_root, raw)  # an absolute ``raw`` replaces the root
    head, tail = os.path.split(full)
    if tail in ("", ".", ".."):
        # The name itself is a directory reference: resolve all of it.
        head, tail = os.path.split(os.path.realpath(full))
    else:
        head = os.path.realpath(head)
    rel = os.path.relpath(head, real_root)
    if rel == os.curdir:
        parents: tuple[str, ...] = ()
    elif rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        parents = ()
        tail = ""
    else:
        parents = tuple(rel.split(os.sep))
    if not tail:
        raise PathOutsideStoreError(
            f"{raw!r} is not strictly inside {real_root!r}; nothing was touched."
            " Pass a path below that directory.",
            path=raw,
        )
    return Confined(real_root, parents, tail)


def open_dir_nofollow(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink at its last component."""
    return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)


def open_beneath(root: str, parents: tuple[str, ...]) -> int:
    """Open ``root/parents...`` as a directory fd, following no symlink below ``root``.

    If a component was swapped for a symlink after :func:`confine` looked, the
    open fails (ELOOP/ENOTDIR) instead of leaving the tree.
    """
    fd = open_dir_nofollow(root)
    try:
        for part in parents:
            next_fd = open_dir_nofollow(part, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_at(dir_fd: int, name: str) -> None:
    """Delete ``name`` in ``dir_fd``: a file or link is unlinked, a directory is
    removed with everything below it, never following a symlink."""
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = open_dir_nofollow(name, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries]
        for child in names:
            with contextlib.suppress(FileNotFoundError):  # removed concurrently: fine
                remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
