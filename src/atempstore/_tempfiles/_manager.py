"""`TempFileManager` and `get_manager`: the async facade, one hop per operation."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
from anyio.abc import AsyncResource

from .._durable import makedirs
from .._paths import check_name
from .._threads import run_sync
from ._core import ManagerCore, Opened
from ._procdirs import DEFAULT_GRACE, CleanResult, check_affix, check_grace

__all__ = ("TempFileManager", "get_manager")


class TempFileManager(AsyncResource):
    """A temp directory owned by this process, cleaned up when it exits or dies.

    The constructor only records ``prefix``; the first coroutine (or
    ``async with``) chooses the base directory, creates and checks
    `userdir` = ``<base>/<prefix>_<user>``, creates `dir` under it and locks
    ``dir/.lock`` for the manager's life.  Base candidates, first that can be
    created (0700) and locked: ``$ATEMPSTORE_TEMPDIR``, ``~/.atempstore/tmp``,
    ``tempfile.gettempdir()``.

    `cleanup` (also `aclose` and leaving ``async with``) releases the lock and
    deletes `dir`; it runs at interpreter exit if never called.  Directories
    left by processes that died without it are removed by `clean_userdir` (or
    ``atempstore clean``), which decides liveness by the lock, never by pid.

    Raises `UnsafeDirectoryError` if `userdir` is a symlink, not a directory,
    someone else's, or writable by group/other; `NoUsableDirectoryError` if no
    base works.

    Example:
        ```python
        async with TempFileManager(prefix="myapp") as manager:
            path = await manager.create_path(suffix=".json")
            async with aiofiles.open(path, "w") as fh:
                await fh.write("{}")
            await manager.remove_path(path)
        ```
    """

    def __init__(self, prefix: str = "atempstore") -> None:
        # String checks only: the constructor never touches the disk.
        self._core = ManagerCore(check_name(prefix))

    def __repr__(self) -> str:
        core = self._core
        if core.closed:
            state = "closed"
        elif core.opened is None:
            state = "not started"
        else:
            state = repr(core.opened.dir)
        return f"<TempFileManager prefix={core.prefix!r} {state}>"

    @property
    def prefix(self) -> str:
        """The prefix given to the constructor.

        Example:
            ```python
            assert TempFileManager(prefix="myapp").prefix == "myapp"
            ```
        """
        return self._core.prefix

    @property
    def userdir(self) -> Path:
        """``<base>/<prefix>_<user>``: the directory shared by this user's processes.

        Available once the manager is started (``async with`` or any coroutine).

        Example:
            ```python
            async with TempFileManager() as manager:
                assert manager.dir.parent == manager.userdir
            ```
        """
        return Path(self._started().userdir)

    @property
    def dir(self) -> Path:
        """This process's own directory, under `userdir`.

        Available once the manager is started (``async with`` or any coroutine).

        Example:
            ```python
            async with TempFileManager() as manager:
                print(manager.dir)  # e.g. /tmp/atempstore_alice/4242-9f86d081884c7d65
            ```
        """
        return Path(self._started().dir)

    def tmpdir(self) -> Path:
        """The base directory that was chosen (the first candidate that worked).

        Available once the manager is started (``async with`` or any coroutine).

        Example:
            ```python
            async with TempFileManager() as manager:
                assert manager.userdir.parent == manager.tmpdir()
            ```
        """
        return Path(self._started().base)

    def username(self) -> str:
        """The name of the OS user running this process (its effective uid).

        Looked up in the user database once (when the manager starts, in a
        worker thread) and remembered; a uid with no entry is used as a number.

        Example:
            ```python
            async with TempFileManager(prefix="myapp") as manager:
                assert manager.userdir.name == f"myapp_{manager.username()}"
            ```
        """
        return self._core.username()

    def pid(self) -> str:
        """This process's id, as a string (part of `dir`'s name).

        Example:
            ```python
            async with TempFileManager() as manager:
                assert manager.dir.name.startswith(manager.pid())
            ```
        """
        return str(os.getpid())

    def _started(self) -> Opened:
        return self._core.started()

    async def __aenter__(self) -> TempFileManager:
        was_started = self._core.opened is not None
        try:
            await run_sync(self._core.ensure_started)
        except BaseException:
            if not was_started and self._core.opened is not None:
                # Cancelled while the worker finished starting: nobody will
                # reach __aexit__, so do not leave the directory to atexit.
                with anyio.CancelScope(shield=True):
                    await run_sync(self._core.close)
            raise
        return self

    # -- public coroutines --------------------------------------------------

    async def gettempdir(self) -> Path:
        """This process's directory (`dir`), starting the manager if needed.

        Example:
            ```python
            manager = await get_manager()
            scratch = await manager.gettempdir()
            ```
        """
        return Path((await run_sync(self._core.ensure_started)).dir)

    async def create_path(
        self,
        prefix: str = "",
        suffix: str = "",
        folder: bool = False,
        text: bool = False,
        mode: str = "r+",
    ) -> Path:
        """Create a new, uniquely named empty file (mode 0600) or, with ``folder``,
        directory (0700) in `dir`, and return its path.

        ``prefix`` and ``suffix`` become part of the name and must not contain a
        path separator.  ``text`` and ``mode`` are accepted for compatibility
        with OMERO: the file is created empty and closed; open it yourself.

        Example:
            ```python
            path = await manager.create_path(prefix="upload-", suffix=".bin")
            async with aiofiles.open(path, "wb") as fh:
                await fh.write(data)
            workdir = await manager.create_path(folder=True)
            ```
        """
        del text, mode  # meaningful to OMERO's open-then-close only
        check_affix("prefix", prefix)
        check_affix("suffix", suffix)
        return await run_sync(
            self._core.create_path, prefix, suffix, folder, undo=self._core.discard_created
        )

    async def remove_path(self, name: str | os.PathLike[str]) -> None:
        """Delete a file or folder inside `dir` (relative paths are taken from `dir`).

        The path must lie strictly inside `dir` once ``..`` and symlinks in its
        parent directories are resolved as the kernel would (``a/link/..`` is
        the parent of the link's target); otherwise `PathOutsideStoreError` is
        raised and nothing is touched.  A symlink named last is removed as a
        link, and a folder is removed without following links inside it, so
        nothing outside `dir` is ever deleted.  ``.lock`` is refused
        (`InvalidNameError`): it is what keeps `dir` alive.

        Example:
            ```python
            path = await manager.create_path(suffix=".tmp")
            await manager.remove_path(path)
            await manager.remove_path("results")  # a folder in manager.dir
            ```
        """
        await run_sync(self._core.remove_path, os.fspath(name))

    async def clean_tempdir(self) -> None:
        """Empty `dir` (everything but its ``.lock``); the manager stays usable.

        OMERO's ``clean_tempdir`` deleted the directory itself; here that is
        `cleanup`'s job, and this one is for reusing a long-lived manager.

        Example:
            ```python
            await manager.clean_tempdir()
            assert [p.name for p in manager.dir.iterdir()] == [".lock"]
            ```
        """
        await run_sync(self._core.clean_tempdir)

    async def clean_userdir(self, grace: float = DEFAULT_GRACE) -> CleanResult:
        """Delete the directories that dead processes left in `userdir`.

        A directory whose ``.lock`` exists but is not held is removed, whatever
        its age: its process is gone (the kernel released the lock when it
        died).  One whose lock is held is skipped.  One with no ``.lock`` yet
        is spared while younger than ``grace`` seconds (by its mtime: a process
        still setting up) and removed when older.  Liveness is never judged by
        pid.  This manager's own `dir` is left out of the result.

        Example:
            ```python
            async with TempFileManager() as manager:
                result = await manager.clean_userdir()
                print("removed", result.removed, "still alive", result.skipped)
            ```
        """
        check_grace(grace)
        verdicts = await run_sync(self._core.clean_userdir, grace)
        return CleanResult(
            removed=[v.path for v in verdicts if v.removed],
            skipped=[v.path for v in verdicts if not v.removed],
        )

    async def cleanup(self) -> None:
        """Release the lock, then delete `dir` and everything in it.

        Idempotent, and run automatically at interpreter exit if never called
        (not in a forked child, which must not delete its parent's directory).
        After it, the manager cannot be used again.

        Example:
            ```python
            manager = TempFileManager()
            try:
                path = await manager.create_path()
            finally:
                await manager.cleanup()
            ```
        """
        await run_sync(self._core.close)

    async def aclose(self) -> None:
        """The same as `cleanup`: the name every async resource has.

        Example:
            ```python
            manager = TempFileManager()
            await manager.gettempdir()
            await manager.aclose()
            ```
        """
        await self.cleanup()

    async def access(self, dir: str | os.PathLike[str]) -> bool:
        """Whether this process may create files in directory ``dir``.

        Example:
            ```python
            if not await manager.access("/srv/spool"):
                raise SystemExit("cannot write to /srv/spool")
            ```
        """
        return await run_sync(os.access, os.fspath(dir), os.W_OK | os.X_OK, abandon_on_cancel=True)

    async def create(self, dir: str | os.PathLike[str]) -> bool:
        """Create directory ``dir`` and any missing parents, each with mode 0700.

        Returns True if it was created, False if it already existed.

        Example:
            ```python
            created = await manager.create("/srv/myapp/scratch")
            ```
        """
        return await run_sync(makedirs, os.fspath(dir))

    # Used by get_manager: started, not cleaned up, and ours (not inherited via fork).


# --------------------------------------------------------------------------
# The process-wide default

_default: TempFileManager | None = None
_default_mutex = threading.Lock()


def _reinit_after_fork() -> None:
    # A lock held by another thread at fork() time stays held forever in the child.
    global _default_mutex
    _default_mutex = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)


def _default_manager() -> TempFileManager:
    global _default
    with _default_mutex:
        manager = _default
        if manager is None or not manager._core.usable_here():
            manager = TempFileManager()
            manager._core.ensure_started()
            _default = manager
        return manager


async def get_manager() -> TempFileManager:
    """The process-wide default `TempFileManager` (prefix ``"atempstore"``), started.

    Created on first use; once it has been cleaned up (or in a forked child),
    the next call makes a new one.  It is cleaned up at interpreter exit.

    Example:
        ```python
        manager = await get_manager()
        path = await manager.create_path(suffix=".csv")
        ```
    """
    manager = _default
    if manager is not None and manager._core.usable_here():
        return manager
    return await run_sync(_default_manager)
