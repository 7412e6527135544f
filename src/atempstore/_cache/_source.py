"""Where the cache copies from: the public `Source` protocol and its origins.

An *origin* is a source resolved in a worker thread: its key, its `Version`
(size, mtime and, for a local file, its identity: device, inode and ctime)
and reads checked against that version, so that nothing of a changed source
is ever published.  `stat_source` is the same resolution without a reader:
what `FileCache.stat` answers (HEAD, conditional requests) without a copy.
`PathOrigin` is a local file (one fd, copied in the kernel); `ObjectOrigin`
wraps any `Source` object.  Remote origins (an HTTP origin, an fsspec file
system, with an ``etag`` validator and a bulk streaming read) belong here
too: the copier and the sessions see only `Origin`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from .._errors import SourceChangedError
from ._fd import SharedFd, pread_exact, pwrite_all

__all__ = (
    "HEAD_SIZE",
    "CacheFailed",
    "FileInfo",
    "ObjectOrigin",
    "Origin",
    "PathOrigin",
    "Source",
    "Version",
    "changed",
    "mtime_to_ns",
    "origin_for",
    "stat_source",
)

#: How much of a local file's start an open remembers, to tell a file that
#: grew by appending from one rewritten in place (see `PathOrigin.check`).
HEAD_SIZE = 4096

#: How `PathOrigin` copies in the kernel: it falls back step by step where a
#: kernel or file system refuses one.
_KernelCopy = Literal["range", "send", "copy"]


@runtime_checkable
class Source(Protocol):
    """Where the cache copies a file from: a slow mount, an object store, a test double.

    ``key`` is the file's identity in the cache (two sources with the same key
    share one cached copy).  ``size`` and ``mtime`` are read again every time
    the cache checks freshness (before it serves a cached copy and after every
    chunk it copies), so they may be properties that ask the backend.
    ``pread(offset, n)`` returns up to ``n`` bytes at ``offset``; it blocks (the
    cache calls it in worker threads, possibly several at once, so it must be
    thread-safe) and returns fewer bytes only at the end of the file.  A
    ``FileNotFoundError`` from any of them means the file vanished.

    A plain path (`str` or `os.PathLike`) is also accepted wherever a `Source`
    is; its key is its real path.

    Example:
        ```python
        class SlowFile:
            def __init__(self, path: str) -> None:
                self.key = path
                self.path = path

            @property
            def size(self) -> int:
                return os.stat(self.path).st_size

            @property
            def mtime(self) -> float:
                return os.stat(self.path).st_mtime

            def pread(self, offset: int, n: int) -> bytes:
                time.sleep(n / 20e6)  # a 20 MB/s link
                with open(self.path, "rb") as f:
                    return os.pread(f.fileno(), n, offset)

        async with cache.open(SlowFile("/mnt/nfs/video.mp4")) as f:
            first = await f.read(0, 4096)
        ```
    """

    @property
    def key(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime(self) -> float: ...

    def pread(self, offset: int, n: int) -> bytes: ...


@dataclass(frozen=True)
class Version:
    """What makes two states of a source the same file.

    Its size and mtime, and ``ident``: for a local file its device, inode and
    ctime, so that a file replaced with the same size and mtime (``cp -p``,
    ``rsync -t``, ``touch -r``: each gives a new inode or a new ctime) is
    another version; empty for a `Source` object, which has only size and mtime.
    """

    size: int
    mtime_ns: int
    ident: str = ""

    @property
    def ident_hash(self) -> int:
        """``ident`` in 64 bits, as the on-disk record and a cached copy keep it; 0 for none."""
        if not self.ident:
            return 0
        return int.from_bytes(hashlib.blake2b(self.ident.encode(), digest_size=8).digest(), "big")

    @property
    def etag(self) -> str:
        """The strong HTTP validator of this version."""
        tag = f"{self.size:x}-{self.mtime_ns:x}"
        return f'"{tag}-{self.ident_hash:016x}"' if self.ident else f'"{tag}"'


#: How a same-length change is looked at again (see `PathOrigin._only_grew`).
_SETTLE_TRIES = 5
_SETTLE_PAUSE = 0.001


@dataclass(frozen=True)
class FileInfo:
    """What `FileCache.stat` tells of a source, and `CachedFile.info` of an open one.

    ``etag`` is a strong validator that changes with any of size, mtime and a
    local file's identity (inode, ctime).

    Example:
        ```python
        info = await cache.stat("/srv/media/video.mp4")
        print(info.size, info.mtime, info.etag)
        ```
    """

    key: str
    size: int
    mtime: float
    mtime_ns: int
    etag: str

    @classmethod
    def of(cls, key: str, version: Version, mtime: float) -> FileInfo:
        return cls(key, version.size, mtime, version.mtime_ns, version.etag)


def mtime_to_ns(mtime: float) -> int:
    # Deterministic for a given float, which is all freshness needs: the cached
    # file gets exactly this many nanoseconds and is compared with it later.
    return round(mtime * 1_000_000_000)


def changed(what: str, key: str) -> SourceChangedError:
    """The error a reader gets when the source ``key`` changed under a read or copy."""
    return SourceChangedError(
        f"the source {key!r} {what} while it was being read; nothing of it was"
        " published to the cache. Open it again to read the current version.",
        path=key,
    )


class CacheFailed(Exception):
    """Writing the cache failed (ENOSPC, EIO...): serve the file uncached."""


class Origin:
    """A source, resolved: its key, its version, and checked reads."""

    key: str
    version: Version
    mtime: float
    #: Does `resolve` ask a backend that may be slow (then it runs on the slow pool)?
    slow_resolve = True

    def resolve(self) -> None:
        """Find the source and read its key and version (in a worker thread)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise `SourceChangedError` unless the source still has ``version``."""
        raise NotImplementedError

    def check_final(self) -> None:
        """The check made just before publishing (may look harder)."""
        self.check()

    def pread(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def read_checked(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, checked to belong to ``version``."""
        data = self.pread(offset, n)
        if len(data) < n:
            self.check()
            raise changed("got shorter", self.key)
        self.check()
        return data

    def copy_into(self, dst: int, offset: int, n: int) -> int:
        """Copy up to ``n`` bytes at ``offset`` into ``dst`` (same offset).

        Returns the count copied (0: the source ended early).  Raises
        `CacheFailed` when writing ``dst`` failed.
        """
        data = self.pread(offset, n)
        try:
            pwrite_all(dst, data, offset)
        except OSError as exc:
            raise CacheFailed(str(exc)) from exc
        return len(data)

    def close(self) -> None:
        """Release what the origin holds (idempotent, fd calls only: in a worker thread)."""

    @property
    def holds_fd(self) -> bool:
        """Does `close` have an fd to close?  (If not, no thread hop is needed.)"""
        return False


class PathOrigin(Origin):
    """A local file: read through one fd, copied in the kernel."""

    slow_resolve = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd: SharedFd | None = None
        self._ident = (0, 0)
        #: The first `HEAD_SIZE` bytes of the version (None: not read, `stat_source`).
        self._head: bytes | None = None
        self._method: _KernelCopy = "range" if hasattr(os, "copy_file_range") else "send"

    def resolve(self, head: bool = True) -> None:  # in a worker thread
        real = os.path.realpath(self.path)
        # O_NONBLOCK: opening a FIFO must not hang the thread (it is refused
        # below); on a regular file the flag changes nothing.
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(
                    errno.EISDIR, "a directory cannot be cached; pass a file", real
                )
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "only regular files can be cached; pass a file", real)
            first: bytes | None = None
            if head:
                # The start is read between two fstats that must agree, so it
                # belongs to the version.  A log being appended moves between
                # them now and then: read again (an append takes microseconds).
                # Still moving after that, the start stays unknown and any
                # growth later counts as a change (the safe side).
                for _ in range(_SETTLE_TRIES):
                    first = pread_exact(fd, min(HEAD_SIZE, st.st_size), 0)
                    again = os.fstat(fd)
                    if _version(again) == _version(st):
                        break
                    st, first = again, None
                self._head = first
        except BaseException:
            os.close(fd)  # here, in the thread: the caller never sees this fd
            raise
        self.fd = SharedFd(fd)
        self.key = real
        self._ident = (st.st_dev, st.st_ino)
        self.version = _version(st)
        self.mtime = st.st_mtime_ns / 1e9

    def _fstat_matches(self, fd: int) -> bool:
        st = os.fstat(fd)
        if _version(st) == self.version:
            return True
        return self._only_grew(fd, st.st_size)

    def _only_grew(self, fd: int, size: int) -> bool:
        """Did the file only grow since its version (a log being appended)?

        Our fd is the version's inode, so a replacement by rename never gets
        here; what changed is this file's content.  It counts as growth when
        it is strictly longer than the version and still starts with the
        version's first `HEAD_SIZE` bytes: an append moves only the end,
        while a rewrite in place (truncate and write, ``cp`` over it) starts
        again at offset 0, and is seen as soon as its size is back past ours.
        A rewrite that keeps the same size, or one whose new start equals the
        old one, and which stays longer, is not told from growth: the limit,
        documented in docs/web.md.
        """
        head = self._head
        if head is None:
            return False
        if size == self.version.size:
            # An appending write() updates mtime and ctime *before* it moves
            # the end of the file, so a check that lands between the two sees
            # a changed file of the same length (a log cut mid-download, seen
            # under load).  Look again for a moment before calling it a change:
            # a same-size rewrite costs this wait, never a wrong answer.
            for _ in range(_SETTLE_TRIES):
                time.sleep(_SETTLE_PAUSE)
                size = os.fstat(fd).st_size
                if size != self.version.size:
                    break
        if size <= self.version.size:
            return False
        return pread_exact(fd, len(head), 0) == head

    def check(self) -> None:
        assert self.fd is not None
        with self.fd.use() as fd:
            if not self._fstat_matches(fd):
                raise changed("changed", self.key)

    def check_final(self) -> None:
        self.check()
        # Our fd still reads the version we copied even if the path now names
        # another file (deleted, or replaced by rename): publish only if the
        # path still leads to it.
        try:
            st = os.stat(self.key)
        except FileNotFoundError:
            raise changed("vanished", self.key) from None
        if (st.st_dev, st.st_ino) != self._ident:
            raise changed("was replaced", self.key)

    def pread(self, offset: int, n: int) -> bytes:
        assert self.fd is not None
        with self.fd.use() as fd:
            return pread_exact(fd, n, offset)

    def copy_into(self, dst: int, offset: int, n: int) -> int:
        assert self.fd is not None
        with self.fd.use() as src:
            try:
                return self._kernel_copy(src, dst, offset, n)
            except OSError as exc:
                # Which side failed?  If the source is intact, it was the cache.
                if not self._fstat_matches(src):
                    raise changed("changed", self.key) from exc
                raise CacheFailed(str(exc)) from exc

    def _kernel_copy(self, src: int, dst: int, offset: int, n: int) -> int:
        while True:
            if self._method == "range":
                try:
                    return os.copy_file_range(src, dst, n, offset, offset)
                except OSError as exc:
                    # Old kernels, or file systems that refuse it: use sendfile.
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._method = "send"
            elif self._method == "send":
                try:
                    os.lseek(dst, offset, os.SEEK_SET)
                    return os.sendfile(dst, src, offset, n)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._method = "copy"
            else:
                data = pread_exact(src, n, offset)
                pwrite_all(dst, data, offset)
                return len(data)

    def close(self) -> None:
        if self.fd is not None:
            self.fd.close()

    @property
    def holds_fd(self) -> bool:
        return self.fd is not None and not self.fd.closed


class ObjectOrigin(Origin):
    """A `Source` object; ``FileNotFoundError`` from it means it vanished."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def resolve(self) -> None:  # in a worker thread
        self.key = str(self.source.key)
        size, mtime = self._attributes()
        self.mtime = mtime
        self.version = Version(size, mtime_to_ns(mtime))

    def _attributes(self) -> tuple[int, float]:
        try:
            return int(self.source.size), float(self.source.mtime)
        except FileNotFoundError:
            raise changed("vanished", self.key) from None

    def check(self) -> None:
        size, mtime = self._attributes()
        if Version(size, mtime_to_ns(mtime)) != self.version:
            raise changed("changed", self.key)

    def pread(self, offset: int, n: int) -> bytes:
        try:
            return bytes(self.source.pread(offset, n))
        except FileNotFoundError:
            raise changed("vanished", self.key) from None


def _version(st: os.stat_result) -> Version:
    # ctime moves with every write, chmod and utime (touch -r restores the
    # mtime, never the ctime); the inode changes with a replacement by rename.
    return Version(st.st_size, st.st_mtime_ns, f"{st.st_dev:x}:{st.st_ino:x}:{st.st_ctime_ns:x}")


def stat_source(source: Source | str | os.PathLike[str]) -> FileInfo:
    """What a source is now, without reading or copying it (in a worker thread).

    Raises what resolving it raises: ``FileNotFoundError``, ``IsADirectoryError``...
    """
    origin = origin_for(source)
    try:
        if isinstance(origin, PathOrigin):
            origin.resolve(head=False)
        else:
            origin.resolve()
        return FileInfo.of(origin.key, origin.version, origin.mtime)
    finally:
        origin.close()


def origin_for(source: Source | str | os.PathLike[str]) -> Origin:
    """The origin of a path or a `Source` object, not yet resolved (no I/O)."""
    if isinstance(source, (str, bytes, os.PathLike)):
        return PathOrigin(os.fsdecode(source))
    if callable(getattr(type(source), "pread", None)):
        return ObjectOrigin(source)
    raise TypeError(
        f"cannot cache {source!r}: pass a path or an object with key, size,"
        " mtime and pread(offset, n) (see atempstore.Source)"
    )
