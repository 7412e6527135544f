"""How a copy thread wakes the event loop: the `Doorbell`, an eventfd the loop reads.

Its own module because it is the one place where a worker thread calls into
the loop, and the reason it does not use ``call_soon_threadsafe`` is a
scheduler effect worth reading on its own (see `Doorbell`).  The copier only
gets its ``post`` method.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("Doorbell", "open_doorbell_fd")


def open_doorbell_fd() -> int:
    """An eventfd for a `Doorbell`, or -1 where there is none (not Linux).
    Names no path; called in the worker thread that prepares the cache."""
    if not hasattr(os, "eventfd"):
        return -1
    try:
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError:
        return -1


class Doorbell:
    """Hands calls from copy threads to the event loop, waking it through an eventfd.

    Why not ``loop.call_soon_threadsafe``: it wakes the loop by writing to a
    socket, and Linux wakes a socket's reader with the *sync* hint ("the writer
    is about to sleep"), so the scheduler puts the loop thread on the copy
    thread's CPU, even when another CPU is idle.  The copy thread does not
    sleep: it goes straight back into a ``copy_file_range`` or ``fsync`` that
    runs for milliseconds in the kernel, where a non-preemptible kernel lets it
    run until the next tick, and the loop thread waits behind it.  On a 2-CPU
    VM, posting each chunk's progress that way took the loop's p99 lag from
    0.1-0.2 ms (no posts) to 0.9-1.5 ms with 4 ms stalls; through an eventfd
    (woken without the hint, so the loop thread stays on an idle CPU) it stays
    at 0.1-0.2 ms.  Calls are queued and the eventfd is written only when the
    queue was empty, so a busy loop gets one wake-up for many posts.

    Calls arrive in order among themselves, but not in order with work that
    completes through ``call_soon_threadsafe`` (a ``run_sync`` returning):
    their targets must tolerate arriving late.  Where there is no eventfd, and
    after `close`, calls go through ``call_soon_threadsafe``.
    """

    __slots__ = ("_armed", "_calls", "_fd", "_loop", "_mutex")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._calls: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._mutex = threading.Lock()
        self._armed = False  # the eventfd was written and not yet read
        self._fd = -1
        if fd >= 0:
            try:
                loop.add_reader(fd, self._ring)
            except (NotImplementedError, OSError, ValueError):
                os.close(fd)  # a loop without add_reader: call_soon_threadsafe
            else:
                self._fd = fd

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; from any thread."""
        with self._mutex:
            if self._fd >= 0:
                self._calls.append((fn, args))
                if not self._armed:
                    self._armed = True
                    # Under the mutex: close() cannot free the fd number meanwhile.
                    os.eventfd_write(self._fd, 1)
                return
        # A closed loop raises RuntimeError: nobody is reading any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _ring(self) -> None:  # on the loop
        with self._mutex:
            if self._fd < 0:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._fd)
            self._armed = False
            calls, self._calls = self._calls, collections.deque()
        for fn, args in calls:
            fn(*args)

    def detach(self) -> int:
        """On the loop: stop listening; calls posted later use ``call_soon_threadsafe``.

        Returns the eventfd (-1 if none) for the caller to close, in the worker
        thread that closes the cache's other fds.
        """
        with self._mutex:
            fd, self._fd = self._fd, -1
            calls, self._calls = self._calls, collections.deque()
        if fd >= 0:
            self._loop.remove_reader(fd)
        for fn, args in calls:
            self._loop.call_soon(fn, *args)
        return fd

    def close(self) -> None:
        """`detach`, then close the eventfd here (an fd of ours, not the user's)."""
        fd = self.detach()
        if fd >= 0:
            os.close(fd)
