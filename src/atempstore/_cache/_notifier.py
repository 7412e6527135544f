"""inotify: wake the followers of a copy when its copier, in another process, writes progress.

One inotify instance per cache, one watch per followed entry (on its lock
file, where the copier rewrites its record), dispatched by one task on the
loop.  Without inotify (not Linux, or out of instances) watches are None and
followers poll; `load_asyncinotify` is called in a worker thread because the
import itself reads files.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ("Follower", "Notifier", "load_asyncinotify")


def load_asyncinotify() -> Any:
    """Import asyncinotify, in a worker thread: importing it reads files and runs
    ``ldconfig`` (ctypes.util.find_library), which ``import atempstore`` must not."""
    try:
        import asyncinotify
    except ImportError:  # not Linux: followers poll
        return None
    return asyncinotify


class Follower(Protocol):
    """What the notifier wakes: a `CopySession` that follows a copy."""

    def poke(self) -> None: ...


class Notifier:
    """One inotify instance per cache; `None` watches mean "poll instead"."""

    def __init__(self) -> None:
        self._inotify: Any = None
        self._mask: Any = None
        self._task: asyncio.Task[None] | None = None
        self._subscribers: dict[int, set[Follower]] = {}
        self.available = False

    def start(self, asyncinotify: Any) -> None:
        """On the loop: inotify_init1 names no path.  ``asyncinotify`` was imported
        by `load_asyncinotify` in a worker thread (None: followers poll)."""
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

    def subscribe(self, wd: int, session: Follower) -> Callable[[], None]:
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
