"""The cache directory as a blocking core: space, publication, healing, eviction.

`Directory` keeps the ledger (`_record.Ledger`) true: every reservation,
publication, cancellation and removal updates one counter under its lock, so
bytes are counted without walking the directory.  The directory is walked
(`Directory.scan`) only when space runs out (to evict least-recently-opened
copies nobody holds, in any process) or when the counter is missing or
unreadable; that walk also recounts from scratch, so a counter left wrong by
a crash heals itself.  What one open finds in an entry is `_probe`'s concern.

Every method makes blocking calls on the user's disk: call them in worker
threads.  ``wait`` says whether a call may wait for the ledger's lock (on a
slow thread) or must raise `LedgerBusy` instead (on a file thread).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable

from .._durable import makedirs, unlink_quietly
from .._flock import try_lock_exclusive
from ._record import (
    FINAL_NAME,
    IDENT_XATTR,
    OPEN_FLAGS,
    QUEUED,
    Ledger,
    LedgerBusy,
    Record,
    clear_record,
    read_record,
    retire_record,
    write_record,
)
from ._source import Version
from ._stats import Stats

__all__ = ("Directory",)

#: A temporary part file older than this belongs to a process that died while
#: creating it (it lives for microseconds otherwise).
_STALE_TMP_NS = 3600 * 1_000_000_000


class Directory:
    """The cache directory on disk: layout, ledger, healing and eviction.

    Example (in a worker thread):
        ```python
        directory = Directory("/var/cache/media", 2**30, time.time, Stats())
        directory.open(wait=True)
        print(directory.usage(wait=True))
        directory.close()
        ```
    """

    def __init__(self, root: str, max_size: int, clock: Callable[[], float], stats: Stats) -> None:
        self.root = root
        self.max_size = max_size
        self.clock = clock
        self.stats = stats
        self.ledger = Ledger()
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
        self.ledger.open(self.root)
        try:
            with self.ledger.held(wait):
                if self.ledger.read() is None:
                    self.ledger.write(self.scan(0))
        except BaseException:
            self.ledger.drop()
            raise

    def close(self) -> None:
        self.ledger.close()

    # -- the ledger -------------------------------------------------------------

    def _add_usage(self, delta: int) -> None:
        usage = self.ledger.read()
        self.ledger.write(self.scan(0) if usage is None else usage + delta)

    def usage(self, wait: bool) -> int:
        with self.ledger.held(wait):
            usage = self.ledger.read()
            if usage is None:
                usage = self.scan(0)
                self.ledger.write(usage)
            return usage

    def publish(self, name: str, lock_fd: int) -> None:
        """Rename a finished part into place (its reservation becomes the file).

        The part gets its version's ident first (`IDENT_XATTR`, from the
        record): a copy published without it (a crash before the attribute
        reached the disk, a file system without user xattrs) is only ever
        outdated, never served for another version.
        """
        rec = read_record(lock_fd)
        if rec is not None and rec.ident:
            with contextlib.suppress(OSError):
                os.setxattr(
                    self.part_path(name),
                    IDENT_XATTR,
                    rec.ident.to_bytes(8, "big"),
                    follow_symlinks=False,
                )
        with self.ledger.held():
            os.replace(self.part_path(name), self.final(name))
            # Not `clear_record`: followers yet to read the final progress
            # must still find it (see `retire_record`).
            retire_record(lock_fd)

    def cancel(self, name: str, lock_fd: int, reserved: int, wait: bool = True) -> None:
        """Drop an unfinished part and give its reserved space back."""
        try:
            ledger = self.ledger.held(wait)
            ledger.__enter__()
        except (RuntimeError, LedgerBusy):
            # The cache is closed (or the ledger held and we may not wait): the
            # part goes anyway, and the record stays for the next holder of
            # this entry to give the space back (heal).
            unlink_quietly(self.part_path(name))
            return
        try:
            unlink_quietly(self.part_path(name))
            if read_record(lock_fd) is not None:
                self._add_usage(-reserved)
                clear_record(lock_fd)
        finally:
            ledger.__exit__(None, None, None)

    # -- healing and reserving one entry (its lock held) ---------------------------

    def heal(self, name: str, lock_fd: int, wait: bool) -> None:
        """With the entry lock held: undo what a copier that died left behind."""
        if read_record(lock_fd) is None:
            return
        with self.ledger.held(wait):
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

    def remove_outdated(self, name: str, wait: bool) -> None:
        """With the entry lock held: remove a copy of an older version.

        Readers that hold it keep reading their (consistent) old version
        through their open fd; the kernel frees the space when they close it.
        """
        final = self.final(name)
        try:
            size = os.stat(final, follow_symlinks=False).st_size
        except FileNotFoundError:
            return
        with self.ledger.held(wait):
            try:
                os.unlink(final)
            except FileNotFoundError:
                return
            self._add_usage(-size)
        self.stats.count("outdated")

    def reserve(
        self, name: str, lock_fd: int, version: Version, part_ino: int, wait: bool, queued: bool
    ) -> bool:
        size = version.size
        with self.ledger.held(wait):
            usage = self.ledger.read()
            if usage is None or usage + size > self.max_size:
                usage = self.scan(size)
            if usage + size > self.max_size:
                self.ledger.write(usage)
                return False
            # The counter first: a crash between the two writes leaks space
            # (healed by the next walk) instead of hiding a reservation.
            self.ledger.write(usage + size)
            # A copy that will wait for a copy slot is QUEUED until its thread
            # starts (it writes 0): followers in other processes read from the
            # source meanwhile.  Written here, not on the loop.
            progress = QUEUED if queued else 0
            write_record(
                lock_fd,
                Record(progress, size, version.mtime_ns, part_ino, size, version.ident_hash),
            )
            return True

    # -- the walk: recount, collect garbage, evict -------------------------------

    def scan(self, need: int) -> int:
        """Recount usage from the directory (ledger held); evict LRU until ``need`` fits."""
        finals: dict[str, tuple[int, int]] = {}
        entries: list[str] = []
        now = self.clock_ns()
        with os.scandir(self.root) as it:
            for entry in it:
                n = entry.name
                try:
                    if FINAL_NAME.fullmatch(n):
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            finals[n] = (st.st_atime_ns, st.st_size)
                    elif (
                        n.startswith(".") and n.endswith(".lock") and FINAL_NAME.fullmatch(n[1:-5])
                    ):
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
            fd = os.open(self.lock_path(name), os.O_RDWR | OPEN_FLAGS)
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
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o600)
        try:
            if not try_lock_exclusive(lock_fd):
                return 0  # being copied or probed
            if os.fstat(lock_fd).st_nlink == 0:
                return 0
            try:
                fd = os.open(self.final(name), os.O_RDONLY | OPEN_FLAGS)
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
