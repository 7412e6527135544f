"""An async worker pool of several processes over one FileStore: run it as it is.

    python examples/worker_pool.py

Producer processes deliver jobs; worker processes each run one ``consume()``
loop and handle up to ``CONCURRENCY`` jobs at a time.  Half-way through, one
worker is killed with SIGKILL and replaced: the jobs it held come back through
``recover()`` (which ``consume()`` runs at start and every ``recover_interval``),
so nothing is lost.  Delivery is at-least-once: the jobs the killed worker had
finished but not yet marked done are handled twice, and no others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from atempstore import FileStore, Message

PRODUCERS = 3
JOBS_PER_PRODUCER = 200
WORKERS = 4
CONCURRENCY = 8


# -- producers -----------------------------------------------------------------


async def produce(root: Path, producer: int) -> None:
    store = FileStore(root)
    for n in range(JOBS_PER_PRODUCER):
        # deliver() returns once the job is on disk (fsynced) and visible in new/.
        await store.deliver(json.dumps({"producer": producer, "n": n}).encode())


def producer_main(root: Path, producer: int) -> None:
    asyncio.run(produce(root, producer))


# -- workers -------------------------------------------------------------------


async def handle(message: Message, log_fd: int) -> None:
    job = json.loads(await message.read())
    await asyncio.sleep(0.002)  # the actual work
    # One write() per line with O_APPEND: whole lines even if we are killed.
    os.write(log_fd, f"{job['producer']}:{job['n']}\n".encode())


async def work(root: Path, log: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    running: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(message: Message) -> None:
        try:
            async with message:  # done() if handle() succeeds, release() if it raises
                await handle(message, log_fd)
        finally:
            slots.release()

    async def pull(store: FileStore) -> None:
        async with contextlib.aclosing(store.consume(recover_interval=1.0)) as messages:
            while True:
                # Take a slot *before* claiming, so this worker never holds
                # jobs it cannot start while other workers sit idle.
                await slots.acquire()
                message = await anext(messages)
                task = asyncio.create_task(one(message))
                running.add(task)
                task.add_done_callback(running.discard)

    try:
        async with FileStore(root) as store:  # aclose() gives back what is still held
            puller = asyncio.create_task(pull(store))
            await stop.wait()
            puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await puller
            await asyncio.gather(*running)
    finally:
        os.close(log_fd)


def worker_main(root: Path, log: Path) -> None:
    asyncio.run(work(root, log))


# -- the pool ------------------------------------------------------------------


def main() -> int:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="atempstore-pool-") as tmp:
        root, log = Path(tmp) / "queue", Path(tmp) / "handled.log"
        asyncio.run(FileStore(root).prepare())
        total = PRODUCERS * JOBS_PER_PRODUCER
        start = time.monotonic()

        workers = [ctx.Process(target=worker_main, args=(root, log)) for _ in range(WORKERS)]
        producers = [ctx.Process(target=producer_main, args=(root, p)) for p in range(PRODUCERS)]
        for process in workers + producers:
            process.start()

        def handled() -> list[str]:
            return log.read_text().split() if log.exists() else []

        # A crash half-way through: SIGKILL, no cleanup code runs in the worker.
        while len(set(handled())) < total // 2:
            time.sleep(0.01)
        workers[0].kill()
        workers[0].join()
        print("killed worker 0 (SIGKILL) half-way; starting a replacement")
        workers[0] = ctx.Process(target=worker_main, args=(root, log))
        workers[0].start()

        for process in producers:
            process.join()
        deadline = time.monotonic() + 60
        while len(set(handled())) < total and time.monotonic() < deadline:
            time.sleep(0.02)
        # Wait for the last done() calls before stopping the workers.
        while any(os.listdir(root / area) for area in ("new", "cur")):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        for process in workers:
            process.terminate()  # SIGTERM: a clean stop
        for process in workers:
            process.join()

        counts = collections.Counter(handled())
        lost = total - len(counts)
        duplicates = sum(counts.values()) - len(counts)
        status = asyncio.run(FileStore(root).status())
        print(
            f"{total} jobs from {PRODUCERS} producers, {WORKERS} worker processes"
            f" x {CONCURRENCY} concurrent jobs, in {elapsed:.1f} s"
        )
        print(
            f"{lost} lost, {duplicates} handled twice (at most the {CONCURRENCY} jobs"
            " the killed worker was handling)"
        )
        print(f"left in the queue: {status.counts}")
        return 0 if lost == 0 and duplicates <= CONCURRENCY else 1


if __name__ == "__main__":
    sys.exit(main())
