"""`lock`'s and `Lock`'s blocking core (`atempstore._lockcore`): arguments it
refuses, errors from ``flock`` other than "held elsewhere" (ENOLCK, as NFS
without lock support answers, injected with strace), and the undo paths."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from atempstore import _lockcore
from atempstore._errors import LockException
from atempstore._locks import LOCK_EX, lock
from tests.conftest import lock_is_held, run_traced


async def test_lock_refuses_a_negative_fd() -> None:
    with pytest.raises(ValueError, match="fd -1"):
        await lock(-1, LOCK_EX)


async def test_lock_refuses_what_is_not_a_file() -> None:
    with pytest.raises(TypeError, match="aiofiles handle, a file object or an fd"):
        await lock(object(), LOCK_EX)  # type: ignore[arg-type]


def test_lock_reports_enolck_as_a_lock_error_naming_the_file(tmp_path: Path) -> None:
    # The first flock of the worker thread (lock()'s try) answers ENOLCK: the
    # caller gets a LockException saying why, not AlreadyLocked, and nothing
    # is held.
    code = """
        import asyncio, sys
        from atempstore._errors import AlreadyLocked, LockException
        from atempstore._locks import LOCK_EX, lock
        async def main():
            with open(sys.argv[1], "a") as fh:
                try:
                    await lock(fh, LOCK_EX)
                except AlreadyLocked:
                    print("wrong: AlreadyLocked")
                except LockException as exc:
                    print(type(exc).__name__, "|", exc)
        asyncio.run(main())
    """
    path = tmp_path / "f"
    result = run_traced(code, ["flock:error=ENOLCK:when=1"], str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LockException |"), result.stdout
    assert "No locks available" in result.stdout
    assert str(path) in result.stdout
    assert not lock_is_held(path)


def test_lock_object_acquire_on_enolck_raises_and_closes_its_file(tmp_path: Path) -> None:
    # Lock.acquire's open-and-try hop meets ENOLCK: the error propagates and
    # the file it opened is closed (no fd left behind in the process).
    code = """
        import asyncio, os, sys
        from atempstore._locks import Lock
        async def main():
            before = len(os.listdir("/proc/self/fd"))
            try:
                await Lock(sys.argv[1], timeout=1).acquire()
            except OSError as exc:
                print("error", exc.errno)
            except Exception as exc:
                print("error", type(exc).__name__, exc)
            print("fds", len(os.listdir("/proc/self/fd")) - before)
        asyncio.run(main())
    """
    path = tmp_path / "f"
    result = run_traced(code, ["flock:error=ENOLCK:when=1"], str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] in ("error 37", "error LockException"), result.stdout
    assert lines[1] == "fds 0", result.stdout
    assert not lock_is_held(path)


def test_undoing_a_failed_try_leaves_the_fds_lock_alone(tmp_path: Path) -> None:
    # The cancelled call took nothing (its try failed): undoing it must not
    # unlock the description, which may hold a lock of the caller's own.
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _lockcore.undo_try_lock(BlockingIOError(11, "busy"), fd)
    assert lock_is_held(path)
    _lockcore.undo_try_lock(None, fd)  # it took the lock: given back
    assert not lock_is_held(path)
    os.close(fd)


def test_lock_error_names_the_reason() -> None:
    error = _lockcore.lock_error(OSError(37, os.strerror(37)), "'f'", "f")
    assert type(error) is LockException
    assert "No locks available" in str(error)
    assert error.path == "f"


def _kept(attempt: _lockcore.Acquisition) -> tuple[object, object]:
    return attempt.file, attempt.dup


def test_an_acquisition_discarded_twice_closes_once(tmp_path: Path) -> None:
    path = tmp_path / "f"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    attempt = _lockcore.Acquisition()
    attempt.open_and_try(str(path), "a", fcntl.LOCK_EX, False, False)
    assert not attempt.locked
    assert attempt.file is not None
    assert attempt.dup is not None
    fds = (attempt.file.fileno(), attempt.dup)
    attempt.discard()
    for fd in fds:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
    assert _kept(attempt) == (None, None)
    attempt.discard()  # nothing left to close: no error, no stray close
    os.close(holder)
