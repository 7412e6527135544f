"""The copy-while-serving cache: `FileCache`, its readers (`CachedFile`), and its directory.

A `FileCache` owns one directory, which any number of processes may share.
For each source (a path or a `Source` object, named by a hash of its key)
the directory may hold::

    <h>          the cached copy, published whole (fsynced, then renamed)
    .<h>.lock    the entry lock, and the record of a copy in progress
    .<h>.part    the copy in progress (never under the final name)
    .usage       the space ledger: bytes used, under its own lock

Opening a source asks, in one worker-thread hop: is a fresh copy there
(size and mtime match)?  Else, can I take the entry lock?  Then I copy: a
part file is created and locked, space is reserved in the ledger (evicting
least-recently-opened copies nobody holds, if needed), and a `CopySession`
(``_copysession.py``) runs the copy.  If another process holds the entry
lock, this one *follows* its part file instead of copying again.  If no
space can be made, the file is served uncached, from the source.

The ledger counts bytes without walking the directory: every reservation,
publication, cancellation and removal updates one counter under a lock.
The directory is walked only when space runs out (to evict) or when the
counter is missing or unreadable.  That walk also recounts from scratch,
so a counter left wrong by a crash heals itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from anyio import CapacityLimiter
from anyio.abc import AsyncResource

from ._copysession import (
    CLOSE_TIMEOUT,
    QUEUED,
    Copier,
    CopySession,
    Doorbell,
    MiB,
    ObjectOrigin,
    Origin,
    PathOrigin,
    Record,
    SharedFd,
    Source,
    Version,
    clear_record,
    entry_name,
    finish,
    open_doorbell_fd,
    read_record,
    write_record,
)
from ._durable import makedirs, temp_name, unlink_quietly
from ._errors import SourceChangedError
from ._flock import try_lock_exclusive
from ._threads import run_sync


def _load_asyncinotify() -> Any:
    """Import asyncinotify, in a worker thread: importing it reads files and runs
    ``ldconfig`` (ctypes.util.find_library), which ``import atempstore`` must not."""
    try:
        import asyncinotify
    except ImportError:  # not Linux: followers poll
        return None
    return asyncinotify


__all__ = ("CachedFile", "FileCache", "Source")

T = TypeVar("T")

_FINAL = re.compile(r"[0-9a-f]{32}")
_USAGE_FILE = ".usage"
_USAGE = struct.Struct("<QQ")
_USAGE_MASK = 0xC0FF_EE00_C0FF_EE00
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW
#: A temporary part file older than this belongs to a process that died while
#: creating it (it lives for microseconds otherwise).
_STALE_TMP_NS = 3600 * 1_000_000_000


class _Stats:
    """Counters, bumped from the loop and from copy threads."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "opens",
                "hits",
                "copies",
                "published",
                "follows",
                "followed",
                "uncached",
                "failed",
                "evicted",
                "outdated",
                "copied_bytes",
                "source_bytes",
            ),
            0,
        )

    def count(self, what: str, n: int = 1) -> None:
        with self._mutex:
            self._counts[what] = self._counts.get(what, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._mutex:
            return dict(self._counts)


class _LedgerBusy(Exception):
    """The ledger's lock is held (by another process, or by a thread of this one
    that waits for it).  Raised where waiting is not allowed: on a file thread,
    which must not wait on another process.  What the call obtained was given
    back; it is made again on a slow thread, which may wait (see `_ledger_hop`)."""


class _Probe:
    """What one probe of an entry obtained; filled in a worker thread.

    If the opening task goes away (cancelled) after the thread obtained
    something, `_Directory.discard` gives it all back.
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
        # "cache" | "copy" | "follow" | "source" | "wait" | "busy" (ledger held: retry slow)
        self.kind = ""
        self.data_fd: int | None = None
        self.lock_fd: int | None = None
        self.locked = False
        self.tmp: str | None = None
        self.reserved = 0
        self.watch: int | None = None
        self.progress = 0


# --------------------------------------------------------------------------
# The directory: blocking helpers, always called in a worker thread


class _Directory:
    """The cache directory on disk: layout, ledger, probing and eviction."""

    def __init__(self, root: str, max_size: int, clock: Callable[[], float], stats: _Stats) -> None:
        self.root = root
        self.max_size = max_size
        self.clock = clock
        self.stats = stats
        self._fd = -1
        # flock belongs to an open file description, which all threads of this
        # process share through _fd: the mutex excludes them from each other.
        self._mutex = threading.Lock()
        self.add_watch: Callable[[str], int | None] = lambda path: None

    def final(self, name: str) -> str:
        return os.path.join(self.root, name)

    def lock_path(self, name: str) -> str:
        return os.path.join(self.root, f".{name}.lock")

    def part_path(self, name: str) -> str:
        return os.path.join(self.root, f".{name}.part")

    def clock_ns(self) -> int:
        return round(self.clock() * 1_000_000_000)

    # -- opening and closing ----------------------------------------------------

    def open(self, wait: bool) -> None:
        # Every level created gets 0700 (os.makedirs gives it to the last one
        # only) and is fsynced into its parent.
        makedirs(self.root, 0o700)
        self.root = os.path.realpath(self.root)
        fd = os.open(
            os.path.join(self.root, _USAGE_FILE), os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600
        )
        self._fd = fd
        try:
            with self._ledger(wait):
                if self._read_usage() is None:
                    self._write_usage(self._scan(0))
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    def close(self) -> None:
        with self._mutex:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    # -- the ledger -------------------------------------------------------------

    @contextlib.contextmanager
    def _ledger(self, wait: bool = True) -> Iterator[None]:
        """Hold the ledger.  Other holders keep it for microseconds (or one
        eviction walk), but one may be another process that stopped: only a
        slow thread waits for it (``wait``); elsewhere `_LedgerBusy`."""
        if not self._mutex.acquire(blocking=wait):
            raise _LedgerBusy
        try:
            if self._fd < 0:
                raise RuntimeError("the FileCache is closed")
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _LedgerBusy from None
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _read_usage(self) -> int | None:
        raw = os.pread(self._fd, _USAGE.size, 0)
        if len(raw) < _USAGE.size:
            return None
        usage, check = _USAGE.unpack(raw)
        return int(usage) if usage ^ _USAGE_MASK == check else None

    def _write_usage(self, usage: int) -> None:
        usage = max(usage, 0)
        os.pwrite(self._fd, _USAGE.pack(usage, usage ^ _USAGE_MASK), 0)

    def _add_usage(self, delta: int) -> None:
        usage = self._read_usage()
        self._write_usage(self._scan(0) if usage is None else usage + delta)

    def usage(self, wait: bool) -> int:
        with self._ledger(wait):
            usage = self._read_usage()
            if usage is None:
                usage = self._scan(0)
                self._write_usage(usage)
            return usage

    def publish(self, name: str, lock_fd: int) -> None:
        """Rename a finished part into place (its reservation becomes the file)."""
        with self._ledger():
            os.replace(self.part_path(name), self.final(name))
            clear_record(lock_fd)

    def cancel(self, name: str, lock_fd: int, reserved: int, wait: bool = True) -> None:
        """Drop an unfinished part and give its reserved space back."""
        try:
            ledger = self._ledger(wait)
            ledger.__enter__()
        except (RuntimeError, _LedgerBusy):
            # The cache is closed (or the ledger held and we may not wait): the
            # part goes anyway, and the record stays for the next holder of
            # this entry to give the space back (_heal).
            unlink_quietly(self.part_path(name))
            return
        try:
            unlink_quietly(self.part_path(name))
            if read_record(lock_fd) is not None:
                self._add_usage(-reserved)
                clear_record(lock_fd)
        finally:
            ledger.__exit__(None, None, None)

    # -- probing one entry --------------------------------------------------------

    def probe(self, p: _Probe, version: Version) -> _Probe:
        """Decide how to serve ``p.name`` at ``version``; fills ``p`` and returns it."""
        try:
            self._probe(p, version)
        except _LedgerBusy:
            self.discard(p)
            p.kind = "busy"
        except BaseException:
            self.discard(p)
            raise
        return p

    def _probe(self, p: _Probe, version: Version) -> None:
        name = p.name
        if self._take_cached(p, version):
            return
        p.lock_fd = os.open(self.lock_path(name), os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        if not try_lock_exclusive(p.lock_fd):
            self._probe_busy(p, version)
            return
        p.locked = True
        if os.fstat(p.lock_fd).st_nlink == 0:
            # Evicted (lock file and all) between our open and our lock.
            self._drop_lock(p)
            p.kind = "wait"
            return
        self._heal(name, p.lock_fd, p.wait)
        if self._take_cached(p, version):
            self._drop_lock(p)
            return
        self._remove_outdated(name, p.wait)
        if version.size > self.max_size:
            self._drop_lock(p)
            p.kind = "source"
            return
        # The part file is locked before it has its public name, so a
        # follower never mistakes it for a dead one.
        p.tmp = temp_name(self.part_path(name))
        p.data_fd = os.open(p.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        fcntl.flock(p.data_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ino = os.fstat(p.data_fd).st_ino
        if not self._reserve(name, p.lock_fd, version, ino, p.wait, p.queued):
            self.discard(p)
            p.kind = "source"
            return
        p.reserved = version.size
        os.replace(p.tmp, self.part_path(name))
        p.tmp = None
        p.kind = "copy"

    def _take_cached(self, p: _Probe, version: Version) -> bool:
        """Open a fresh cached copy with ``LOCK_SH`` held (so no one evicts it)."""
        try:
            fd = os.open(self.final(p.name), os.O_RDONLY | _OPEN_FLAGS)
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
            ):
                return False
            with contextlib.suppress(OSError):
                # The atime records the last open: eviction goes oldest first.
                os.utime(fd, ns=(self.clock_ns(), version.mtime_ns))
            keep = True
        finally:
            if not keep:
                os.close(fd)
        p.data_fd = fd
        p.kind = "cache"
        return True

    def _probe_busy(self, p: _Probe, version: Version) -> None:
        """Someone else holds the entry lock: follow its copy if it is ours to follow."""
        assert p.lock_fd is not None
        try:
            part = os.open(self.part_path(p.name), os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            part = -1
        kind = "wait"
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
                elif (rec.size, rec.mtime_ns) != (version.size, version.mtime_ns):
                    kind = "source"  # another version is being copied
                elif live:
                    kind = "follow"
                elif rec.progress != QUEUED and rec.progress >= rec.size == st.st_size:
                    kind = "cache"  # complete, a moment before its rename
                if kind == "follow":
                    p.watch = self.add_watch(self.lock_path(p.name))
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

    def _drop_lock(self, p: _Probe) -> None:
        fd, p.lock_fd = p.lock_fd, None
        if fd is not None:
            if p.locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        p.locked = False

    def discard(self, p: _Probe) -> None:
        """Give back everything a probe obtained (idempotent)."""
        try:
            if p.tmp is not None:
                unlink_quietly(p.tmp)
                p.tmp = None
            if p.reserved and p.lock_fd is not None:
                self.cancel(p.name, p.lock_fd, p.reserved, p.wait)
                p.reserved = 0
        finally:
            fd, p.data_fd = p.data_fd, None
            if fd is not None:
                os.close(fd)
            self._drop_lock(p)
            p.kind = ""

    def _heal(self, name: str, lock_fd: int, wait: bool) -> None:
        """With the entry lock held: undo what a copier that died left behind."""
        if read_record(lock_fd) is None:
            return
        with self._ledger(wait):
            rec = read_record(lock_fd)
            if rec is None:
                return
            if not self._is_final(name, rec):
                unlink_quietly(self.part_path(name))
                self._add_usage(-rec.reserved)
            clear_record(lock_fd)

    def _is_final(self, name: str, rec: Record) -> bool:
        """Did the copier of ``rec`` publish (and die before clearing its record)?"""
        try:
            return os.stat(self.final(name), follow_symlinks=False).st_ino == rec.part_ino
        except FileNotFoundError:
            return False

    def _remove_outdated(self, name: str, wait: bool) -> None:
        """With the entry lock held: remove a copy of an older version.

        Readers that hold it keep reading their (consistent) old version
        through their open fd; the kernel frees the space when they close it.
        """
        final = self.final(name)
        try:
            size = os.stat(final, follow_symlinks=False).st_size
        except FileNotFoundError:
            return
        with self._ledger(wait):
            try:
                os.unlink(final)
            except FileNotFoundError:
                return
            self._add_usage(-size)
        self.stats.count("outdated")

    def _reserve(
        self, name: str, lock_fd: int, version: Version, part_ino: int, wait: bool, queued: bool
    ) -> bool:
        size = version.size
        with self._ledger(wait):
            usage = self._read_usage()
            if usage is None or usage + size > self.max_size:
                usage = self._scan(size)
            if usage + size > self.max_size:
                self._write_usage(usage)
                return False
            # The counter first: a crash between the two writes leaks space
            # (healed by the next walk) instead of hiding a reservation.
            self._write_usage(usage + size)
            # A copy that will wait for a copy slot is QUEUED until its thread
            # starts (it writes 0): followers in other processes read from the
            # source meanwhile.  Written here, not on the loop.
            progress = QUEUED if queued else 0
            write_record(lock_fd, Record(progress, size, version.mtime_ns, part_ino, size))
            return True

    # -- the walk: recount, collect garbage, evict -------------------------------

    def _scan(self, need: int) -> int:
        """Recount usage from the directory (ledger held); evict LRU until ``need`` fits."""
        finals: dict[str, tuple[int, int]] = {}
        entries: list[str] = []
        now = self.clock_ns()
        with os.scandir(self.root) as it:
            for entry in it:
                n = entry.name
                try:
                    if _FINAL.fullmatch(n):
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            finals[n] = (st.st_atime_ns, st.st_size)
                    elif n.startswith(".") and n.endswith(".lock") and _FINAL.fullmatch(n[1:-5]):
                        entries.append(n[1:-5])
                    elif n.startswith("..") and n.endswith(".tmp"):
                        st = entry.stat(follow_symlinks=False)
                        if now - st.st_mtime_ns > _STALE_TMP_NS:
                            unlink_quietly(entry.path)
                except FileNotFoundError:
                    continue
        reserved = sum(self._inspect_entry(name, name in finals) for name in entries)
        usage = sum(size for _, size in finals.values()) + reserved
        if need and usage + need > self.max_size:
            for name in sorted(finals, key=lambda n: finals[n][0]):
                if usage + need <= self.max_size:
                    break
                usage -= self._evict(name)
        return usage

    def _inspect_entry(self, name: str, has_final: bool) -> int:
        """Bytes a live copy of ``name`` has reserved; clean up after a dead one."""
        try:
            fd = os.open(self.lock_path(name), os.O_RDWR | _OPEN_FLAGS)
        except FileNotFoundError:
            return 0
        try:
            if not try_lock_exclusive(fd):
                rec = read_record(fd)  # a live copier wrote it under the ledger lock
                return rec.reserved if rec is not None else 0
            if os.fstat(fd).st_nlink == 0:
                return 0
            rec = read_record(fd)
            if rec is not None:
                if not self._is_final(name, rec):
                    unlink_quietly(self.part_path(name))
                clear_record(fd)
            if not has_final:
                # An entry with nothing cached: drop its lock file (safe while
                # we hold it: whoever locks it next sees st_nlink == 0).
                unlink_quietly(self.part_path(name))
                unlink_quietly(self.lock_path(name))
            return 0
        finally:
            os.close(fd)

    def _evict(self, name: str) -> int:
        """Remove ``name`` unless someone holds it; returns the bytes freed."""
        lock_path = self.lock_path(name)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        try:
            if not try_lock_exclusive(lock_fd):
                return 0  # being copied or probed
            if os.fstat(lock_fd).st_nlink == 0:
                return 0
            try:
                fd = os.open(self.final(name), os.O_RDONLY | _OPEN_FLAGS)
            except FileNotFoundError:
                return 0
            try:
                if not try_lock_exclusive(fd):
                    return 0  # a reader, in some process, holds it
                size = os.fstat(fd).st_size
                os.unlink(self.final(name))
            finally:
                os.close(fd)
            unlink_quietly(lock_path)
            self.stats.count("evicted")
            return size
        finally:
            os.close(lock_fd)


# --------------------------------------------------------------------------
# inotify: wake followers when a copier in another process makes progress


class _Notifier:
    """One inotify instance per cache; `None` watches mean "poll instead"."""

    def __init__(self) -> None:
        self._inotify: Any = None
        self._mask: Any = None
        self._task: asyncio.Task[None] | None = None
        self._subscribers: dict[int, set[CopySession]] = {}
        self.available = False

    def start(self, asyncinotify: Any) -> None:
        """On the loop: inotify_init1 names no path.  ``asyncinotify`` was imported
        by `_load_asyncinotify` in a worker thread (None: followers poll)."""
        if self._inotify is not None or self._task is not None or asyncinotify is None:
            return
        try:
            self._inotify = asyncinotify.Inotify()
        except OSError:  # out of inotify instances: followers poll
            return
        self._mask = asyncinotify.Mask.MODIFY
        self.available = True
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    def add_watch(self, path: str) -> int | None:
        """In a worker thread (it names a path)."""
        if self._inotify is None:
            return None
        try:
            return int(self._inotify.add_watch(path, self._mask).wd)
        except OSError:
            return None

    def subscribe(self, wd: int, session: CopySession) -> Callable[[], None]:
        self._subscribers.setdefault(wd, set()).add(session)

        def unsubscribe() -> None:
            subs = self._subscribers.get(wd)
            if subs is None:
                return
            subs.discard(session)
            if not subs:
                del self._subscribers[wd]
                with contextlib.suppress(OSError, ValueError):
                    # inotify_rm_watch takes the inotify fd, not a path.
                    for watch in self._inotify.watches:
                        if watch.wd == wd:
                            self._inotify.rm_watch(watch)

        return unsubscribe

    async def _dispatch(self) -> None:
        async for event in self._inotify:
            watch = event.watch
            if watch is None:
                continue
            for session in list(self._subscribers.get(watch.wd, ())):
                session.poke()

    async def stop(self) -> Callable[[], None] | None:
        """Stop dispatching; returns what closes the inotify fd, for a worker
        thread: closing it waits for an RCU grace period in the kernel (2-8 ms
        measured here).  The dispatch task is done, so the fd is no longer
        registered with the loop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        inotify, self._inotify = self._inotify, None
        return None if inotify is None else inotify.close


# --------------------------------------------------------------------------
# The public classes


class FileCache(AsyncResource):
    """A local cache that serves files to many async readers *while* it copies them.

    ``directory`` holds the cached copies; it is created (mode 0700) on first
    use and may be shared by several processes.  ``max_size`` bounds the bytes
    of cached copies (and copies in progress) in it; least-recently-opened
    copies that no reader holds, in any process, are evicted to make room.
    When no room can be made, or the cache's disk fails (ENOSPC, EIO), files
    are served uncached, straight from the source, with exact bytes.

    A read more than ``wait_window`` bytes ahead of a copy in progress is
    served from the source at once instead of waiting.  ``chunk_size`` is the
    largest chunk a `Source` object is copied in (local paths are copied in the
    kernel, in larger chunks); ``read_size`` is the largest chunk
    `CachedFile.iter_bytes` yields (it starts at 64 KiB and doubles), so a
    reader holds at most that much memory.  With ``finish_abandoned`` (the
    default) a copy runs to the end even when every reader has left; without
    it, it is cancelled.  At most ``max_copies`` copies run at once; the
    readers of a queued copy read from the source meanwhile.  Reads of the
    local cache file use at most ``read_threads`` worker threads (default: one
    less than the CPUs, 1 to 4; more would take the event loop's CPU without
    adding throughput).  ``lock_timeout`` bounds how long an open waits for
    another process that holds an entry without copying it (it then serves
    the file uncached).  ``poll_interval`` is the followers' safety poll.
    ``clock`` is injectable (it stamps the last open of a copy) so eviction
    order can be made deterministic in tests.  ``close_timeout`` bounds how
    long `aclose` waits for a copy to stop (a source read that hangs); the
    readers of a copy it gives up on get `SourceChangedError`.

    The constructor does no I/O.  Use it as an async context manager; leaving
    it cancels the copies still running, removes their temporary files and
    waits for them to stop.

    Example:
        ```python
        async with FileCache("/var/cache/media", max_size=20 * 2**30) as cache:
            async with cache.open("/mnt/nfs/video.mp4") as f:
                async for chunk in f.iter_bytes(0, f.size):
                    await send(chunk)
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_size: int = 1 << 30,
        wait_window: int = 1 * MiB,
        chunk_size: int = 1 * MiB,
        read_size: int = 512 * 1024,
        finish_abandoned: bool = True,
        max_copies: int = 8,
        read_threads: int | None = None,
        lock_timeout: float = 10.0,
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.time,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        for label, value in (
            ("max_size", max_size),
            ("chunk_size", chunk_size),
            ("read_size", read_size),
            ("max_copies", max_copies),
            ("read_threads", 1 if read_threads is None else read_threads),
        ):
            if value <= 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if wait_window < 0:
            raise ValueError(f"wait_window must be >= 0, got {wait_window!r}")
        if close_timeout < 0:
            raise ValueError(f"close_timeout must be >= 0, got {close_timeout!r}")
        self._directory = Path(directory)
        self.max_size = max_size
        self.wait_window = wait_window
        self.chunk_size = chunk_size
        self.read_size = read_size
        self.finish_abandoned = finish_abandoned
        self.max_copies = max_copies
        self.read_threads = read_threads
        self.lock_timeout = lock_timeout
        self.poll_interval = poll_interval
        self.close_timeout = close_timeout
        self._stats = _Stats()
        self._dir = _Directory(os.fspath(directory), max_size, clock, self._stats)
        self._notifier = _Notifier()
        self._dir.add_watch = self._notifier.add_watch
        self._sessions: dict[str, CopySession] = {}
        self._live: set[CopySession] = set()
        self._gates: dict[str, asyncio.Event] = {}
        self._limiter: CapacityLimiter | None = None
        self._read_limiter: CapacityLimiter | None = None
        self._ready_lock: asyncio.Lock | None = None
        self._ready = False
        self._closed = False
        self._shut = False  # aclose() finished (a cancelled one may be resumed)
        self._probing = 0
        self._probes_done: asyncio.Event | None = None
        self._doorbell: Doorbell | None = None

    def __repr__(self) -> str:
        return f"<FileCache {os.fspath(self._directory)!r} max_size={self.max_size}>"

    @property
    def directory(self) -> Path:
        """The cache directory, as given."""
        return self._directory

    async def __aenter__(self) -> FileCache:
        await self._ensure_ready()
        return self

    async def _ensure_ready(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; create a new FileCache")
        if self._ready:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if not self._ready:
                cpus, asyncinotify, bell_fd = await _ledger_hop(
                    _prepare, self._dir, undo=_unprepare(self._dir)
                )
                self._doorbell = Doorbell(asyncio.get_running_loop(), bell_fd)
                self._limiter = CapacityLimiter(self.max_copies)
                # One core stays free for the event loop (and the copy thread):
                # on 2 cores, 4 busy readers made the loop wait several ms.
                threads = self.read_threads or max(1, min(4, cpus - 1))
                self._read_limiter = CapacityLimiter(threads)
                self._notifier.start(asyncinotify)
                self._ready = True

    def open(self, source: Source | str | os.PathLike[str]) -> _Opening:
        """Open ``source`` (a path or a `Source`) for reading through the cache.

        Use as ``async with cache.open(source) as f`` or ``f = await
        cache.open(source)`` (then call ``await f.aclose()``).  Opening checks
        the cached copy's freshness (size and mtime against the source's);
        a missing or outdated copy starts a copy, shared with every other
        reader of the same source, in this process or another one.  Raises
        what the source raises (``FileNotFoundError`` for a missing path).

        Example:
            ```python
            async with cache.open("/mnt/nfs/big.iso") as f:
                header = await f.read(0, 512)
                tail = await f.read(f.size - 4096, 4096)  # served at once
            ```
        """
        return _Opening(self, source)

    async def _open(self, source: Source | str | os.PathLike[str]) -> CachedFile:
        origin: Origin
        if isinstance(source, (str, bytes, os.PathLike)):
            origin = PathOrigin(os.fsdecode(source))
        elif callable(getattr(type(source), "pread", None)):
            origin = ObjectOrigin(source)
        else:
            raise TypeError(
                f"cannot cache {source!r}: pass a path or an object with key, size,"
                " mtime and pread(offset, n) (see atempstore.Source)"
            )
        await self._ensure_ready()
        self._stats.count("opens")
        # A Source object's size and mtime may ask a slow backend: slow work.
        await run_sync(
            origin.resolve, slow=isinstance(origin, ObjectOrigin), undo=lambda _: origin.close()
        )
        try:
            session, spare = await self._session_for(origin)
        except BaseException:
            if origin.holds_fd:
                await finish(origin.close)
            raise
        return CachedFile(self, session, spare)

    async def _session_for(self, origin: Origin) -> tuple[CopySession, Origin | None]:
        """The session to share for ``origin``, and ``origin`` back if the session
        has its own (the reader closes it, in its `CachedFile.aclose` hop)."""
        name = entry_name(origin.key)
        while True:
            current = self._sessions.get(name)
            if current is not None and current.shareable and current.version == origin.version:
                current.acquire()
                return current, origin
            gate = self._gates.get(name)
            if gate is None:
                break
            await gate.wait()  # another task is probing this entry: share its result
        gate = self._gates[name] = asyncio.Event()
        try:
            session = await self._start_session(name, origin)
        finally:
            del self._gates[name]
            gate.set()
        self._sessions[name] = session
        return session, None

    async def _start_session(self, name: str, origin: Origin) -> CopySession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        delay = 0.001
        wait = False
        while True:
            if self._closed:
                raise RuntimeError(f"{self!r} was closed while opening {origin.key!r}")
            # Usually on a file thread, never waiting for the ledger; if the
            # ledger is held, again on a slow thread, which may wait for it.
            assert self._limiter is not None
            probe = _Probe(name, wait, queued=self._limiter.available_tokens == 0)
            self._probing += 1
            try:
                # A caller cancelled after the thread obtained fds, locks or
                # space: the thread (or the caller) gives them back.
                await run_sync(
                    self._dir.probe, probe, origin.version, slow=wait, undo=self._discard
                )
            finally:
                self._probing -= 1
                if self._probing == 0 and self._probes_done is not None:
                    self._probes_done.set()
            if self._is_closed():
                # aclose() ran during the hop: start nothing it would not stop.
                await finish(partial(self._discard, probe), slow=True)
                raise RuntimeError(f"{self!r} was closed while opening {origin.key!r}")
            if probe.kind == "busy":
                wait = True
                continue
            if probe.kind != "wait":
                break
            if loop.time() >= deadline:
                probe.kind = "source"
                break
            # Another process holds the entry for a moment (starting a copy,
            # evicting it): a short, bounded backoff.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self._make_session(name, origin, probe)

    def _is_closed(self) -> bool:
        return self._closed

    def _discard(self, probe: _Probe) -> None:
        """In a worker thread: give back what ``probe`` obtained.  Space it
        reserved goes back to the ledger; if the ledger is held and this thread
        may not wait (``probe.wait``), the entry's record keeps the reservation
        and the next holder of the entry gives it back (`_Directory._heal`)."""
        self._dir.discard(probe)

    def _make_session(self, name: str, origin: Origin, probe: _Probe) -> CopySession:
        kind = probe.kind
        assert self._read_limiter is not None
        session = CopySession(
            name=name,
            origin=origin,
            mode=kind,
            data=SharedFd(probe.data_fd) if probe.data_fd is not None else None,
            wait_window=self.wait_window,
            read_limiter=self._read_limiter,
            stats=self._stats,
            on_closed=self._forget,
        )
        session.acquire()
        self._live.add(session)
        if kind == "copy":
            assert probe.data_fd is not None
            assert probe.lock_fd is not None
            assert session.data is not None
            assert self._limiter is not None
            self._stats.count("copies")
            assert self._doorbell is not None
            copier = Copier(
                origin=origin,
                name=name,
                root=self._dir.root,
                part=session.data,
                part_fd=probe.data_fd,
                lock_fd=probe.lock_fd,
                reserved=probe.reserved,
                ledger=self._dir,
                stats=self._stats,
                chunk_size=self.chunk_size,
                clock_ns=self._dir.clock_ns,
                post=self._doorbell.post,
            )
            session.start_copy(copier, self._limiter)
        elif kind == "follow":
            assert probe.data_fd is not None
            assert probe.lock_fd is not None
            self._stats.count("follows")
            if probe.watch is not None:
                session.cleanup.append(self._notifier.subscribe(probe.watch, session))
            # Without inotify, followers poll fast; with it, only as a safety net.
            poll = self.poll_interval if probe.watch is not None else 0.01
            session.start_follow(probe.lock_fd, probe.data_fd, probe.progress, poll)
        elif kind == "cache":
            self._stats.count("hits")
        else:
            self._stats.count("uncached")
        # Ownership passed to the session.
        probe.data_fd = probe.lock_fd = None
        probe.reserved = 0
        return session

    def _forget(self, session: CopySession) -> None:
        self._live.discard(session)
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]

    async def usage(self) -> int:
        """Bytes the cache accounts for: cached copies plus copies in progress.

        Never more than ``max_size``.

        Example:
            ```python
            used = await cache.usage()
            print(f"{used / cache.max_size:.0%} full")
            ```
        """
        await self._ensure_ready()
        return await _ledger_hop(self._dir.usage)

    def stats(self) -> dict[str, int]:
        """Counters since this cache was created (no I/O).

        ``opens``, ``hits`` (served from a cached copy), ``copies`` (started
        here), ``published``, ``follows`` (copies of another process followed),
        ``followed`` (of those, completed), ``uncached`` (served from the
        source), ``failed`` (source changed or failed), ``evicted``,
        ``outdated``, ``copied_bytes`` and ``source_bytes`` (read from sources
        directly by readers).

        Example:
            ```python
            s = cache.stats()
            print(f"hit ratio {s['hits'] / max(s['opens'], 1):.0%}")
            ```
        """
        return self._stats.snapshot()

    async def aclose(self) -> None:
        """Cancel the copies still running, remove their temporary files, wait for them.

        Readers still open keep working: what was not copied is read from the
        source.  A second call does nothing.

        Example:
            ```python
            cache = FileCache("cache", max_size=2**30)
            try:
                ...
            finally:
                await cache.aclose()
            ```
        """
        if self._shut:
            return
        # A cancelled aclose() may be resumed: every step below is idempotent.
        self._closed = True
        if self._probing:
            # Opens in the middle of a probe finish it (and give back what it
            # got, seeing the cache closed) before the ledger closes.
            if self._probes_done is None:
                self._probes_done = asyncio.Event()
            await self._probes_done.wait()
        sessions = list(self._live)
        for session in sessions:
            session.cancel_copy()
            if session.copier is None and session.task is not None:
                session.task.cancel()
        tasks = {s.task for s in sessions if s.task is not None and not s.task.done()}
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=self.close_timeout)
            if stuck:
                # A copy that did not reach its next chunk in time: its source
                # read hangs.  Its thread is left to it (a daemon thread: it
                # never keeps the interpreter from exiting, and a cancelled
                # copy publishes nothing); its readers get an error now.
                for session in sessions:
                    if session.task in stuck:
                        session.abort(
                            SourceChangedError(
                                f"the source {session.origin.key!r} did not answer within"
                                f" {self.close_timeout} s of the cache closing; open it"
                                " again through an open cache",
                                path=session.origin.key,
                            )
                        )
                        session.task.cancel()  # the copy's await gives up on its thread
                await asyncio.wait(stuck)
        close_inotify = await self._notifier.stop()
        bell_fd = self._doorbell.detach() if self._doorbell is not None else -1
        directory = self._dir if self._ready else None

        def shut() -> None:  # idempotent: `finish` may call it twice
            try:
                if close_inotify is not None:
                    close_inotify()
            finally:
                try:
                    if bell_fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(bell_fd)
                finally:
                    if directory is not None:
                        directory.close()

        # One hop for every fd the cache itself holds (inotify, the copy
        # threads' eventfd, the ledger): never closed on the loop.
        once = [shut]
        await finish(lambda: once.pop()() if once else None)
        self._shut = True


async def _ledger_hop(func: Callable[..., T], *args: Any, undo: Any = None) -> T:
    """Run ``func(*args, wait)`` in one hop: ``wait=False`` on a file thread,
    and only if the ledger was held (`_LedgerBusy`), ``wait=True`` on a slow one."""
    try:
        return await run_sync(partial(func, *args), False, undo=undo)
    except _LedgerBusy:
        return await run_sync(partial(func, *args), True, slow=True, undo=undo)


def _prepare(directory: _Directory, wait: bool) -> tuple[int, Any, int]:
    """Open the cache directory; count CPUs (may read /sys); import asyncinotify;
    open the copy threads' doorbell (see `Doorbell`)."""
    directory.open(wait)
    cpus = os.cpu_count() or 2
    asyncinotify = _load_asyncinotify()
    return cpus, asyncinotify, open_doorbell_fd()


def _unprepare(directory: _Directory) -> Callable[[tuple[int, Any, int]], None]:
    """Undo `_prepare` for a caller cancelled while it ran (in a worker thread)."""

    def undo(prepared: tuple[int, Any, int]) -> None:
        directory.close()
        if prepared[2] >= 0:
            os.close(prepared[2])

    return undo


class _Opening:
    """What `FileCache.open` returns: await it, or use it with ``async with``."""

    __slots__ = ("_cache", "_file", "_source")

    def __init__(self, cache: FileCache, source: Source | str | os.PathLike[str]) -> None:
        self._cache = cache
        self._source = source
        self._file: CachedFile | None = None

    def __await__(self) -> Generator[Any, None, CachedFile]:
        return self._cache._open(self._source).__await__()

    async def __aenter__(self) -> CachedFile:
        self._file = await self._cache._open(self._source)
        return self._file

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            await self._file.aclose()


class CachedFile(AsyncResource):
    """A reader of one version of one source, returned by `FileCache.open`.

    ``size`` and ``mtime`` are the source's at open time; every byte a reader
    gets belongs to that version (a source that changes under a copy raises
    `SourceChangedError`, never mixed data).  Readers of one source share one
    copy; each reader is cheap.

    Example:
        ```python
        async with cache.open(path) as f:
            print(f.size, f.mtime, f.etag, f.mode)
            async for chunk in f.iter_bytes(1000, 2000):  # bytes 1000..1999
                ...
        ```
    """

    def __init__(self, cache: FileCache, session: CopySession, spare: Origin | None = None) -> None:
        self._cache = cache
        self._session = session
        # This reader's own view of the source when it shares a session that
        # has one: its fd is closed in `aclose`'s hop, never on the loop.
        self._spare = spare
        self._closed = False

    def __repr__(self) -> str:
        return f"<CachedFile {self.key!r} size={self.size} mode={self.mode}>"

    @property
    def key(self) -> str:
        """The source's key (a path's real path)."""
        return self._session.origin.key

    @property
    def size(self) -> int:
        """The size in bytes."""
        return self._session.size

    @property
    def mtime(self) -> float:
        """The source's modification time (seconds since the epoch)."""
        return self._session.origin.mtime

    @property
    def etag(self) -> str:
        """A strong validator for HTTP: changes whenever size or mtime changes."""
        version = self._session.version
        return f'"{version.size:x}-{version.mtime_ns:x}"'

    @property
    def mode(self) -> str:
        """Where bytes come from now.

        ``"cache"`` (a complete cached copy), ``"copy"`` (this process copies),
        ``"follow"`` (another process copies), or ``"source"`` (uncached).
        """
        return self._session.mode

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"read from a closed {self!r}")

    async def read(self, offset: int, n: int) -> bytes:
        """Read ``n`` bytes at ``offset``; fewer only at the end of the file.

        Copied bytes come from the cache; bytes just ahead of the copy (within
        ``wait_window``) are waited for; bytes further ahead come straight from
        the source.

        Example:
            ```python
            async with cache.open(path) as f:
                block = await f.read(4096, 65536)
            ```
        """
        self._check_open()
        return await self._session.read(offset, n)

    async def iter_bytes(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield the bytes of ``[start, end)`` in chunks of up to ``read_size`` (bounded memory).

        ``end`` is exclusive and defaults to the end of the file; both are
        clipped to the file.

        Example:
            ```python
            async with cache.open(path) as f:
                async for chunk in f.iter_bytes(0, f.size):
                    await response.send(chunk)
            ```
        """
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"iter_bytes(start={start}, end={end}): need 0 <= start <= end")
        stop = self.size if end is None else min(end, self.size)
        largest = self._cache.read_size
        # Small first, so the first bytes come quickly (from a slow source
        # too), then doubling: a long stream costs few thread hops.
        step = min(64 * 1024, largest)
        position = start
        while position < stop:
            chunk = await self.read(position, min(step, stop - position))
            if not chunk:
                return
            position += len(chunk)
            step = min(step * 2, largest)
            yield chunk

    async def wait_cached(self) -> bool:
        """Wait until the copy is over; True if the whole file is now in the cache.

        Example:
            ```python
            f = await cache.open(path)
            try:
                cached = await f.wait_cached()  # warm the cache
            finally:
                await f.aclose()
            ```
        """
        self._check_open()
        await self._session.wait_settled()
        return self._session.mode == "cache"

    async def aclose(self) -> None:
        """Stop reading; a second call does nothing.

        When the last reader of a source leaves, the copy still runs to the
        end (unless the cache was made with ``finish_abandoned=False``).

        Example:
            ```python
            f = await cache.open(path)
            try:
                data = await f.read(0, 100)
            finally:
                await f.aclose()
            ```
        """
        if self._closed:
            return
        self._closed = True
        session = self._session
        closer = session.release(self._cache.finish_abandoned)
        spare, self._spare = self._spare, None
        if spare is not None and spare.holds_fd:
            closer = _both(spare.close, closer)
        if closer is not None:
            # The last reader of a session gives its fds back in this one hop.
            await finish(closer)
        task = session.task
        if session.refs == 0 and task is not None and session.copier is None and not task.done():
            await asyncio.wait({task})  # a follower stopping: let it give back its fds

    async def __aenter__(self) -> CachedFile:
        return self


def _both(first: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    def both() -> None:
        try:
            first()
        finally:
            if then is not None:
                then()

    return both
