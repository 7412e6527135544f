"""The copy-while-serving cache (SPEC §5): `FileCache`, `CachedFile`, `Source`.

One concern per module, from the bottom up:

- `_fd`: fds shared by threads, and giving fds back off the loop;
- `_stats`: the counters of `FileCache.stats`;
- `_source`: the `Source` protocol and the origins (a path, a `Source` object;
  remote origins go here);
- `_record`: the on-disk format: entry names, the copy record in an entry's
  lock file, the space ledger and its lock;
- `_directory`: the cache directory as a blocking core (space, publication,
  healing, eviction);
- `_probe`: what one open finds in an entry (cache, copy, follow, source);
- `_doorbell`: how a copy thread wakes the loop;
- `_copier`: the blocking copy loop, checked, then published;
- `_waiters` and `_session`: the per-source `CopySession` its readers share;
- `_notifier`: inotify, waking followers of another process's copy;
- `_table`: the sessions of one cache, one per entry, and stopping them;
- `_cachedfile` and `_filecache`: the public classes, thin one-hop facades.

Start reading at `_filecache`, then `_session`.
"""

from __future__ import annotations

from ._cachedfile import CachedFile
from ._filecache import FileCache
from ._source import FileInfo, Source

__all__ = ("CachedFile", "FileCache", "FileInfo", "Source")
