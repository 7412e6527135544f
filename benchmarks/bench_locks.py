"""Lock benchmark: cross-process handoff latency and uncontended acquire+release rate.

    python benchmarks/bench_locks.py [--trials N] [--cycles N]

Compares, in one run, atempstore.Lock with portalocker.Lock (defaults),
filelock.FileLock and filelock.AsyncFileLock (defaults).  Handoff latency is
measured between two real processes: the holder stamps ``time.monotonic_ns()``
right before it releases, the waiter stamps right after its acquire returns.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import filelock
import portalocker

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fresh_dir, median, percentile, print_table, save

import atempstore

IMPLEMENTATIONS = (
    "atempstore.Lock",
    "portalocker.Lock",
    "filelock.FileLock",
    "filelock.AsyncFileLock",
)


# --- one acquire/release pair per implementation, as a user would write it ---------------


class _Sync:
    def __init__(self, make: Callable[[], Any]) -> None:
        self.lock = make()

    async def acquire(self) -> None:
        self.lock.acquire()

    async def release(self) -> None:
        self.lock.release()


class _Atempstore:
    def __init__(self, path: str) -> None:
        self.lock = atempstore.Lock(path, timeout=60)

    async def acquire(self) -> None:
        await self.lock.acquire()

    async def release(self) -> None:
        await self.lock.release()


class _AsyncFileLock:
    def __init__(self, path: str) -> None:
        self.lock = filelock.AsyncFileLock(path)

    async def acquire(self) -> None:
        await self.lock.acquire()

    async def release(self) -> None:
        await self.lock.release()


def make_lock(name: str, path: str) -> Any:
    if name == "atempstore.Lock":
        return _Atempstore(path)
    if name == "portalocker.Lock":
        return _Sync(lambda: portalocker.Lock(path, timeout=60))
    if name == "filelock.FileLock":
        return _Sync(lambda: filelock.FileLock(path))
    return _AsyncFileLock(path)


# --- handoff ---------------------------------------------------------------------------------


def _waiter(name: str, path: str, trials: int, conn: Connection) -> None:
    async def main() -> None:
        lock = make_lock(name, path)
        for _ in range(trials):
            conn.recv()  # the holder has the lock now
            conn.send("waiting")
            await lock.acquire()
            acquired = time.monotonic_ns()
            await lock.release()
            conn.send(acquired)

    asyncio.run(main())


async def handoff(name: str, path: str, trials: int) -> list[float]:
    parent, child = mp.Pipe()
    process = mp.get_context("spawn").Process(target=_waiter, args=(name, path, trials, child))
    process.start()
    lock = make_lock(name, path)
    delays = []
    for _ in range(trials):
        await lock.acquire()
        parent.send("held")
        assert parent.recv() == "waiting"
        await asyncio.sleep(0.02)  # let the waiter block (or start polling)
        released = time.monotonic_ns()
        await lock.release()
        acquired = parent.recv()
        delays.append((acquired - released) / 1e6)
    process.join()
    return delays


# --- uncontended -----------------------------------------------------------------------------


async def uncontended(name: str, path: str, cycles: int) -> float:
    lock = make_lock(name, path)
    for _ in range(50):  # warm up (threads, caches)
        await lock.acquire()
        await lock.release()
    started = time.perf_counter()
    for _ in range(cycles):
        await lock.acquire()
        await lock.release()
    return cycles / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="handoffs per implementation")
    parser.add_argument("--cycles", type=int, default=3000, help="uncontended cycles per round")
    parser.add_argument("--rounds", type=int, default=5, help="uncontended rounds (median kept)")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {name: {} for name in IMPLEMENTATIONS}
    with fresh_dir("locks") as scratch:
        for name in IMPLEMENTATIONS:
            path = str(scratch / f"{name}.handoff.lock")
            # The polling peers cost up to a poll interval per trial; fewer trials suffice.
            trials = args.trials if name == "atempstore.Lock" else max(10, args.trials // 2)
            delays = await handoff(name, path, trials)
            results[name]["handoff_median_ms"] = median(delays)
            results[name]["handoff_p90_ms"] = percentile(delays, 90)
        # Interleave the rounds so that machine noise hits every implementation alike.
        rates: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
        for _ in range(args.rounds):
            for name in IMPLEMENTATIONS:
                path = str(scratch / f"{name}.uncontended.lock")
                rates[name].append(await uncontended(name, path, args.cycles))
        for name in IMPLEMENTATIONS:
            results[name]["uncontended_per_s"] = median(rates[name])

    ours = results["atempstore.Lock"]
    rows = []
    for name in IMPLEMENTATIONS:
        r = results[name]
        rows.append(
            [
                name,
                r["handoff_median_ms"],
                r["handoff_p90_ms"],
                r["handoff_median_ms"] / ours["handoff_median_ms"],
                r["uncontended_per_s"],
                ours["uncontended_per_s"] / r["uncontended_per_s"],
            ]
        )
    print_table(
        "Lock handoff between two processes, and uncontended acquire+release (fresh directory)",
        [
            "implementation",
            "handoff median ms",
            "handoff p90 ms",
            "atempstore faster by",
            "acquire+release /s",
            "atempstore rate ratio",
        ],
        rows,
    )
    save("locks", {"args": vars(args), "results": results})


if __name__ == "__main__":
    asyncio.run(main())
