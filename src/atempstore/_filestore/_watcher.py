"""Waking consumers: the inotify watch on ``new/`` and a consumer's backlog of names.

An idle consumer must cost no CPU and still see a delivery from another
process within milliseconds, so it sleeps in the event loop's selector on an
inotify fd (through asyncinotify).  The events are read without blocking, in
the claim hop, never on the loop.  Where inotify is unavailable (another OS,
or the per-user instance limit reached) the watcher falls back to a rescan of
``new/`` every `POLL_INTERVAL` seconds.  The `Backlog` keeps the names seen,
oldest first, so a consumer claims in delivery order without a full listing
per message.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
from collections.abc import Iterable
from typing import Any

from ._names import OrderKey, order_key, visible_names

__all__ = ("POLL_INTERVAL", "Backlog", "Watcher")

#: Rescan interval of a consumer that could not get an inotify watch.
POLL_INTERVAL = 0.05


class Watcher:
    """Tells a consumer that something arrived in ``new/``.

    inotify events are read without blocking once the fd is readable, so no
    event is ever dropped by a timeout racing a read.  Without inotify, every
    wait ends after `POLL_INTERVAL` and asks for a rescan.
    """

    __slots__ = ("_inotify", "_mask", "_woke")

    def __init__(self, inotify: Any) -> None:
        self._inotify = inotify
        self._mask: Any = None
        self._woke = False

    @classmethod
    def open(cls, directory: str, use_inotify: bool = True) -> Watcher:  # in a thread
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

    async def wait(self, timeout: float) -> bool:
        """Sleep until something arrives (True) or ``timeout`` passes (False)."""
        if timeout <= 0:
            return False
        if self._inotify is None:
            await asyncio.sleep(min(timeout, POLL_INTERVAL))
            self._woke = True
            return timeout > POLL_INTERVAL
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


class Backlog:
    """A consumer's view of ``new/``: names it has seen, oldest first.

    Fed by inotify events, or by a full scan at start, on overflow and after
    each recovery.  Only touched by the worker thread of the current hop.
    """

    __slots__ = ("heap", "known")

    def __init__(self) -> None:
        self.heap: list[OrderKey] = []
        self.known: set[str] = set()

    def rescan(self, directory: str) -> None:
        self.heap = []
        self.known = set()
        self.add(directory, visible_names(directory))

    def add(self, directory: str, names: Iterable[str]) -> None:
        for name in names:
            if name in self.known or name.startswith("."):
                continue
            key = order_key(name, os.path.join(directory, name))
            if key is not None:
                heapq.heappush(self.heap, key)
                self.known.add(name)

    def pop(self) -> str | None:
        if not self.heap:
            return None
        name = heapq.heappop(self.heap)[-1]
        self.known.discard(name)
        return name
