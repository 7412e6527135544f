"""FileStore benchmark: durable deliver rate, claim+done rate, delivery->consume latency.

    python benchmarks/bench_filestore.py [--messages N] [--rounds N]

1. Durable delivery of 1 KiB messages, in short interleaved batches (each round
   runs every variant once, in rotating order) in one fresh directory.  Every
   durable variant writes the message, fsyncs it, publishes it into new/
   without a window where it is partial, and fsyncs new/:
   - ``atempstore deliver``: ``await store.deliver(data)``, one hop each,
     awaited one after another (as a request handler does).  Its steps: an
     unnamed ``O_TMPFILE`` file in new/, written, fsynced, linked in;
   - ``atempstore deliver x16``: 16 deliveries in flight;
   - ``inline sync loop``: the maildir steps (tmp/, fsync, link into new/,
     unlink, fsync new/) called directly on the event loop, blocking every
     other task meanwhile.  The bar's reference;
   - ``inline sync loop (O_TMPFILE)``: atempstore's own steps, inline: the
     floor for any hop to a thread, shown so the gain from the steps and the
     cost of the hop can be told apart;
   - ``aiofiles naive``: aiofiles as commonly written, one hop per
     open/write/fsync/close/rename/open-dir/fsync-dir/close-dir;
   - ``mailbox.Maildir.add``: the standard library, called inline.  It does
     **not** fsync (neither the file nor the directory), so it is not durable.
2. Claim+done rate: a backlog drained by 4 consumer processes (and by 1,
   for comparison), each running ``consume()``, ``read()``, ``done()``.
3. Delivery->consume latency: an idle consumer in another process; the
   producer stamps before ``deliver()``, the consumer right after
   ``consume()`` yields (``CLOCK_MONOTONIC`` is system-wide).  inotify vs the
   polling fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiofiles
import aiofiles.os

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import fresh_dir, median, percentile, print_table, save

from atempstore import FileStore
from atempstore._filestore._names import maildir_name as _maildir_name

SRC = str(Path(__file__).resolve().parent.parent / "src")
DATA = os.urandom(1024)


# --- 1. durable deliver -------------------------------------------------------------------


def _prepared(root: Path) -> FileStore:
    store = FileStore(root)
    asyncio.run(store.prepare())
    return store


def _sync_deliver(tmp: str, new: str) -> None:
    name = _maildir_name(time.time())
    path = os.path.join(tmp, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, DATA)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(path, os.path.join(new, name))
    os.unlink(path)
    dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _sync_deliver_unnamed(new: str) -> None:
    """atempstore's steps, inline: an unnamed file in new/, linked in whole."""
    name = _maildir_name(time.time())
    dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.write(fd, DATA)
            os.fsync(fd)
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
        finally:
            os.close(fd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def _batch_maker(name: str, root: Path) -> Callable[[int], Awaitable[None]]:
    """A coroutine function delivering ``n`` messages the ``name`` way into ``root``."""
    store = FileStore(root)
    await store.prepare()
    tmp, new = str(root / "tmp"), str(root / "new")

    async def atempstore(n: int) -> None:
        for _ in range(n):
            await store.deliver(DATA)

    async def atempstore_x16(n: int) -> None:
        sem = asyncio.Semaphore(16)

        async def one() -> None:
            async with sem:
                await store.deliver(DATA)

        await asyncio.gather(*(one() for _ in range(n)))

    async def inline(n: int) -> None:
        for _ in range(n):
            _sync_deliver(tmp, new)  # blocks the loop: the baseline, not a recommendation

    async def inline_unnamed(n: int) -> None:
        for _ in range(n):
            _sync_deliver_unnamed(new)

    fsync = aiofiles.os.wrap(os.fsync)
    open_fd = aiofiles.os.wrap(os.open)
    close_fd = aiofiles.os.wrap(os.close)

    async def aiofiles_naive(n: int) -> None:
        for _ in range(n):
            name = _maildir_name(time.time())
            f = await aiofiles.open(os.path.join(tmp, name), "xb")  # hop
            await f.write(DATA)  # hop
            await f.flush()  # hop
            await fsync(f.fileno())  # hop
            await f.close()  # hop
            await aiofiles.os.rename(os.path.join(tmp, name), os.path.join(new, name))  # hop
            dfd = await open_fd(new, os.O_RDONLY | os.O_DIRECTORY)  # hop
            await fsync(dfd)  # hop
            await close_fd(dfd)  # hop

    box = mailbox.Maildir(str(root), create=True)

    async def maildir(n: int) -> None:
        for _ in range(n):
            box.add(DATA)  # no fsync at all: not durable

    return {
        "atempstore deliver": atempstore,
        "atempstore deliver x16": atempstore_x16,
        "inline sync loop": inline,
        "inline sync loop (O_TMPFILE)": inline_unnamed,
        "aiofiles naive": aiofiles_naive,
        "mailbox.Maildir.add (no fsync)": maildir,
    }[name]


DELIVERY_VARIANTS = (
    "atempstore deliver",
    "atempstore deliver x16",
    "inline sync loop",
    "inline sync loop (O_TMPFILE)",
    "aiofiles naive",
    "mailbox.Maildir.add (no fsync)",
)


def bench_deliver(batch: int, rounds: int) -> dict[str, float]:
    """Median msgs/s per variant.

    The shared disk's speed drifts by tens of percent within seconds, so each
    round runs a short batch of every variant, one after another (the order
    rotates), each into its own store inside one fresh directory: variants
    compared within a round saw the same disk.
    """

    async def go(base: Path) -> dict[str, float]:
        makers = {
            name: await _batch_maker(name, base / str(n))
            for n, name in enumerate(DELIVERY_VARIANTS)
        }
        for deliver_batch in makers.values():  # warm up: threads, page cache, directories
            await deliver_batch(16)
        rates: dict[str, list[float]] = {name: [] for name in DELIVERY_VARIANTS}
        for r in range(rounds):
            k = r % len(DELIVERY_VARIANTS)
            for name in DELIVERY_VARIANTS[k:] + DELIVERY_VARIANTS[:k]:
                start = time.perf_counter()
                await makers[name](batch)
                rates[name].append(batch / (time.perf_counter() - start))
        return {name: median(values) for name, values in rates.items()}

    with fresh_dir("filestore") as base:
        return asyncio.run(go(base))


# --- 2. claim + done with consumer processes ----------------------------------------------

CONSUMER = textwrap.dedent(
    """
    import asyncio, sys, time
    from atempstore import FileStore

    async def main(root: str) -> None:
        store = FileStore(root)
        count, last = 0, 0.0
        messages = store.consume()
        print("ready", flush=True)
        sys.stdin.readline()
        while True:
            try:
                message = await asyncio.wait_for(anext(messages), 0.5)
            except asyncio.TimeoutError:
                break
            await message.read()
            await message.done()
            count += 1
            last = time.monotonic()
        await messages.aclose()
        await store.aclose()
        print(count, repr(last), flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def run_claim_done(consumers: int, backlog: int) -> float:
    with fresh_dir("claim") as base:
        root = base / "store"
        store = _prepared(root)

        async def fill() -> None:
            for _ in range(backlog):
                await store.deliver(DATA, durable=False)

        asyncio.run(fill())
        procs = [_spawn(CONSUMER, str(root)) for _ in range(consumers)]
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        counts, lasts = [], []
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            count, last = out.split()
            counts.append(int(count))
            lasts.append(float(last))
        assert sum(counts) == backlog, counts
        return backlog / (max(lasts) - start)


# --- 3. delivery -> consume latency -------------------------------------------------------

IDLE = textwrap.dedent(
    """
    import asyncio, sys, time
    from atempstore import FileStore

    async def main(root: str, inotify: bool) -> None:
        store = FileStore(root)
        store._use_inotify = inotify
        async for message in store.consume():
            stamp = time.monotonic()
            await message.done()
            print(repr(stamp), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2] == "1"))
    """
)


def run_latency(samples: int, inotify: bool) -> list[float]:
    with fresh_dir("latency") as base:
        root = base / "store"
        store = _prepared(root)
        proc = _spawn(IDLE, str(root), "1" if inotify else "0")
        assert proc.stdout is not None
        stdout = proc.stdout

        async def go() -> list[float]:
            await store.deliver(b"warm-up")
            await asyncio.to_thread(stdout.readline)
            latencies = []
            for _ in range(samples):
                await asyncio.sleep(0.02)  # idle again
                sent = time.monotonic()
                await store.deliver(DATA)
                latencies.append(float(await asyncio.to_thread(stdout.readline)) - sent)
            return latencies

        try:
            return asyncio.run(go())
        finally:
            proc.kill()
            proc.communicate()


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=32, help="deliveries per variant per round")
    parser.add_argument("--rounds", type=int, default=40, help="rounds (median kept)")
    parser.add_argument("--backlog", type=int, default=4000, help="messages for claim+done")
    parser.add_argument("--samples", type=int, default=100, help="latency samples")
    args = parser.parse_args()

    rates = bench_deliver(args.messages, args.rounds)
    ours = rates["atempstore deliver"]
    print_table(
        f"durable deliver, 1 KiB messages, batches of {args.messages} interleaved,"
        f" median of {args.rounds} rounds",
        ["implementation", "msgs/s", "atempstore deliver / this"],
        [[name, rate, ours / rate] for name, rate in rates.items()],
    )
    vs_naive = ours / rates["aiofiles naive"]
    vs_inline = ours / rates["inline sync loop"]
    vs_inline_same_steps = ours / rates["inline sync loop (O_TMPFILE)"]
    print(
        f"bar: >= 1.5x aiofiles naive: {vs_naive:.2f}x; >= 0.8x inline sync loop:"
        f" {vs_inline:.2f}x (and {vs_inline_same_steps:.2f}x the inline loop of"
        " atempstore's own steps)"
    )

    claim_rates = {
        f"{n} consumer process{'es' if n > 1 else ''}": run_claim_done(n, args.backlog)
        for n in (1, 4)
    }
    print_table(
        f"claim + read + done, backlog of {args.backlog} messages",
        ["consumers", "msgs/s"],
        [[name, rate] for name, rate in claim_rates.items()],
    )

    latency = {
        "inotify (default)": run_latency(args.samples, inotify=True),
        "polling fallback (50 ms)": run_latency(max(20, args.samples // 5), inotify=False),
    }
    print_table(
        "delivery -> consume latency, idle consumer in another process (deliver() included)",
        ["wake-up", "median ms", "p99 ms"],
        [
            [name, median(values) * 1e3, percentile(values, 99) * 1e3]
            for name, values in latency.items()
        ],
    )
    save(
        "filestore",
        {
            "messages": args.messages,
            "rounds": args.rounds,
            "deliver_msgs_per_s": rates,
            "deliver_vs_aiofiles_naive": vs_naive,
            "deliver_vs_inline_sync": vs_inline,
            "deliver_vs_inline_sync_same_steps": vs_inline_same_steps,
            "claim_done_msgs_per_s": claim_rates,
            "latency_ms": {
                name: {"median": median(v) * 1e3, "p99": percentile(v, 99) * 1e3}
                for name, v in latency.items()
            },
        },
    )


if __name__ == "__main__":
    main()
