"""What one open finds in an entry of the cache directory: the probe.

`probe` decides, in one worker-thread hop, how to serve one version of one
source: a fresh cached copy is there (``"cache"``); the entry lock is ours, so
a part file is created, locked and its space reserved (``"copy"``); another
process copies it (``"follow"``); it cannot be cached (``"source"``); or the
entry is held for a moment and the opener tries again (``"wait"``, and
``"busy"``: the ledger was held and the probe may not wait for it).  What the
probe obtained (fds, locks, reserved space) is in its `Probe`; `discard`
gives it all back if the opener goes away.  Blocking calls only: worker
threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from typing import Literal, TypeGuard, get_args

from .._durable import temp_name, unlink_quietly
from .._flock import try_lock_exclusive
from ._directory import Directory
from ._record import IDENT_XATTR, OPEN_FLAGS, QUEUED, LedgerBusy, read_record
from ._source import Version

__all__ = ("Mode", "Probe", "ProbeKind", "discard", "is_mode", "probe")

#: How a session serves its readers (see `_session`).
Mode = Literal["cache", "copy", "follow", "source"]
#: What a probe found: a `Mode`, or "try again" (``"wait"``; ``"busy"``: on a
#: slow thread, which may wait for the ledger), or nothing yet (``""``).
ProbeKind = Literal["", "cache", "copy", "follow", "source", "wait", "busy"]


def is_mode(kind: ProbeKind) -> TypeGuard[Mode]:
    """Is ``kind`` a way to serve (not a reason to probe again)?"""
    return kind in get_args(Mode)


class Probe:
    """What one probe of an entry obtained; filled in a worker thread.

    If the opening task goes away (cancelled) after the thread obtained
    something, `discard` gives it all back.
    """

    __slots__ = (
        "data_fd",
        "kind",
        "lock_fd",
        "locked",
        "name",
        "progress",
        "queued",
        "reserved",
        "tmp",
        "wait",
        "watch",
    )

    def __init__(self, name: str, wait: bool = False, queued: bool = False) -> None:
        self.name = name
        #: May the probe wait for the ledger's lock (it runs on a slow thread)?
        self.wait = wait
        #: Would a copy started now wait for a copy slot?
        self.queued = queued
        self.kind: ProbeKind = ""
        self.data_fd: int | None = None
        self.lock_fd: int | None = None
        self.locked = False
        self.tmp: str | None = None
        self.reserved = 0
        self.watch: int | None = None
        self.progress = 0


def probe(directory: Directory, p: Probe, version: Version) -> Probe:
    """Decide how to serve ``p.name`` at ``version``; fills ``p`` and returns it."""
    try:
        _probe(directory, p, version)
    except LedgerBusy:
        discard(directory, p)
        p.kind = "busy"
    except BaseException:
        discard(directory, p)
        raise
    return p


def _probe(directory: Directory, p: Probe, version: Version) -> None:
    name = p.name
    if _take_cached(directory, p, version):
        return
    p.lock_fd = os.open(directory.lock_path(name), os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o600)
    if not try_lock_exclusive(p.lock_fd):
        _probe_busy(directory, p, version)
        return
    p.locked = True
    if os.fstat(p.lock_fd).st_nlink == 0:
        # Evicted (lock file and all) between our open and our lock.
        _drop_lock(p)
        p.kind = "wait"
        return
    directory.heal(name, p.lock_fd, p.wait)
    if _take_cached(directory, p, version):
        _drop_lock(p)
        return
    directory.remove_outdated(name, p.wait)
    if version.size > directory.max_size:
        _drop_lock(p)
        p.kind = "source"
        return
    # The part file is locked before it has its public name, so a
    # follower never mistakes it for a dead one.
    p.tmp = temp_name(directory.part_path(name))
    p.data_fd = os.open(p.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    fcntl.flock(p.data_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ino = os.fstat(p.data_fd).st_ino
    if not directory.reserve(name, p.lock_fd, version, ino, p.wait, p.queued):
        discard(directory, p)
        p.kind = "source"
        return
    p.reserved = version.size
    os.replace(p.tmp, directory.part_path(name))
    p.tmp = None
    p.kind = "copy"


def _take_cached(directory: Directory, p: Probe, version: Version) -> bool:
    """Open a fresh cached copy with ``LOCK_SH`` held (so no one evicts it)."""
    try:
        fd = os.open(directory.final(p.name), os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        return False
    keep = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # being evicted right now
        st = os.fstat(fd)
        if (
            st.st_nlink == 0
            or not stat.S_ISREG(st.st_mode)
            or st.st_size != version.size
            or st.st_mtime_ns != version.mtime_ns
            or not _same_ident(fd, version)
        ):
            return False
        with contextlib.suppress(OSError):
            # The atime records the last open: eviction goes oldest first.
            os.utime(fd, ns=(directory.clock_ns(), version.mtime_ns))
        keep = True
    finally:
        if not keep:
            os.close(fd)
    p.data_fd = fd
    p.kind = "cache"
    return True


def _same_ident(fd: int, version: Version) -> bool:
    """Is the cached copy open on ``fd`` of ``version`` (its `IDENT_XATTR`)?"""
    want = version.ident_hash
    if not want:
        return True  # a Source object: size and mtime are all there is
    try:
        return os.getxattr(fd, IDENT_XATTR) == want.to_bytes(8, "big")
    except OSError:
        return False  # published before idents (or without xattrs): outdated


def _probe_busy(directory: Directory, p: Probe, version: Version) -> None:
    """Someone else holds the entry lock: follow its copy if it is ours to follow."""
    assert p.lock_fd is not None
    try:
        part = os.open(directory.part_path(p.name), os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        part = -1
    kind: ProbeKind = "wait"
    try:
        if part >= 0:
            st = os.fstat(part)
            try:
                fcntl.flock(part, fcntl.LOCK_SH | fcntl.LOCK_NB)
                live = False
            except BlockingIOError:
                live = True  # its copier holds LOCK_EX
            rec = read_record(p.lock_fd)
            if rec is None or rec.part_ino != st.st_ino:
                kind = "wait"  # a copier is starting, or a dead part is being replaced
            elif (rec.size, rec.mtime_ns, rec.ident) != (
                version.size,
                version.mtime_ns,
                version.ident_hash,
            ):
                kind = "source"  # another version is being copied
            elif live:
                kind = "follow"
            elif rec.progress != QUEUED and rec.progress >= rec.size == st.st_size:
                kind = "cache"  # complete, a moment before its rename
            if kind == "follow":
                p.watch = directory.add_watch(directory.lock_path(p.name))
                p.progress = rec.progress if rec is not None else 0
            if kind in ("follow", "cache"):
                p.data_fd, part = part, -1
    finally:
        if part >= 0:
            os.close(part)
    p.kind = kind
    if kind != "follow":
        os.close(p.lock_fd)
        p.lock_fd = None


def _drop_lock(p: Probe) -> None:
    fd, p.lock_fd = p.lock_fd, None
    if fd is not None:
        if p.locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    p.locked = False


def discard(directory: Directory, p: Probe) -> None:
    """Give back everything a probe obtained (idempotent)."""
    try:
        if p.tmp is not None:
            unlink_quietly(p.tmp)
            p.tmp = None
        if p.reserved and p.lock_fd is not None:
            directory.cancel(p.name, p.lock_fd, p.reserved, p.wait)
            p.reserved = 0
    finally:
        fd, p.data_fd = p.data_fd, None
        if fd is not None:
            os.close(fd)
        _drop_lock(p)
        p.kind = ""
