"""The gocept.filestore store as a blocking core: prepare, create, list, move, copy, remove.

Plain methods on a `StoreCore`, testable without an event loop; `FileStore`
runs each one in one worker-thread hop.  What a cancelled caller will never
see is handed back by the methods that create it (`create`, `copy`) and
undone by their ``un...`` counterpart, which `FileStore` passes to
``run_sync(undo=...)``.  Names and areas are checked by `Layout` on the
caller's side, before any hop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import IO, Any, Literal

from .._durable import (
    create_exclusive,
    fsync_dir,
    makedirs,
    publish_link,
    rename_noreplace,
    temp_name,
    unlink_quietly,
)
from ._names import AREAS, DIR_MODE, FILE_FLAGS, Layout, sorted_names

__all__ = ("BINARY_MODES", "TEXT_MODES", "StoreCore", "open_flags", "read_file")

TEXT_MODES = Literal["w", "x", "a", "w+", "x+", "a+", "wt", "xt", "at"]
BINARY_MODES = Literal["wb", "xb", "ab", "w+b", "x+b", "a+b", "wb+", "xb+", "ab+"]

_Paths = list[Path]
#: An open file of ``tmp/`` and whether opening it created it.
_Created = tuple[IO[Any], bool]
#: ``(st_dev, st_ino)`` of a published copy: `StoreCore.uncopy` removes only that file.
_Copied = tuple[int, int]


def open_flags(mode: str) -> tuple[int, str]:
    """The ``os.open`` flags and the ``open()`` mode of a `FileStore.create` mode.

    `ValueError` for a mode that does not write.
    """
    kinds = [c for c in mode if c in "rwxa"]
    if (
        kinds not in (["w"], ["x"], ["a"])
        or set(mode) - set("wxa+bt")
        or len(set(mode)) != len(mode)
        or ("b" in mode and "t" in mode)
    ):
        raise ValueError(
            f"invalid mode {mode!r} for create(): use a writing mode such as 'w', 'wb', 'x' or 'a'"
        )
    flags = os.O_RDWR if "+" in mode else os.O_WRONLY
    flags |= os.O_CREAT | FILE_FLAGS
    flags |= {"w": os.O_TRUNC, "x": os.O_EXCL, "a": os.O_APPEND}[kinds[0]]
    return flags, mode.replace("x", "w").replace("t", "")


def read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | FILE_FLAGS)
    with os.fdopen(fd, "rb") as file:
        return file.read()


class StoreCore:
    """The blocking operations of the store; each is one `FileStore` hop.

    Example (no event loop):
        ```python
        core = StoreCore(Layout("spool"))
        core.prepare()
        file, _ = core.create(core.layout.path("a", "tmp"), *open_flags("w"))
        ```
    """

    __slots__ = ("layout",)

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def prepare(self) -> None:
        """Create the store's directories, each 0700 and durable; harmless when they exist."""
        layout = self.layout
        # Every level created gets DIR_MODE (os.makedirs gives it to the
        # last one only), and its parent is fsynced.
        makedirs(layout.root, DIR_MODE)
        created = False
        for directory in (*layout.dirs.values(), layout.consumers):
            try:
                os.mkdir(directory, DIR_MODE)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise NotADirectoryError(
                        errno.ENOTDIR,
                        "a FileStore area exists but is not a directory; move it away",
                        directory,
                    ) from None
            else:
                created = True
        if created:
            fsync_dir(layout.root)  # the areas survive a power cut

    @staticmethod
    def create(path: str, flags: int, pymode: str) -> _Created:
        """Open ``path`` for writing (never through a symlink); the file's name is ``path``."""
        created = False

        def opener(file: str, _flags: int) -> int:
            # O_EXCL first, to know whether the file is ours to remove if the
            # caller is cancelled (an existing file is only truncated or
            # appended to, as asked, and never removed).
            nonlocal created
            while True:
                try:
                    fd = os.open(file, flags | os.O_EXCL, 0o666)
                except FileExistsError:
                    if flags & os.O_EXCL:
                        raise  # mode "x"
                else:
                    created = True
                    return fd
                try:
                    return os.open(file, flags & ~os.O_CREAT)
                except FileNotFoundError:
                    continue  # removed between the two opens: create it after all

        # open() with an opener: the file object's name is the path.
        file: IO[Any] = open(path, pymode, opener=opener)  # noqa: SIM115 - handed out
        return file, created

    @staticmethod
    def uncreate(opened: _Created) -> None:
        file, created = opened
        file.close()
        if created:
            unlink_quietly(file.name)

    @staticmethod
    def listing(directory: str) -> _Paths:
        """The paths in ``directory``, oldest first; hidden entries excluded."""
        return [Path(directory, n) for n in sorted_names(directory)]

    @staticmethod
    def move(src: str, dst: str, durable: bool) -> None:
        """Rename ``src`` to ``dst``, never replacing; data and name on disk if ``durable``."""
        if durable:
            fd = os.open(src, os.O_RDONLY | FILE_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        rename_noreplace(src, dst)
        if durable:
            fsync_dir(os.path.dirname(dst))

    @staticmethod
    def copy(src: str, dst: str, durable: bool) -> _Copied:
        """Copy ``src`` to ``dst`` under a hidden name, then publish it whole, never replacing."""
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "copy() never replaces a file", dst)
        source_fd = os.open(src, os.O_RDONLY | FILE_FLAGS)
        with os.fdopen(source_fd, "rb") as source:
            tmp = temp_name(dst)  # hidden: never listed, never claimed
            try:
                with os.fdopen(create_exclusive(tmp), "wb") as target:
                    shutil.copyfileobj(source, target)
                    target.flush()
                    if durable:
                        os.fsync(target.fileno())
                    copied = os.fstat(target.fileno())
            except BaseException:
                unlink_quietly(tmp)  # a failed close too (EIO, NFS ENOSPC)
                raise
        publish_link(tmp, dst)
        if durable:
            fsync_dir(os.path.dirname(dst))
        return copied.st_dev, copied.st_ino

    @staticmethod
    def uncopy(dst: str, copied: _Copied, durable: bool) -> None:
        # Only our copy: a consumer may have claimed it (gone from dst)
        # and someone else put a file of that name there since.
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(dst)
            if (st.st_dev, st.st_ino) == copied:
                unlink_quietly(dst)
                if durable:
                    fsync_dir(os.path.dirname(dst))

    def clean_tmp(self, limit: float) -> _Paths:
        """Remove files of ``tmp/`` (and hidden copy leftovers anywhere) last
        modified before ``limit`` (a ``time.time()``); what was removed."""
        removed: _Paths = []
        for area in AREAS:
            directory = self.layout.dirs[area]
            with os.scandir(directory) as entries:
                for entry in entries:
                    # In new/ and cur/ only our own hidden copy temporaries.
                    if area != "tmp" and not (
                        entry.name.startswith(".") and entry.name.endswith(".tmp")
                    ):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st.st_mode) or st.st_mtime >= limit:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
        return removed
