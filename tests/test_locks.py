"""Locks: real flock contention between real processes and tasks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    lock,
    open_atomic,
    unlock,
)

from .conftest import lock_is_held, open_fds, run_python, spawn_python

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


async def wait_until(predicate: object, timeout: float = 2.0) -> bool:
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


@pytest.mark.multiprocess
async def test_handoff_is_event_driven_not_polled(tmp_path: Path) -> None:
    """With a 5 s check_interval a poller would wait seconds; we wake on release."""
    path = tmp_path / "handoff.lock"
    delays = []
    for _ in range(5):
        mine = Lock(path, timeout=30, check_interval=5.0)
        with held_elsewhere(path) as child:
            waiter = asyncio.create_task(mine.acquire())
            await asyncio.sleep(0.05)
            assert child.stdin is not None
            child.stdin.write("\n")
            child.stdin.flush()
            released = time.monotonic()
            await asyncio.wait_for(waiter, 10)
            delays.append(time.monotonic() - released)
        await mine.release()
    # The child's release includes its pipe read and loop wake-up, so allow slack; a
    # poller with a 5 s interval would be far above this.
    assert sorted(delays)[len(delays) // 2] < 0.5, delays


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
