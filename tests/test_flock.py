"""The waiting thread's protocol (`atempstore._flock.Waiter`), tested directly.

`Waiter.run` is plain blocking code for a thread, so its rare branches (a
wait given up before the thread blocks, an error from ``flock``, a grant
that cannot be moved over yet, a task cancelled while the grant is being
committed) are driven here with real files, real locks and real threads.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from atempstore import _flock
from atempstore._locks import LOCK_EX, lock, unlock
from tests.conftest import REPO, lock_is_held, open_fds, require_tool


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _granted(waiter: _flock.Waiter) -> bool:
    return waiter.granted  # read anew each time (the thread sets it)


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def test_a_wait_given_up_before_the_thread_blocks_takes_nothing(tmp_path: Path) -> None:
    # The task gave up (timeout, cancellation) before the thread got to run:
    # the thread must not block on, let alone take, the lock, and it closes
    # its descriptor and leaves no ghost behind.
    path = tmp_path / "lock"
    fd = _open(path)
    dup, key = _flock.dup_with_key(fd)
    waiter = _flock.Waiter(dup, fcntl.LOCK_EX, key)
    assert waiter.abandon() is None  # still "waiting": the thread cleans up itself
    assert key in _flock._ghosts
    waiter.run()
    assert not waiter.granted
    assert waiter.error is None
    assert waiter.gone.is_set()
    assert key not in _flock._ghosts
    assert not _is_open(dup)
    assert not lock_is_held(path)
    os.close(fd)


def test_a_flock_error_ends_the_wait_with_the_error(tmp_path: Path) -> None:
    # flock on an O_PATH descriptor fails with EBADF: the error is the
    # waiter's outcome (its caller raises it), nothing is granted and both of
    # the thread's descriptors are closed.
    path = tmp_path / "lock"
    own = _open(path)
    target = os.open(path, os.O_PATH | os.O_CLOEXEC)
    waiter = _flock.Waiter(own, fcntl.LOCK_EX, _flock.file_key(own), target=target)
    waiter.run()
    assert waiter.error is not None
    assert waiter.error.errno == 9  # EBADF
    assert not waiter.granted
    assert not _is_open(own)
    assert not _is_open(target)
    assert not lock_is_held(path)


def test_a_grant_moves_over_only_once_the_callers_description_can_take_it(
    tmp_path: Path,
) -> None:
    # The thread got the lock on its own description, gave it up to take the
    # caller's with LOCK_NB, and found another holder there (who slipped in
    # between): it must wait again, not report a grant it does not have.
    # Two files stand for "the same file, someone else in between", so the
    # slip-in is certain rather than a race.
    own_path, target_path = tmp_path / "own", tmp_path / "target"
    own = _open(own_path)
    target = _open(target_path)
    holder = _open(target_path)
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiter = _flock.Waiter(own, fcntl.LOCK_EX, _flock.file_key(target), target=os.dup(target))
    thread = threading.Thread(target=waiter.run)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()  # waiting again, not granted
    assert not _granted(waiter)
    fcntl.flock(holder, fcntl.LOCK_UN)
    thread.join(10)
    assert not thread.is_alive()
    assert waiter.granted
    assert waiter.error is None
    assert lock_is_held(target_path)  # through the caller's description
    assert not lock_is_held(own_path)  # the thread's own gave it back
    fcntl.flock(target, fcntl.LOCK_UN)
    assert not lock_is_held(target_path)
    for fd in (target, holder):
        os.close(fd)


async def test_a_task_cancelled_while_the_grant_is_committed_waits_and_gives_it_back(
    tmp_path: Path,
) -> None:
    # The grant is being committed (the thread runs `then`, e.g. mode "w"'s
    # truncation) when the task is cancelled: the task must wait for the
    # thread to finish, then give the lock back, before the cancellation
    # propagates, so nothing is held once it has.
    path = tmp_path / "lock"
    fd = _open(path)
    entered, release = threading.Event(), threading.Event()

    def then(_: int) -> None:
        entered.set()
        release.wait(10)

    dup, key = _flock.dup_with_key(fd)
    waiter = _flock.Waiter(dup, fcntl.LOCK_EX, key, then=then)
    task = asyncio.ensure_future(_flock.await_grant_for(fd, waiter))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()  # waits for the commit rather than walking away
    assert lock_is_held(path)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert waiter.granted
    assert not lock_is_held(path)
    assert not _is_open(dup)
    os.close(fd)


async def test_lock_waits_for_a_write_only_file_without_read_permission(
    tmp_path: Path,
) -> None:
    # lock() waits on a new open file description of the caller's file
    # (/proc/self/fd).  A write-only file the process may not read (mode
    # 0200, no CAP_DAC_OVERRIDE) is reopened write-only: flock works on any
    # access mode, so the wait must still succeed.
    path = tmp_path / "w-only"
    path.write_text("")
    path.chmod(0o200)
    code = """
        import asyncio, fcntl, os, sys, threading
        from atempstore._locks import LOCK_EX, lock, unlock
        path = sys.argv[1]
        holder = os.open(path, os.O_WRONLY)
        fcntl.flock(holder, fcntl.LOCK_EX)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.open(path, os.O_RDONLY)
        except PermissionError:
            print("unreadable")
        async def main():
            asyncio.get_running_loop().call_later(0.1, fcntl.flock, holder, fcntl.LOCK_UN)
            await lock(fd, LOCK_EX)
            print("locked")
            await unlock(fd)
        asyncio.run(main())
    """
    result = _without_dac(code, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["unreadable", "locked"]


def _without_dac(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` as root without the capabilities that bypass file
    permissions (the bounding set is what an exec'd root process gets)."""
    setpriv = require_tool("setpriv")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    drop = "--bounding-set=-dac_override,-dac_read_search"
    return subprocess.run(
        [setpriv, drop, sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


async def test_lock_on_a_file_that_cannot_be_reopened_raises_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lock"
    fd = _open(path)
    holder = _open(path)
    fcntl.flock(holder, fcntl.LOCK_EX)
    before = open_fds()
    # The waiting thread's descriptor comes from /proc/self/fd/N; a file
    # whose every reopen is refused cannot be waited for: the error comes
    # out of lock() and the dup made for the thread is closed.
    real_open = os.open

    def refuse(path_: object, *args: object, **kwargs: object) -> int:
        if str(path_).startswith("/proc/self/fd/"):
            raise PermissionError(13, "Permission denied", path_)
        return real_open(path_, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError):
        await lock(fd, LOCK_EX)
    monkeypatch.undo()
    assert open_fds() == before
    fcntl.flock(holder, fcntl.LOCK_UN)
    await lock(fd, LOCK_EX)  # and the fd is still fine to lock
    await unlock(fd)
    for each in (fd, holder):
        os.close(each)
