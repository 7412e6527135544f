"""The on-disk format of a cache directory: entry names, the copy record, the ledger.

For each source (named by a hash of its key, `entry_name`) the directory may
hold::

    <h>          the cached copy, published whole (fsynced, then renamed)
    .<h>.lock    the entry lock, and the `Record` of a copy in progress
    .<h>.part    the copy in progress (never under the final name)
    .usage       the space ledger: bytes used, under its own lock

Every process that shares the directory reads and writes these bytes, so
they are defined in this one file: the record's layout and its torn-read
check, the ledger's counter and its lock (`Ledger`).  Plain blocking
functions on fds, called in worker threads; nothing here decides anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = (
    "FINAL_NAME",
    "IDENT_XATTR",
    "OPEN_FLAGS",
    "QUEUED",
    "RECORD_SIZE",
    "USAGE_FILE",
    "Ledger",
    "LedgerBusy",
    "Record",
    "clear_record",
    "entry_name",
    "read_progress",
    "read_record",
    "retire_record",
    "write_progress",
    "write_record",
)

#: The name of a cached copy (`entry_name`); its lock and part files add a
#: leading dot and a suffix.
FINAL_NAME = re.compile(r"[0-9a-f]{32}")
USAGE_FILE = ".usage"
#: Every file of the directory is opened without following a symlink.
OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


def entry_name(key: str) -> str:
    """The cached file's name for ``key``: keys may hold any character, names may not."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


# --------------------------------------------------------------------------
# The record in an entry's lock file: what is being copied, and how far
#
# 72 bytes at offset 0.  The progress counter is stored twice (the second
# copy XOR a mask) and the rest carries a CRC: a follower reads it without a
# lock while the copier rewrites it, and must recognize a torn read.  The
# version is size, mtime and ``ident`` (`Version.ident_hash`: a local file's
# inode and ctime).  Records of the first format (``ATSCOPY1``, 64 bytes,
# without ident) read as none: their copy is not followed, and the part they
# name is replaced by the next copier.
#
# A published copy carries its version's ident in the extended attribute
# `IDENT_XATTR` (set on the part just before its rename, so it moves with
# the inode): a cached copy without it, or with another, is outdated.

_RECORD = struct.Struct("<QQ8sQqQQQI4x")
_PROGRESS = struct.Struct("<QQ")
_MASK = 0x5A5A_5A5A_5A5A_5A5A
_MAGIC = b"ATSCOPY2"
#: The extended attribute that names a cached copy's version (its ident hash).
IDENT_XATTR = "user.atempstore.ident"
RECORD_SIZE = _RECORD.size
#: The progress of a copy still queued for a copy slot in its process: its
#: followers read from the source meanwhile, as its local readers do.
QUEUED = (1 << 64) - 1


@dataclass(frozen=True)
class Record:
    progress: int
    size: int
    mtime_ns: int
    part_ino: int
    reserved: int
    ident: int = 0


def write_record(fd: int, rec: Record) -> None:
    body = struct.pack(
        "<8sQqQQQ", _MAGIC, rec.size, rec.mtime_ns, rec.part_ino, rec.reserved, rec.ident
    )
    raw = _PROGRESS.pack(rec.progress, rec.progress ^ _MASK) + body
    os.pwrite(fd, raw + struct.pack("<I4x", zlib.crc32(body)), 0)


def clear_record(fd: int) -> None:
    os.pwrite(fd, bytes(RECORD_SIZE), 0)


def retire_record(fd: int) -> None:
    """End the record of a published copy but keep its counter.

    A follower learns that the copy is complete from the counter (the full
    size, written before the copier let go of the part file), and may read it
    only after the publication: the kernel wakes it when the part's lock is
    downgraded, but it reads the counter whenever it next gets a CPU.  Zeroing
    the counter too (`clear_record`) would tell it the copy failed, so only the
    body goes: `read_record` sees no record, `read_progress` still the size.
    """
    os.pwrite(fd, bytes(RECORD_SIZE - _PROGRESS.size), _PROGRESS.size)


def write_progress(fd: int, progress: int) -> None:
    os.pwrite(fd, _PROGRESS.pack(progress, progress ^ _MASK), 0)


def read_record(fd: int) -> Record | None:
    """The active record, or None (none, cleared, or unreadable)."""
    for _ in range(8):
        raw = os.pread(fd, RECORD_SIZE, 0)
        if len(raw) < RECORD_SIZE:
            return None
        progress, check, magic, size, mtime_ns, ino, reserved, ident, crc = _RECORD.unpack(raw)
        if magic != _MAGIC:
            return None
        if crc != zlib.crc32(raw[16:64]) or progress ^ _MASK != check:
            continue  # read while being rewritten: read again
        return Record(progress, size, mtime_ns, ino, reserved, ident)
    return None


def read_progress(fd: int) -> int | None:
    for _ in range(8):
        raw = os.pread(fd, _PROGRESS.size, 0)
        if len(raw) < _PROGRESS.size:
            return None
        progress, check = _PROGRESS.unpack(raw)
        if progress ^ _MASK == check:
            return int(progress)
    return None


# --------------------------------------------------------------------------
# The ledger: bytes used, stored twice (the second copy XOR a mask), under
# flock on the ``.usage`` file


_USAGE = struct.Struct("<QQ")
_USAGE_MASK = 0xC0FF_EE00_C0FF_EE00


class LedgerBusy(Exception):
    """The ledger's lock is held (by another process, or by a thread of this one
    that waits for it).  Raised where waiting is not allowed: on a file thread,
    which must not wait on another process.  What the call obtained was given
    back; it is made again on a slow thread, which may wait (see ``ledger_hop``)."""


class Ledger:
    """The ``.usage`` file of one cache: a byte counter and the lock that guards it.

    Example (in a worker thread):
        ```python
        ledger = Ledger()
        ledger.open("/var/cache/media")
        with ledger.held(wait=True):
            ledger.write((ledger.read() or 0) + 4096)
        ledger.close()
        ```
    """

    def __init__(self) -> None:
        self._fd = -1
        # flock belongs to an open file description, which all threads of this
        # process share through _fd: the mutex excludes them from each other.
        self._mutex = threading.Lock()

    def open(self, root: str) -> None:
        self._fd = os.open(
            os.path.join(root, USAGE_FILE), os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o600
        )

    def close(self) -> None:
        with self._mutex:
            self.drop()

    def drop(self) -> None:
        """`close` without the mutex: for an `open` that failed (nobody else holds it)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    @contextlib.contextmanager
    def held(self, wait: bool = True) -> Iterator[None]:
        """Hold the ledger.  Other holders keep it for microseconds (or one
        eviction walk), but one may be another process that stopped: only a
        slow thread waits for it (``wait``); elsewhere `LedgerBusy`."""
        if not self._mutex.acquire(blocking=wait):
            raise LedgerBusy
        try:
            if self._fd < 0:
                raise RuntimeError("the FileCache is closed")
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerBusy from None
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def read(self) -> int | None:
        """The counter, or None (missing or torn): the caller recounts."""
        raw = os.pread(self._fd, _USAGE.size, 0)
        if len(raw) < _USAGE.size:
            return None
        usage, check = _USAGE.unpack(raw)
        return int(usage) if usage ^ _USAGE_MASK == check else None

    def write(self, usage: int) -> None:
        usage = max(usage, 0)
        os.pwrite(self._fd, _USAGE.pack(usage, usage ^ _USAGE_MASK), 0)
