"""The counters behind `FileCache.stats`, bumped from the loop and from copy threads.

Its own module because every layer of the cache counts (the directory evicts,
the copier copies, a session reads from the source) and none of them should
import another only to count.
"""

from __future__ import annotations

import threading
from typing import Literal, get_args

__all__ = ("Count", "Stats")

#: What the cache counts (documented in `FileCache.stats`).
Count = Literal[
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
]


class Stats:
    """Counters, bumped from the loop and from copy threads."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(get_args(Count), 0)

    def count(self, what: Count, n: int = 1) -> None:
        with self._mutex:
            self._counts[what] = self._counts.get(what, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._mutex:
            return dict(self._counts)
