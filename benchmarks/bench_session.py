"""Checkpoint benchmark: durable saves per second of SessionStorage.save_checkpoint.

    python benchmarks/bench_session.py [--rounds N] [--batch N] [--sizes 4096,65536,1048576]

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

Each round runs a short batch of every variant, one after another (the order
rotates), so that the shared disk's drifting speed hits them alike; the table
shows the median over rounds.  The bar:
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


def saver(variant: str, storage: SessionStorage, data: bytes) -> Callable[[], Awaitable[None]]:
    """One save of ``variant``, as a coroutine function (sync ones run inline)."""
    location = str(storage.location)

    async def atempstore() -> None:
        await storage.save_checkpoint(data)

    async def raw_inline() -> None:
        raw_save(location, data)

    async def plainbox_style() -> None:
        plainbox_style_save(location, data)

    async def raw_to_thread() -> None:
        await asyncio.to_thread(raw_save, location, data)

    return {
        "atempstore": atempstore,
        "raw inline": raw_inline,
        "plainbox-style": plainbox_style,
        "raw + to_thread": raw_to_thread,
    }[variant]


async def measure_size(data: bytes, rounds: int, batch: int) -> dict[str, float]:
    """Median saves/s per variant over ``rounds`` rounds.

    The disk is shared and its speed drifts by tens of percent within seconds,
    so each round runs every variant for a short batch, one after another (the
    order rotates): variants compared within a round saw the same disk.
    """
    with fresh_dir("session") as base:
        saves = {
            variant: saver(variant, await SessionStorage.create(base, prefix=f"{n}-"), data)
            for n, variant in enumerate(VARIANTS)
        }
        for save_one in saves.values():  # warm up: threads, page cache, directories
            for _ in range(3):
                await save_one()
        rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                save_one = saves[variant]
                start = time.perf_counter()
                for _ in range(batch):
                    await save_one()
                rates[variant].append(batch / (time.perf_counter() - start))
        return {variant: median(values) for variant, values in rates.items()}


async def run(rounds: int, batch: int, sizes: list[int]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for size in sizes:
        results[str(size)] = await measure_size(os.urandom(size), rounds, batch)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=10, help="saves per variant per round")
    parser.add_argument("--sizes", default="4096,65536,1048576")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    load_before = os.getloadavg()[0]
    results = asyncio.run(run(args.rounds, args.batch, sizes))
    load_after = os.getloadavg()[0]

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
    print(f"\nload average (1 min) before/after: {load_before:.1f}/{load_after:.1f}")
    for size, ratio in verdicts.items():
        status = "meets" if ratio >= BAR else "MISSES"
        print(f"{int(size) // 1024} KiB: atempstore = {ratio:.2f}x raw inline ({status} {BAR}x)")
    save(
        "session",
        {
            "rounds": args.rounds,
            "saves_per_batch": args.batch,
            "saves_per_second": results,
            "atempstore_vs_raw": verdicts,
            "load_average_before_after": [load_before, load_after],
        },
    )
    return 0 if all(ratio >= BAR for ratio in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
