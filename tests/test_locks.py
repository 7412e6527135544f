"""Locks: real flock contention between real processes and tasks."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import portalocker
import pytest

from atempstore import (
    LOCK_EX,
    LOCK_NB,
    LOCK_SH,
    AlreadyLocked,
    AtempstoreError,
    Lock,
    LockException,
    LockTimeout,
    _flock,
    lock,
    open_atomic,
    unlock,
)

from .cancelling import CancelPoint, cancel_points
from .conftest import (
    lock_is_held,
    names_path_under,
    open_fds,
    run_python,
    run_traced,
    spawn_python,
)

# A child that takes the lock, says so, and holds it until told to let go.
HOLDER = """
import asyncio, sys
from atempstore import Lock

async def main() -> None:
    async with Lock(sys.argv[1], timeout=30):
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


@contextlib.contextmanager
def held_elsewhere(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Hold the lock on ``path`` in another process for the duration of the block."""
    child = spawn_python(HOLDER, str(path))
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held", child.stderr
        yield child
    finally:
        release_child(child)


def release_child(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(timeout=30)
    for stream in (child.stdin, child.stdout, child.stderr):
        if stream is not None:
            stream.close()


def lock_is_free(path: Path) -> bool:
    return not lock_is_held(path)


async def wait_until(predicate: object, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]


# --- exclusion -----------------------------------------------------------------------------


@pytest.mark.multiprocess
async def test_two_processes_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    mine = Lock(path, timeout=10)
    with held_elsewhere(path) as child:
        with pytest.raises(AlreadyLocked):
            await Lock(path, fail_when_locked=True).acquire()
        waiter = asyncio.create_task(mine.acquire())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        release_child(child)
        fh = await asyncio.wait_for(waiter, 5)
        assert not fh.closed
        assert not lock_is_free(path)
        await Lock(path).release()  # an unrelated Lock object releases nothing
        assert not lock_is_free(path)
    await mine.release()
    assert lock_is_free(path)


async def test_two_tasks_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "job.lock"
    inside = 0
    peak = 0

    async def worker(shared: Lock[Any] | None) -> None:
        nonlocal inside, peak
        for _ in range(20):
            the_lock = shared if shared is not None else Lock(path, timeout=10)
            async with the_lock:
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0)
                inside -= 1

    await asyncio.gather(*(worker(None) for _ in range(5)))
    shared = Lock(path, timeout=10)
    await asyncio.gather(*(worker(shared) for _ in range(5)))
    assert peak == 1
    assert lock_is_free(path)


async def test_same_task_reacquire_returns_the_handle_and_release_twice_is_harmless(
    tmp_path: Path,
) -> None:
    the_lock = Lock(tmp_path / "a.lock")
    first = await the_lock.acquire()
    assert await the_lock.acquire() is first
    assert the_lock.held
    await the_lock.release()
    await the_lock.release()
    assert not bool(the_lock.held)  # (bool(): mypy narrowed .held above)
    assert first.closed
    assert lock_is_free(tmp_path / "a.lock")


WORKER = """
import asyncio, os, sys
from atempstore import Lock

async def main() -> None:
    path, log, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    pid = os.getpid()
    for i in range(n):
        async with Lock(path, timeout=120):
            os.write(fd, f"start {pid} {i}\\n".encode())
            if i % 7 == 0:
                await asyncio.sleep(0)
            os.write(fd, f"end {pid} {i}\\n".encode())
    os.close(fd)

asyncio.run(main())
"""


@pytest.mark.multiprocess
def test_processes_never_overlap(tmp_path: Path) -> None:
    """16 processes x 200 acquires: the shared log shows every hold alone."""
    path, log = tmp_path / "shared.lock", tmp_path / "log"
    log.touch()
    procs, rounds = 16, 200
    children = [spawn_python(WORKER, str(path), str(log), str(rounds)) for _ in range(procs)]
    for child in children:
        _, err = child.communicate(timeout=240)
        assert child.returncode == 0, err
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * procs * rounds
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start.startswith("start "), (start, end)
        assert end == "end " + start[len("start ") :], (start, end)


# --- event-driven handoff ---------------------------------------------------------------------


# A holder that stamps the monotonic clock (system-wide) right before it releases.
STAMPING_HOLDER = """
import asyncio, sys, time
from atempstore import Lock

async def main() -> None:
    async with Lock(sys.argv[1], timeout=30):
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        released = time.monotonic()
    print(released, flush=True)

asyncio.run(main())
"""


@pytest.mark.multiprocess
async def test_handoff_is_event_driven_not_polled(tmp_path: Path) -> None:
    """Holder in another process stamps just before its release, we stamp as our
    acquire returns: the median handoff must be far below any polling interval.

    A poller with the default 0.25 s interval has a median of ~125 ms, one with
    the 5 s asked for here seconds; event-driven is ~0.5 ms.  20 ms leaves a
    loaded 2-core machine 40x headroom and still fails a 50 ms poller."""
    path = tmp_path / "handoff.lock"
    delays = []
    for _ in range(7):
        mine = Lock(path, timeout=30, check_interval=5.0)
        child = spawn_python(STAMPING_HOLDER, str(path))
        try:
            assert child.stdout is not None
            assert child.stdin is not None
            assert child.stdout.readline().strip() == "held", child.stderr
            waiter = asyncio.create_task(mine.acquire())
            # Waiting for certain: the task is parked behind its blocked thread.
            assert await wait_until(lambda: _waiting_threads() == 1, timeout=10)
            child.stdin.write("\n")
            child.stdin.flush()
            await asyncio.wait_for(waiter, 10)
            acquired = time.monotonic()
            released = float(await asyncio.to_thread(child.stdout.readline))
            delays.append(acquired - released)
        finally:
            release_child(child)
        await mine.release()
    assert sorted(delays)[len(delays) // 2] < 0.020, delays


def _waiting_threads() -> int:
    return sum(t.name == "atempstore lock wait" for t in threading.enumerate())


async def test_waiting_tasks_use_one_thread_and_do_not_stall_file_work(tmp_path: Path) -> None:
    path = tmp_path / "busy.lock"
    holder = Lock(path)
    await holder.acquire()
    waiters = [asyncio.create_task(Lock(path, timeout=None).acquire()) for _ in range(100)]
    await asyncio.sleep(0.2)
    # 100 waiting tasks queue behind one blocked thread for this file.
    waiting_threads = [t for t in threading.enumerate() if t.name == "atempstore lock wait"]
    assert len(waiting_threads) == 1
    started = time.monotonic()
    async with open_atomic(tmp_path / "out.bin") as out:
        await out.write(b"x" * 4096)
    assert time.monotonic() - started < 2.0
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 4096
    await holder.release()
    # They all get it, one after another (each closes its handle, freeing the lock).
    for next_holder in asyncio.as_completed(waiters, timeout=20):
        fh = await next_holder
        await fh.close()
    assert await wait_until(lambda: lock_is_free(path))


# --- cancellation -----------------------------------------------------------------------------


async def test_random_cancellation_leaves_nothing(tmp_path: Path) -> None:
    """Cancel acquires at random moments: afterwards no lock is held and no fd is open."""
    path = tmp_path / "cancel.lock"
    path.touch()
    baseline = open_fds()
    rng = random.Random(1234)
    holder = Lock(path)
    for round_ in range(60):
        hold = round_ % 2 == 0
        if hold:
            await holder.acquire()
        tasks = [asyncio.create_task(Lock(path, timeout=5).acquire()) for _ in range(5)]
        await asyncio.sleep(rng.uniform(0, 0.003))
        if hold and rng.random() < 0.5:
            await holder.release()
        for task in tasks:
            await asyncio.sleep(rng.uniform(0, 0.0005))
            task.cancel()
        for task in tasks:
            try:
                fh = await task
            except asyncio.CancelledError:
                continue
            await fh.close()  # it won the race before the cancel
        await holder.release()
    # Abandoned waits give their fd back within a second of the lock being free.
    assert await wait_until(lambda: open_fds() == baseline, timeout=2.0), (open_fds(), baseline)
    assert lock_is_free(path)


async def test_cancel_while_granted_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "data.lock"
    path.write_text("holder's data\n")
    holder = Lock(path, mode="a")
    await holder.acquire()
    truncating = asyncio.create_task(Lock(path, mode="w", timeout=5).acquire())
    await asyncio.sleep(0.05)
    await holder.release()
    truncating.cancel()  # races with the grant
    with contextlib.suppress(asyncio.CancelledError):
        fh = await truncating
        # It won before the cancel landed: only then may it have truncated.
        assert path.read_text() == ""
        await fh.close()
        return
    assert path.read_text() == "holder's data\n"
    assert await wait_until(lambda: lock_is_free(path))


async def test_mode_w_truncates_only_once_locked(tmp_path: Path) -> None:
    path = tmp_path / "state.lock"
    async with Lock(path, mode="a") as fh:
        await fh.write("holder's data\n")
        await fh.flush()
        with pytest.raises(LockTimeout):
            await Lock(path, mode="w", timeout=0.2).acquire()
        assert path.read_text() == "holder's data\n"
    async with Lock(path, mode="w") as fh:
        assert path.read_text() == ""
        await fh.write("new\n")
    assert path.read_text() == "new\n"


async def test_written_data_is_visible_to_the_next_holder(tmp_path: Path) -> None:
    path = tmp_path / "counter"
    path.write_text("0")

    async def bump() -> None:
        async with Lock(path, mode="r+", timeout=10) as fh:
            value = int(await fh.read() or "0")
            await fh.seek(0)
            await fh.write(str(value + 1))

    await asyncio.gather(*(bump() for _ in range(30)))
    assert path.read_text() == "30"


# --- open/close of the same file --------------------------------------------------------------


@pytest.mark.multiprocess
async def test_unrelated_open_close_does_not_drop_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "keep.lock"
    async with Lock(path):
        with open(path) as other:
            other.read()
        os.close(os.open(path, os.O_RDONLY))
        probe = run_python(
            """
            import fcntl, os, sys
            fd = os.open(sys.argv[1], os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("free")
            except BlockingIOError:
                print("held")
            """,
            str(path),
        )
        assert probe.stdout.strip() == "held", probe.stderr


# --- fail_when_locked, timeout ----------------------------------------------------------------


async def test_fail_when_locked_and_timeout(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    async with Lock(path):
        started = time.monotonic()
        with pytest.raises(AlreadyLocked) as already:
            await Lock(path, timeout=10, fail_when_locked=True).acquire()
        assert time.monotonic() - started < 0.5
        assert isinstance(already.value, portalocker.AlreadyLocked)
        assert str(path) in str(already.value)

        started = time.monotonic()
        with pytest.raises(LockTimeout) as timed_out:
            await Lock(path, timeout=0.3).acquire()
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 2.0
        error = timed_out.value
        assert isinstance(error, TimeoutError)
        assert isinstance(error, portalocker.AlreadyLocked)
        assert isinstance(error, AtempstoreError)
        assert error.timeout == 0.3
        assert error.path == str(path)
        # per-call override
        with pytest.raises(AlreadyLocked):
            await Lock(path).acquire(fail_when_locked=True)
    assert lock_is_free(path)


async def test_a_given_up_wait_never_holds_the_lock_after_release(tmp_path: Path) -> None:
    # A timed-out (or cancelled) acquire leaves a thread blocked in flock: it
    # takes the lock for a moment when the holder lets go, then drops it.
    # Once release() or unlock() has returned in this process, that moment
    # is over; without the wait the loop would keep the GIL from that thread
    # and the probe below would find the lock taken.
    path = tmp_path / "g.lock"
    for round_ in range(20):
        holder = Lock(path)
        handle = await holder.acquire()
        with pytest.raises(LockTimeout):
            await Lock(path, timeout=0.01).acquire()
        if round_ % 2:
            await unlock(handle)  # the function form waits them out too
        await holder.release()
        assert lock_is_free(path), f"round {round_}"


# --- lock() / unlock() ------------------------------------------------------------------------


async def test_lock_function_on_handles_files_and_fds(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.touch()
    with open(path) as first, open(path) as second:
        await lock(first, LOCK_SH)
        await lock(second.fileno(), LOCK_SH | LOCK_NB)  # shared locks coexist
        with pytest.raises(AlreadyLocked):
            await lock(second, LOCK_EX | LOCK_NB)  # conversion blocked by `first`
        await unlock(first)
        await unlock(second.fileno())
        assert lock_is_free(path)

        await lock(first, LOCK_EX | LOCK_NB)
        waiting = asyncio.create_task(lock(second, LOCK_EX))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await unlock(first)
        await asyncio.wait_for(waiting, 5)
        assert not lock_is_free(path)
        await unlock(second)
    assert lock_is_free(path)


async def test_cancelled_lock_function_takes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    path.touch()
    baseline = open_fds()
    with open(path) as first, open(path) as second:
        await lock(first, LOCK_EX)
        waiting = asyncio.create_task(lock(second, LOCK_EX))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await unlock(first)
        # The abandoned wait may grab the lock for an instant, then lets go.
        assert await wait_until(lambda: lock_is_free(path))
        assert await wait_until(lambda: open_fds() == baseline + 2)


# --- bad input --------------------------------------------------------------------------------


async def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "x.lock"
    with pytest.raises(FileNotFoundError) as not_found:
        await Lock(missing).acquire()
    assert str(missing) in str(not_found.value)
    assert not missing.parent.exists()

    with pytest.raises(IsADirectoryError) as is_dir:
        await Lock(tmp_path).acquire()
    assert str(tmp_path) in str(is_dir.value)

    fd = os.open(tmp_path / "closed", os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    with pytest.raises(LockException) as bad_fd:
        await lock(fd, LOCK_EX | LOCK_NB)
    assert f"fd {fd}" in str(bad_fd.value)

    with open(tmp_path / "closed") as closed:
        pass
    with pytest.raises(LockException) as closed_file:
        await lock(closed, LOCK_EX)
    assert "closed" in str(closed_file.value)
    assert str(tmp_path / "closed") in str(closed_file.value)

    with pytest.raises(ValueError, match="invalid lock flags"):
        await lock(0, LOCK_NB)
    with pytest.raises(ValueError, match="invalid lock file mode"):
        Lock(tmp_path / "x", mode="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed"]


# --- open_atomic ------------------------------------------------------------------------------


async def test_open_atomic_publishes_whole(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    async with open_atomic(target) as fh:
        await fh.write(b"a" * 100_000)
        assert not target.exists()  # nothing under the final name until the end
    assert target.read_bytes() == b"a" * 100_000
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    text = tmp_path / "out.txt"
    async with open_atomic(text, binary=False) as fh:
        await fh.write("héllo")
    assert text.read_text() == "héllo"


async def test_open_atomic_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        async with open_atomic(target) as fh:
            await fh.write(b"new")
    assert target.read_bytes() == b"old"

    late = tmp_path / "late"
    with pytest.raises(FileExistsError):
        async with open_atomic(late) as fh:
            await fh.write(b"mine")
            late.write_bytes(b"theirs")  # appears while we write
    assert late.read_bytes() == b"theirs"

    async with open_atomic(target, overwrite=True) as fh:
        await fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "out"]


async def test_open_atomic_body_error_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with open_atomic(target, overwrite=True) as fh:
            await fh.write(b"partial")
            raise Boom
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.multiprocess
def test_open_atomic_kill_9_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    child = spawn_python(
        """
        import asyncio, sys
        from atempstore import open_atomic

        async def main() -> None:
            async with open_atomic(sys.argv[1], overwrite=True) as fh:
                await fh.write(b"partial" * 1000)
                await fh.flush()
                print("writing", flush=True)
                await asyncio.sleep(60)

        asyncio.run(main())
        """,
        str(target),
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert target.read_bytes() == b"old"


# --- never blocks the loop --------------------------------------------------------------------


async def test_public_coroutines_do_no_path_io_on_the_loop(
    tmp_path: Path, no_blocking_io: list[str]
) -> None:
    path = tmp_path / "guarded.lock"
    the_lock = Lock(path, mode="w", timeout=5)
    async with the_lock as fh:
        await fh.write("x")
        other = asyncio.create_task(Lock(path, timeout=5).acquire())
        await asyncio.sleep(0.02)
    fh2 = await other
    await fh2.close()
    with pytest.raises(LockTimeout):
        async with Lock(path) as held:
            assert held
            await Lock(path, timeout=0.05).acquire()
    async with open_atomic(tmp_path / "a", overwrite=True) as out:
        await out.write(b"data")
    async with open_atomic(tmp_path / "b", binary=False) as out:
        await out.write("text")
    with open(path) as raw:  # opened by the test, outside the guard's scope
        await lock(raw, LOCK_EX | LOCK_NB)
        await unlock(raw)
    assert no_blocking_io == []


# --- lock() again on the same file after a given-up wait (issue 11) ---------------------------


async def _give_up(how: str, call: Awaitable[None]) -> None:
    if how == "move_on_after":
        with anyio.move_on_after(0.3) as scope:
            await call
        assert scope.cancelled_caught
    elif how == "wait_for":
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(call, 0.3)
    else:
        task = asyncio.ensure_future(call)
        assert await wait_until(lambda: _waiting_threads() >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _hold_the_gil(seconds: float) -> None:
    switch = sys.getswitchinterval()
    sys.setswitchinterval(seconds * 5)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
    finally:
        sys.setswitchinterval(switch)


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["move_on_after", "wait_for", "cancel"])
async def test_lock_again_after_a_given_up_wait_really_holds(tmp_path: Path, how: str) -> None:
    # The given-up wait's thread is still blocked in flock when the retry
    # starts.  Once the other process lets go, it takes the lock and gives it
    # back; that must never drop the lock the retry on the same fd acquired
    # (it did in 5 of 5 trials when the thread unlocked a dup of the fd).
    path = tmp_path / "retry.lock"
    with_ghost = 0
    for trial in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with held_elsewhere(path) as child:
                await _give_up(how, lock(fd, LOCK_EX))
                ghosts = sum(len(g) for g in _flock._ghosts.values())
                with_ghost += ghosts > 0
                retry = asyncio.ensure_future(lock(fd, LOCK_EX))
                # The retry's own thread waits too (a loaded machine may not
                # have started the given-up call's thread before the timeout).
                threads = 1 + ghosts
                assert await wait_until(lambda: _waiting_threads() >= threads, timeout=10)  # noqa: B023 - awaited here, in this iteration
                release_child(child)
                # Keep the GIL from the waiting threads for a moment: the kernel
                # wakes both and grants whatever it grants, and only then may
                # the given-up one run its unlock (the order that lost the
                # retry's lock every time).
                _hold_the_gil(0.2)
                await asyncio.wait_for(retry, 10)
            # The given-up thread has had its moment with the lock.
            assert await wait_until(lambda: not _flock._ghosts, timeout=5)
            assert lock_is_held(path), f"trial {trial}: lock() returned, the lock is gone"
            await unlock(fd)
            assert not lock_is_held(path)
        finally:
            os.close(fd)
    assert with_ghost, "no trial left a given-up thread behind: the test tested nothing"


async def test_a_given_up_lock_call_on_a_shared_lock_leaves_the_fd_unlocked(
    tmp_path: Path,
) -> None:
    # The waiting thread never touches the caller's description while it
    # waits: a given-up lock() takes nothing, even after the holder lets go.
    path = tmp_path / "sh.lock"
    path.touch()
    baseline = open_fds()
    with open(path) as holder, open(path) as mine:
        await lock(holder, LOCK_EX)
        await _give_up("move_on_after", lock(mine, LOCK_SH))
        await unlock(holder)
        assert await wait_until(lambda: not _flock._ghosts)
        assert not lock_is_held(path)
        await lock(mine, LOCK_SH | LOCK_NB)  # and it can be locked again at once
        await unlock(mine)
    assert await wait_until(lambda: open_fds() == baseline)


# --- open_atomic: modes, owners, long names -----------------------------------------------


async def test_open_atomic_overwrite_keeps_the_targets_mode_and_owner(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"old")
    secret.chmod(0o600)
    async with open_atomic(secret, overwrite=True) as fh:
        await fh.write(b"new")
    assert secret.read_bytes() == b"new"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600  # was 0644 (umask default)

    shared = tmp_path / "shared"
    shared.write_bytes(b"old")
    shared.chmod(0o664)
    if os.geteuid() == 0:
        os.chown(shared, 4242, 4343)  # root may keep any owner
    before = shared.stat()
    async with open_atomic(shared, overwrite=True) as fh:
        await fh.write(b"new")
    after = shared.stat()
    assert stat.S_IMODE(after.st_mode) == 0o664
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # replaced, not rewritten in place


async def test_open_atomic_new_file_gets_0666_masked_by_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        async with open_atomic(tmp_path / "new") as fh:
            await fh.write(b"x")
        async with open_atomic(tmp_path / "new2", overwrite=True) as fh:
            await fh.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new2").stat().st_mode) == 0o640


@pytest.mark.parametrize("length", [245, 255])
@pytest.mark.parametrize("overwrite", [False, True])
async def test_open_atomic_takes_any_valid_name(
    tmp_path: Path, length: int, overwrite: bool
) -> None:
    # A 245-byte name failed with ENAMETOOLONG: the temp name added to it.
    target = tmp_path / ("é" * ((length - 1) // 2) + "x" * (1 + (length - 1) % 2))
    assert len(os.fsencode(target.name)) == length
    if overwrite:
        target.write_bytes(b"old")
    async with open_atomic(target, overwrite=overwrite) as fh:
        await fh.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# --- cancellation at every hop of every public coroutine -----------------------------------


class Boom(Exception):
    pass


@dataclass
class Scene:
    """One run's state for `cancel_points`: the files, what the call achieved."""

    path: Path
    baseline: int = 0
    fd: int = -1
    holder: int = -1  # another open file description holding the lock
    lock: Lock[Any] | None = None
    done: bool = False  # the call returned (lock() / acquire: the lock is ours)
    extra: dict[str, Any] = field(default_factory=dict)

    def release_holder(self) -> None:
        if self.holder >= 0:
            os.close(self.holder)  # closing the only fd of a description drops its lock
            self.holder = -1


HOLDER_DATA = "holder's data\n"


def _scene_factory(
    tmp_path: Path, *, fd: bool = False, contended: bool = False, data: bool = False
) -> Callable[[], Awaitable[Scene]]:
    async def prepare() -> Scene:
        for leftover in tmp_path.iterdir():
            leftover.unlink()
        scene = Scene(tmp_path / "scene.lock")
        scene.path.write_text(HOLDER_DATA if data else "")
        if fd:
            scene.fd = os.open(scene.path, os.O_RDWR)
        if contended:
            scene.holder = os.open(scene.path, os.O_RDONLY)
            fcntl.flock(scene.holder, fcntl.LOCK_EX)
            _holders.append(scene)
        scene.baseline = open_fds() - (1 if contended else 0)
        return scene

    return prepare


# The contended scenes' holder lets go the moment the waiting thread starts,
# so a run that is not cancelled completes (no sleep in between).
_holders: list[Scene] = []


@pytest.fixture
def release_holders_as_waits_start(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = _flock.Waiter.run

    def run(waiter: _flock.Waiter) -> None:
        while _holders:
            _holders.pop().release_holder()
        real_run(waiter)

    monkeypatch.setattr(_flock.Waiter, "run", run)


async def _lock_fd(scene: Scene) -> None:
    await lock(scene.fd, LOCK_EX)
    scene.done = True


async def _unlock_fd(scene: Scene) -> None:
    await unlock(scene.fd)


def _acquire(mode: str) -> Callable[[Scene], Awaitable[None]]:
    async def call(scene: Scene) -> None:
        scene.lock = Lock(scene.path, mode=mode, timeout=10)
        await scene.lock.acquire()
        scene.done = True
        # A cancellation that came as a truncating grant was committed is
        # deferred to the caller's next await: this one.
        await asyncio.sleep(0)

    return call


async def _release(scene: Scene) -> None:
    assert scene.lock is not None
    await scene.lock.release()


async def _release_written(scene: Scene) -> None:
    assert scene.lock is not None
    await scene.lock.release()


def _atomic(overwrite: bool, body_raises: bool) -> Callable[[Scene], Awaitable[None]]:
    async def call(scene: Scene) -> None:
        with contextlib.suppress(Boom):
            async with open_atomic(scene.path, overwrite=overwrite) as fh:
                await fh.write(b"new whole content")
                if body_raises:
                    raise Boom

    return call


async def _check_lock_state(scene: Scene, point: CancelPoint) -> None:
    scene.release_holder()
    # A cancelled acquire or lock() holds nothing; one that returned does.
    ours = scene.done or (scene.lock is not None and scene.lock.held)
    if scene.lock is not None:
        assert scene.lock.held == ours, point  # Lock.held tells the truth
    assert await wait_until(lambda: not _flock._ghosts), point
    assert lock_is_held(scene.path) == ours, point
    if scene.extra.get("truncates"):
        # Mode "w": truncated exactly when the acquire handed the lock over.
        expected = "" if ours else HOLDER_DATA
        assert scene.path.read_text() == expected, point
    if scene.lock is not None:
        await scene.lock.release()
    if scene.fd >= 0:
        await unlock(scene.fd)
        os.close(scene.fd)
        scene.fd = -1
    assert open_fds() == scene.baseline - (1 if scene.extra.get("own_fd") else 0), point


async def _check_atomic(scene: Scene, point: CancelPoint) -> None:
    names = sorted(p.name for p in scene.path.parent.iterdir())
    assert names == [scene.path.name], (point, names)  # no temp file left
    content = scene.path.read_text()
    if scene.extra.get("body_raises"):
        assert content == scene.extra["old"], point
    else:
        assert content in (scene.extra["old"], "new whole content"), point
    assert open_fds() == scene.baseline, point


def _with_extra(
    prepare: Callable[[], Awaitable[Scene]], **extra: Any
) -> Callable[[], Awaitable[Scene]]:
    async def wrapped() -> Scene:
        scene = await prepare()
        scene.extra.update(extra)
        if extra.get("acquired"):
            scene.lock = Lock(scene.path, timeout=10)
            fh = await scene.lock.acquire()
            if extra.get("written"):
                await fh.write("unflushed")
        if extra.get("locked_fd"):
            await lock(scene.fd, LOCK_EX)
        scene.extra.setdefault("old", scene.path.read_text())
        return scene

    return wrapped


CASES = [
    "lock",
    "lock-contended",
    "unlock",
    "acquire-a",
    "acquire-w",
    "acquire-a-contended",
    "acquire-w-contended",
    "release",
    "release-written",
    "open_atomic-new",
    "open_atomic-overwrite",
    "open_atomic-body-raises",
]


@pytest.mark.parametrize("case", CASES)
async def test_cancelling_each_public_coroutine_at_each_hop_leaves_nothing(
    tmp_path: Path, case: str, release_holders_as_waits_start: None
) -> None:
    """Cancel at each thread hop, before / during / after it: fds back to where
    they were, no temp file, no lock held unless the call returned, Lock.held
    truthful, mode "w" truncated only with the lock handed over, the target
    of open_atomic untouched or wholly published."""
    call: Callable[[Scene], Awaitable[object]]
    contended = case.endswith("-contended")
    if case.startswith("lock"):
        prepare = _with_extra(_scene_factory(tmp_path, fd=True, contended=contended), own_fd=True)
        call, check = _lock_fd, _check_lock_state
    elif case == "unlock":
        prepare = _with_extra(_scene_factory(tmp_path, fd=True), own_fd=True, locked_fd=True)
        call, check = _unlock_fd, _check_lock_state
    elif case.startswith("acquire"):
        mode = "w" if "-w" in case else "a"
        prepare = _with_extra(
            _scene_factory(tmp_path, contended=contended, data=True), truncates=mode == "w"
        )
        call, check = _acquire(mode), _check_lock_state
    elif case.startswith("release"):
        prepare = _with_extra(
            _scene_factory(tmp_path), acquired=True, written=case == "release-written"
        )
        call, check = _release, _check_lock_state
    else:
        overwrite = case != "open_atomic-new"
        raises = case == "open_atomic-body-raises"

        async def prepare_atomic() -> Scene:
            for leftover in tmp_path.iterdir():
                leftover.unlink()
            scene = Scene(tmp_path / "target")
            if overwrite:
                scene.path.write_text("old content")
            scene.extra.update(old="old content" if overwrite else "", body_raises=raises)
            scene.baseline = open_fds()
            return scene

        async def check_atomic(scene: Scene, point: CancelPoint) -> None:
            if not scene.path.exists():
                scene.path.write_text("")  # not published: nothing under the name
            await _check_atomic(scene, point)

        prepare, call, check = prepare_atomic, _atomic(overwrite, raises), check_atomic
    scenes: list[Scene] = []

    async def prepare_and_keep() -> Scene:
        scenes.append(await prepare())
        return scenes[-1]

    points = await cancel_points(prepare_and_keep, call, check)
    assert points, "the call made no thread hop"
    assert _holders == []
    # The run that was not cancelled is the test's to clean up.
    last = scenes[-1]
    last.release_holder()
    if last.lock is not None:
        await last.lock.release()
    if last.fd >= 0:
        os.close(last.fd)


# --- never an fd syscall on the loop thread (strace) -----------------------------------------

TOUR = r"""
import asyncio, contextlib, os, sys, threading
import anyio
from atempstore import LOCK_EX, LOCK_NB, LOCK_SH, AlreadyLocked, Lock, LockTimeout
from atempstore import lock, open_atomic, unlock

root = sys.argv[1]
print(threading.get_native_id(), flush=True)

async def tour() -> None:
    path = os.path.join(root, "tour.lock")
    async with Lock(path, mode="w") as fh:            # uncontended, truncating
        await fh.write("x")
        waiter = asyncio.create_task(Lock(path, mode="w", timeout=5).acquire())
        with contextlib.suppress(LockTimeout):
            await Lock(path, timeout=0.05).acquire()   # times out: a ghost
        with contextlib.suppress(AlreadyLocked):
            await Lock(path, fail_when_locked=True).acquire()
        cancelled = asyncio.create_task(Lock(path, timeout=5).acquire())
        await asyncio.sleep(0.02)
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
    second = await waiter                               # contended, truncating
    await second.close()
    other = Lock(path, mode="a")
    await other.acquire()
    await other.release()                               # release without writes
    await other.release()
    # lock()/unlock() on a file the tour opened in a thread
    fd = await asyncio.to_thread(os.open, path, os.O_RDWR)
    fd2 = await asyncio.to_thread(os.open, path, os.O_RDWR)
    await lock(fd, LOCK_EX | LOCK_NB)
    with anyio.move_on_after(0.05):
        await lock(fd2, LOCK_EX)                        # gives up: a ghost
    retry = asyncio.create_task(lock(fd2, LOCK_EX))
    await asyncio.sleep(0.02)
    await unlock(fd)
    await retry
    await unlock(fd2)
    await lock(fd, LOCK_SH)
    await unlock(fd)
    await asyncio.to_thread(os.close, fd)
    await asyncio.to_thread(os.close, fd2)
    # open_atomic: new, replacing, body raising, cancelled
    target = os.path.join(root, "atomic.bin")
    async with open_atomic(target) as out:
        await out.write(b"x")
    async with open_atomic(target, overwrite=True) as out:
        await out.write(b"y")
    with contextlib.suppress(ValueError):
        async with open_atomic(target, overwrite=True) as out:
            raise ValueError
    await asyncio.sleep(0.1)  # ghosts finish: their work is on their threads too

asyncio.run(tour())
print("done", flush=True)
"""


@pytest.mark.faults
def test_the_loop_thread_makes_no_syscall_on_lock_files(tmp_path: Path) -> None:
    """strace -f -yy: no call of the loop thread names a file of the tour's
    directory (a path, or an fd that strace shows with its path)."""
    root = tmp_path / "tour"
    root.mkdir()
    log = tmp_path / "strace.log"
    options = ["-yy", "-e", "signal=none", "-e", "trace=desc,file"]
    done = run_traced(TOUR, (), str(root), options=options, log=log)
    assert done.returncode == 0, done.stderr
    loop_thread, status = done.stdout.split()
    assert status == "done"
    on_loop = []
    seen = set()
    for line in log.read_text().splitlines():
        thread, _, call = line.partition(" ")
        name = re.match(r"\s*(\w+)\(", call)
        if name is None or not names_path_under(call, root):
            continue
        seen.add(name.group(1))
        if thread == loop_thread:
            on_loop.append(call)
    assert on_loop == [], "\n".join(on_loop)
    # The tour did make these calls (in worker threads): the test sees them.
    assert {"flock", "ftruncate", "close"} <= seen, seen
