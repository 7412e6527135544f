"""No system call on a user's file or fd from the event-loop thread, ever.

SPEC.md's "never blocks" is strict: on NFS every ``open``, ``stat``, ``close``,
``fstat``, ``ftruncate``, ``flock``... is a round trip to a server that may
hang, and the loop thread must make none of them.  ``tests/blocking.py``
catches path calls in-process; this test catches *fd* calls too, the way the
issue was found: ``strace -f -yy`` of a tour of the public API, every call
the loop thread made that names a file under the tour's directory (a path, or
an fd that ``-yy`` shows with its path) is a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import loop_thread_lines, names_path_under, run_traced

TOUR = r"""
import asyncio, os, sys, threading
from pathlib import Path

import aiofiles

import atempstore
from atempstore import (
    LOCK_EX, FileCache, FileStore, Lock, SessionStorage, TempFileManager, lock, open_atomic,
    unlock,
)

root = Path(sys.argv[1])


async def tour() -> None:
    # Locks: uncontended and contended, both modes, and the lock()/unlock() pair.
    async with Lock(root / "a.lock") as fh:
        await fh.write("held\n")
    async with Lock(root / "w.lock", "w"):
        pass
    holder = Lock(root / "c.lock")
    await holder.acquire()
    waiter = asyncio.ensure_future(Lock(root / "c.lock", timeout=5).acquire())
    await asyncio.sleep(0.05)
    await holder.release()
    await (await waiter).close()
    async with aiofiles.open(root / "plain.lock", "a") as fh:
        await lock(fh, LOCK_EX)
        await unlock(fh)
    # Atomic writes, new and replacing.
    async with open_atomic(root / "atomic.bin") as out:
        await out.write(b"x")
    async with open_atomic(root / "atomic.bin", overwrite=True) as out:
        await out.write(b"y")
    # Temp files.
    async with TempFileManager(prefix="tour") as manager:
        path = await manager.create_path(suffix=".txt")
        await manager.remove_path(path)
        await manager.clean_userdir()
    # The work queue.
    store = FileStore(root / "spool")
    await store.prepare()
    await store.deliver(b"job")
    async for msg in store.consume(recover_interval=60):
        await msg.read()
        await msg.done()
        break
    await store.deliver(b"again")
    async for msg in store.consume(recover_interval=60):
        await msg.release()
        break
    await store.recover()
    await store.list("new")
    await store.aclose()
    # Checkpoints.
    storage = await SessionStorage.create(root / "sessions")
    await storage.save_checkpoint(b"state")
    await storage.load_checkpoint()
    await storage.remove()
    # The cache: a copy, a read while cached, and close.
    async with FileCache(root / "cache") as cache:
        for _ in range(2):
            async with cache.open(root / "source.bin") as f:
                await f.read(0, 10)
                async for _chunk in f.iter_bytes():
                    pass


(root / "source.bin").write_bytes(os.urandom(3 << 20))
os.environ["ATEMPSTORE_TEMPDIR"] = str(root / "temp")
print("loop-thread", threading.get_native_id(), flush=True)
asyncio.run(tour())
print("tour done", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.faults
def test_the_loop_thread_makes_no_syscall_on_users_files(tmp_path: Path) -> None:
    root = tmp_path / "tour"
    root.mkdir()
    log = tmp_path / "strace.log"
    options = ["-yy", "-e", "trace=%file,%desc", "-e", "signal=none"]
    result = run_traced(TOUR, (), str(root), options=options, log=log)
    assert result.returncode == 0, result.stderr
    assert "tour done" in result.stdout, result.stdout
    # Only calls from the tour on count (the script's own set-up writes
    # source.bin inline before it prints its tid).
    touched = [
        line
        for line in loop_thread_lines(result.stdout, log)
        if names_path_under(line, root) and "tour done" not in line
    ]
    assert touched == [], "\n".join(touched[:40])
