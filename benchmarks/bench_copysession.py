"""CopySession / FileCache against the obvious alternatives, measured in the same run.

1. Copy into the cache with no reader vs ``shutil.copyfile`` + ``fsync``: the
   cache fsyncs before it publishes (a crash never leaves a torn file under a
   final name), so the fair peer fsyncs too.  Bar: ratio >= 0.9.
2. Time to first byte of a 1 GiB file, cold cache, vs copy-then-serve.
   Bar: <= 10 ms.
3. 32 concurrent readers of a 1 GiB file while it is being copied: aggregate
   throughput vs 32 aiofiles readers of an already-local copy, and the peak
   RSS growth.  Bar: <= 64 MiB.
4. Event-loop lag while 1-3 run (ours only): a thread asks the loop to run a
   callback every millisecond and records how late it runs.  Bar: p99 <= 1 ms,
   and max <= 1.5x the max of a separate process that only sleeps, measured in
   the same windows (the machine's own stalls, which no event loop can avoid;
   the old absolute bar, max <= 5 ms, failed on the shared VM's stalls alone).
   Two more reference rows say what the machine itself imposes: the
   idle loop, and the loop while a plain worker thread runs copyfile + fsync
   (no atempstore code at all, as many 1 GiB copies as atempstore makes): on
   a small VM the kernel's copying and writeback take the CPUs the loop
   thread needs.  The "> 5 ms" column counts the probes that waited longer.

Run: ``.venv/bin/python benchmarks/bench_copysession.py [--size-mib 1024] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiofiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import fresh_dir, median, percentile, print_table, save

from atempstore import FileCache

MiB = 1 << 20
READERS = 32


def make_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# Event-loop lag, measured from outside the loop


class LagProbe:
    """A thread that asks the loop to run a callback every ``interval`` seconds.

    Only what happens inside `measuring` windows counts: the peers (and the
    benchmark's own clean-up) run synchronously on the loop thread, and the
    lag they cause is theirs.  A probe sent inside a window counts up to the
    window's end at most, so a probe thread descheduled on a loaded machine
    cannot charge the next ``rmtree`` to us.

    Beside it, a separate process does nothing but sleep 1 ms at a time and
    reports how late each sleep ended (`Sleeper`): no event loop, no GIL
    shared with this process.  What it suffers in the same windows is the
    machine's, and no event loop can do better.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.001) -> None:
        self.loop = loop
        self.interval = interval
        self.lags: list[float] = []
        self.sleeper = Sleeper()
        self._windows: list[list[float]] = []  # [start, end], end = inf while open
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _window_end(self, at: float) -> float | None:
        for start, end in reversed(self._windows):
            if start <= at <= end:
                return end
        return None

    def _record(self, sent: float) -> None:
        ran = time.perf_counter()
        end = self._window_end(sent)
        if end is not None:
            self.lags.append(min(ran, end) - sent)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.loop.call_soon_threadsafe(self._record, time.perf_counter())

    def take(self) -> tuple[list[float], list[tuple[float, float]]]:
        """The loop's lags since the last call, and the windows they came from."""
        lags, self.lags = self.lags, []
        windows = [(start, end) for start, end in self._windows]
        self._windows = []
        return lags, windows

    @contextmanager
    def running(self) -> Iterator[None]:
        self._thread.start()
        try:
            with self.sleeper.running():
                yield
        finally:
            self._stop.set()
            self._thread.join()

    @asynccontextmanager
    async def measuring(self) -> AsyncIterator[None]:
        window = [time.perf_counter(), float("inf")]
        self._windows.append(window)
        try:
            yield
        finally:
            window[1] = time.perf_counter()


SLEEPER = """
import json, select, sys, time
late = []
due = time.perf_counter() + 0.001
while not select.select([sys.stdin], [], [], max(0.0, due - time.perf_counter()))[0]:
    now = time.perf_counter()
    late.append((due, now - due))
    due = now + 0.001
print(json.dumps(late))
"""


class Sleeper:
    """A separate process sleeping 1 ms at a time; how late each sleep ended.

    ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for every
    process, so its wake-ups can be matched to this process's windows.
    """

    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []

    @contextmanager
    def running(self) -> Iterator[None]:
        child = subprocess.Popen(
            [sys.executable, "-c", SLEEPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            yield
        finally:
            out, _ = child.communicate(b"stop\n", timeout=60)
            self.wakes = [(due, late) for due, late in json.loads(out)]

    def lags(self, windows: list[tuple[float, float]]) -> list[float]:
        """How late the sleeps due inside ``windows`` ended (capped at the window's end)."""
        return [
            max(0.0, min(late, end - due))
            for due, late in self.wakes
            for start, end in windows
            if start <= due <= end
        ]


# --------------------------------------------------------------------------
# 1. Copy with no readers


def peer_copy(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fsync_path(dst)
    fsync_path(dst.parent)
    elapsed = time.perf_counter() - t0
    dst.unlink()
    return elapsed


async def our_copy(src: Path, directory: Path, size: int) -> float:
    t0 = time.perf_counter()
    async with FileCache(directory, max_size=2 * size) as cache, cache.open(src) as f:
        assert await f.wait_cached()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# 2. Time to first byte


def peer_first_byte(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fsync_path(dst)
    with open(dst, "rb") as f:
        f.read(65536)
    elapsed = time.perf_counter() - t0
    dst.unlink()
    return elapsed


async def our_first_byte(src: Path, directory: Path, size: int) -> float:
    async with FileCache(directory, max_size=2 * size) as cache:  # directory set up first
        t0 = time.perf_counter()
        async with cache.open(src) as f:
            first = await f.read(0, 65536)
            elapsed = time.perf_counter() - t0
            assert len(first) == 65536
            await f.wait_cached()
    return elapsed


# --------------------------------------------------------------------------
# 3. Many readers


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    return _status_bytes("VmRSS")


def rss_peak() -> int:
    return _status_bytes("VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


async def our_readers(src: Path, directory: Path, size: int) -> tuple[float, int]:
    async with FileCache(directory, max_size=2 * size) as cache:
        reset_peak()
        base = rss_now()
        t0 = time.perf_counter()

        async def reader() -> int:
            total = 0
            async with cache.open(src) as f:
                async for chunk in f.iter_bytes():
                    total += len(chunk)
            return total

        totals = await asyncio.gather(*(reader() for _ in range(READERS)))
        elapsed = time.perf_counter() - t0
        growth = rss_peak() - base
    assert totals == [size] * READERS
    return READERS * size / elapsed, growth


async def peer_readers(local: Path, size: int) -> tuple[float, int]:
    reset_peak()
    base = rss_now()
    t0 = time.perf_counter()

    async def reader() -> int:
        total = 0
        async with aiofiles.open(local, "rb") as f:
            while chunk := await f.read(256 * 1024):
                total += len(chunk)
        return total

    totals = await asyncio.gather(*(reader() for _ in range(READERS)))
    elapsed = time.perf_counter() - t0
    growth = rss_peak() - base
    assert totals == [size] * READERS
    return READERS * size / elapsed, growth


# --------------------------------------------------------------------------


def lag_summary(lags: list[float]) -> dict[str, float]:
    return {
        "p99": percentile(lags, 99),
        "max": max(lags),
        "over_5ms": sum(lag > 0.005 for lag in lags),
        "samples": len(lags),
    }


async def run(size: int, rounds: int, scratch: Path) -> dict[str, object]:
    src = scratch / "source.bin"
    make_file(src, size)
    peer_dst = scratch / "peer-copy.bin"
    cache_dir = scratch / "cache"
    loop = asyncio.get_running_loop()
    probe = LagProbe(loop)

    ours_copy: list[float] = []
    peers_copy: list[float] = []
    ours_ttfb: list[float] = []
    peers_ttfb: list[float] = []
    with probe.running():
        # The machine's own noise: the same probe with the loop idle.
        async with probe.measuring():
            await asyncio.sleep(1.0)
        await asyncio.sleep(0.01)  # probes still in flight land
        idle_lags, idle_windows = probe.take()
        # ...and while a plain worker thread copies and fsyncs (no atempstore):
        # what the kernel's copying and writeback cost the loop on this machine.
        # As many copies as atempstore makes below (a copy and a first-byte
        # copy per round): the worst of N samples grows with N.
        for _ in range(2 * rounds):
            async with probe.measuring():
                await asyncio.to_thread(peer_copy, src, peer_dst)
        await asyncio.sleep(0.01)
        thread_copy_lags, thread_copy_windows = probe.take()
        # Warm up both paths once (page cache, thread pool), then alternate.
        peer_copy(src, peer_dst)
        await our_copy(src, cache_dir, size)
        drop_cache_dir(cache_dir)
        for _ in range(rounds):
            peers_copy.append(peer_copy(src, peer_dst))
            async with probe.measuring():
                ours_copy.append(await our_copy(src, cache_dir, size))
            drop_cache_dir(cache_dir)
        for _ in range(rounds):
            peers_ttfb.append(peer_first_byte(src, peer_dst))
            async with probe.measuring():
                ours_ttfb.append(await our_first_byte(src, cache_dir, size))
            drop_cache_dir(cache_dir)
        await asyncio.sleep(0.01)  # probes still in flight land
        copy_lags, copy_windows = probe.take()
        async with probe.measuring():
            ours_tp, ours_rss = await our_readers(src, cache_dir, size)
        await asyncio.sleep(0.01)  # probes still in flight land
        reader_lags, reader_windows = probe.take()
        drop_cache_dir(cache_dir)
    peers_tp, peers_rss = await peer_readers(src, size)

    lags = copy_lags + reader_lags
    sleeper = probe.sleeper
    return {
        "size_bytes": size,
        "rounds": rounds,
        "copy_s": {"atempstore": median(ours_copy), "copyfile+fsync": median(peers_copy)},
        # Each round times the peer and then atempstore back to back; the
        # shared disk's speed flips between modes ~3x apart within seconds,
        # so the ratio is taken per round (paired), then the median.
        "copy_ratio": median(
            [peer / ours for peer, ours in zip(peers_copy, ours_copy, strict=True)]
        ),
        "copy_ratio_of_medians": median(peers_copy) / median(ours_copy),
        "ttfb_s": {"atempstore": median(ours_ttfb), "copy-then-serve": median(peers_ttfb)},
        "readers": READERS,
        "throughput_Bps": {"atempstore (while copying)": ours_tp, "aiofiles (local)": peers_tp},
        "rss_growth_bytes": {"atempstore": ours_rss, "aiofiles": peers_rss},
        "lag_idle_s": lag_summary(idle_lags),
        "lag_plain_thread_copy_s": lag_summary(thread_copy_lags),
        "lag_copies_s": lag_summary(copy_lags),
        "lag_readers_s": lag_summary(reader_lags),
        "lag_all_s": lag_summary(lags),
        "sleeper_idle_s": lag_summary(sleeper.lags(idle_windows)),
        "sleeper_plain_thread_copy_s": lag_summary(sleeper.lags(thread_copy_windows)),
        "sleeper_copies_s": lag_summary(sleeper.lags(copy_windows)),
        "sleeper_readers_s": lag_summary(sleeper.lags(reader_windows)),
        "sleeper_all_s": lag_summary(sleeper.lags(copy_windows + reader_windows)),
    }


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mib * MiB
    with fresh_dir("copysession") as scratch:
        results = asyncio.run(run(size, args.rounds, scratch))
    copy_s = results["copy_s"]
    ttfb = results["ttfb_s"]
    tp = results["throughput_Bps"]
    rss = results["rss_growth_bytes"]
    assert isinstance(copy_s, dict)
    assert isinstance(ttfb, dict)
    assert isinstance(tp, dict)
    assert isinstance(rss, dict)
    ratio = results["copy_ratio"]
    assert isinstance(ratio, float)
    print_table(
        f"Copy {args.size_mib} MiB into the cache, no readers (median of {args.rounds})",
        ["", "seconds", "speed ratio, paired per round"],
        [
            ["atempstore FileCache", copy_s["atempstore"], 1.0],
            ["shutil.copyfile + fsync", copy_s["copyfile+fsync"], 1 / ratio],
        ],
    )
    print(
        f"atempstore copies {ratio:.2f}x as fast as copyfile + fsync"
        f" (bar: >= 0.9): {verdict(ratio >= 0.9)}"
    )
    print_table(
        f"Time to first 64 KiB of a {args.size_mib} MiB file, cold (median of {args.rounds})",
        ["", "ms", "x faster"],
        [
            [
                "atempstore FileCache",
                ttfb["atempstore"] * 1e3,
                ttfb["copy-then-serve"] / ttfb["atempstore"],
            ],
            ["copy-then-serve", ttfb["copy-then-serve"] * 1e3, 1.0],
        ],
    )
    print(
        f"time to first byte {ttfb['atempstore'] * 1e3:.2f} ms (bar: <= 10 ms):"
        f" {verdict(ttfb['atempstore'] <= 0.010)}"
    )
    print_table(
        f"{READERS} concurrent readers of the whole {args.size_mib} MiB file",
        ["", "aggregate MB/s", "peak RSS growth MiB"],
        [
            [
                "atempstore, while copying",
                tp["atempstore (while copying)"] / 1e6,
                rss["atempstore"] / MiB,
            ],
            ["aiofiles, local copy", tp["aiofiles (local)"] / 1e6, rss["aiofiles"] / MiB],
        ],
    )
    rows = []
    for label, key in (
        ("idle loop (machine noise)", "idle_s"),
        ("plain thread: copyfile+fsync", "plain_thread_copy_s"),
        ("copies and first bytes", "copies_s"),
        (f"{READERS} readers + copy", "readers_s"),
        ("all of atempstore's work", "all_s"),
    ):
        lag, sleeper = results[f"lag_{key}"], results[f"sleeper_{key}"]
        assert isinstance(lag, dict)
        assert isinstance(sleeper, dict)
        rows.append(
            [
                label,
                lag["p99"] * 1e3,
                lag["max"] * 1e3,
                int(lag["over_5ms"]),
                sleeper["max"] * 1e3,
                int(sleeper["over_5ms"]),
                int(lag["samples"]),
            ]
        )
    print_table(
        "Event-loop lag (a callback sent from a thread every 1 ms); first two rows: reference."
        "\nsleeper: how late another process's 1 ms sleeps ended in the same windows"
        " (the machine's own stalls).",
        ["while", "p99 ms", "max ms", "> 5 ms", "sleeper max ms", "sleeper > 5 ms", "samples"],
        rows,
    )
    lag, sleeper = results["lag_all_s"], results["sleeper_all_s"]
    assert isinstance(lag, dict)
    assert isinstance(sleeper, dict)
    relative = lag["max"] / sleeper["max"] if sleeper["max"] > 0 else float("inf")
    results["lag_bar"] = {
        "p99_s": lag["p99"],
        "max_s": lag["max"],
        "sleeper_max_s": sleeper["max"],
        "max_over_sleeper_max": relative,
        "passed": lag["p99"] <= 0.001 and relative <= 1.5,
    }
    print_table(
        "Event-loop lag during all of atempstore's work, against the sleeping process"
        " in the same windows",
        ["", "p99 ms", "max ms", "max / sleeper max", "bar", "result"],
        [
            [
                "atempstore loop",
                lag["p99"] * 1e3,
                lag["max"] * 1e3,
                relative,
                "p99 <= 1 ms, max <= 1.5x sleeper",
                verdict(lag["p99"] <= 0.001 and relative <= 1.5),
            ],
            ["sleeping process", sleeper["p99"] * 1e3, sleeper["max"] * 1e3, 1.0, "", ""],
        ],
    )
    results["loadavg_after"] = os.getloadavg()
    print(f"\nload average after the run: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    save("copysession", results)


if __name__ == "__main__":
    main()
