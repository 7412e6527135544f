"""The public `FileStore`: a thin async facade, one worker-thread hop per coroutine.

Each coroutine checks its arguments on the caller's side (names, areas,
modes: no I/O), then makes one `run_sync` hop into a blocking core:
`StoreCore` for the gocept.filestore API, `QueueCore` for the work queue.
A hop that changes the store runs to its end even when the calling task is
cancelled, and what a cancelled caller will never see (a claim, an open
file, a delivered message) is rolled back through ``undo=``; the objects'
state is updated from what the hop really did, cancelled or not.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import overload

from aiofiles.threadpool.binary import AsyncBufferedIOBase
from aiofiles.threadpool.text import AsyncTextIOWrapper
from anyio.abc import AsyncResource

from .._handles import AsyncFile, wrap_file
from .._paths import check_name
from .._threads import run_sync
from ._names import Layout, maildir_name
from ._owners import Owner
from ._queue import Message, QueueCore, QueueStatus
from ._store import BINARY_MODES, TEXT_MODES, StoreCore, open_flags
from ._watcher import Backlog, Watcher

__all__ = ("FileStore",)

_Paths = list[Path]
_Names = list[str]


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
        self._layout = Layout(os.fspath(path))
        self._clock = clock
        self._unique_name = unique_name
        self._files = StoreCore(self._layout)
        self._queue = QueueCore(self._layout)
        self._use_inotify = True

    def __repr__(self) -> str:
        return f"<FileStore {self._layout.root!r}>"

    @property
    def path(self) -> Path:
        """The store's directory, as given.

        Example:
            ```python
            print(FileStore("spool").path / "new")
            ```
        """
        return Path(self._layout.root)

    @property
    def owner(self) -> str | None:
        """This consumer's id (the suffix of its files in ``cur/``), once it has claimed.

        Example:
            ```python
            await store.claim(name)
            print(store.owner)  # e.g. '9f2c4e1ab3d05e77'
            ```
        """
        return self._queue.owners.id

    @property
    def _held(self) -> dict[str, Message]:
        return self._queue.held

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
        await run_sync(self._files.prepare)

    @overload
    async def create(self, name: str, mode: TEXT_MODES = "w") -> AsyncTextIOWrapper: ...

    @overload
    async def create(self, name: str, mode: BINARY_MODES) -> AsyncBufferedIOBase: ...

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
        flags, pymode = open_flags(mode)
        path = self._layout.path(name, "tmp")
        file, _ = await run_sync(self._files.create, path, flags, pymode, undo=StoreCore.uncreate)
        return wrap_file(file)

    async def list(self, area: str) -> _Paths:
        """Full paths of the files in ``area``, oldest first; hidden entries excluded.

        Example:
            ```python
            for path in await store.list("new"):
                print(path.name)
            ```
        """
        directory = self._layout.area(area)
        return await run_sync(StoreCore.listing, directory, abandon_on_cancel=True)

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
        src, dst = self._layout.path(name, from_area), self._layout.path(name, to_area)
        await run_sync(StoreCore.move, src, dst, durable)

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
        src, dst = self._layout.path(name, from_area), self._layout.path(name, to_area)
        undo = lambda copied: StoreCore.uncopy(dst, copied, durable)  # noqa: E731 - one line
        await run_sync(StoreCore.copy, src, dst, durable, undo=undo)

    async def remove(self, name: str, area: str) -> None:
        """Delete ``name`` from ``area``.

        Example:
            ```python
            await store.remove("report.txt", "cur")
            ```
        """
        await run_sync(os.unlink, self._layout.path(name, area))

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
        name = self._unique_name() if self._unique_name else maildir_name(self._clock())
        check_name(name)
        queue = self._queue
        undo = lambda name: queue.undeliver(name, durable)  # noqa: E731 - one line
        return await run_sync(queue.deliver, name, data, durable, undo=undo)

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
        queue = self._queue
        got = await run_sync(queue.claim, name, undo=lambda got: queue.unclaim(name, got))
        if got is None:
            return False
        queue.adopt(name, *got)
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
        return self._queue.held[name]

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
        queue, new, use_inotify = self._queue, self._layout.dirs["new"], self._use_inotify
        watcher = await run_sync(Watcher.open, new, use_inotify, undo=Watcher.close)
        try:
            backlog, rescan, next_recover = Backlog(), True, 0.0
            interval = float("inf") if recover_interval is None else recover_interval
            while True:
                if time.monotonic() >= next_recover:
                    await self.recover()
                    rescan, next_recover = True, time.monotonic() + interval
                args = (watcher, backlog, rescan)
                got = await run_sync(queue.claim_next, *args, undo=queue.unclaim_next)
                rescan = False
                if got is not None:
                    yield queue.adopt(*got)
                    continue
                await watcher.wait(next_recover - time.monotonic())
        finally:
            # Not on the loop: closing an inotify fd waits for an RCU grace period
            # in the kernel (2-8 ms measured here); shielded, or the fd could leak.
            await run_sync(watcher.close, shield=True)

    async def recover(self) -> _Names:
        """Give messages held by dead consumers back to ``new/``; return their names.

        A consumer is dead when its lock is free.  Lock files of dead consumers
        with nothing left in ``cur/`` are removed.

        Example:
            ```python
            for name in await store.recover():
                print("redelivering", name)
            ```
        """
        return await run_sync(self._queue.recover)

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
        # Not abandoned on cancel: the probe holds dead owners' locks for a
        # moment, and a concurrent recover() must not find them taken later.
        return await run_sync(self._queue.status, self._clock())

    async def clean_tmp(self, older_than: float = 36 * 3600) -> _Paths:
        """Remove files abandoned in ``tmp/`` (and hidden copy leftovers) older than
        ``older_than`` seconds; return what was removed.

        Maildir's rule: a file in ``tmp/`` untouched for 36 hours belongs to a
        writer that died.

        Example:
            ```python
            removed = await store.clean_tmp(older_than=3600)
            ```
        """
        return await run_sync(self._files.clean_tmp, self._clock() - older_than)

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
        held = dict(self._queue.held)
        closed: list[Owner] = []
        try:
            # Shielded: the lock is let go even if cancelled before the hop starts.
            await run_sync(self._queue.close, held, closed, shield=True)
        finally:
            # Even when the caller was cancelled: the hop ran to its end, and
            # the messages must say they are no longer held.
            QueueCore.closed(held, closed)

    async def __aenter__(self) -> FileStore:
        await self.prepare()
        return self
