"""FileStore: the maildir store of gocept.filestore, grown into a multi-process work queue.

Layout, shared by any number of processes without a central lock::

    store/
      tmp/          files being written (create(), deliver() before publication)
      new/          published messages waiting for a consumer
      cur/          claimed messages: ``<name>~<owner>`` while a consumer holds them
      .consumers/   ``<owner>.lock``: one flock per live consumer

How the queue stays correct when processes die:

* **Delivery** writes ``tmp/<name>``, fsyncs it, publishes it into ``new/`` by
  ``link`` (which, unlike ``rename``, never replaces an existing file) and
  fsyncs ``new/``.  A message is never visible half-written.
* **Claiming** is one ``rename`` from ``new/<name>`` to ``cur/<name>~<owner>``.
  The kernel serialises renames of one directory entry: exactly one claimer
  finds the source, every other gets ``ENOENT``.
* **Liveness** comes from a lock, never from a pid (pids are reused, and a pid
  says nothing across containers).  A `FileStore` takes ``.consumers/<owner>.lock``
  before its first claim and holds it until it is closed or its process dies,
  when the kernel lets go.  `FileStore.recover` takes that lock with
  ``LOCK_NB``: if it gets it, the owner is gone and its claims go back to
  ``new/``.  The lock file is created under a temporary name, locked, then
  renamed into place, so a lock file visible under its final name is never
  free while its owner lives.
* **Waking** uses inotify on ``new/`` (through asyncinotify): an idle consumer
  sleeps in the event loop's selector and costs no CPU.  Where inotify is
  unavailable (another OS, or the per-user instance limit reached) a consumer
  falls back to rescanning ``new/`` every 50 ms.

* **Forking**: a child process inherits the parent's consumer lock fd (the
  same open file description) and its `Message` objects.  At ``fork()`` the
  child's copy of every store forgets the parent's owner: it closes its copy
  of the fd (which leaves the parent's lock held) and never gives back,
  settles or unlinks anything of the parent's.  Its next claim takes a lock
  of its own.

Every public coroutine makes one worker-thread hop through `run_sync`.  A hop
that changes the store runs to its end even when the calling task is
cancelled, and what a cancelled caller will never see (a claim, an open file,
a delivered message) is rolled back through ``undo=``; the objects' state is
updated from what the hop really did, cancelled or not.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import fcntl
import heapq
import itertools
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar, overload

from aiofiles.threadpool.binary import AsyncBufferedIOBase
from aiofiles.threadpool.text import AsyncTextIOWrapper
from anyio.abc import AsyncResource

from ._durable import (
    create_exclusive,
    fsync_dir,
    makedirs,
    publish_link,
    publish_new_file,
    temp_name,
    unlink_quietly,
)
from ._handles import AsyncFile, wrap_file
from ._locks import try_lock_exclusive
from ._paths import check_name
from ._threads import _shielded, _start_thread, run_sync

__all__ = ("AREAS", "FileStore", "Message", "QueueStatus")

T = TypeVar("T")

#: The three maildir areas, in the order a message travels through them.
AREAS = ("tmp", "new", "cur")
_CONSUMERS = ".consumers"
_LOCK_SUFFIX = ".lock"
# A claimed file is ``<name>~<owner>``; owners are 16 lowercase hex digits.
_OWNER_SEP = "~"
_CLAIMED = re.compile(r"(?P<name>.+)~(?P<owner>[0-9a-f]{16})", re.DOTALL)
# Maildir names start with the delivery time: ``<sec>.M<usec>P<pid>Q<counter>...``.
# Parsing it orders messages oldest first without a stat per file.
_TIMED = re.compile(r"(?P<sec>\d+)\.(?:M(?P<usec>\d+))?(?:P\d+)?(?:Q(?P<count>\d+))?")
# A consumer's lock file left as ``<owner>.lock.tmp`` by a crash in the
# microseconds between its creation and its rename is removed after this long.
_STALE_LOCK_TMP = 3600.0
# Rescan interval of a consumer that could not get an inotify watch.
_POLL_INTERVAL = 0.05
_FILE_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW
#: The mode of every directory `FileStore.prepare` creates (the umask applies
#: too): messages are written 0600, so a store is its user's.
DIR_MODE = 0o700


# --------------------------------------------------------------------------
# Blocking primitives (run in worker threads)


def _load_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28, or not Linux
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, failing with `FileExistsError` if ``dst`` exists.

    ``os.rename`` silently replaces its target, which would destroy a message
    that happens to sit there.  ``renameat2(RENAME_NOREPLACE)`` checks and
    renames atomically.  Where the kernel or filesystem lacks it, ``link``
    then ``unlink`` gives the same no-replace guarantee; a crash between the
    two leaves the file under both names, which at-least-once delivery allows.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS):  # unsupported here: fall back
                raise OSError(err, os.strerror(err), src, None, dst)
        else:
            return
    os.link(src, dst, follow_symlinks=False)
    try:
        os.unlink(src)
    except FileNotFoundError:
        # Someone else moved ``src`` meanwhile and won: take our link back.
        unlink_quietly(dst)
        raise


def _order_key(name: str, path: str) -> tuple[float, int, int, str] | None:
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


def _visible_names(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        return [entry.name for entry in entries if not entry.name.startswith(".")]


def _sorted_names(directory: str) -> list[str]:
    """The visible names in ``directory``, oldest first.

    A claimed file ``<name>~<owner>`` sorts by its message name.
    """
    keyed = []
    for entry in _visible_names(directory):
        match = _CLAIMED.fullmatch(entry)
        key = _order_key(match["name"] if match else entry, os.path.join(directory, entry))
        if key is not None:
            keyed.append((key, entry))
    keyed.sort()
    return [entry for _, entry in keyed]


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | _FILE_FLAGS)
    with os.fdopen(fd, "rb") as file:
        return file.read()


# --------------------------------------------------------------------------
# Unique names

_counter = itertools.count(1)
_hostname: str | None = None


def _host() -> str:
    # Maildir escapes '/' and ':' in the host part; the name must stay one component.
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "host"
    return _hostname


def _maildir_name(now: float) -> str:
    sec = int(now)
    usec = min(int((now - sec) * 1_000_000), 999_999)
    # Time, a per-process counter, the pid, randomness and the host: unique
    # across processes, hosts sharing the directory, and pid reuse.
    return f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{_host()}"


# --------------------------------------------------------------------------
# The consumer lock, its release off the loop, and fork


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_off_loop(fd: int) -> None:
    """Close ``fd`` now, or on a thread of its own if called on an event loop.

    The finalizer of a store dropped without `FileStore.aclose` runs wherever
    the garbage collector happens to run, often on the event loop; a close
    there is a syscall on the lock file (a round trip on NFS) that cannot be
    awaited, so it is handed to a thread.  Elsewhere (a worker thread, the
    interpreter's exit) it closes at once.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _close_quietly(fd)
        return
    try:
        threading.Thread(
            target=_close_quietly, args=(fd,), name="atempstore close", daemon=True
        ).start()
    except RuntimeError:  # the interpreter is shutting down: no new threads
        _close_quietly(fd)


async def _run_to_end(func: Callable[[], object]) -> None:
    """Run a clean-up ``func`` in a hop that happens even if the caller is
    cancelled before the hop started (a dropped hop would leave an fd open, or
    a closing store's lock held): then on a thread of its own, waited for."""
    ran = False

    def hop() -> None:
        nonlocal ran
        ran = True
        func()

    try:
        await run_sync(hop)
    except BaseException:
        if not ran:
            loop = asyncio.get_running_loop()

            def on_thread() -> None:
                try:
                    func()
                except Exception as exc:  # the caller is being cancelled: report it
                    context = {"message": "atempstore: a clean-up failed", "exception": exc}
                    with contextlib.suppress(RuntimeError):  # loop closed
                        loop.call_soon_threadsafe(loop.call_exception_handler, context)

            await _shielded(_start_thread(loop, on_thread))
        raise


class _Owner:
    """One consumer identity of a `FileStore`: its id, its locked lock file's fd,
    and the process that took it.  A `Message` keeps the owner it was claimed
    under, so it can never act for a later owner of the same store."""

    __slots__ = ("__weakref__", "fd", "finalizer", "id", "pid")

    def __init__(self, owner_id: str, fd: int, store: FileStore) -> None:
        self.id = owner_id
        self.fd = fd
        self.pid = os.getpid()
        # Closing the fd is what releases the lock; do it if the store is
        # dropped without aclose(), as a file object would.
        self.finalizer = weakref.finalize(store, _close_off_loop, fd)


_stores: weakref.WeakSet[FileStore] = weakref.WeakSet()


def _forget_inherited_owners() -> None:
    # In a forked child, before any of its code runs.  The inherited lock fd
    # shares the parent's open file description: LOCK_UN on it, or giving
    # back the parent's claims, or unlinking its lock file, would wreck the
    # parent, which is still alive (issue 11).  Closing the child's copy
    # leaves the parent's lock held and lets the parent's death be seen even
    # while the child lives.  It runs inside fork(), never on a running loop.
    for store in list(_stores):
        store._forget_inherited()


os.register_at_fork(after_in_child=_forget_inherited_owners)


# --------------------------------------------------------------------------
# Waking consumers


class _Watcher:
    """Tells a consumer that something arrived in ``new/``.

    inotify events are read without blocking once the fd is readable, so no
    event is ever dropped by a timeout racing a read.  Without inotify, every
    wait ends after `_POLL_INTERVAL` and asks for a rescan.
    """

    __slots__ = ("_inotify", "_mask", "_woke")

    def __init__(self, inotify: Any) -> None:
        self._inotify = inotify
        self._mask: Any = None
        self._woke = False

    @classmethod
    def open(cls, directory: str, use_inotify: bool = True) -> _Watcher:  # in a thread
        if not use_inotify:
            return cls(None)
        try:
            from asyncinotify import Inotify, Mask
        except ImportError:  # not Linux
            return cls(None)
        try:
            inotify = Inotify()
        except OSError:  # EMFILE: the per-user limit of inotify instances
            return cls(None)
        try:
            inotify.add_watch(directory, Mask.CREATE | Mask.MOVED_TO | Mask.ONLYDIR)
        except OSError as exc:
            inotify.close()
            if exc.errno in (errno.ENOSPC, errno.EMFILE):  # out of watches
                return cls(None)
            raise
        inotify.sync_timeout = 0  # sync_get(): poll, never block
        watcher = cls(inotify)
        watcher._mask = Mask
        return watcher

    @property
    def polling(self) -> bool:
        return self._inotify is None

    def drain(self) -> tuple[list[str], bool]:
        """Names that arrived since the last call, and whether to rescan instead."""
        if self._inotify is None:
            # Polling: rescan after each sleep, not after each claimed message.
            woke, self._woke = self._woke, False
            return [], woke
        names: list[str] = []
        rescan = False
        while True:
            event = self._inotify.sync_get()  # reads a non-blocking fd: no path, no wait
            if event is None:
                return names, rescan
            if self._mask.Q_OVERFLOW in event.mask or self._mask.IGNORED in event.mask:
                rescan = True
            elif event.name is not None:
                names.append(str(event.name))

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - recover() schedule, not a user timeout
        """Sleep until something arrives (True) or ``timeout`` passes (False)."""
        if timeout <= 0:
            return False
        if self._inotify is None:
            await asyncio.sleep(min(timeout, _POLL_INTERVAL))
            self._woke = True
            return timeout > _POLL_INTERVAL
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._inotify.fd

        def on_readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            await asyncio.wait_for(ready, None if timeout == float("inf") else timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
        return True

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


class _Backlog:
    """A consumer's view of ``new/``: names it has seen, oldest first.

    Fed by inotify events, or by a full scan at start, on overflow and after
    each recovery.  Only touched by the worker thread of the current hop.
    """

    __slots__ = ("heap", "known")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, str]] = []
        self.known: set[str] = set()

    def rescan(self, directory: str) -> None:
        self.heap = []
        self.known = set()
        self.add(directory, _visible_names(directory))

    def add(self, directory: str, names: Iterable[str]) -> None:
        for name in names:
            if name in self.known or name.startswith("."):
                continue
            key = _order_key(name, os.path.join(directory, name))
            if key is not None:
                heapq.heappush(self.heap, key)
                self.known.add(name)

    def pop(self) -> str | None:
        if not self.heap:
            return None
        name = heapq.heappop(self.heap)[-1]
        self.known.discard(name)
        return name


# --------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class QueueStatus:
    """A snapshot of a store, as `FileStore.status` sees it.

    Example:
        ```python
        status = await store.status()
        print(status.counts["new"], "waiting, oldest", status.oldest_age, "s")
        ```
    """

    #: The store's directory.
    path: Path
    #: Files per area: ``{"tmp": ..., "new": ..., "cur": ...}`` (hidden entries excluded).
    counts: dict[str, int]
    #: Age in seconds of the oldest message waiting in ``new/``; None when empty.
    oldest_age: float | None
    #: Claimed messages whose consumer is alive (holds its lock).
    live_claims: int
    #: Names of claimed messages whose consumer is gone: `FileStore.recover` gives them back.
    dead_claims: list[str] = field(default_factory=list)
    #: Files in ``cur/`` named like a claim whose owner has no lock file
    #: (``.consumers`` was tampered with); left alone.
    unknown_claims: list[str] = field(default_factory=list)


_TEXT_MODES = Literal["w", "x", "a", "w+", "x+", "a+", "wt", "xt", "at"]
_BINARY_MODES = Literal["wb", "xb", "ab", "w+b", "x+b", "a+b", "wb+", "xb+", "ab+"]


def _open_flags(mode: str) -> int:
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
    flags |= os.O_CREAT | _FILE_FLAGS
    flags |= {"w": os.O_TRUNC, "x": os.O_EXCL, "a": os.O_APPEND}[kinds[0]]
    return flags


class FileStore(AsyncResource):
    """A maildir directory (``tmp/``, ``new/``, ``cur/``) used as a store and a work queue.

    The constructor only records its arguments; `prepare` creates the
    directories.  As an async context manager it prepares the store on entry
    and calls `aclose` on exit.

    Args:
        path: the store's directory.
        clock: returns the current time as ``time.time()`` does; used for
            message names, ages and `clean_tmp`.  Inject one to make tests
            deterministic.
        unique_name: returns the name of the next delivered message; the
            default builds a maildir name from ``clock()``, a per-process
            counter, the pid, randomness and the host name.

    Example:
        ```python
        async with FileStore("/var/spool/jobs") as store:
            await store.deliver(b'{"job": 1}')
            async for message in store.consume():
                print(await message.read())
                await message.done()
        ```
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        unique_name: Callable[[], str] | None = None,
    ) -> None:
        self._root = os.fspath(path)
        self._clock = clock
        self._unique_name = unique_name
        self._dirs = {area: os.path.join(self._root, area) for area in AREAS}
        self._consumers = os.path.join(self._root, _CONSUMERS)
        # The consumer lock: taken by the first claim, held until aclose().
        # Claims and aclose() exclude each other through this mutex, so no
        # claim is ever made under an owner whose lock is being let go.
        self._owner_mutex = threading.Lock()
        self._owner: _Owner | None = None
        self._held: dict[str, Message] = {}
        self._use_inotify = True
        _stores.add(self)  # pure Python: so that a forked child forgets our owner

    def __repr__(self) -> str:
        return f"<FileStore {self._root!r}>"

    @property
    def path(self) -> Path:
        """The store's directory, as given.

        Example:
            ```python
            print(FileStore("spool").path / "new")
            ```
        """
        return Path(self._root)

    @property
    def owner(self) -> str | None:
        """This consumer's id (the suffix of its files in ``cur/``), once it has claimed.

        Example:
            ```python
            await store.claim(name)
            print(store.owner)  # e.g. '9f2c4e1ab3d05e77'
            ```
        """
        owner = self._owner
        return None if owner is None else owner.id

    def _forget_inherited(self) -> None:
        """In a forked child: let go of the parent's owner without touching it."""
        # A mutex held by another thread at fork() stays held forever here.
        self._owner_mutex = threading.Lock()
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.finalizer.detach()  # the fd number is closed now, not again later
            _close_quietly(owner.fd)
        for message in self._held.values():
            message._state = "forked"
        self._held.clear()

    # -- helpers ------------------------------------------------------------

    def _area(self, area: str) -> str:
        try:
            return self._dirs[area]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown area {area!r}: a FileStore has the areas 'tmp', 'new' and 'cur'"
            ) from None

    def _lock_path(self, owner: str) -> str:
        return os.path.join(self._consumers, owner + _LOCK_SUFFIX)

    def _take_owner_lock(self) -> _Owner:
        """Return this store's owner, creating and locking its lock file first.

        Call with ``_owner_mutex`` held, in a worker thread.
        """
        if self._owner is not None:
            return self._owner
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._consumers, DIR_MODE)  # a store prepared by an older version
        owner_id = secrets.token_hex(8)
        final = self._lock_path(owner_id)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600)
        try:
            # A brand-new file: nobody else can hold its lock yet.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            # Locked before it is visible under its final name: recover()
            # never sees the lock file of a live consumer unlocked.
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            unlink_quietly(tmp)
            raise
        owner = self._owner = _Owner(owner_id, fd, self)
        return owner

    def _claim_sync(self, name: str) -> tuple[str, _Owner] | None:
        """Claim ``name``: its file in ``cur/`` and the owner it is claimed
        under, or None if another claimer won (or it was never there)."""
        src = os.path.join(self._dirs["new"], name)
        with self._owner_mutex:
            owner = self._take_owner_lock()
            claimed = f"{name}{_OWNER_SEP}{owner.id}"
            try:
                os.rename(src, os.path.join(self._dirs["cur"], claimed))
            except FileNotFoundError:
                if os.path.lexists(src):
                    # Not a lost race: cur/ itself is gone.  Returning False
                    # would make a consumer skip every message, silently.
                    cur = self._dirs["cur"]
                    raise FileNotFoundError(
                        errno.ENOENT, "the store has no cur/ directory; run prepare()", cur
                    ) from None
                return None
            return claimed, owner

    def _give_back_sync(self, claimed: str, name: str) -> None:
        rename_noreplace(
            os.path.join(self._dirs["cur"], claimed), os.path.join(self._dirs["new"], name)
        )

    def _adopt(self, name: str, claimed: str, owner: _Owner) -> Message:
        message = Message(self, name, os.path.join(self._dirs["cur"], claimed), owner)
        self._held[name] = message
        return message

    # -- the gocept.filestore API --------------------------------------------

    async def prepare(self) -> None:
        """Create the store's directories; harmless when they exist.

        Every directory it creates (each missing level of the path too) gets
        mode 0700, less the umask, and is made durable: its parent directory
        is fsynced, so a power cut cannot lose the store.

        Example:
            ```python
            store = FileStore("spool")
            await store.prepare()
            await store.prepare()  # idempotent
            ```
        """

        def make() -> None:
            # Every level created gets DIR_MODE (os.makedirs gives it to the
            # last one only), and its parent is fsynced.
            makedirs(self._root, DIR_MODE)
            created = False
            for directory in (*self._dirs.values(), self._consumers):
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
                fsync_dir(self._root)  # the areas survive a power cut

        await run_sync(make)

    @overload
    async def create(self, name: str, mode: _TEXT_MODES = "w") -> AsyncTextIOWrapper: ...

    @overload
    async def create(self, name: str, mode: _BINARY_MODES) -> AsyncBufferedIOBase: ...

    @overload
    async def create(self, name: str, mode: str) -> AsyncFile: ...

    async def create(self, name: str, mode: str = "w") -> AsyncFile:
        """Open ``tmp/<name>`` for writing and return an aiofiles handle.

        ``mode`` is a writing mode (``"w"``, ``"wb"``, ``"x"``, ``"a"``...).
        The file is opened without following a symlink; the handle's ``name``
        is its path.  Move it to ``new/`` with `move` once it is complete.  A
        cancelled call closes the file and removes it if it created it.

        Example:
            ```python
            async with await store.create("report.txt") as fh:
                await fh.write("hello")
            await store.move("report.txt", "tmp", "new")
            ```
        """
        check_name(name)
        flags = _open_flags(mode)
        path = os.path.join(self._dirs["tmp"], name)
        pymode = mode.replace("x", "w").replace("t", "")

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

        def open_it() -> IO[Any]:
            # open() with an opener: the file object's name is the path.
            file: IO[Any] = open(path, pymode, opener=opener)  # noqa: SIM115 - handed out
            return file

        def undo(file: IO[Any]) -> None:
            file.close()
            if created:
                unlink_quietly(path)

        return wrap_file(await run_sync(open_it, undo=undo))

    async def list(self, area: str) -> builtins.list[Path]:
        """Full paths of the files in ``area``, oldest first; hidden entries excluded.

        Example:
            ```python
            for path in await store.list("new"):
                print(path.name)
            ```
        """
        directory = self._area(area)

        def listing() -> builtins.list[Path]:
            return [Path(directory, n) for n in _sorted_names(directory)]

        return await run_sync(listing, abandon_on_cancel=True)

    async def move(self, name: str, from_area: str, to_area: str, *, durable: bool = True) -> None:
        """Move ``name`` from one area to another; never replaces a file.

        Unlike gocept.filestore (``os.rename``), a file already at the target
        raises `FileExistsError` and both files are kept.  With ``durable``
        the file's data and its new name are on disk when the call returns
        (the file is fsynced, then the target directory).

        Example:
            ```python
            await store.move("report.txt", "tmp", "new")
            ```
        """
        check_name(name)
        src = os.path.join(self._area(from_area), name)
        dst = os.path.join(self._area(to_area), name)

        def move_it() -> None:
            if durable:
                fd = os.open(src, os.O_RDONLY | _FILE_FLAGS)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            rename_noreplace(src, dst)
            if durable:
                fsync_dir(os.path.dirname(dst))

        await run_sync(move_it)

    async def copy(self, name: str, from_area: str, to_area: str, *, durable: bool = True) -> None:
        """Copy ``name`` from one area to another; never replaces a file.

        The copy is written under a hidden temporary name and published whole,
        so a consumer never claims a half-copied message.  A cancelled call
        removes the copy it published, unless it was moved on meanwhile.

        Example:
            ```python
            await store.copy("template", "cur", "new")
            ```
        """
        check_name(name)
        src = os.path.join(self._area(from_area), name)
        dst = os.path.join(self._area(to_area), name)

        def copy_it() -> tuple[int, int]:
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "copy() never replaces a file", dst)
            source_fd = os.open(src, os.O_RDONLY | _FILE_FLAGS)
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

        def undo(copied: tuple[int, int]) -> None:
            # Only our copy: a consumer may have claimed it (gone from dst)
            # and someone else put a file of that name there since.
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(dst)
                if (st.st_dev, st.st_ino) == copied:
                    unlink_quietly(dst)
                    if durable:
                        fsync_dir(os.path.dirname(dst))

        await run_sync(copy_it, undo=undo)

    async def remove(self, name: str, area: str) -> None:
        """Delete ``name`` from ``area``.

        Example:
            ```python
            await store.remove("report.txt", "cur")
            ```
        """
        check_name(name)
        path = os.path.join(self._area(area), name)
        await run_sync(lambda: os.unlink(path))

    # -- the work queue --------------------------------------------------------

    async def deliver(self, data: bytes | bytearray | memoryview, *, durable: bool = True) -> str:
        """Publish ``data`` as a new message in ``new/`` and return its unique name.

        The message is written to ``tmp/``, fsynced, linked into ``new/``
        (which never replaces an existing file) and ``new/`` is fsynced: once
        this returns, the message survives a power cut.  If anything fails
        (ENOSPC, EIO...) the error is raised and nothing is left in ``tmp/``
        or ``new/``.  ``durable=False`` skips both fsyncs.

        A cancelled ``deliver`` finishes its hop, then takes its message back
        out of ``new/``: the caller, who never learnt the name, may send it
        again without a duplicate.  Only a consumer that claimed it in the
        microseconds in between has it then (at-least-once).

        Example:
            ```python
            name = await store.deliver(json.dumps(job).encode())
            ```
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"deliver() takes bytes, not {type(data).__name__}; encode it first")
        name = self._unique_name() if self._unique_name else _maildir_name(self._clock())
        check_name(name)
        tmp = os.path.join(self._dirs["tmp"], name)
        new = self._dirs["new"]

        def publish() -> str:
            publish_new_file(new, name, data, staging=tmp, durable=durable)
            return name

        def take_back(name: str) -> None:
            try:
                os.unlink(os.path.join(new, name))
            except FileNotFoundError:
                return  # already claimed: it is delivered
            if durable:
                fsync_dir(new)

        return await run_sync(publish, undo=take_back)

    async def claim(self, name: str) -> bool:
        """Move ``new/<name>`` to ``cur/``; True for exactly one of all competing claimers.

        The winner's file is ``cur/<name>~<owner>`` and `message` returns it as
        a `Message`.  The first claim takes this store's consumer lock.

        Example:
            ```python
            if await store.claim(name):
                message = store.message(name)
                await message.done()
            ```
        """
        check_name(name)

        def undo(got: tuple[str, _Owner] | None) -> None:
            if got is not None:  # won, but the cancelled caller will never know
                self._give_back_sync(got[0], name)

        got = await run_sync(self._claim_sync, name, undo=undo)
        if got is None:
            return False
        self._adopt(name, *got)
        return True

    def message(self, name: str) -> Message:
        """The `Message` for a name this store claimed and has not settled (no I/O).

        Raises `KeyError` if this store does not hold ``name``.

        Example:
            ```python
            if await store.claim(name):
                data = await store.message(name).read()
            ```
        """
        return self._held[name]

    async def _claim_next(
        self, watcher: _Watcher, backlog: _Backlog, rescan: bool
    ) -> Message | None:
        new = self._dirs["new"]

        def take() -> tuple[str, str, _Owner] | None:
            # The inotify fd is read here too, not on the loop.
            arrived, overflow = watcher.drain()
            if rescan or overflow:
                backlog.rescan(new)
            else:
                backlog.add(new, arrived)
            while (name := backlog.pop()) is not None:
                got = self._claim_sync(name)
                if got is not None:
                    return name, *got
            return None

        def undo(got: tuple[str, str, _Owner] | None) -> None:
            if got is not None:
                self._give_back_sync(got[1], got[0])

        got = await run_sync(take, undo=undo)
        return None if got is None else self._adopt(*got)

    async def consume(
        self, *, recover_interval: float | None = 30.0
    ) -> AsyncGenerator[Message, None]:
        """Claim messages as they arrive, oldest first, and yield them.

        Waits without polling (inotify on ``new/``): an idle consumer costs no
        CPU, and a delivery from another process wakes it within a
        millisecond or so.  Recovers messages held by dead consumers at start
        and every ``recover_interval`` seconds (`None`: only at start).
        Settle each message with `Message.done` or `Message.release`.

        Close the iterator (``break`` inside ``contextlib.aclosing``, or
        `aclose`) to free its inotify watch at once.

        Example:
            ```python
            async with contextlib.aclosing(store.consume()) as messages:
                async for message in messages:
                    async with message:  # done() on success, release() on error
                        await handle(await message.read())
            ```
        """
        use_inotify = self._use_inotify
        watcher = await run_sync(
            lambda: _Watcher.open(self._dirs["new"], use_inotify), undo=lambda w: w.close()
        )
        try:
            backlog = _Backlog()
            rescan = True
            next_recover = 0.0
            while True:
                if time.monotonic() >= next_recover:
                    await self.recover()
                    rescan = True
                    next_recover = (
                        float("inf")
                        if recover_interval is None
                        else time.monotonic() + recover_interval
                    )
                message = await self._claim_next(watcher, backlog, rescan)
                rescan = False
                if message is not None:
                    yield message
                    continue
                await watcher.wait(next_recover - time.monotonic())
        finally:
            # Not on the loop: closing an inotify fd waits for an RCU grace
            # period in the kernel (2-8 ms measured here).
            await _run_to_end(watcher.close)

    async def recover(self) -> builtins.list[str]:
        """Give messages held by dead consumers back to ``new/``; return their names.

        A consumer is dead when its lock is free.  Lock files of dead consumers
        with nothing left in ``cur/`` are removed.

        Example:
            ```python
            for name in await store.recover():
                print("redelivering", name)
            ```
        """
        return await run_sync(self._recover_sync)

    def _claims_by_owner(self) -> dict[str, builtins.list[tuple[str, str]]]:
        claims: dict[str, builtins.list[tuple[str, str]]] = {}
        for claimed in _visible_names(self._dirs["cur"]):
            match = _CLAIMED.fullmatch(claimed)
            if match is not None:
                claims.setdefault(match["owner"], []).append((claimed, match["name"]))
        return claims

    def _consumer_files(self) -> tuple[set[str], builtins.list[str]]:
        owners: set[str] = set()
        leftovers: builtins.list[str] = []
        try:
            with os.scandir(self._consumers) as entries:
                for entry in entries:
                    if entry.name.endswith(_LOCK_SUFFIX):
                        owners.add(entry.name[: -len(_LOCK_SUFFIX)])
                    elif entry.name.endswith(_LOCK_SUFFIX + ".tmp"):
                        leftovers.append(entry.name)
        except FileNotFoundError:
            pass
        return owners, leftovers

    def _probe(self, owner: str) -> int | None:
        """Open ``owner``'s lock file and lock it: an fd if the owner is dead.

        None if the owner is alive (its lock is held) or has no lock file.
        """
        try:
            fd = os.open(self._lock_path(owner), os.O_RDONLY | _FILE_FLAGS)
        except FileNotFoundError:
            return None
        try:
            alive = not try_lock_exclusive(fd)
        except BaseException:
            os.close(fd)
            raise
        if alive:
            os.close(fd)
            return None
        return fd

    def _recover_sync(self) -> builtins.list[str]:
        owners, leftovers = self._consumer_files()
        owners.update(self._claims_by_owner())
        owners.discard(self.owner or "")
        dead: dict[str, int] = {}
        recovered: builtins.list[str] = []
        try:
            for owner in owners:
                fd = self._probe(owner)
                if fd is not None:
                    dead[owner] = fd
            if not dead:
                return recovered
            # List cur/ again *after* the locks were taken: a consumer that
            # claimed between the first listing and its death is seen now.
            claims = self._claims_by_owner()
            for owner in dead:
                left = 0
                for claimed, name in claims.get(owner, []):
                    try:
                        self._give_back_sync(claimed, name)
                    except FileNotFoundError:
                        continue  # another recover() was faster
                    except FileExistsError:
                        left += 1  # new/<name> exists: keep this copy where it is
                        continue
                    recovered.append(name)
                if not left:
                    # Still holding its lock: nobody can mistake it for alive.
                    unlink_quietly(self._lock_path(owner))
        finally:
            for fd in dead.values():
                os.close(fd)
        now = time.time()
        for leftover in leftovers:
            path = os.path.join(self._consumers, leftover)
            with contextlib.suppress(FileNotFoundError):
                if now - os.lstat(path).st_mtime > _STALE_LOCK_TMP:
                    unlink_quietly(path)
        return recovered

    async def status(self) -> QueueStatus:
        """Count the files per area, the age of the oldest waiting message, and the claims.

        Read-only: it never takes a dead consumer's lock for longer than a
        check, and a cancelled call still lets go of it before it returns.

        Example:
            ```python
            status = await store.status()
            if status.dead_claims:
                await store.recover()
            ```
        """
        now = self._clock()

        def look() -> QueueStatus:
            counts = {area: len(_visible_names(self._dirs[area])) for area in AREAS}
            oldest = None
            new = self._dirs["new"]
            keys = [
                k for k in (_order_key(n, os.path.join(new, n)) for n in _visible_names(new)) if k
            ]
            if keys:
                sec, usec, _, _ = min(keys)
                oldest = max(0.0, now - (sec + usec / 1_000_000))
            claims = self._claims_by_owner()
            mine = self.owner
            live = 0
            dead: builtins.list[str] = []
            unknown: builtins.list[str] = []
            for owner, held in claims.items():
                names = [name for _, name in held]
                if owner == mine:
                    live += len(held)
                    continue
                if not os.path.exists(self._lock_path(owner)):
                    unknown.extend(claimed for claimed, _ in held)
                    continue
                fd = self._probe(owner)
                if fd is None:
                    live += len(held)
                else:
                    os.close(fd)
                    dead.extend(names)
            return QueueStatus(
                path=Path(self._root),
                counts=counts,
                oldest_age=oldest,
                live_claims=live,
                dead_claims=sorted(dead),
                unknown_claims=sorted(unknown),
            )

        # Not abandoned on cancel: the probe holds dead owners' locks for a
        # moment, and a concurrent recover() must not find them taken later.
        return await run_sync(look)

    async def clean_tmp(self, older_than: float = 36 * 3600) -> builtins.list[Path]:
        """Remove files abandoned in ``tmp/`` (and hidden copy leftovers) older than
        ``older_than`` seconds; return what was removed.

        Maildir's rule: a file in ``tmp/`` untouched for 36 hours belongs to a
        writer that died.

        Example:
            ```python
            removed = await store.clean_tmp(older_than=3600)
            ```
        """
        limit = self._clock() - older_than

        def clean() -> builtins.list[Path]:
            removed: builtins.list[Path] = []
            for area in AREAS:
                directory = self._dirs[area]
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

        return await run_sync(clean)

    async def aclose(self) -> None:
        """Give back the messages this store still holds and release its consumer lock.

        Harmless to call twice.  The store can be used again afterwards; it
        then claims under a new owner id.

        Example:
            ```python
            store = FileStore("spool")
            try:
                ...
            finally:
                await store.aclose()
            ```
        """
        held = dict(self._held)
        closed: builtins.list[_Owner] = []

        def close() -> None:
            with self._owner_mutex:
                owner = self._owner
                if owner is None:
                    return
                left = 0
                for name, message in held.items():
                    if message._owner is not owner or message._state != "held":
                        continue  # a done()/release() in flight settles it
                    try:
                        self._give_back_sync(message._claimed, name)
                    except FileNotFoundError:
                        pass  # settled meanwhile
                    except FileExistsError:
                        left += 1
                if not left:
                    unlink_quietly(self._lock_path(owner.id))
                self._owner = None
                owner.finalizer()  # closes the fd: the lock is released
                closed.append(owner)

        try:
            await _run_to_end(close)
        finally:
            # Even when the caller was cancelled: the hop ran to its end, and
            # the messages must say they are no longer held.
            for owner in closed:
                for message in held.values():
                    if message._owner is owner and message._state == "held":
                        message._settled("closed")

    async def __aenter__(self) -> FileStore:
        await self.prepare()
        return self


_State = Literal["held", "settling", "done", "released", "closed", "forked"]


class Message:
    """A message claimed by a `FileStore`, yielded by `FileStore.consume`.

    Read it with `read`, then settle it once: `done` removes it, `release`
    gives it back to ``new/`` for another consumer.  As an async context
    manager it calls `done` when the block succeeds and `release` when it
    raises.

    Its `state` always tells what happened to the file, even after a
    cancelled `done` or `release`, and a `Message` only ever acts on its own
    claim: once settled (or given back by `FileStore.aclose`, or inherited by
    a forked child) it cannot touch a later claim of the same name.

    Example:
        ```python
        async for message in store.consume():
            async with message:
                await process(await message.read())
        ```
    """

    __slots__ = ("_claimed", "_owner", "_path", "_state", "_store", "name")

    def __init__(self, store: FileStore, name: str, path: str, owner: _Owner) -> None:
        self._store = store
        #: The message's name in ``new/`` (without the owner suffix).
        self.name = name
        self._path = path
        self._claimed = os.path.basename(path)
        self._owner = owner
        self._state: _State = "held"

    def __repr__(self) -> str:
        return f"<Message {self.name!r} {self._state}>"

    @property
    def path(self) -> Path:
        """The claimed file, ``cur/<name>~<owner>``.

        Example:
            ```python
            size = (await anyio.Path(message.path).stat()).st_size
            ```
        """
        return Path(self._path)

    @property
    def state(self) -> _State:
        """``"held"``; ``"settling"`` while a `done` or `release` runs; then
        ``"done"``, ``"released"``, ``"closed"`` (given back by
        `FileStore.aclose`) or ``"forked"`` (claimed by the parent of this
        forked process, which alone can settle it).

        Example:
            ```python
            await message.done()
            assert message.state == "done"
            ```
        """
        return self._state

    def _check_held(self, action: Literal["done", "release"]) -> bool:
        state = self._state
        if state == "held":
            return True
        if (state, action) in (("done", "done"), ("released", "release")):
            return False  # a second done() / release() does nothing
        why = {
            "settling": "being settled by another done() or release() call",
            "done": "done",
            "released": "released",
            "closed": "given back by aclose()",
            "forked": (
                f"claimed by process {self._owner.pid}, the parent of this forked process;"
                " only that process can settle it"
            ),
        }[state]
        raise RuntimeError(f"cannot {action}() message {self.name!r}: it was already {why}")

    async def read(self) -> bytes:
        """The message's bytes.

        Example:
            ```python
            payload = json.loads(await message.read())
            ```
        """
        return await run_sync(_read_file, self._path, abandon_on_cancel=True)

    async def _settle(self, action: Literal["done", "release"], func: Callable[[], None]) -> None:
        if not self._check_held(action):
            return
        self._state = "settling"
        ran = False

        def hop() -> None:
            nonlocal ran
            func()
            ran = True

        try:
            await run_sync(hop)
        finally:
            # Whether or not the caller was cancelled: the hop either ran to
            # its end or never started, and the state says which.
            if ran:
                self._settled("done" if action == "done" else "released")
            elif self._owner is self._store._owner:
                self._state = "held"  # never ran, or failed: still ours
            else:
                self._settled("closed")  # failed because aclose() gave it back

    async def done(self) -> None:
        """Remove the message: it was handled.  A second call does nothing.

        Example:
            ```python
            await handle(await message.read())
            await message.done()
            ```
        """
        await self._settle("done", lambda: os.unlink(self._path))

    async def release(self) -> None:
        """Give the message back to ``new/`` for any consumer.  A second call does nothing.

        Example:
            ```python
            if not ready_for(message):
                await message.release()
            ```
        """
        await self._settle("release", lambda: self._store._give_back_sync(self._claimed, self.name))

    def _settled(self, state: _State) -> None:
        self._state = state
        if self._store._held.get(self.name) is self:
            del self._store._held[self.name]

    async def __aenter__(self) -> Message:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "held":
            return
        if exc_type is None:
            await self.done()
        else:
            await self.release()
