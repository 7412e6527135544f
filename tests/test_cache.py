"""FileCache and CopySession: one copy, many readers, exact bytes, bounded space.

Real files in tmp_path, a throttled `Source` for a slow network mount, a real
small tmpfs for ENOSPC.  Cross-process tests are in ``test_cache_procs.py``;
here two `FileCache` objects on one directory stand in for two processes
(their locks are separate open files, exactly as between processes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from atempstore import CachedFile, FileCache, Source, SourceChangedError

from .conftest import mounted_tmpfs, open_fds

MiB = 1 << 20


class MemorySource:
    """A `Source` over bytes in memory, throttled like a slow link, logging every pread."""

    def __init__(self, data: bytes, *, rate: float = 0.0, key: str = "mem:file") -> None:
        self.data = data
        self.key = key
        self.rate = rate
        self.mtime = 1_700_000_000.25
        self.log: list[tuple[int, int]] = []
        self._mutex = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, n: int) -> bytes:
        if self.rate:
            time.sleep(n / self.rate)
        chunk = self.data[offset : offset + n]
        with self._mutex:
            self.log.append((offset, len(chunk)))
        return chunk

    @property
    def bytes_read(self) -> int:
        with self._mutex:
            return sum(n for _, n in self.log)


class FileSource:
    """A `Source` over a real file, throttled, whose size/mtime are read afresh."""

    def __init__(self, path: Path, *, rate: float) -> None:
        self.path = path
        self.key = f"slow:{path}"
        self.rate = rate

    @property
    def size(self) -> int:
        return os.stat(self.path).st_size

    @property
    def mtime(self) -> float:
        return os.stat(self.path).st_mtime

    def pread(self, offset: int, n: int) -> bytes:
        time.sleep(n / self.rate)
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), n, offset)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def parts(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".part", ".tmp")))


async def read_all(f: CachedFile, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in f.iter_bytes(start, end)])


@pytest.fixture
def payload() -> bytes:
    return os.urandom(3 * MiB + 12345)


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[FileCache]:
    async with FileCache(tmp_path / "cache", max_size=256 * MiB) as c:
        yield c


# --------------------------------------------------------------------------
# Basics


async def test_path_source_is_copied_then_served_from_the_cache(
    tmp_path: Path, cache: FileCache, payload: bytes
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_650_000_000_123_456_789))

    async with cache.open(src) as f:
        assert f.mode == "copy"
        assert f.size == len(payload)
        assert f.key == str(src.resolve())
        assert await read_all(f) == payload
        assert await f.wait_cached()
        assert f.mode == "cache"
    names = visible(cache.directory)
    assert len(names) == 1
    final = cache.directory / names[0]
    assert final.read_bytes() == payload
    assert final.stat().st_mtime_ns == 1_650_000_000_123_456_789  # the source's mtime
    assert parts(cache.directory) == []
    assert await cache.usage() == len(payload)

    async with cache.open(str(src)) as f:
        assert f.mode == "cache"
        assert f.mtime == pytest.approx(1_650_000_000.123456789)
        assert await f.read(100, 50) == payload[100:150]
    stats = cache.stats()
    assert (stats["copies"], stats["published"], stats["hits"]) == (1, 1, 1)


async def test_reader_api(tmp_path: Path, cache: FileCache, payload: bytes) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    f = await cache.open(src)
    try:
        size = len(payload)
        assert await f.read(size - 10, 100) == payload[-10:]  # short only at the end
        assert await f.read(size, 10) == b""
        assert await f.read(size + 5, 10) == b""
        assert await f.read(0, 0) == b""
        assert await read_all(f, 1000, 1000 + 3 * 256 * 1024 + 7) == payload[1000 : 1000 + 786439]
        assert await read_all(f, size - 5, size + 100) == payload[-5:]
        assert await read_all(f, 10, 10) == b""
        with pytest.raises(ValueError, match="offset"):
            await f.read(-1, 10)
        with pytest.raises(ValueError, match="start"):
            await read_all(f, 5, 4)
        assert f.etag.startswith('"')
        assert f.etag.endswith('"')
        assert "CachedFile" in repr(f)
    finally:
        await f.aclose()
        await f.aclose()  # harmless
    with pytest.raises(ValueError, match="closed"):
        await f.read(0, 1)


async def test_empty_file(tmp_path: Path, cache: FileCache) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    for expected in ("copy", "cache"):
        async with cache.open(src) as f:
            assert f.mode == expected
            assert f.size == 0
            assert await f.read(0, 10) == b""
            assert await read_all(f) == b""
            assert await f.wait_cached()
    assert len(visible(cache.directory)) == 1


async def test_bad_sources_and_closed_cache(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "c", max_size=MiB)
    with pytest.raises(FileNotFoundError):
        await cache.open(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        await cache.open(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="regular files"):
        await asyncio.wait_for(cache.open(fifo), 5)  # refused, not hung waiting for a writer
    with pytest.raises(TypeError, match="Source"):
        await cache.open(42)  # type: ignore[arg-type]
    await cache.aclose()
    await cache.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await cache.open(tmp_path / "x")
    with pytest.raises(ValueError, match="max_size"):
        FileCache(tmp_path, max_size=0)


def test_constructor_does_no_io(tmp_path: Path) -> None:
    FileCache(tmp_path / "not" / "yet", max_size=MiB)
    assert not (tmp_path / "not").exists()


def test_memory_source_follows_the_protocol() -> None:
    source: Source = MemorySource(b"x")  # mypy checks the protocol here
    assert source.size == 1


# --------------------------------------------------------------------------
# The heart of it: a slow source, many readers, one copy


async def test_sixteen_readers_of_a_throttled_64_mib_source(tmp_path: Path) -> None:
    data = os.urandom(64 * MiB)
    source = MemorySource(data, rate=20e6)  # 20 MB/s: the copy takes ~3.4 s
    size = len(data)
    async with FileCache(tmp_path / "cache", max_size=128 * MiB) as cache:
        t0 = time.perf_counter()
        first_byte: list[float] = []
        tail_done: list[tuple[float, int]] = []

        async def reader(i: int) -> tuple[int, str]:
            start = i * 4 * MiB
            async with cache.open(source) as f:
                digest = hashlib.sha256()
                async for chunk in f.iter_bytes(start):
                    if i == 0 and not first_byte:
                        first_byte.append(time.perf_counter() - t0)
                    digest.update(chunk)
                return start, digest.hexdigest()

        async def tail() -> bytes:
            await asyncio.sleep(0.3)
            async with cache.open(source) as f:
                got = await f.read(size - MiB, MiB)
                tail_done.append((time.perf_counter() - t0, cache.stats()["copied_bytes"]))
                return got

        results, last = await asyncio.gather(asyncio.gather(*map(reader, range(16))), tail())
        async with cache.open(source) as f:
            assert await f.wait_cached()
        copy_time = time.perf_counter() - t0

        for start, digest in results:
            assert digest == sha(data[start:]), f"reader at {start} got wrong bytes"
        assert last == data[-MiB:]
        # The first byte came long before the copy ended...
        assert first_byte[0] < 0.5 < 3.0 < copy_time
        # ...and the last MiB came while the copy was still far from it.
        returned_at, copied_then = tail_done[0]
        assert returned_at < 1.5
        assert copied_then < size - MiB
        # One copy: the copier's preads tile the file exactly once, and every
        # other byte read from the source is accounted as a direct read.
        stats = cache.stats()
        assert (stats["copies"], stats["published"], stats["copied_bytes"]) == (1, 1, size)
        assert source.bytes_read == stats["copied_bytes"] + stats["source_bytes"]
        assert visible(cache.directory) != []
        assert parts(cache.directory) == []


async def test_read_just_ahead_waits_and_far_ahead_comes_from_the_source(
    tmp_path: Path,
) -> None:
    data = os.urandom(8 * MiB)
    source = MemorySource(data, rate=10e6)
    async with (
        FileCache(tmp_path / "c", max_size=64 * MiB, wait_window=MiB) as cache,
        cache.open(source) as f,
    ):
        t0 = time.perf_counter()
        assert await f.read(7 * MiB, 1000) == data[7 * MiB : 7 * MiB + 1000]
        assert time.perf_counter() - t0 < 0.3  # not after the copy (~0.8 s)
        assert cache.stats()["source_bytes"] == 1000
        # Just ahead: waits for the copy, then comes from the cache file.
        assert await f.read(512 * 1024, 1000) == data[512 * 1024 : 512 * 1024 + 1000]
        assert cache.stats()["source_bytes"] == 1000
        assert cache.stats()["copied_bytes"] >= 512 * 1024 + 1000


async def test_same_source_in_two_caches_is_copied_once_and_followed(
    tmp_path: Path, no_blocking_io: list[str]
) -> None:
    """Two caches on one directory behave like two processes: the second follows."""
    data = os.urandom(6 * MiB)
    source = MemorySource(data, rate=15e6)
    async with (
        FileCache(tmp_path / "c", max_size=64 * MiB) as one,
        FileCache(tmp_path / "c", max_size=64 * MiB) as two,
    ):
        f1 = await one.open(source)
        await f1.read(0, 1)  # the copy is under way
        f2 = await two.open(source)
        try:
            assert f1.mode == "copy"
            assert f2.mode == "follow"
            got1, got2 = await asyncio.gather(read_all(f1), read_all(f2))
            assert got1 == data
            assert got2 == data
            assert await f2.wait_cached()
        finally:
            await f1.aclose()
            await f2.aclose()
        assert one.stats()["copied_bytes"] == len(data)
        assert two.stats()["copied_bytes"] == 0
        assert two.stats()["source_bytes"] == 0  # it read behind the copy, from the part
        assert (two.stats()["follows"], two.stats()["followed"]) == (1, 1)
        assert source.bytes_read == len(data)
        async with two.open(source) as f:
            assert f.mode == "cache"


class GatedSource(MemorySource):
    """A `MemorySource` whose reads past the first chunk wait for ``gate``."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.gate = threading.Event()

    def pread(self, offset: int, n: int) -> bytes:
        if offset > 0:
            assert self.gate.wait(30), "the test never opened the gate"
        return super().pread(offset, n)


async def test_follower_that_reads_the_progress_only_after_publication_ends_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copier downgrades the part's lock (waking the followers) and then
    publishes; a follower on a busy machine reads the progress only after
    that.  It used to find the record cleared and end uncached (1 in 4 runs of
    the two-process test at load average 9).  Here every read of the progress
    by the follower waits for the publication: the interleaving is forced."""
    from atempstore._cache import _directory, _record, _session

    published = threading.Event()
    real_publish = _directory.Directory.publish
    real_read_progress = _record.read_progress  # what _session calls

    def publish(self: _directory.Directory, name: str, lock_fd: int) -> None:
        real_publish(self, name, lock_fd)
        published.set()

    def read_progress_late(fd: int) -> int | None:
        assert published.wait(30), "the copy was never published"
        return real_read_progress(fd)

    monkeypatch.setattr(_directory.Directory, "publish", publish)
    monkeypatch.setattr(_session, "read_progress", read_progress_late)
    data = os.urandom(2 * MiB)
    source = GatedSource(data)
    async with (
        FileCache(tmp_path / "c", max_size=64 * MiB) as one,
        FileCache(tmp_path / "c", max_size=64 * MiB) as two,
    ):
        async with one.open(source) as f1:
            await f1.read(0, 1)  # the copy holds the part, stopped at the gate
            async with two.open(source) as f2:
                assert (f1.mode, f2.mode) == ("copy", "follow")
                source.gate.set()
                assert await f1.wait_cached()
                assert await f2.wait_cached()
                assert f2.mode == "cache"
                assert await read_all(f2) == data
        assert (two.stats()["followed"], two.stats()["source_bytes"]) == (1, 0)
        assert source.bytes_read == len(data)


async def test_follower_of_a_queued_copy_reads_from_the_source_meanwhile(
    tmp_path: Path,
) -> None:
    busy = MemorySource(os.urandom(4 * MiB), rate=4e6, key="busy")  # holds the only slot
    queued_data = os.urandom(2 * MiB)
    queued = MemorySource(queued_data, rate=50e6, key="queued")
    async with (
        FileCache(tmp_path / "c", max_size=64 * MiB, max_copies=1) as one,
        FileCache(tmp_path / "c", max_size=64 * MiB) as two,
    ):
        f_busy = await one.open(busy)
        await f_busy.read(0, 1)
        f_queued = await one.open(queued)  # its copy waits for the slot
        async with two.open(queued) as f:
            assert f.mode == "follow"
            t0 = time.perf_counter()
            assert await f.read(0, 1000) == queued_data[:1000]
            assert time.perf_counter() - t0 < 0.5  # not after busy's copy (~1 s)
            assert two.stats()["source_bytes"] == 1000
            assert await read_all(f) == queued_data
        await f_busy.aclose()
        await f_queued.aclose()


async def test_follower_of_a_cancelled_copy_finishes_from_the_source(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    source = MemorySource(data, rate=8e6)
    one = FileCache(tmp_path / "c", max_size=64 * MiB)
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as two:
        f1 = await one.open(source)
        await f1.read(0, 1)
        async with two.open(source) as f2:
            assert f2.mode == "follow"
            head = await f2.read(0, 100_000)
            await one.aclose()  # the copier goes away mid-copy
            rest = await read_all(f2, 100_000)
            assert head + rest == data
            assert f2.mode == "source"
        await f1.aclose()
        assert visible(tmp_path / "c") == []
        assert parts(tmp_path / "c") == []
        async with two.open(source) as f:  # a new copy starts cleanly
            assert f.mode == "copy"
            assert await read_all(f) == data
            assert await f.wait_cached()
        assert await two.usage() == len(data)


# --------------------------------------------------------------------------
# Sources that change or vanish


def change_source(path: Path, change: str) -> None:
    """Change a source file the way the mid-copy tests need: "truncated" (to
    1 MiB), "rewritten" (same size, first 4 KiB zeroed, newer mtime) or "deleted"."""
    if change == "truncated":
        os.truncate(path, MiB)
    elif change == "rewritten":
        with open(path, "r+b") as fh:
            fh.write(b"\0" * 4096)
        os.utime(path, ns=(0, time.time_ns() + 10**9))
    else:
        assert change == "deleted", change
        path.unlink()


@pytest.mark.parametrize("change", ["truncated", "rewritten", "deleted"])
async def test_source_changing_mid_copy_never_mixes_bytes(tmp_path: Path, change: str) -> None:
    path = tmp_path / "src.bin"
    original = os.urandom(4 * MiB)
    path.write_bytes(original)
    source = FileSource(path, rate=10e6)  # ~0.4 s
    async with FileCache(tmp_path / "c", max_size=64 * MiB, wait_window=256 * 1024) as cache:
        outcomes: list[str] = []

        async def reader(start: int) -> None:
            got = bytearray()
            try:
                async with cache.open(source) as f:
                    async for chunk in f.iter_bytes(start):
                        got += chunk
            except SourceChangedError:
                outcomes.append("changed")
            else:
                outcomes.append("whole")
                assert len(got) == len(original) - start
            assert bytes(got) == original[start : start + len(got)], "mixed bytes"

        async def mutate() -> None:
            while cache.stats()["copied_bytes"] < 300_000:
                await asyncio.sleep(0.005)
            change_source(path, change)

        await asyncio.gather(*(reader(s) for s in (0, 0, 1000, 700_000)), mutate())
        assert "changed" in outcomes
        assert cache.stats()["failed"] == 1
        assert cache.stats()["published"] == 0
        assert visible(cache.directory) == []
        assert parts(cache.directory) == []
        assert await cache.usage() == 0


async def test_outdated_copy_is_recopied_and_old_readers_keep_their_version(
    tmp_path: Path, cache: FileCache
) -> None:
    src = tmp_path / "src.bin"
    old = os.urandom(2 * MiB)
    src.write_bytes(old)
    async with cache.open(src) as f:
        assert await f.wait_cached()
    holder = await cache.open(src)
    assert holder.mode == "cache"
    new = os.urandom(MiB)
    src.write_bytes(new)
    os.utime(src, ns=(0, 1_800_000_000_000_000_000))
    async with cache.open(src) as f:
        assert f.mode == "copy"
        assert await read_all(f) == new
        assert await f.wait_cached()
    assert await read_all(holder) == old  # its fd still reads the old version
    await holder.aclose()
    assert cache.stats()["outdated"] == 1
    assert await cache.usage() == len(new)
    async with cache.open(src) as f:
        assert f.mode == "cache"
        assert await read_all(f) == new


# --------------------------------------------------------------------------
# Space


async def test_full_cache_of_held_files_serves_uncached_then_evicts_lru(tmp_path: Path) -> None:
    now = [1_000.0]
    directory = tmp_path / "c"
    async with FileCache(directory, max_size=3 * MiB, clock=lambda: now[0]) as cache:
        blobs = {name: os.urandom(MiB) for name in "abcd"}
        sources = {name: MemorySource(b, key=name) for name, b in blobs.items()}
        held = []
        for name in "abc":
            now[0] += 10
            f = await cache.open(sources[name])
            assert await f.wait_cached()
            held.append(f)
        assert await cache.usage() == 3 * MiB

        async with cache.open(sources["d"]) as f:
            assert f.mode == "source"  # nothing can be evicted: all held
            assert await read_all(f) == blobs["d"]
        assert len(visible(directory)) == 3
        assert await cache.usage() == 3 * MiB

        for f in held:
            await f.aclose()
        now[0] += 10
        async with cache.open(sources["a"]) as f:  # a is now the most recent
            assert f.mode == "cache"
        now[0] += 10
        async with cache.open(sources["d"]) as f:
            assert f.mode == "copy"
            assert await read_all(f) == blobs["d"]
            assert await f.wait_cached()
        assert await cache.usage() <= 3 * MiB
        assert cache.stats()["evicted"] == 1
        for name, expected in (("a", "cache"), ("c", "cache"), ("d", "cache"), ("b", "copy")):
            async with cache.open(sources[name]) as f:
                assert f.mode == expected, name
                assert await read_all(f) == blobs[name]
                await f.wait_cached()
            assert await cache.usage() <= 3 * MiB


async def test_file_larger_than_the_cache_is_served_uncached(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    async with FileCache(tmp_path / "c", max_size=MiB) as cache:
        async with cache.open(MemorySource(data)) as f:
            assert f.mode == "source"
            assert await read_all(f) == data
        assert visible(cache.directory) == []


async def test_usage_counter_is_rebuilt_when_lost(tmp_path: Path, payload: bytes) -> None:
    src = tmp_path / "s"
    src.write_bytes(payload)
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as cache, cache.open(src) as f:
        assert await f.wait_cached()
    (tmp_path / "c" / ".usage").write_bytes(b"garbage!")
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as cache:
        assert await cache.usage() == len(payload)


@pytest.mark.faults
async def test_enospc_on_the_cache_disk_serves_uncached(tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)
    with mounted_tmpfs(tmp_path / "small", "size=2m") as mount:
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        # max_size lies: the disk fills first, with a real ENOSPC.
        async with FileCache(mount / "c", max_size=64 * MiB) as cache:
            for source in (src, MemorySource(data, rate=50e6)):
                async with cache.open(source) as f:
                    got = await read_all(f)
                    assert got == data
                    assert not await f.wait_cached()
                    assert f.mode == "source"
            assert visible(mount / "c") == []
            assert parts(mount / "c") == []
            assert await cache.usage() == 0
            assert cache.stats()["uncached"] == 2


# --------------------------------------------------------------------------
# Lifetime: abandoning, cancelling, closing


async def test_copy_finishes_when_every_reader_leaves(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    source = MemorySource(data, rate=20e6)
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as cache:
        async with cache.open(source) as f:
            await f.read(0, 10)
        async with cache.open(source) as f:  # the session is still alive: shared
            assert f.mode == "copy"
            assert await f.wait_cached()
        assert cache.stats()["copies"] == 1


async def test_abandoned_copy_is_cancelled_when_configured(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    source = MemorySource(data, rate=10e6)
    async with FileCache(tmp_path / "c", max_size=64 * MiB, finish_abandoned=False) as cache:
        async with cache.open(source) as f:
            await f.read(0, 10)
        for _ in range(200):
            if not parts(cache.directory) and await cache.usage() == 0:
                break
            await asyncio.sleep(0.01)
        assert parts(cache.directory) == []
        assert visible(cache.directory) == []
        assert await cache.usage() == 0
        assert source.bytes_read < len(data)


async def test_aclose_cancels_copies_and_leaves_readers_working(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    source = MemorySource(data, rate=10e6)
    cache = FileCache(tmp_path / "c", max_size=64 * MiB)
    f = await cache.open(source)
    head = await f.read(0, 1000)
    t0 = time.perf_counter()
    await cache.aclose()
    assert time.perf_counter() - t0 < 0.5  # stopped at the next chunk, not the end
    assert parts(tmp_path / "c") == []
    assert visible(tmp_path / "c") == []
    assert head + await read_all(f, 1000) == data
    assert f.mode == "source"
    await f.aclose()


async def test_aclose_during_opens_starts_no_copy(tmp_path: Path) -> None:
    # Close at every point of the opens in flight (resolving, probing, ...):
    # no copy may start after aclose() (it would run on, unstopped, and publish).
    for delay in range(24):
        directory = tmp_path / f"c{delay}"
        cache = FileCache(directory, max_size=64 * MiB)
        await cache.usage()  # set up
        sources = [MemorySource(os.urandom(256 * 1024), rate=20e6, key=f"k{i}") for i in range(4)]
        opens = [asyncio.ensure_future(cache.open(s)) for s in sources]
        for _ in range(delay):
            await asyncio.sleep(0)
        await cache.aclose()
        # aclose() waits for the copies it cancels, so whatever is published now
        # was finished before it (possible when the loop is starved for the
        # ~13 ms a copy takes); nothing may appear afterwards.
        published_before_close = visible(directory)
        for result in await asyncio.gather(*opens, return_exceptions=True):
            if isinstance(result, CachedFile):
                await result.aclose()
            else:
                assert isinstance(result, RuntimeError), result
        await asyncio.sleep(0.05)  # a stray copy would have published by now
        assert parts(directory) == []
        assert visible(directory) == published_before_close, delay


async def test_ten_thousand_cancelled_reads_leak_nothing(tmp_path: Path) -> None:
    data = os.urandom(8 * MiB)
    source = MemorySource(data, rate=2e6)  # the copy crawls: reads just ahead wait
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    unheld = tmp_path / "unheld.bin"  # no reader holds it: every open probes
    unheld.write_bytes(data[:MiB])
    before = open_fds()
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as cache:
        f = await cache.open(source)
        for i in range(10_000):
            task = asyncio.ensure_future(f.read(300_000 + i, 1000))
            await asyncio.sleep(0)  # it is waiting now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert len(f._session._waiters) < 1000  # swept, not piling up
        # Cancel reads in flight in worker threads, and opens at every step
        # (resolving, probing, sharing a session a held reader keeps alive).
        keeper = await cache.open(src)
        for i in range(600):
            read_task = asyncio.ensure_future(f.read(0, 100))
            target = (src, source, unheld)[i % 3]
            open_task = asyncio.ensure_future(cache.open(target))
            for _ in range(i % 16):
                await asyncio.sleep(0)
            read_task.cancel()
            open_task.cancel()
            results = await asyncio.gather(read_task, open_task, return_exceptions=True)
            for result in results:
                if isinstance(result, CachedFile):
                    await result.aclose()
        assert await f.read(0, 100) == data[:100]
        await f.aclose()
        await keeper.aclose()
    assert open_fds() == before


async def test_no_blocking_io_on_the_loop(
    tmp_path: Path, payload: bytes, no_blocking_io: list[str]
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    source = MemorySource(payload, rate=40e6)
    async with FileCache(tmp_path / "c", max_size=5 * MiB) as cache:
        for s in (src, source):
            async with cache.open(s) as f:
                assert await f.read(0, 10) == payload[:10]
                assert await f.read(len(payload) - 10, 10) == payload[-10:]
                assert await read_all(f) == payload
                assert await f.wait_cached()
            f2 = await cache.open(s)
            assert f2.mode == "cache"
            await f2.aclose()
        # Full: eviction walks the directory; too big: uncached.
        async with cache.open(MemorySource(payload, key="other")) as f:
            assert await read_all(f) == payload
        async with cache.open(MemorySource(os.urandom(6 * MiB), key="big")) as f:
            assert f.mode == "source"
        assert await cache.usage() <= 5 * MiB
        cache.stats()
    assert no_blocking_io == []


async def test_copy_wakes_the_loop_only_for_waiting_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every wake-up of the loop from a copy thread risks leaving the loop thread
    behind it on one CPU (see `Doorbell`): a copy nobody waits on posts nothing."""
    from atempstore._cache._doorbell import Doorbell

    posts: list[str] = []
    post = Doorbell.post

    def counting(self: Doorbell, fn: Any, *args: Any) -> None:
        posts.append(fn.__name__)
        post(self, fn, *args)

    monkeypatch.setattr(Doorbell, "post", counting)
    data = os.urandom(8 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as cache:
        async with cache.open(src) as f:
            assert await f.wait_cached()
        assert posts == []
        # A reader waiting at the front of a slow copy is woken, with exact bytes.
        async with cache.open(MemorySource(data, rate=40e6)) as f:
            assert await f.read(MiB, 1000) == data[MiB : MiB + 1000]
            assert await f.wait_cached()
        assert posts != []
        assert cache.stats()["source_bytes"] == 0


async def test_doorbell_coalesces_and_falls_back_after_close() -> None:
    from atempstore._cache._doorbell import Doorbell, open_doorbell_fd

    loop = asyncio.get_running_loop()
    bell = Doorbell(loop, open_doorbell_fd())
    got: list[int] = []
    done = asyncio.Event()

    def burst() -> None:
        for i in range(100):
            bell.post(got.append, i)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=burst).start()
    await done.wait()
    while len(got) < 100:
        await asyncio.sleep(0.001)
    assert got == list(range(100))
    bell.close()
    bell.close()
    await asyncio.to_thread(bell.post, got.append, 100)  # after close: call_soon_threadsafe
    await asyncio.sleep(0.01)
    assert got[-1] == 100


# --------------------------------------------------------------------------
# Slow work never starves other file operations


class StuckSource(MemorySource):
    """A `Source` whose pread waits (up to ``timeout`` s) for ``release``;
    ``in_flight`` counts the preads waiting, ``crowd`` is set once ``crowd_size`` do."""

    def __init__(
        self, data: bytes, key: str, gate: StuckGate, *, timeout: float | None = 1.0
    ) -> None:
        super().__init__(data, key=key)
        self.gate = gate
        self.timeout = timeout

    def pread(self, offset: int, n: int) -> bytes:
        self.gate.enter()
        try:
            self.gate.release.wait(self.timeout)
        finally:
            self.gate.leave()
        return super().pread(offset, n)


class StuckGate:
    def __init__(self, crowd_size: int) -> None:
        self.release = threading.Event()
        self.crowd = threading.Event()
        self.crowd_size = crowd_size
        self.in_flight = 0
        self._mutex = threading.Lock()

    def enter(self) -> None:
        with self._mutex:
            self.in_flight += 1
            if self.in_flight >= self.crowd_size:
                self.crowd.set()

    def leave(self) -> None:
        with self._mutex:
            self.in_flight -= 1


async def test_forty_readers_of_stuck_sources_do_not_starve_file_operations(
    tmp_path: Path,
) -> None:
    """SPEC intro: 40 readers stuck in a source pread (1 s each) leave file
    operations at milliseconds: source reads and copies run on the slow pool.
    On the file pool (32 threads) they took it whole: 0.95 s for a 1-byte
    open_atomic."""
    from atempstore import open_atomic

    cached = tmp_path / "cached.bin"
    cached.write_bytes(b"hello cache")
    # Sources larger than the cache are served uncached: every read is a pread.
    # 32 of them plus 8 copies (max_copies) whose first pread waits too.
    gate = StuckGate(crowd_size=32)  # 32: all the old pool had; 40 get in now
    big = bytes(2 * MiB)
    small = bytes(64 * 1024)
    async with FileCache(tmp_path / "c", max_size=MiB, max_copies=8) as cache:
        async with cache.open(cached) as f:
            assert await f.wait_cached()
        sources = [StuckSource(big, f"uncached{i}", gate) for i in range(32)]
        sources += [StuckSource(small, f"copied{i}", gate) for i in range(8)]
        files = [await cache.open(s) for s in sources]
        try:
            assert [f.mode for f in files].count("copy") == 8
            # Uncached: a source read; copied: waits for the copy, whose pread waits.
            reads = [asyncio.ensure_future(f.read(f.size - 10, 10)) for f in files]
            await asyncio.to_thread(gate.crowd.wait, 10)
            assert gate.crowd.is_set()

            t0 = time.perf_counter()
            async with open_atomic(tmp_path / "one.txt") as out:
                await out.write(b"x")
            atomic_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            async with cache.open(cached) as f:
                assert f.mode == "cache"
                assert await f.read(0, 5) == b"hello"
            cached_s = time.perf_counter() - t0
            in_flight = gate.in_flight
        finally:
            gate.release.set()
        assert atomic_s < 0.2, f"open_atomic took {atomic_s:.3f} s behind stuck source reads"
        assert cached_s < 0.2, f"a cached open took {cached_s:.3f} s behind stuck source reads"
        assert in_flight >= 40  # every source read and copy got a thread at once
        assert [len(r) for r in await asyncio.gather(*reads)] == [10] * 40
        for f in files:
            await f.aclose()


# --------------------------------------------------------------------------
# A source read that hangs


async def test_aclose_gives_up_on_a_hung_source_read_and_its_readers_get_an_error(
    tmp_path: Path,
) -> None:
    gate = StuckGate(crowd_size=2)
    source = StuckSource(os.urandom(4 * MiB), "hangs", gate, timeout=None)  # never answers
    directory = tmp_path / "c"
    cache = FileCache(directory, max_size=64 * MiB, close_timeout=0.2)
    try:
        f = await cache.open(source)
        assert f.mode == "copy"
        waiting = asyncio.ensure_future(f.read(0, 10))  # waits for the copy's first chunk
        direct = asyncio.ensure_future(f.read(3 * MiB, 10))  # far ahead: a source read
        await asyncio.to_thread(gate.crowd.wait, 10)
        assert gate.crowd.is_set()  # the copy's pread and the direct one hang

        t0 = time.perf_counter()
        await asyncio.wait_for(cache.aclose(), 5)
        assert time.perf_counter() - t0 < 2
        for read in (waiting, direct):
            with pytest.raises(SourceChangedError, match="did not answer") as info:
                await asyncio.wait_for(read, 2)
            assert info.value.filename == "hangs"
        with pytest.raises(SourceChangedError):
            await f.read(0, 10)  # later reads fail at once too
        await f.aclose()
    finally:
        gate.release.set()
    # Freed, the copy thread notices it was cancelled: nothing is published.
    for _ in range(200):
        if not parts(directory):
            break
        await asyncio.sleep(0.01)
    assert parts(directory) == []
    assert visible(directory) == []


# --------------------------------------------------------------------------
# The directory, and errors


async def test_every_directory_level_created_is_0700_and_fsynced_into_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atempstore import _durable

    synced: list[str] = []
    fsync_dir = _durable.fsync_dir

    def recording(path: str | os.PathLike[str]) -> None:
        synced.append(os.fspath(path))
        fsync_dir(path)

    monkeypatch.setattr(_durable, "fsync_dir", recording)
    os.umask(old := os.umask(0o022))
    try:
        async with FileCache(tmp_path / "a" / "b" / "c", max_size=MiB) as cache:
            assert cache.directory.is_dir()
    finally:
        os.umask(old)
    for level in ("a", "a/b", "a/b/c"):
        mode = (tmp_path / level).stat().st_mode & 0o777
        assert mode == 0o700, f"{level}: {mode:o}"
    assert sorted(synced) == sorted(str(tmp_path / p) for p in ("", "a", "a/b"))


class FailingSource(MemorySource):
    def pread(self, offset: int, n: int) -> bytes:
        if offset > 0:
            raise PermissionError(13, "the origin refused")
        return super().pread(offset, n)


async def test_a_failed_copy_tells_readers_the_source_path(tmp_path: Path) -> None:
    source = FailingSource(os.urandom(MiB), key="origin:/videos/a.mp4")
    async with FileCache(tmp_path / "c", max_size=64 * MiB) as cache, cache.open(source) as f:
        with pytest.raises(SourceChangedError) as info:
            await f.read(200_000, 10)  # waits for the copy, which fails after its first chunk
    assert info.value.filename == "origin:/videos/a.mp4"
    assert "origin:/videos/a.mp4" in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)


# --------------------------------------------------------------------------
# The blocking cores, without an event loop


def test_the_copy_record_round_trips_and_a_torn_read_is_recognized(tmp_path: Path) -> None:
    from atempstore._cache._record import (
        QUEUED,
        RECORD_SIZE,
        Record,
        clear_record,
        read_progress,
        read_record,
        retire_record,
        write_progress,
        write_record,
    )

    fd = os.open(tmp_path / "entry.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert read_record(fd) is None  # empty file: no record
        rec = Record(QUEUED, 5 * MiB, 1_700_000_000_123_456_789, 4242, 5 * MiB)
        write_record(fd, rec)
        assert os.fstat(fd).st_size == RECORD_SIZE == 72  # 64 before the ident (ATSCOPY2)
        assert read_record(fd) == rec
        assert read_progress(fd) == QUEUED
        write_progress(fd, 3 * MiB)  # rewrites the counter only
        assert read_record(fd) == Record(3 * MiB, 5 * MiB, rec.mtime_ns, 4242, 5 * MiB)
        assert read_progress(fd) == 3 * MiB
        # One copy of the counter torn (a follower reading while the copier
        # rewrites it): never taken for progress.
        os.pwrite(fd, (4 * MiB).to_bytes(8, "little"), 0)
        assert read_progress(fd) is None
        assert read_record(fd) is None
        write_progress(fd, 4 * MiB)
        # The body torn: its CRC no longer matches.
        os.pwrite(fd, b"\xff", 30)
        assert read_record(fd) is None
        # A published copy's record ends, but its counter still says "complete".
        write_record(fd, Record(5 * MiB, 5 * MiB, rec.mtime_ns, 4242, 5 * MiB))
        retire_record(fd)
        assert read_record(fd) is None
        assert read_progress(fd) == 5 * MiB
        clear_record(fd)
        assert read_record(fd) is None
        assert read_progress(fd) is None
        assert os.pread(fd, RECORD_SIZE, 0) == bytes(RECORD_SIZE)
    finally:
        os.close(fd)


def test_the_ledger_counts_under_its_lock_and_refuses_to_wait_when_told(tmp_path: Path) -> None:
    import fcntl

    from atempstore._cache._record import USAGE_FILE, Ledger, LedgerBusy

    ledger = Ledger()
    ledger.open(str(tmp_path))
    try:
        with ledger.held(wait=False):
            assert ledger.read() is None  # a new ledger: the caller recounts
            ledger.write(12345)
            assert ledger.read() == 12345
            ledger.write(-5)  # never below zero
            assert ledger.read() == 0
        # Another open file description (another process, for flock) holds it.
        other = os.open(tmp_path / USAGE_FILE, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            with pytest.raises(LedgerBusy), ledger.held(wait=False):
                pass
            os.pwrite(other, b"\x01", 3)  # torn by hand
            fcntl.flock(other, fcntl.LOCK_UN)
        finally:
            os.close(other)
        with ledger.held(wait=True):
            assert ledger.read() is None
    finally:
        ledger.close()
    with pytest.raises(RuntimeError, match="closed"), ledger.held():
        pass


def test_directory_probe_copier_publish_without_a_loop(tmp_path: Path) -> None:
    """The directory, the probe and the copier are plain blocking code: one
    copy from probe to publication, then a hit, in this thread."""
    from atempstore._cache._copier import Copier
    from atempstore._cache._directory import Directory
    from atempstore._cache._fd import SharedFd
    from atempstore._cache._probe import Probe, discard, probe
    from atempstore._cache._record import entry_name, read_progress, read_record
    from atempstore._cache._source import PathOrigin
    from atempstore._cache._stats import Stats

    data = os.urandom(3 * MiB + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    stats = Stats()
    directory = Directory(str(tmp_path / "c"), 8 * MiB, lambda: 1000.0, stats)
    directory.open(wait=True)
    origin = PathOrigin(src)
    try:
        origin.resolve()
        name = entry_name(origin.key)
        # A probe given back leaves nothing: no part, no reservation.
        p = probe(directory, Probe(name), origin.version)
        assert p.kind == "copy"
        assert p.reserved == len(data)
        assert directory.usage(wait=True) == len(data)
        discard(directory, p)
        assert directory.usage(wait=True) == 0
        assert sorted(os.listdir(directory.root)) == [f".{name}.lock", ".usage"]

        p = probe(directory, Probe(name), origin.version)
        assert p.kind == "copy"
        assert p.data_fd is not None
        assert p.lock_fd is not None
        woken: list[str] = []
        part = SharedFd(p.data_fd)  # the session's, once the copy is handed over
        copier = Copier(
            origin=origin,
            name=name,
            root=directory.root,
            part=part,
            part_fd=p.data_fd,
            lock_fd=p.lock_fd,
            reserved=p.reserved,
            ledger=directory,
            stats=stats,
            chunk_size=MiB,
            clock_ns=directory.clock_ns,
            post=lambda fn, *args: woken.append(fn.__name__),
        )
        assert copier.run(lambda: None) == "published"
        part.close()
        assert woken == []  # nobody waited: the loop is never woken
        assert (Path(directory.root) / name).read_bytes() == data
        assert (Path(directory.root) / name).stat().st_mtime_ns == origin.version.mtime_ns
        assert directory.usage(wait=True) == len(data)
        hit = probe(directory, Probe(name), origin.version)
        assert hit.kind == "cache"
        assert hit.data_fd is not None
        assert hit.lock_fd is None
        discard(directory, hit)
        lock_fd = os.open(directory.lock_path(name), os.O_RDONLY)
        try:
            assert read_record(lock_fd) is None  # published: the record is over
            assert read_progress(lock_fd) == len(data)  # for followers still to read it
        finally:
            os.close(lock_fd)
        snapshot = stats.snapshot()
        assert snapshot["copied_bytes"] == len(data)
    finally:
        origin.close()
        directory.close()


# --------------------------------------------------------------------------
# Cancellation at every hop of every public coroutine


class Run:
    """One run of `cancel_points`: a cache (and maybe readers) and what it must give back."""

    def __init__(self, directory: Path, cache: FileCache, fds: collections.Counter[str]) -> None:
        self.directory = directory
        self.cache = cache
        self.fds = fds  # open before the cache was made
        self.files: list[CachedFile] = []
        self.opened: list[CachedFile] = []
        self.agen: Any = None


_runs = iter(range(1 << 30))


def _our_fds(tmp_path: Path) -> collections.Counter[str]:
    """What this process's fds point to that a cache could have opened: files
    under ``tmp_path`` (its directory, the source), eventfds and inotify fds.
    (A plain count would also see fds of earlier tests closing meanwhile.)"""
    seen: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith((str(tmp_path), "anon_inode:")):
                seen[target] += 1
    return seen


def _setup(tmp_path: Path, what: str) -> tuple[Callable[[], Any], Callable[[Run], Any]]:
    """``(prepare, call)`` for the public coroutine ``what``."""
    src = tmp_path / "src.bin"
    if not src.exists():
        src.write_bytes(os.urandom(MiB + 17))
    data = src.read_bytes()

    async def prepare() -> Run:
        directory = tmp_path / f"c{next(_runs)}"
        gc.collect()  # what earlier tests left to the collector closes now, not mid-run
        run = Run(directory, FileCache(directory, max_size=64 * MiB), _our_fds(tmp_path))
        if what == "__aenter__":
            return run
        await run.cache.__aenter__()
        if what.startswith("open") or what in ("usage", "FileCache.aclose"):
            if what in ("open cached", "open shared"):
                async with run.cache.open(src) as f:
                    assert await f.wait_cached()
            if what == "open shared":
                run.files.append(await run.cache.open(src))
            if what == "FileCache.aclose":  # a copy running, and a reader of it
                run.files.append(await run.cache.open(MemorySource(data, rate=2e6)))
                await run.files[0].read(0, 1)
            return run
        source: Any = MemorySource(data, rate=4e6) if what.endswith("copy") else src
        f = await run.cache.open(source)
        run.files.append(f)
        if not what.endswith("copy"):
            assert await f.wait_cached()
        if what.startswith("CachedFile.aclose shared"):
            run.files.append(await run.cache.open(source))
        return run

    async def call(run: Run) -> object:
        cache = run.cache
        if what == "__aenter__":
            return await cache.__aenter__()
        if what.startswith("open"):
            source: Any = MemorySource(data, key="object") if what.endswith("object") else src
            opened = await cache.open(source)
            run.opened.append(opened)  # the call completed (the sweep's last run)
            return opened
        if what == "usage":
            return await cache.usage()
        if what == "FileCache.aclose":
            await cache.aclose()
            return None
        f = run.files[0]
        if what.startswith("read"):
            return await f.read(1000, 5000)
        if what.startswith("iter_bytes"):
            run.agen = f.iter_bytes(10)
            return await run.agen.__anext__()
        assert what.startswith("CachedFile.aclose")
        # "shared": the second reader, which has a source fd of its own to close.
        await run.files[-1].aclose()
        return None

    return prepare, call


@pytest.mark.parametrize(
    "what",
    [
        "__aenter__",
        "open cold",
        "open cached",
        "open shared",
        "open source object",
        "usage",
        "read cached",
        "read copy",
        "iter_bytes cached",
        "iter_bytes copy",
        "CachedFile.aclose cached",
        "CachedFile.aclose shared",
        "CachedFile.aclose copy",
        "FileCache.aclose",
    ],
)
async def test_cancelling_each_public_coroutine_at_each_hop_leaves_nothing_behind(
    tmp_path: Path, what: str
) -> None:
    from .cancelling import CancelPoint, cancel_points

    prepare, call = _setup(tmp_path, what)
    src_data = (tmp_path / "src.bin").read_bytes()

    async def check(run: Run, point: CancelPoint) -> None:
        cache = run.cache
        where = f"{what}, cancelled at {point}"
        if what == "__aenter__":
            assert not cache._ready or cache._doorbell is not None, where
        if what.startswith("open"):
            # No session was made or shared for the cancelled caller.
            assert sum(s.refs for s in cache._live) == len(run.files + run.opened), where
        if what.startswith("CachedFile.aclose"):
            closed = run.files.pop()
            with pytest.raises(ValueError, match="closed"):
                await closed.read(0, 1)
            assert sum(s.refs for s in cache._live) == len(run.files), where
        if what in ("read cached", "iter_bytes cached", "read copy", "iter_bytes copy"):
            assert await run.files[0].read(0, 100) == src_data[:100], where
        if run.agen is not None:
            await run.agen.aclose()
        if what == "FileCache.aclose":
            assert parts(run.directory) == [], where  # the copy was stopped and removed
        elif cache._ready and not cache._closed:
            # The ledger tells the truth: published copies plus live reservations.
            published = sum(
                (run.directory / name).stat().st_size for name in visible(run.directory)
            )
            reserved = sum(s.size for s in cache._live if s.copier is not None)
            assert await cache.usage() in (published, published + reserved), where
        for f in run.files + run.opened:
            await f.aclose()
        await cache.aclose()
        assert cache._live == set(), where  # no session leaked
        if run.directory.exists():
            assert parts(run.directory) == [], where
        # No fd left on the cache's files or the source, nor an eventfd or inotify fd.
        assert _our_fds(tmp_path) == run.fds, where

    points = await cancel_points(prepare, call, check)
    # Waiting for a copy's progress, and leaving a copy that runs on, take no hop.
    if what not in ("read copy", "iter_bytes copy", "CachedFile.aclose copy"):
        assert points, f"{what} made no thread hop"


# --------------------------------------------------------------------------
# Versions beyond size and mtime; growing files; stat without a copy (issue 13)


async def test_stat_tells_the_version_and_touches_nothing_in_the_cache(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB))
    (tmp_path / "adir").mkdir()
    async with FileCache(tmp_path / "cache", max_size=64 * MiB) as cache:
        info = await cache.stat(src)
        assert (info.key, info.size) == (str(src), 3 * MiB)
        assert info.mtime_ns == os.stat(src).st_mtime_ns
        # Nothing but the ledger: no copy, no part, no entry lock.
        assert os.listdir(tmp_path / "cache") == [".usage"]
        assert cache.stats()["copies"] == 0
        async with cache.open(src) as f:
            assert f.info == info
        with pytest.raises(FileNotFoundError):
            await cache.stat(tmp_path / "missing")
        with pytest.raises(IsADirectoryError):
            await cache.stat(tmp_path / "adir")
        obj = await cache.stat(MemorySource(b"x" * 10))
        assert obj.etag == f'"a-{obj.mtime_ns:x}"'  # size and mtime only


async def test_cancelling_stat_at_each_hop_leaves_no_fd(tmp_path: Path) -> None:
    from .cancelling import CancelPoint, cancel_points

    src = tmp_path / "src.bin"
    src.write_bytes(b"y" * 1000)
    cache = FileCache(tmp_path / "cache", max_size=MiB)
    await cache.__aenter__()
    try:

        async def prepare() -> collections.Counter[str]:
            gc.collect()
            return _our_fds(tmp_path)

        async def call(_: object) -> object:
            return await cache.stat(src)

        async def check(before: collections.Counter[str], point: CancelPoint) -> None:
            assert _our_fds(tmp_path) == before, point

        assert await cancel_points(prepare, call, check)
    finally:
        await cache.aclose()


def test_a_path_version_is_its_inode_and_ctime_too(tmp_path: Path) -> None:
    from atempstore._cache._source import PathOrigin

    path = tmp_path / "f"
    path.write_bytes(b"A" * 100)
    one = PathOrigin(path)
    one.resolve()
    st = os.stat(path)
    os.chmod(path, 0o600)  # a new ctime, nothing else
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    two = PathOrigin(path)
    two.resolve()
    try:
        assert (one.version.size, one.version.mtime_ns) == (two.version.size, two.version.mtime_ns)
        assert one.version != two.version
        assert one.version.etag != two.version.etag
        assert one.version.ident_hash != 0
    finally:
        one.close()
        two.close()


def test_a_growing_file_is_its_version_and_a_rewrite_is_not(tmp_path: Path) -> None:
    from atempstore._cache._source import HEAD_SIZE, PathOrigin

    path = tmp_path / "log"
    path.write_bytes(b"L" * 10_000)

    def opened() -> PathOrigin:
        origin = PathOrigin(path)
        origin.resolve()
        return origin

    origin = opened()
    try:
        with open(path, "ab") as f:
            f.write(b"more\n")
        origin.check()  # appended: still the version (its first 10000 bytes)
        assert origin.read_checked(9_990, 10) == b"L" * 10
        origin.check_final()
    finally:
        origin.close()
    # Rewritten in place with the same size: a change.
    origin = opened()
    try:
        with open(path, "r+b") as rewrite:
            rewrite.write(b"X")
        with pytest.raises(SourceChangedError):
            origin.check()
    finally:
        origin.close()
    # Truncated and written longer, with another start: a change, not growth.
    origin = opened()
    try:
        path.write_bytes(b"N" * 20_000)
        with pytest.raises(SourceChangedError):
            origin.read_checked(0, 10)
    finally:
        origin.close()
    # Truncated shorter: a change.
    origin = opened()
    try:
        path.write_bytes(b"N" * 100)
        with pytest.raises(SourceChangedError):
            origin.check()
    finally:
        origin.close()
    assert HEAD_SIZE <= 20_000


async def test_a_growing_file_is_cached_as_of_its_length_at_open(tmp_path: Path) -> None:
    path = tmp_path / "log"
    first = os.urandom(8 * MiB)
    path.write_bytes(first)
    async with FileCache(tmp_path / "cache", max_size=64 * MiB, chunk_size=64 * 1024) as cache:
        f = await cache.open(path)
        try:
            with open(path, "ab") as out:
                out.write(b"appended" * 1000)  # while the copy runs
            got = b"".join([chunk async for chunk in f.iter_bytes()])
            assert await f.wait_cached()
        finally:
            await f.aclose()
        assert got == first
        # The next open is another version (longer): outdated, copied again.
        async with cache.open(path) as g:
            assert g.size == len(first) + 8000
            assert await g.read(len(first), 8) == b"appended"


async def test_an_old_cached_copy_and_an_old_record_are_taken_as_stale(tmp_path: Path) -> None:
    from atempstore._cache._record import IDENT_XATTR, entry_name

    src = tmp_path / "src.bin"
    data = os.urandom(MiB)
    src.write_bytes(data)
    where = tmp_path / "cache"
    async with FileCache(where, max_size=64 * MiB) as cache, cache.open(src) as f:
        assert await f.wait_cached()
    name = entry_name(str(src))
    # A copy published by an older version (no ident attribute) and a lock
    # file holding a record of the first format (64 bytes, ATSCOPY1).
    os.removexattr(where / name, IDENT_XATTR)
    old = bytearray(64)
    old[16:24] = b"ATSCOPY1"
    (where / f".{name}.lock").write_bytes(bytes(old))
    async with FileCache(where, max_size=64 * MiB) as cache:
        async with cache.open(src) as f:
            assert f.mode == "copy"  # not served as cached: copied again
            assert await f.read(0, MiB) == data
            assert await f.wait_cached()
        assert cache.stats()["outdated"] == 1
        async with cache.open(src) as f:
            assert f.mode == "cache"


def test_an_append_caught_between_its_mtime_and_its_length_is_still_growth(
    tmp_path: Path,
) -> None:
    # A write() that appends updates mtime and ctime before it moves the end
    # of the file; a check landing between the two saw a changed file of the
    # same length and cut a log's download (seen under load).  Reproduced: the
    # mtime moves first, and the length follows a moment later.
    from atempstore._cache._source import PathOrigin

    path = tmp_path / "log"
    path.write_bytes(b"L" * 10_000)
    origin = PathOrigin(path)
    origin.resolve()
    try:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

        def append_soon() -> None:
            time.sleep(0.001)
            with open(path, "ab") as f:
                f.write(b"more\n")

        appender = threading.Thread(target=append_soon)
        appender.start()
        try:
            origin.check()  # not a change: the length catches up
        finally:
            appender.join()
        assert origin.read_checked(9_990, 10) == b"L" * 10
    finally:
        origin.close()


def test_an_append_while_the_start_is_read_at_open_keeps_growth_growth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A log appended to every few ms moved between the two fstats around the
    # read of its start at open; the start was then unknown, every later
    # growth counted as a change, and a download was cut (a flaky web test).
    from atempstore._cache import _fd, _source

    path = tmp_path / "log"
    path.write_bytes(b"L" * 10_000)
    real = _fd.pread_exact
    appended: list[bool] = []

    def read_then_append(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        if not appended:
            appended.append(True)
            with open(path, "ab") as f:
                f.write(b"x\n")
        return data

    monkeypatch.setattr(_source, "pread_exact", read_then_append)
    origin = _source.PathOrigin(path)
    origin.resolve()
    monkeypatch.setattr(_source, "pread_exact", real)
    try:
        assert appended
        with open(path, "ab") as f:
            f.write(b"more\n")
        origin.check()  # only grew: still the version
    finally:
        origin.close()
