"""FileStore: the gocept.filestore API and the work queue, on real files.

The heavy multi-process battery (thousands of messages, kill -9) is in
``test_filestore_procs.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import gc
import itertools
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from aiofiles.threadpool.text import AsyncTextIOWrapper

from atempstore import AtempstoreError, FileStore, InvalidNameError, Message
from atempstore._durable import rename_noreplace
from atempstore._filestore._names import (
    Layout,
    claimed_name,
    maildir_name,
    order_key,
    parse_claimed,
    sorted_names,
)
from atempstore._filestore._owners import Owner
from atempstore._filestore._queue import QueueCore
from atempstore._filestore._store import StoreCore, open_flags, read_file
from atempstore._filestore._watcher import Backlog, Watcher
from atempstore.cli import main as cli_main

from .cancelling import CancelPoint, cancel_points
from .conftest import (
    REPO,
    lock_is_held,
    loop_thread_lines,
    mounted_tmpfs,
    names_path_under,
    open_fds,
    require_tool,
    run_python,
    run_traced,
    spawn_python,
)

BAD_NAMES = ["", ".", "..", "a/b", "/abs", "nul\0byte", ".hidden", "../escape"]


@pytest.fixture
async def store(tmp_path: Path) -> FileStore:
    s = FileStore(tmp_path / "store")
    await s.prepare()
    return s


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------
# The gocept.filestore API


async def test_gocept_flow(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = FileStore(root)
    await store.prepare()
    await store.prepare()  # idempotent
    assert sorted(os.listdir(root)) == [".consumers", "cur", "new", "tmp"]

    fh = await store.create("a.txt")
    await fh.write("hello ")
    await fh.write("world")
    await fh.close()
    assert await store.list("tmp") == [root / "tmp" / "a.txt"]
    assert await store.list("new") == []

    await store.move("a.txt", "tmp", "new")
    assert await store.list("tmp") == []
    assert await store.list("new") == [root / "new" / "a.txt"]

    await store.move("a.txt", "new", "cur")
    assert await store.list("new") == []
    [path] = await store.list("cur")
    assert path == root / "cur" / "a.txt"
    assert path.read_text() == "hello world"

    await store.copy("a.txt", "cur", "new")
    assert (root / "new" / "a.txt").read_text() == "hello world"
    await store.remove("a.txt", "cur")
    assert await store.list("cur") == []
    with pytest.raises(FileNotFoundError):
        await store.remove("a.txt", "cur")


async def test_create_modes(store: FileStore) -> None:
    fh = await store.create("bin", "wb")
    await fh.write(b"\x00\x01")
    await fh.close()
    assert (store.path / "tmp" / "bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileExistsError):
        await store.create("bin", "xb")
    fh2 = await store.create("bin", "ab")
    await fh2.write(b"\x02")
    await fh2.close()
    assert (store.path / "tmp" / "bin").read_bytes() == b"\x00\x01\x02"
    for mode in ("r", "rb", "w+r", "wbt", "ww"):
        with pytest.raises(ValueError, match="mode"):
            await store.create("x", mode)


async def test_create_does_not_follow_a_planted_symlink(store: FileStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (store.path / "tmp" / "trap").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic links") as info:
        await store.create("trap")
    assert info.value.errno == errno.ELOOP
    assert victim.read_text() == "keep"


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_bad_names_are_refused_everywhere(store: FileStore, bad: str) -> None:
    calls = [
        store.create(bad),
        store.move(bad, "tmp", "new"),
        store.copy(bad, "tmp", "new"),
        store.remove(bad, "new"),
        store.claim(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidNameError) as info:
            await call
        assert repr(bad) in str(info.value)
        assert info.value.name == bad
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, AtempstoreError)
    assert os.listdir(store.path / "new") == []


async def test_maildir_info_suffix_is_a_valid_name(store: FileStore) -> None:
    fh = await store.create("x:2,S")
    await fh.close()
    await store.move("x:2,S", "tmp", "new")
    assert names(await store.list("new")) == ["x:2,S"]
    assert await store.claim("x:2,S")
    await store.message("x:2,S").done()


async def test_unknown_area(store: FileStore) -> None:
    for call in (
        store.list("inbox"),
        store.move("a", "tmp", "inbox"),
        store.copy("a", "outbox", "new"),
        store.remove("a", "../tmp"),
    ):
        with pytest.raises(ValueError, match="unknown area"):
            await call


async def test_hidden_entries_are_never_listed(store: FileStore) -> None:
    for area in ("tmp", "new", "cur"):
        (store.path / area / ".mine").write_text("x")
        (store.path / area / "visible").write_text("x")
        assert names(await store.list(area)) == ["visible"]
    # and never claimed: consume() and claim() see only visible names
    assert await store.claim("visible")
    with pytest.raises(InvalidNameError):
        await store.claim(".mine")


async def test_move_and_copy_never_replace(store: FileStore) -> None:
    (store.path / "tmp" / "m").write_text("first")
    (store.path / "new" / "m").write_text("second")
    with pytest.raises(FileExistsError):
        await store.move("m", "tmp", "new")
    with pytest.raises(FileExistsError):
        await store.copy("m", "tmp", "new")
    assert (store.path / "tmp" / "m").read_text() == "first"
    assert (store.path / "new" / "m").read_text() == "second"
    assert sorted(os.listdir(store.path / "new")) == ["m"]  # no temporary left


def test_rename_noreplace_is_atomic_and_refuses(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_text() == "b"
    rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(FileNotFoundError):
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "d"))


async def test_prepare_refuses_a_file_in_place_of_an_area(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "new").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        await FileStore(root).prepare()


# --------------------------------------------------------------------------
# deliver


async def test_deliver_publishes_whole_unique_messages(store: FileStore) -> None:
    delivered = await asyncio.gather(*(store.deliver(f"m{i}".encode()) for i in range(50)))
    assert len(set(delivered)) == 50
    assert os.listdir(store.path / "tmp") == []
    for i, name in enumerate(delivered):
        assert (store.path / "new" / name).read_bytes() == f"m{i}".encode()
        sec, rest = name.split(".", 1)
        assert sec.isdigit()
        assert f"P{os.getpid()}Q" in rest
    await store.deliver(bytearray(b"ba"))
    await store.deliver(memoryview(b"mv"), durable=False)
    with pytest.raises(TypeError, match="bytes"):
        await store.deliver("text")  # type: ignore[arg-type]


async def test_deliver_never_overwrites(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", unique_name=lambda: "fixed")
    await store.prepare()
    assert await store.deliver(b"first") == "fixed"
    with pytest.raises(FileExistsError):
        await store.deliver(b"second")
    assert (store.path / "new" / "fixed").read_bytes() == b"first"
    assert os.listdir(store.path / "tmp") == []


async def test_names_unique_within_one_second(tmp_path: Path) -> None:
    # Every name gets the same time: the counter and randomness keep them apart.
    store = FileStore(tmp_path / "s", clock=lambda: 1_700_000_000.25)
    await store.prepare()
    got = await asyncio.gather(*(store.deliver(b"", durable=False) for _ in range(2000)))
    assert len(set(got)) == 2000
    assert all(n.startswith("1700000000.M250000P") for n in got)


@pytest.mark.faults
async def test_deliver_enospc_leaves_nothing(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "mnt", "size=256k") as mnt:
        store = FileStore(mnt / "store")
        await store.prepare()
        kept = await store.deliver(b"small")
        with pytest.raises(OSError, match="No space left") as info:
            await store.deliver(b"x" * (1024 * 1024))
        assert info.value.errno == errno.ENOSPC
        assert os.listdir(mnt / "store" / "tmp") == []
        assert os.listdir(mnt / "store" / "new") == [kept]


EIO_CHILD = """
import asyncio, sys
from atempstore import FileStore

async def main() -> None:
    try:
        await FileStore(sys.argv[1]).deliver(b"payload")
    except OSError as exc:
        print("error", exc.errno)
    else:
        print("delivered")

asyncio.run(main())
"""


@pytest.mark.faults
@pytest.mark.parametrize("when", [1, 2], ids=["file-fsync", "dir-fsync"])
def test_deliver_eio_at_fsync_leaves_nothing(tmp_path: Path, when: int) -> None:
    root = tmp_path / "store"
    asyncio.run(FileStore(root).prepare())
    done = run_traced(
        EIO_CHILD, [f"fsync:error=EIO:when={when}"], str(root), options=["-e", "trace=fsync"]
    )
    assert done.stdout.strip() == f"error {errno.EIO}", done.stderr
    assert os.listdir(root / "tmp") == []
    assert os.listdir(root / "new") == []


def traced_deliver(root: Path, *strace_args: str) -> tuple[str, list[str]]:
    """Deliver b"payload" into ``root`` in a child under strace; its output and
    the traced calls."""
    log = root.parent / "strace.log"
    options = ["-e", "signal=none", *strace_args]
    done = run_traced(EIO_CHILD, (), str(root), options=options, log=log)
    assert done.returncode == 0, done.stderr
    calls = [line.split(maxsplit=1)[1] for line in log.read_text().splitlines()]
    return done.stdout.strip(), calls


@pytest.mark.faults
def test_deliver_writes_no_temporary_name_where_linux_allows(tmp_path: Path) -> None:
    # O_TMPFILE: the message is written unnamed in new/ and linked in whole;
    # tmp/ is never touched, so a crash mid-deliver leaves nothing behind.
    require_tool("strace")
    root = tmp_path / "store"
    asyncio.run(FileStore(root).prepare())
    # Every open, link and unlink of the whole process is traced.
    out, calls = traced_deliver(root, "-e", "trace=openat,linkat,link,unlink,unlinkat")
    assert out == "delivered"
    assert any("O_TMPFILE" in call for call in calls), calls
    assert any(call.startswith('linkat(AT_FDCWD, "/proc/self/fd/') for call in calls), calls
    assert not any(str(root / "tmp") in call for call in calls), calls
    [name] = os.listdir(root / "new")
    assert (root / "new" / name).read_bytes() == b"payload"


@pytest.mark.faults
@pytest.mark.parametrize(
    "inject",
    ["openat:error=EOPNOTSUPP:when=2", "openat:error=EISDIR:when=2", "linkat:error=EXDEV:when=1"],
    ids=["no-tmpfile-on-this-fs", "kernel-without-tmpfile", "link-across-mounts"],
)
def test_deliver_falls_back_to_tmp_where_unnamed_files_fail(tmp_path: Path, inject: str) -> None:
    # The 2nd openat on new/ is the O_TMPFILE open (the 1st opens new/ itself);
    # the 1st linkat names the unnamed file.  Either failing the way an
    # unsupporting system fails sends the message through tmp/ instead.
    require_tool("strace")
    root = tmp_path / "store"
    asyncio.run(FileStore(root).prepare())
    # -P: only calls on new/ count towards "when" (and are logged).
    out, calls = traced_deliver(
        root, "-P", str(root / "new"), "-e", "trace=openat,linkat", "-e", f"inject={inject}"
    )
    assert out == "delivered"
    assert sum("(INJECTED)" in call for call in calls) == 1, calls
    assert calls[-1].startswith(f'linkat(AT_FDCWD, "{root / "tmp"}/'), calls
    assert os.listdir(root / "tmp") == []
    [name] = os.listdir(root / "new")
    assert (root / "new" / name).read_bytes() == b"payload"


# --------------------------------------------------------------------------
# claim, Message


async def test_claim_and_settle(store: FileStore) -> None:
    name = await store.deliver(b"job")
    assert await store.claim(name)
    assert not await store.claim(name)
    message = store.message(name)
    assert isinstance(message, Message)
    assert message.name == name
    assert message.path.parent == store.path / "cur"
    assert message.path.name == f"{name}~{store.owner}"
    assert names(await store.list("cur")) == [message.path.name]
    assert await message.read() == b"job"
    await message.release()
    await message.release()  # harmless
    assert names(await store.list("new")) == [name]
    with pytest.raises(RuntimeError, match="released"):
        await message.done()
    with pytest.raises(KeyError):
        store.message(name)

    assert await store.claim(name)
    again = store.message(name)
    await again.done()
    await again.done()  # harmless
    assert os.listdir(store.path / "cur") == []
    assert os.listdir(store.path / "new") == []


async def test_message_context_manager(store: FileStore) -> None:
    a, b = await store.deliver(b"a"), await store.deliver(b"b")
    assert await store.claim(a)
    async with store.message(a) as message:
        assert await message.read() == b"a"
    assert os.listdir(store.path / "cur") == []  # done()

    assert await store.claim(b)
    with pytest.raises(KeyError):
        async with store.message(b):
            raise KeyError("handler failed")
    assert names(await store.list("new")) == [b]  # release()d for another try


CLAIMER = """
import asyncio, sys, random
from atempstore import FileStore

async def main(root: str, names: list[str]) -> None:
    stores = [FileStore(root) for _ in range(4)]
    won: list[str] = []

    async def contend(store: FileStore) -> None:
        order = names[:]
        random.shuffle(order)
        for name in order:
            if await store.claim(name):
                won.append(name)

    sys.stdin.readline()
    await asyncio.gather(*(contend(s) for s in stores for _ in range(2)))
    print(" ".join(won), flush=True)
    for store in stores:
        for name in list(store._held):
            await store.message(name).done()
        await store.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2:]))
"""


@pytest.mark.multiprocess
async def test_claim_has_exactly_one_winner(store: FileStore) -> None:
    """4 processes x 8 tasks, plus 4 threads with their own loops, claim the same 200 names."""
    delivered = [await store.deliver(b"x", durable=False) for _ in range(200)]
    procs = [spawn_python(CLAIMER, str(store.path), *delivered) for _ in range(4)]
    await asyncio.sleep(0.5)
    won_by_threads: list[str] = []
    lock = threading.Lock()

    def thread_claimer() -> None:
        async def go() -> None:
            mine = FileStore(store.path)
            order = delivered[:]
            random.shuffle(order)
            for name in order:
                if await mine.claim(name):
                    with lock:
                        won_by_threads.append(name)
                    await mine.message(name).done()
            await mine.aclose()

        asyncio.run(go())

    threads = [threading.Thread(target=thread_claimer) for _ in range(4)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for t in threads:
        t.start()
    outputs = [await asyncio.to_thread(proc.communicate, timeout=60) for proc in procs]
    for t in threads:
        t.join()
    winners = won_by_threads + [n for out, _ in outputs for n in out.split()]
    assert sorted(winners) == sorted(delivered)  # each exactly once
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outputs]


async def test_cancelled_claim_never_strands_a_message(store: FileStore) -> None:
    """A claim cancelled while its thread renames is given back, not held forever."""
    outcomes: dict[str, int] = {"won": 0, "cancelled": 0}
    for i in range(150):
        name = await store.deliver(b"x", durable=False)
        task = asyncio.create_task(store.claim(name))
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        try:
            won = await task
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            assert os.listdir(store.path / "cur") == []
            assert os.listdir(store.path / "new") == [name]
            with pytest.raises(KeyError):
                store.message(name)
            os.unlink(store.path / "new" / name)
        else:
            assert won
            outcomes["won"] += 1
            await store.message(name).done()
    assert outcomes["cancelled"] > 0


# --------------------------------------------------------------------------
# consume


async def test_consume_oldest_first(tmp_path: Path) -> None:
    times = iter([1_000_000_000.5, 999_999_999.0, 1_000_000_000.25])
    store = FileStore(tmp_path / "s", clock=lambda: next(times))
    await store.prepare()
    first = await store.deliver(b"1000000000.5")
    second = await store.deliver(b"999999999")  # 9 digits: lexically last, oldest in time
    third = await store.deliver(b"1000000000.25")
    # A foreign name without a timestamp sorts by its mtime.
    (store.path / "new" / "foreign").write_bytes(b"foreign")
    os.utime(store.path / "new" / "foreign", (999_999_999.5, 999_999_999.5))
    assert names(await store.list("new")) == [second, "foreign", third, first]
    got = []
    async with contextlib.aclosing(store.consume()) as messages:
        async for message in messages:
            got.append(await message.read())
            await message.done()
            if len(got) == 4:
                break
    assert got == [b"999999999", b"foreign", b"1000000000.25", b"1000000000.5"]
    await store.aclose()


async def test_consume_wakes_on_delivery_and_release(store: FileStore) -> None:
    consumer = FileStore(store.path)
    received: asyncio.Queue[Message] = asyncio.Queue()

    async def run() -> None:
        async for message in consumer.consume():
            await received.put(message)

    task = asyncio.create_task(run())
    await asyncio.sleep(0.1)  # idle, waiting on inotify
    start = time.monotonic()
    name = await store.deliver(b"wake")
    message = await asyncio.wait_for(received.get(), 5)
    assert time.monotonic() - start < 0.5
    assert message.name == name
    await message.release()  # back to new/: the same consumer gets it again
    again = await asyncio.wait_for(received.get(), 5)
    assert again.name == name
    await again.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await consumer.aclose()


async def test_consume_without_inotify_polls(store: FileStore) -> None:
    consumer = FileStore(store.path)
    consumer._use_inotify = False  # as when the inotify instance limit is reached
    gen = consumer.consume()
    waiter = asyncio.create_task(anext(gen))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    start = time.monotonic()
    await store.deliver(b"polled")
    message = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - start < 0.5
    assert await message.read() == b"polled"
    await message.done()
    await gen.aclose()
    await consumer.aclose()


async def test_consume_competes_fairly(store: FileStore) -> None:
    """Three consumers in one process drain 300 messages: each handled exactly once."""
    for i in range(300):
        await store.deliver(str(i).encode(), durable=False)
    seen: list[bytes] = []

    async def worker() -> None:
        consumer = FileStore(store.path)
        async with contextlib.aclosing(consumer.consume()) as messages:
            async for message in messages:
                seen.append(await message.read())
                await message.done()
                if len(seen) >= 300:
                    break
        await consumer.aclose()

    tasks = [asyncio.create_task(worker()) for _ in range(3)]
    while len(seen) < 300:
        await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(seen, key=int) == [str(i).encode() for i in range(300)]
    assert os.listdir(store.path / "new") == []


async def test_cancelled_consume_never_strands_a_message(store: FileStore) -> None:
    consumer = FileStore(store.path)
    stranded = 0
    for i in range(120):
        name = await store.deliver(b"x", durable=False)
        gen = consumer.consume(recover_interval=None)
        task = asyncio.create_task(anext(gen))
        # Three hops (watch, recover, claim): land the cancel anywhere in them.
        for _ in range(i % 40):
            await asyncio.sleep(0)
        task.cancel()
        try:
            message = await task
        except asyncio.CancelledError:
            in_cur = os.listdir(store.path / "cur")
            stranded += len(in_cur)
            assert os.listdir(store.path / "new") == [name]
            os.unlink(store.path / "new" / name)
        else:
            await message.done()
        await gen.aclose()
    assert stranded == 0
    await consumer.aclose()


# --------------------------------------------------------------------------
# recovery, aclose


HOLDER = """
import asyncio, os, sys
from atempstore import FileStore

async def main(root: str, count: int) -> None:
    store = FileStore(root)
    got = []
    async for message in store.consume():
        got.append(message.name)
        if len(got) == count:
            break
    print(" ".join(got), flush=True)
    sys.stdin.readline()  # hold the claims until killed
    os._exit(0)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.multiprocess
async def test_recover_gives_back_claims_of_a_killed_consumer(store: FileStore) -> None:
    delivered = sorted([await store.deliver(f"{i}".encode()) for i in range(3)])
    child = spawn_python(HOLDER, str(store.path), "3")
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert sorted(line.split()) == delivered, child.stderr
        status = await store.status()
        assert status.live_claims == 3
        assert status.dead_claims == []
        assert await store.recover() == []  # alive: its lock is held
        assert len(os.listdir(store.path / "cur")) == 3
        child.kill()  # SIGKILL: no cleanup code runs
        await asyncio.to_thread(child.wait)
    finally:
        child.kill()
        child.communicate()
    status = await store.status()
    assert status.dead_claims == delivered
    assert status.live_claims == 0
    results = await asyncio.gather(*(FileStore(store.path).recover() for _ in range(5)))
    assert sorted(itertools.chain.from_iterable(results)) == delivered  # each exactly once
    assert names(await store.list("new")) == delivered
    assert os.listdir(store.path / "cur") == []
    assert os.listdir(store.path / ".consumers") == []  # the dead lock file is gone


async def test_recover_spares_live_consumers_of_this_process(store: FileStore) -> None:
    name = await store.deliver(b"held")
    holder = FileStore(store.path)
    assert await holder.claim(name)
    assert await FileStore(store.path).recover() == []
    # Dropped without aclose(): closing its lock fd (as a file object would)
    # is what tells the others it is gone.  Collected here, on the loop, the
    # close is handed to a thread of its own: wait for it.
    lock = store.path / ".consumers" / f"{holder.owner}.lock"
    del holder
    gc.collect()
    assert await asyncio.to_thread(wait_until, lambda: not lock_is_held(lock))
    assert await FileStore(store.path).recover() == [name]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` (in a thread) until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def test_claims_without_a_lock_file_are_left_alone(store: FileStore) -> None:
    (store.path / "cur" / "job~0123456789abcdef").write_text("x")
    status = await store.status()
    assert status.unknown_claims == ["job~0123456789abcdef"]
    assert await store.recover() == []
    assert os.listdir(store.path / "cur") == ["job~0123456789abcdef"]


async def test_aclose_gives_back_and_unlocks(store: FileStore) -> None:
    consumer = FileStore(store.path)
    a, b = await store.deliver(b"a"), await store.deliver(b"b")
    assert await consumer.claim(a)
    assert await consumer.claim(b)
    first_owner = consumer.owner
    await consumer.message(a).done()
    held = consumer.message(b)
    await consumer.aclose()
    await consumer.aclose()  # harmless
    assert names(await store.list("new")) == [b]
    assert os.listdir(store.path / ".consumers") == []
    with pytest.raises(RuntimeError, match="aclose"):
        await held.done()
    # Usable again, under a new owner id.
    assert await consumer.claim(b)
    assert consumer.owner not in (None, first_owner)
    await consumer.message(b).done()
    await consumer.aclose()


async def test_context_manager_prepares_and_closes(tmp_path: Path) -> None:
    async with FileStore(tmp_path / "s") as store:
        name = await store.deliver(b"x")
        assert await store.claim(name)
    assert names(await FileStore(tmp_path / "s").list("new")) == [name]


async def test_clean_tmp(store: FileStore) -> None:
    old, young = store.path / "tmp" / "old", store.path / "tmp" / "young"
    leftover = store.path / "new" / ".copy.abc.tmp"
    for path in (old, young, leftover):
        path.write_text("x")
    message = store.path / "new" / "message"
    message.write_text("x")
    past = time.time() - 40 * 3600
    for path in (old, leftover, message):
        os.utime(path, (past, past))
    removed = await store.clean_tmp()
    assert sorted(removed) == sorted([old, leftover])
    assert young.exists()
    assert message.exists()  # messages are never "abandoned"
    assert await store.clean_tmp(older_than=0) == [young]


async def test_status(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = FileStore(tmp_path / "s", clock=lambda: now[0])
    await store.prepare()
    assert (await store.status()).oldest_age is None
    await store.deliver(b"a")
    now[0] += 90
    await store.deliver(b"b")
    (store.path / "tmp" / "partial").write_text("x")
    status = await store.status()
    assert status.counts == {"tmp": 1, "new": 2, "cur": 0}
    assert status.oldest_age == pytest.approx(90)


async def test_no_blocking_io_on_the_loop(tmp_path: Path, no_blocking_io: list[str]) -> None:
    """Every public coroutine, with the guard on."""
    store = FileStore(tmp_path / "s")
    async with store:
        await store.prepare()
        fh = await store.create("f")
        await fh.write("x")
        await fh.close()
        await store.list("tmp")
        await store.move("f", "tmp", "new")
        await store.copy("f", "new", "tmp")
        await store.remove("f", "tmp")
        await store.remove("f", "new")
        name = await store.deliver(b"m")
        assert await store.claim(name)
        message = store.message(name)
        await message.read()
        await message.release()
        async with contextlib.aclosing(store.consume()) as messages:
            async for message in messages:
                async with message:
                    await message.read()
                break
        other = await store.deliver(b"n")
        assert await store.claim(other)
        await store.message(other).done()
        await store.recover()
        await store.status()
        await store.clean_tmp()
    assert no_blocking_io == []


# --------------------------------------------------------------------------
# The command line and the example


DIES_HOLDING = """
import asyncio, os, sys
from atempstore import FileStore

async def main(root: str) -> None:
    store = FileStore(root)
    for name in sorted(os.listdir(os.path.join(root, "new")))[:2]:
        assert await store.claim(name)
    os._exit(0)  # dies without giving them back

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.multiprocess
def test_cli_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"

    async def fill() -> None:
        store = FileStore(root)
        await store.prepare()
        for i in range(5):
            await store.deliver(f"{i}".encode())

    asyncio.run(fill())
    done = run_python(DIES_HOLDING, str(root))
    assert done.returncode == 0, done.stderr

    assert cli_main(["queue", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"new:\s+3\s+oldest waiting 0\.\d s", out), out
    assert "0 by live consumers, 2 by dead consumers" in out
    assert "--recover" in out

    assert cli_main(["queue", str(root), "--recover"]) == 0
    out = capsys.readouterr().out
    assert "gave 2 message(s) back to new/" in out
    assert re.search(r"new:\s+5\s", out), out
    assert "0 by dead consumers" in out

    assert cli_main(["queue", str(tmp_path / "nowhere")]) == 1
    assert "is not a FileStore" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # never creates a store


@pytest.mark.multiprocess
def test_worker_pool_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "worker_pool.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "0 lost" in done.stdout


# --------------------------------------------------------------------------
# Cancellation: every public coroutine, cancelled at each of its hops


@dataclass
class Run:
    """One run of a coroutine under `cancel_points`: its store and what to check."""

    store: FileStore
    root: Path
    #: Payload -> how many copies must be in new/ and cur/ after the run.
    payloads: collections.Counter[bytes] = field(default_factory=collections.Counter)
    #: Messages whose state must match their file.
    messages: list[Message] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    gen: AsyncGenerator[Message, None] | None = None
    result: object = None
    completed: bool = False  # the call returned: it was not cancelled
    checked: bool = False
    fds: int = 0


async def fds_settle(expected: int) -> int:
    """Open fds once an abandoned read-only hop has let go (within 5 s)."""
    deadline = time.monotonic() + 5
    while (now := open_fds()) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return now


def read_area(root: Path, area: str) -> list[bytes]:
    return [(root / area / n).read_bytes() for n in os.listdir(root / area)]


async def assert_tidy(run: Run, point: CancelPoint, *, tmp: int = 0) -> None:
    """What must hold after any run: no fd, temp file, orphan claim or lost
    message left behind, and every Message telling the truth."""
    root, store = run.root, run.store
    assert await fds_settle(run.fds) == run.fds, f"fds leaked at {point}"
    assert len(os.listdir(root / "tmp")) == tmp, (point, os.listdir(root / "tmp"))
    for area in ("new", "cur"):
        assert not [n for n in os.listdir(root / area) if n.startswith(".")], point
    # Every file in cur/ is a claim that a Message of this store holds.
    held = {m.path.name: m for m in store._held.values()}
    assert sorted(os.listdir(root / "cur")) == sorted(held), point
    assert all(m.state == "held" for m in held.values()), point
    for message in run.messages:
        exists = message.path.exists()
        assert exists == (message.state == "held"), (point, message, exists)
        assert (store._held.get(message.name) is message) == exists, (point, message)
    # Nothing lost, nothing duplicated.
    there = collections.Counter(read_area(root, "new") + read_area(root, "cur"))
    assert there == +run.payloads, (point, there, run.payloads)
    if store.owner is not None:
        assert lock_is_held(root / ".consumers" / f"{store.owner}.lock"), point
    # No other consumer lock left held (status() and recover() probe them).
    for entry in os.listdir(root / ".consumers"):
        if not entry.startswith(f"{store.owner}."):
            assert not lock_is_held(root / ".consumers" / entry), (point, entry)


_runs = itertools.count()


async def prepared(tmp_path: Path, count: int = 1, claimed: int = 0) -> Run:
    """A store holding its consumer lock already (so the first claim's lock
    fd is not a leak), with ``count`` messages, the first ``claimed`` claimed."""
    root = tmp_path / f"s{next(_runs)}"
    run = Run(FileStore(root), root)
    await run.store.prepare()
    warm = await run.store.deliver(b"warm-up")
    assert await run.store.claim(warm)
    await run.store.message(warm).done()
    for i in range(count):
        data = f"m{i}".encode()
        run.names.append(await run.store.deliver(data))
        run.payloads[data] += 1
    for name in run.names[:claimed]:
        assert await run.store.claim(name)
        run.messages.append(run.store.message(name))
    return run


async def finish(run: Run) -> None:
    if run.gen is not None:
        await run.gen.aclose()
    await run.store.aclose()


OPS = [
    "prepare",
    "create",
    "create-existing",
    "list",
    "move",
    "copy",
    "remove",
    "deliver",
    "claim",
    "recover",
    "status",
    "clean_tmp",
    "read",
    "done",
    "release",
    "consume",
    "consume-aclose",
    "aclose",
]


@pytest.mark.parametrize("op", OPS)
async def test_cancelled_anywhere_leaves_nothing_behind(tmp_path: Path, op: str) -> None:
    """Each public coroutine cancelled at each hop, before/during/after it runs."""
    runs: list[Run] = []

    async def prepare() -> Run:
        run = await prepare_run()
        runs.append(run)
        return run

    async def prepare_run() -> Run:
        if op == "prepare":
            root = tmp_path / f"s{next(_runs)}" / "a" / "b"
            run = Run(FileStore(root), root)
            run.fds = open_fds()
            return run
        run = await prepared(tmp_path, count=2, claimed=2 if op in ("aclose",) else 1)
        store, root = run.store, run.root
        old = root / "tmp" / "old"
        old.write_bytes(b"tmp file")
        os.utime(old, (1, 1))
        if op == "create-existing":
            (root / "tmp" / "f").write_text("kept")
        if op == "recover":
            # A dead consumer's claim: its lock file exists and nobody holds it.
            dead = "0123456789abcdef"
            (root / ".consumers" / f"{dead}.lock").write_text("")
            name = run.names[1]
            (root / "new" / name).rename(root / "cur" / f"{name}~{dead}")
        run.fds = open_fds()  # consume-aclose: without the consumer's inotify fds
        if op == "consume-aclose":
            run.gen = store.consume(recover_interval=None)
            message = await anext(run.gen)
            run.messages.append(message)
        return run

    async def call(run: Run) -> None:
        store = run.store
        claimed = run.messages[0] if run.messages else None
        waiting = run.names[1] if len(run.names) > 1 else None
        if op == "prepare":
            await store.prepare()
        elif op in ("create", "create-existing"):
            run.result = await store.create("f", "a")
        elif op == "list":
            run.result = await store.list("new")
        elif op == "move":
            assert waiting is not None
            await store.move(waiting, "new", "tmp")
        elif op == "copy":
            assert waiting is not None
            await store.copy(waiting, "new", "tmp")
        elif op == "remove":
            assert waiting is not None
            await store.remove(waiting, "new")
        elif op == "deliver":
            run.result = await store.deliver(b"delivered")
        elif op == "claim":
            assert waiting is not None
            run.result = await store.claim(waiting)
        elif op == "recover":
            run.result = await store.recover()
        elif op == "status":
            run.result = await store.status()
        elif op == "clean_tmp":
            run.result = await store.clean_tmp()
        elif op == "read":
            assert claimed is not None
            run.result = await claimed.read()
        elif op == "done":
            assert claimed is not None
            await claimed.done()
        elif op == "release":
            assert claimed is not None
            await claimed.release()
        elif op == "consume":
            run.gen = store.consume(recover_interval=None)
            run.result = await anext(run.gen)
        elif op == "consume-aclose":
            assert run.gen is not None
            await run.gen.aclose()
            run.gen = None
        elif op == "aclose":
            await store.aclose()
        run.completed = True

    async def check(run: Run, point: CancelPoint) -> None:
        run.checked = True
        root, done = run.root, run.completed
        if op == "prepare":
            assert await fds_settle(run.fds) == run.fds, point
            if root.exists():  # the hop ran, to its end
                assert sorted(os.listdir(root)) == [".consumers", "cur", "new", "tmp"]
            else:
                assert point.phase == "before", point
            return
        tmp = 1  # tmp/old
        name = run.names[1]
        if op in ("create", "create-existing"):
            if done:
                handle = cast(AsyncTextIOWrapper, run.result)
                assert handle.name == str(root / "tmp" / "f")
                await handle.close()
            # A cancelled create removes the file it made, never one it found.
            tmp += done or op == "create-existing"
            if op == "create-existing":
                assert (root / "tmp" / "f").read_text() == "kept"
        elif op == "move":
            # Moved or not: never both, never neither.
            moved = (root / "tmp" / name).exists()
            assert moved != (root / "new" / name).exists(), point
            assert moved == (done or point.phase != "before"), point
            run.payloads[b"m1"] -= moved
            tmp += moved
        elif op == "copy":
            # A cancelled copy takes its copy back.
            assert (root / "tmp" / name).exists() == done, point
            tmp += done
        elif op == "remove":
            run.payloads[b"m1"] -= not (root / "new" / name).exists()
        elif op == "deliver":
            run.payloads[b"delivered"] += done  # a cancelled one is taken back
        elif op == "claim":
            if done:
                assert run.result is True
                run.messages.append(run.store.message(name))
            else:
                assert (root / "new" / name).exists(), point
        elif op == "recover":
            stuck = os.listdir(root / "cur")
            stuck.remove(run.messages[0].path.name)
            if stuck:  # cancelled before it started: still the dead consumer's
                assert point.phase == "before", point
                (root / "cur" / stuck[0]).rename(root / "new" / name)
            assert (root / "new" / name).read_bytes() == b"m1"
        elif op == "clean_tmp":
            tmp -= not (root / "tmp" / "old").exists()
        elif op == "done":
            message = run.messages[0]
            assert message.state == ("held" if point.phase == "before" and not done else "done")
            run.payloads[b"m0"] -= message.state == "done"
        elif op == "release":
            message = run.messages[0]
            released = message.state == "released"
            assert released == (done or point.phase != "before"), (point, message)
            if released:
                # A stale Message cannot act on a later claim of the same name.
                assert await run.store.claim(message.name)
                again = run.store.message(message.name)
                assert again.path == message.path  # same store, same owner: same file
                with pytest.raises(RuntimeError, match="released"):
                    await message.done()
                assert again.path.exists()
                run.messages = [again]
        elif op == "consume":
            if done:
                run.messages.append(cast(Message, run.result))
            else:
                assert (root / "new" / name).exists(), point
            if run.gen is not None:  # cancelled, it has ended already
                await run.gen.aclose()
                run.gen = None
        elif op == "consume-aclose":
            run.gen = None  # closed, cancelled or not: its fds are checked below
        elif op == "aclose":
            # Even a cancelled aclose() gives everything back and lets go.
            assert run.store.owner is None, point
            assert [m.state for m in run.messages] == ["closed", "closed"], point
            assert os.listdir(root / ".consumers") == [], point
            assert os.listdir(root / "cur") == [], point
            run.fds -= 1  # the consumer lock's
        await assert_tidy(run, point, tmp=tmp)
        await finish(run)

    points = await cancel_points(prepare, call, check)
    assert points, "no hop was cancelled"
    # The last run was not cancelled (it made no further hop): the same
    # checks, for what a caller that got its result has.
    [last] = [run for run in runs if not run.checked]
    assert last.completed
    await check(last, CancelPoint(len(points) // 3, "after"))


# --------------------------------------------------------------------------
# Handles, modes, durability of the directories, errors


async def test_create_handle_name_is_its_path(store: FileStore) -> None:
    # gocept's README prints the handle's name: a path, not an fd number.
    for mode in ("w", "wb", "x", "a+"):
        name = f"f-{mode}"
        handle = await store.create(name, mode)
        try:
            assert isinstance(handle.name, str)
            assert handle.name == str(store.path / "tmp" / name)
            assert handle.name.endswith(f"tmp/{name}")
        finally:
            await handle.close()


async def test_prepare_gives_every_directory_it_creates_mode_0700(tmp_path: Path) -> None:
    """os.makedirs(mode=) gives the mode to the last level only."""
    root = tmp_path / "a" / "b" / "store"
    before = stat.S_IMODE(tmp_path.stat().st_mode)
    old = os.umask(0o022)
    try:
        store = FileStore(root)
        await store.prepare()
        assert await store.claim(await store.deliver(b"x"))
    finally:
        os.umask(old)
    made = [tmp_path / "a", tmp_path / "a" / "b", root]
    made += [root / area for area in ("tmp", "new", "cur", ".consumers")]
    assert {str(d): oct(stat.S_IMODE(d.stat().st_mode)) for d in made} == {
        str(d): "0o700" for d in made
    }
    assert stat.S_IMODE(tmp_path.stat().st_mode) == before  # what existed is left alone
    [lock] = (root / ".consumers").iterdir()
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    await store.aclose()


PREPARE = """
import asyncio, sys
from atempstore import FileStore

asyncio.run(FileStore(sys.argv[1]).prepare())
"""


@pytest.mark.faults
def test_prepare_makes_a_new_store_durable(tmp_path: Path) -> None:
    """Each directory created is followed by an fsync of its parent: a power
    cut cannot lose the store (or an area) that messages were delivered into."""
    root = tmp_path / "a" / "store"
    log = tmp_path / "strace.log"
    options = ["-y", "-e", "trace=mkdir,mkdirat,fsync"]
    done = run_traced(PREPARE, (), str(root), options=options, log=log)
    assert done.returncode == 0, done.stderr
    calls = [line.split(maxsplit=1)[1] for line in log.read_text().splitlines()]
    made = [c for c in calls if c.startswith("mkdir") and c.endswith("= 0")]
    synced = [re.search(r"fsync\(\d+<(.*)>\)", c) for c in calls if c.startswith("fsync")]
    synced_dirs = [m.group(1) for m in synced if m]
    assert len(made) == 6, calls  # a, store, tmp, new, cur, .consumers
    # Every new directory's parent is fsynced after it was made.
    for parent in (tmp_path, tmp_path / "a", root):
        assert str(parent) in synced_dirs, calls


async def test_os_errors_carry_and_name_their_path(tmp_path: Path) -> None:
    """Every OSError the store raises has ``filename`` and names it."""

    def named(exc: OSError, path: Path) -> None:
        assert exc.filename == str(path), exc
        assert str(path) in str(exc), exc

    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as info:
        await FileStore(tmp_path / "file" / "s").prepare()
    named(info.value, tmp_path / "file" / "s")

    root = tmp_path / "s"
    root.mkdir()
    (root / "new").write_text("in the way")
    with pytest.raises(NotADirectoryError) as info:
        await FileStore(root).prepare()
    named(info.value, root / "new")
    (root / "new").unlink()

    store = FileStore(root)
    await store.prepare()
    (root / "tmp" / "a").write_text("a")
    (root / "new" / "a").write_text("b")
    with pytest.raises(FileExistsError) as exists:
        await store.copy("a", "tmp", "new")
    named(exists.value, root / "new" / "a")
    with pytest.raises(FileExistsError) as exists:
        await store.move("a", "tmp", "new")
    named(exists.value, root / "tmp" / "a")
    assert exists.value.filename2 == str(root / "new" / "a")

    # A store whose cur/ is gone: an error naming it, not a claim that
    # silently fails forever.
    (root / "cur").rmdir()
    with pytest.raises(FileNotFoundError, match="prepare") as missing:
        await store.claim("a")
    named(missing.value, root / "cur")
    assert (root / "new" / "a").read_text() == "b"
    await store.aclose()

    with pytest.raises(FileNotFoundError) as missing:
        await anext(FileStore(tmp_path / "nowhere").consume())
    assert str(tmp_path / "nowhere") in str(missing.value)


def test_cli_queue_reports_any_os_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    asyncio.run(FileStore(root).prepare())
    (root / "cur").rmdir()
    (root / "cur").symlink_to(root / "cur")  # ELOOP: neither ENOENT nor ENOTDIR
    assert cli_main(["queue", str(root)]) == 1
    err = capsys.readouterr().err
    assert "atempstore queue" in err
    assert str(root / "cur") in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------
# The loop thread never touches an fd of the store (strace)

LOOP_TOUR = r"""
import asyncio, contextlib, gc, sys, threading
from pathlib import Path

from atempstore import FileStore

root = Path(sys.argv[1])


async def tour() -> None:
    async with FileStore(root) as store:
        await store.prepare()
        handle = await store.create("f")
        await handle.write("x")
        await handle.close()
        await store.move("f", "tmp", "new")
        await store.copy("f", "new", "tmp")
        await store.remove("f", "tmp")
        await store.remove("f", "new")
        await store.list("new")
        name = await store.deliver(b"job")
        assert await store.claim(name)
        await store.message(name).read()
        await store.message(name).release()
        async with contextlib.aclosing(store.consume(recover_interval=60)) as messages:
            async for message in messages:
                await message.done()
                break

        # A consumer that waits on inotify, woken by a delivery: its events
        # are read in the claim hop.
        consumer = FileStore(root)
        gen = consumer.consume(recover_interval=60)
        waiter = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.2)
        await store.deliver(b"wake")
        await (await waiter).done()
        await gen.aclose()
        await consumer.recover()
        await consumer.status()
        await consumer.clean_tmp()
        # Dropped without aclose(), collected on the loop: its lock fd is closed
        # by its finalizer, which must hand the close to a thread.
        del consumer, gen, waiter
        gc.collect()
        await asyncio.sleep(0.2)


print("loop-thread", threading.get_native_id(), flush=True)
asyncio.run(tour())
print("tour done", flush=True)
"""


@pytest.mark.faults
def test_the_loop_thread_makes_no_syscall_on_the_stores_fds(tmp_path: Path) -> None:
    """strace -f -yy: no call of the loop thread names a file of the store or
    the inotify fd, from the first line of the tour on."""
    root = tmp_path / "spool"
    log = tmp_path / "strace.log"
    options = ["-yy", "-e", "trace=%file,%desc", "-e", "signal=none"]
    done = run_traced(LOOP_TOUR, (), str(root), options=options, log=log)
    assert done.returncode == 0, done.stderr
    assert "tour done" in done.stdout, done.stdout
    lines = log.read_text(errors="replace").splitlines()
    touched = [
        line
        for line in loop_thread_lines(done.stdout, log)
        # epoll_ctl registers the inotify fd with the loop's selector: a call
        # on the epoll fd, which is how add_reader works at all.
        if (names_path_under(line, root) or "inotify" in line)
        and not line.split()[1].startswith("epoll_ctl(")
    ]
    assert touched == [], "\n".join(touched[:40])
    # And the tour did what it should have: the strace saw its worker threads' calls.
    assert any("inotify" in line and "read(" in line for line in lines)
    assert any(".consumers" in line and line.split()[1].startswith("close(") for line in lines)


async def test_one_message_settled_twice_at_once(store: FileStore) -> None:
    """A done() racing a release() of the same Message: one acts, the other
    is refused before it touches anything."""
    name = await store.deliver(b"x")
    assert await store.claim(name)
    message = store.message(name)
    released, done = await asyncio.gather(message.release(), message.done(), return_exceptions=True)
    assert released is None
    assert isinstance(done, RuntimeError)
    assert "being settled" in str(done)
    assert message.state == "released"
    assert names(await store.list("new")) == [name]
    await store.aclose()


# --------------------------------------------------------------------------
# The blocking cores, without an event loop: FileStore is a facade over them


def test_names_and_order_without_a_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    first, second = maildir_name(1000.25), maildir_name(1000.25)
    assert first != second
    keys = [order_key(name, "") for name in (second, first)]
    assert sorted(key for key in keys if key is not None) == keys[::-1]  # the counter decides
    owner = "0123456789abcdef"
    assert parse_claimed(claimed_name(first, owner)) == (first, owner)
    assert parse_claimed("plain~name") is None
    layout = Layout(str(tmp_path))
    assert layout.path("a", "cur") == str(tmp_path / "cur" / "a")
    with pytest.raises(ValueError, match="unknown area"):
        layout.area("failed")
    with pytest.raises(InvalidNameError):
        layout.path("../a", "new")
    # A claimed older message sorts before a newer one; hidden entries never show.
    for entry in (second, claimed_name(first, owner), ".lock.tmp"):
        (tmp_path / entry).write_bytes(b"")
    assert sorted_names(str(tmp_path)) == [claimed_name(first, owner), second]


def test_store_core_without_a_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    layout = Layout(str(tmp_path / "spool"))
    core = StoreCore(layout)
    core.prepare()
    core.prepare()
    tmp, new, cur = (layout.path("a", area) for area in ("tmp", "new", "cur"))
    file, created = core.create(tmp, *open_flags("w"))
    assert created
    assert file.name == tmp
    file.write("hello")
    file.close()
    StoreCore.move(tmp, new, True)
    assert names(StoreCore.listing(layout.area("new"))) == ["a"]
    copied = StoreCore.copy(new, cur, True)
    with pytest.raises(FileExistsError):
        StoreCore.copy(new, cur, True)
    assert read_file(cur) == b"hello"
    StoreCore.uncopy(cur, copied, True)
    assert not os.path.lexists(cur)
    # The roll-back of a create removes only a file the create made.
    StoreCore.uncreate(core.create(tmp, *open_flags("wb")))
    assert not os.path.lexists(tmp)
    Path(tmp).write_text("kept")
    StoreCore.uncreate(core.create(tmp, *open_flags("a")))
    assert Path(tmp).read_text() == "kept"
    os.utime(tmp, (1, 1))
    assert core.clean_tmp(time.time()) == [Path(tmp)]


def test_queue_core_without_a_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    layout = Layout(str(tmp_path / "spool"))
    StoreCore(layout).prepare()
    dying, survivor = QueueCore(layout), QueueCore(layout)
    older, newer = maildir_name(1000.0), maildir_name(2000.0)
    assert survivor.deliver(newer, b"two", True) == newer
    assert survivor.deliver(older, b"one", True) == older

    got = dying.claim(older)
    assert got is not None
    claimed, owner = got
    assert claimed == claimed_name(older, owner.id)
    assert survivor.claim(older) is None  # exactly one claimer wins
    message = dying.adopt(older, claimed, owner)
    assert read_file(str(message.path)) == b"one"
    assert lock_is_held(layout.lock_path(owner.id))
    assert survivor.status(time.time()).live_claims == 1

    # Its lock let go without giving anything back: as when its process dies.
    dying.owners.let_go(owner, unlink=False)
    status = survivor.status(time.time())
    assert (status.counts, status.dead_claims) == ({"tmp": 0, "new": 1, "cur": 1}, [older])
    assert survivor.recover() == [older]
    assert not os.path.lexists(layout.lock_path(owner.id))

    # A consumer's next claim is the oldest; a roll-back gives it back.
    watcher, backlog = Watcher.open(layout.dirs["new"], use_inotify=False), Backlog()
    assert watcher.polling
    taken = survivor.claim_next(watcher, backlog, True)
    assert taken is not None
    assert taken[0] == older
    survivor.unclaim_next(taken)
    taken = survivor.claim_next(watcher, backlog, True)
    assert taken is not None
    survivor.adopt(*taken)
    survivor.undeliver(newer, True)
    assert names(StoreCore.listing(layout.dirs["new"])) == []

    # close() gives back what it holds, releases the lock, and says whom it let go.
    held = dict(survivor.held)
    closed: list[Owner] = []
    survivor.close(held, closed)
    QueueCore.closed(held, closed)
    assert [m.state for m in held.values()] == ["closed"]
    assert names(StoreCore.listing(layout.dirs["new"])) == [older]
    assert survivor.owners.current is None
    assert os.listdir(layout.consumers) == []
