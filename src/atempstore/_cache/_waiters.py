"""The readers of a session waiting for the copy to reach an offset: a heap, on the loop.

Its own module so that `CopySession` reads as modes and readers, and so that
the one subtle part of waiting (a cancelled wait stays in the heap until
progress passes it, and a client that keeps hanging up must not make it grow
without bound) is in one place.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from ._copier import NOBODY

__all__ = ("Waiters",)


class Waiters:
    """Futures keyed by the offset each reader waits for, smallest first.

    Example (on the loop):
        ```python
        waiters = Waiters()
        future = waiters.add(4096)
        waiters.wake_upto(8192)  # future is done now
        ```
    """

    __slots__ = ("_abandoned", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._abandoned = 0

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def front(self) -> int:
        """The smallest offset waited for (`NOBODY` if nobody waits)."""
        return self._heap[0][0] if self._heap else NOBODY

    def add(self, end: int) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (end, next(self._seq), future))
        return future

    def abandoned(self) -> None:
        """A wait was cancelled: it stays in the heap until progress passes it;
        many of them (a client that keeps hanging up) are swept out."""
        self._abandoned += 1
        if self._abandoned > 256 and self._abandoned * 2 > len(self._heap):
            self._heap = [w for w in self._heap if not w[2].done()]
            heapq.heapify(self._heap)
            self._abandoned = 0

    def wake_upto(self, avail: int) -> None:
        """Wake the readers waiting for at most ``avail``."""
        heap = self._heap
        while heap and heap[0][0] <= avail:
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        """No more progress will come: wake everyone to look again."""
        heap, self._heap = self._heap, []
        for _, _, future in heap:
            if not future.done():
                future.set_result(None)
