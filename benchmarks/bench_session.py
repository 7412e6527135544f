"""Checkpoint benchmark: durable saves per second of SessionStorage.save_checkpoint.

    python benchmarks/bench_session.py [--rounds N] [--saves N] [--sizes 4096,65536,1048576]

Compares, in one run and on the same disk, for each checkpoint size:

* ``atempstore``: ``await storage.save_checkpoint(data)`` in a loop (one worker-thread
  hop per save; the event loop stays free);
* ``raw inline``: the same durable sequence written inline, blocking the loop
  (exclusive create, write, fsync, close, rename, open dir, fsync dir, close) — the
  floor any durable save pays;
* ``plainbox-style``: plainbox's algorithm, synchronous (directory fd, ``openat``
  with ``O_EXCL``, write, fsync, ``renameat`` through the directory fd, fsync it),
  re-implemented here from its description;
* ``raw + to_thread``: the raw sequence through ``asyncio.to_thread``, the stdlib's
  way of not blocking the loop, for the cost of a hop.

The variants alternate within each round (the order rotates) so that load from
other processes hits them alike; the table shows the median over rounds.  The bar:
atempstore >= 0.8x the raw inline loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fresh_dir, median, print_table, save

from atempstore import SessionStorage

VARIANTS = ("atempstore", "raw inline", "plainbox-style", "raw + to_thread")
BAR = 0.8


def raw_save(location: str, data: bytes) -> None:
    """The durable-replace sequence, nothing else."""
    next_path = os.path.join(location, "session.next")
    fd = os.open(next_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(next_path, os.path.join(location, "session"))
    dir_fd = os.open(location, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def plainbox_style_save(location: str, data: bytes) -> None:
    """plainbox's steps: everything relative to one directory fd."""
    dir_fd = os.open(location, os.O_DIRECTORY)
    try:
        fd = os.open("session.next", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        try:
            if os.write(fd, data) != len(data):
                raise OSError("partial write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename("session.next", "session", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def timed(saves: int, one: Callable[[], Awaitable[None] | None]) -> float:
    """Saves per second over ``saves`` consecutive saves."""
    start = time.perf_counter()
    for _ in range(saves):
        result = one()
        if result is not None:
            await result
    return saves / (time.perf_counter() - start)


async def measure(variant: str, data: bytes, saves: int) -> float:
    with fresh_dir("session") as base:
        storage = await SessionStorage.create(base)
        location = str(storage.location)
        if variant == "atempstore":
            return await timed(saves, lambda: storage.save_checkpoint(data))
        if variant == "raw inline":
            return await timed(saves, lambda: raw_save(location, data))
        if variant == "plainbox-style":
            return await timed(saves, lambda: plainbox_style_save(location, data))
        return await timed(saves, lambda: asyncio.to_thread(raw_save, location, data))


async def run(rounds: int, saves: int, sizes: list[int]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for size in sizes:
        data = os.urandom(size)
        count = max(10, saves * 4096 // max(size, 4096)) if size > 65536 else saves
        for variant in VARIANTS:  # warm up: thread pool, page cache, directory
            await measure(variant, data, 5)
        rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                rates[variant].append(await measure(variant, data, count))
        results[f"{size}"] = {variant: median(values) for variant, values in rates.items()}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--saves", type=int, default=200, help="saves per round (small sizes)")
    parser.add_argument("--sizes", default="4096,65536,1048576")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results = asyncio.run(run(args.rounds, args.saves, sizes))

    rows = []
    verdicts = {}
    for size, rates in results.items():
        raw = rates["raw inline"]
        for variant in VARIANTS:
            rows.append([f"{int(size) // 1024} KiB", variant, rates[variant], rates[variant] / raw])
        verdicts[size] = rates["atempstore"] / raw
    print_table(
        f"durable saves/s, median of {args.rounds} rounds (higher is better)",
        ["checkpoint", "implementation", "saves/s", "x raw inline"],
        rows,
    )
    print()
    for size, ratio in verdicts.items():
        status = "meets" if ratio >= BAR else "MISSES"
        print(f"{int(size) // 1024} KiB: atempstore = {ratio:.2f}x raw inline ({status} {BAR}x)")
    save(
        "session",
        {
            "rounds": args.rounds,
            "saves_per_round": args.saves,
            "saves_per_second": results,
            "atempstore_vs_raw": verdicts,
        },
    )
    return 0 if all(ratio >= BAR for ratio in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
