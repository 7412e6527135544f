"""Temp file benchmark: create + remove rate, atempstore vs inline tempfile vs anyio.

    python benchmarks/bench_tempfiles.py [--ops N] [--rounds N] [--tasks N]

One operation is "create a unique empty temp file, then delete it", as a user
writes it with each tool, measured in one run in fresh directories:

* ``tempfile.mkstemp`` + ``os.close`` + ``os.remove`` inline: the floor, but it
  blocks the event loop for every syscall;
* ``anyio.mkstemp`` + ``os.close`` + ``anyio.Path.unlink``: anyio's wrappers,
  one thread hop each;
* ``TempFileManager.create_path`` + ``remove_path``: one hop each, and
  ``remove_path`` also resolves and confines the path and walks down with
  ``O_NOFOLLOW`` (the safety anyio's ``unlink`` does not have).

Sequential (one task) and concurrent (``--tasks`` tasks sharing the work) rates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fresh_dir, median, print_table, save

from atempstore import TempFileManager

Op = Callable[[], Awaitable[None]]


async def _run(op: Op, ops: int, tasks: int) -> float:
    """Seconds for ``ops`` operations spread over ``tasks`` tasks."""
    per_task = ops // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await op()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - start


def measure_inline(ops: int, tasks: int) -> float:
    with fresh_dir("tempfiles-inline") as where:
        directory = str(where)

        async def op() -> None:
            fd, name = tempfile.mkstemp(dir=directory)
            os.close(fd)
            os.remove(name)

        return ops / asyncio.run(_run(op, ops, tasks))


def measure_anyio(ops: int, tasks: int) -> float:
    with fresh_dir("tempfiles-anyio") as where:
        directory = str(where)

        async def op() -> None:
            fd, name = await anyio.mkstemp(dir=directory)
            os.close(fd)
            await anyio.Path(name).unlink()

        return ops / asyncio.run(_run(op, ops, tasks))


def measure_atempstore(ops: int, tasks: int) -> float:
    with fresh_dir("tempfiles-atempstore") as where:
        os.environ["ATEMPSTORE_TEMPDIR"] = str(where)

        async def main() -> float:
            async with TempFileManager(prefix="bench") as manager:

                async def op() -> None:
                    path = await manager.create_path()
                    await manager.remove_path(path)

                return await _run(op, ops, tasks)

        return ops / asyncio.run(main())


PEERS: dict[str, Callable[[int, int], float]] = {
    "tempfile.mkstemp + os.remove (inline, blocks the loop)": measure_inline,
    "anyio.mkstemp + anyio.Path.unlink": measure_anyio,
    "atempstore create_path + remove_path": measure_atempstore,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=400, help="operations per round")
    parser.add_argument("--rounds", type=int, default=21, help="rounds (the median is kept)")
    parser.add_argument("--tasks", type=int, default=16, help="tasks in the concurrent run")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    for tasks in (1, args.tasks):
        # Rounds are interleaved (peer A, B, C, A, B, C...) so that load from
        # other processes on a shared machine hits every peer alike; each
        # round runs in a fresh directory and the median is kept.
        rounds: dict[str, list[float]] = {name: [] for name in PEERS}
        for _ in range(args.rounds):
            for name, measure in PEERS.items():
                rounds[name].append(measure(args.ops, tasks))
        for name, values in rounds.items():
            results.setdefault(name, {})[f"ops_per_s_{tasks}_tasks"] = median(values)

    anyio_name = "anyio.mkstemp + anyio.Path.unlink"
    rows = []
    for name, rates in results.items():
        row: list[object] = [name]
        for tasks in (1, args.tasks):
            rate = rates[f"ops_per_s_{tasks}_tasks"]
            ratio = rate / results[anyio_name][f"ops_per_s_{tasks}_tasks"]
            row += [rate, f"{ratio:.2f}x"]
        rows.append(row)
    print_table(
        f"create + remove a temp file ({args.ops} ops/round, median of {args.rounds} rounds;"
        " ratio = rate / anyio's rate)",
        ["implementation", "ops/s 1 task", "vs anyio", f"ops/s {args.tasks} tasks", "vs anyio"],
        rows,
    )
    save(
        "tempfiles",
        {"ops": args.ops, "rounds": args.rounds, "tasks": args.tasks, "results": results},
    )


if __name__ == "__main__":
    main()
