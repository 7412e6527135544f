"""Stream one file from a slow source to several readers while it is being cached.

Run it as it is: ``python examples/stream_file.py`` (``--help`` for sizes).

A 32 MiB file sits behind a source throttled to 40 MB/s (think of a network
mount).  Four readers start at different offsets at once: two at the start,
one in the middle, one near the end.  All of them share one copy into the
cache.  The readers at the start follow the copy as the bytes land.  The
others are far ahead of the copy, so they read from the source directly and
don't wait.  Each one prints its time to first byte and its throughput.  A
last reader then finds the whole file in the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

from atempstore import FileCache

MiB = 1 << 20


class ThrottledFile:
    """A `atempstore.Source` that reads a local file at a limited rate."""

    def __init__(self, path: Path, rate: float) -> None:
        self.path = path
        self.rate = rate
        self.key = f"throttled:{path}"
        self.bytes_read = 0
        self._mutex = threading.Lock()

    @property
    def size(self) -> int:
        return os.stat(self.path).st_size

    @property
    def mtime(self) -> float:
        return os.stat(self.path).st_mtime

    def pread(self, offset: int, n: int) -> bytes:
        time.sleep(n / self.rate)  # the slow link (called in a worker thread)
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), n, offset)
        with self._mutex:
            self.bytes_read += len(data)
        return data


async def reader(cache: FileCache, source: ThrottledFile, name: str, start: int) -> str:
    began = time.perf_counter()
    first = None
    total = 0
    digest = hashlib.sha256()
    async with cache.open(source) as f:
        mode = f.mode
        async for chunk in f.iter_bytes(start):
            if first is None:
                first = time.perf_counter() - began
            total += len(chunk)
            digest.update(chunk)
    elapsed = time.perf_counter() - began
    return (
        f"{name:<14} from {start / MiB:5.1f} MiB: first byte {1e3 * (first or 0):7.1f} ms,"
        f" {total / MiB:5.1f} MiB at {total / elapsed / 1e6:6.1f} MB/s (opened in {mode} mode)"
    )


async def main(size: int, rate: float) -> None:
    with tempfile.TemporaryDirectory(prefix="atempstore-stream-") as tmp:
        path = Path(tmp, "movie.bin")
        path.write_bytes(os.urandom(size))
        source = ThrottledFile(path, rate)
        print(f"source: {size / MiB:.0f} MiB at {rate / 1e6:.0f} MB/s")
        async with FileCache(Path(tmp, "cache"), max_size=4 * size) as cache:
            t0 = time.perf_counter()
            lines = await asyncio.gather(
                reader(cache, source, "start", 0),
                reader(cache, source, "start, again", 0),
                reader(cache, source, "middle", size // 2),
                reader(cache, source, "near the end", size - MiB),
            )
            print("\n".join(lines))
            async with cache.open(source) as f:
                await f.wait_cached()
            print(
                f"copy finished after {time.perf_counter() - t0:.2f} s;"
                f" {source.bytes_read / MiB:.1f} MiB read from the source in all"
            )
            print(await reader(cache, source, "later reader", 0))
            stats = cache.stats()
            print(
                f"copies: {stats['copies']}, cache hits: {stats['hits']},"
                f" usage: {await cache.usage() / MiB:.0f} MiB of {cache.max_size / MiB:.0f} MiB"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--rate-mb", type=float, default=40.0, help="source speed, MB/s")
    args = parser.parse_args()
    asyncio.run(main(args.size_mib * MiB, args.rate_mb * 1e6))
