"""Crash-safe checkpoints: the async counterpart of plainbox's ``session.storage``.

A storage is a directory holding one file, ``session``, with the last
checkpoint.  A save never touches ``session`` in place:

1. ``session.next`` is created exclusively (``O_CREAT | O_EXCL``): if it is
   already there, another save is in progress or a crash interrupted one, and
   the save stops with `LockedStorageError` instead of racing it;
2. the whole checkpoint is written into it and fsynced;
3. it is renamed over ``session`` (atomic: a reader sees the old file or the
   new one, never a mix);
4. the directory is fsynced, so the new *name* survives a power cut too.

A crash (kill -9) at any point leaves ``session`` holding the previous or the
new checkpoint, whole; at worst it leaves ``session.next`` behind, which
`SessionStorage.break_lock` removes.  Any failure (ENOSPC, EIO...) raises the
error the kernel reported and removes the ``next`` file this save created.

plainbox logged a failed ``write`` and went on to rename, so the caller saw a
confusing ``FileNotFoundError`` from the rename, and it left ``session.next``
behind when ``fsync`` failed, locking every later save.  Neither happens here.

Each public coroutine is one worker-thread hop (`run_sync`); the write, fsync,
rename and directory fsync come from ``_durable``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from ._durable import fsync_dir, makedirs, open_dir, publish_replace, unlink_quietly, write_new_file
from ._errors import LockedStorageError
from ._paths import remove_at
from ._threads import run_sync

__all__ = ("SessionStorage", "SessionStorageRepository")

#: The file holding the last checkpoint, inside a storage directory.
SESSION_FILE = "session"
#: The file a save writes before renaming it over `SESSION_FILE`; its presence
#: is the lock.
NEXT_FILE = "session.next"
#: Every storage directory's name ends with this.
STORAGE_SUFFIX = ".session"

_TIME_FORMAT = "%Y-%m-%dT%H.%M.%S"
_NOT_SLUG = re.compile(r"[^a-z0-9-]")
_DIR_MODE = 0o700  # checkpoints are often private state (tokens, paths): owner only


def slug(text: str) -> str:
    """Lower-case ``text`` and replace every character outside ``[a-z0-9-]`` by ``-``.

    The result can never add a path component (no ``/``, no ``.``), so a
    prefix from a user cannot make `SessionStorage.create` write elsewhere.

    Example:
        ```python
        assert slug("My Job/../x") == "my-job----x"
        ```
    """
    return _NOT_SLUG.sub("-", text.lower())


def _missing_storage(location: Path) -> FileNotFoundError:
    return FileNotFoundError(
        errno.ENOENT,
        "no session storage here (removed, or never created): create one with"
        " SessionStorage.create() or pick one from SessionStorageRepository",
        os.fspath(location),
    )


class SessionStorage:
    """One directory holding a checkpoint that survives kill -9, ENOSPC and EIO.

    The constructor only records ``location`` (no I/O); use `create` for a new
    storage, or get existing ones from a `SessionStorageRepository`.

    Example:
        ```python
        storage = await SessionStorage.create("/var/cache/myjob")
        await storage.save_checkpoint(b'{"step": 1}')
        assert await storage.load_checkpoint() == b'{"step": 1}'
        ```
    """

    __slots__ = ("_location",)

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self._location = Path(location)

    @classmethod
    async def create(
        cls,
        base_dir: str | os.PathLike[str],
        prefix: str = "session-",
        *,
        clock: Callable[[], float] = time.time,
    ) -> SessionStorage:
        """Create a new, empty storage in a unique directory under ``base_dir``.

        The directory is named ``<slug(prefix)><UTC time>.session`` (time as
        ``%Y-%m-%dT%H.%M.%S``); when that name is taken, ``_(1)``, ``_(2)``...
        is inserted before ``.session``.  Each candidate is claimed with
        ``mkdir`` itself, so two processes creating storages in the same second
        never share one.  ``base_dir`` is created (mode 0700) if needed; the new
        directory is mode 0700 and its name is made durable (``base_dir`` is
        fsynced).

        Args:
            base_dir: the directory to create the storage in (often a
                `SessionStorageRepository`'s ``location``).
            prefix: the start of the directory name, passed through `slug`.
            clock: seconds since the epoch; replace it to make names
                deterministic in tests.

        Example:
            ```python
            storage = await SessionStorage.create(repo.location, prefix="Nightly Backup ")
            print(storage.id)  # nightly-backup-2024-05-01T12.00.00.session
            ```
        """
        stem = slug(prefix) + time.strftime(_TIME_FORMAT, time.gmtime(clock()))
        base = os.fspath(base_dir)
        location = await run_sync(_create, base, stem, undo=_uncreate)
        return cls(location)

    @property
    def id(self) -> str:
        """The storage's name: the last component of `location`.

        Example:
            ```python
            print(storage.id)  # session-2024-05-01T12.00.00.session
            ```
        """
        return self._location.name

    @property
    def location(self) -> Path:
        """The storage directory.

        Example:
            ```python
            print(storage.location)  # /home/me/.cache/atempstore/sessions/session-...session
            ```
        """
        return self._location

    @property
    def session_file(self) -> Path:
        """The file holding the last checkpoint (absent until the first save).

        Example:
            ```python
            print(storage.session_file.name)  # session
            ```
        """
        return self._location / SESSION_FILE

    async def save_checkpoint(self, data: bytes) -> None:
        """Replace the checkpoint with ``data``, durably and atomically.

        Writes ``session.next`` (created exclusively), fsyncs it, renames it
        over ``session`` and fsyncs the directory.  When this returns, the
        checkpoint is on disk; if it raises, ``session`` holds the previous
        checkpoint or (when only the final directory fsync or close failed)
        the new one, whole either way.

        A cancelled save is finished, not abandoned: a state change is never
        left half done.

        Raises:
            TypeError: ``data`` is not `bytes` (nothing is touched).
            LockedStorageError: ``session.next`` exists: another save is in
                progress, or a crash interrupted one.  Retry later, or call
                `break_lock` once you know no other process is saving.
            OSError: the error the kernel reported (``ENOSPC``, ``EIO``...).
                The ``next`` file this save created is removed.  After a
                failed fsync the data is never fsynced again: the kernel may
                have dropped the dirty pages and a second fsync would report
                success for data that is not on disk, so a retry writes the
                whole checkpoint afresh into a new ``next`` file.

        Example:
            ```python
            state = {"step": 42}
            await storage.save_checkpoint(json.dumps(state).encode())
            ```
        """
        if not isinstance(data, bytes):
            raise TypeError(
                f"checkpoint data must be bytes, not {type(data).__name__};"
                " encode it first (e.g. json.dumps(state).encode())"
            )
        await run_sync(_save, os.fspath(self._location), data)

    async def load_checkpoint(self) -> bytes:
        """Return the last saved checkpoint, or ``b""`` if nothing was saved yet.

        Raises:
            FileNotFoundError: the storage directory itself does not exist (it
                was removed, or the location is wrong), so a typo never
                silently restarts a job from scratch.

        Example:
            ```python
            data = await storage.load_checkpoint()
            state = json.loads(data) if data else {"step": 0}
            ```
        """
        return await run_sync(_load, self._location, abandon_on_cancel=True)

    async def break_lock(self) -> bool:
        """Remove a stale ``session.next``; return whether there was one.

        Only call this when no other task or process is saving into this
        storage (typically: the process that was saving died).  Breaking the
        lock of a save still in progress lets a second writer start, and the
        first writer's rename could then publish the second one's unfinished
        file.

        Raises:
            FileNotFoundError: the storage directory does not exist.

        Example:
            ```python
            try:
                await storage.save_checkpoint(data)
            except LockedStorageError:
                await storage.break_lock()  # we know the previous run crashed
                await storage.save_checkpoint(data)
            ```
        """
        return await run_sync(_break_lock, self._location)

    async def remove(self) -> None:
        """Delete the storage directory and everything in it.

        Symbolic links inside are removed as links, never followed; removing
        a storage that is already gone is not an error.

        Example:
            ```python
            await storage.save_checkpoint(b"final")
            await storage.remove()
            ```
        """
        await run_sync(_remove, self._location)

    def __repr__(self) -> str:
        return f"SessionStorage({os.fspath(self._location)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionStorage):
            return NotImplemented
        return self._location == other._location

    def __hash__(self) -> int:
        return hash(self._location)


class SessionStorageRepository:
    """A directory of `SessionStorage` directories (those named ``*.session``).

    The constructor only records ``location`` (default: `get_default_location`);
    the directory is not created until a storage is created in it.

    Example:
        ```python
        repo = SessionStorageRepository()
        storage = await repo.get_last_storage()
        if storage is None:
            storage = await SessionStorage.create(repo.location)
        ```
    """

    __slots__ = ("_location",)

    def __init__(self, location: str | os.PathLike[str] | None = None) -> None:
        self._location = Path(location) if location is not None else self.get_default_location()

    @staticmethod
    def get_default_location() -> Path:
        """Where storages live by default.

        ``$ATEMPSTORE_SESSION_REPOSITORY`` if set and not empty, else
        ``$XDG_CACHE_HOME/atempstore/sessions``, else
        ``~/.cache/atempstore/sessions``.  As the XDG base-directory
        specification says, an empty or relative ``$XDG_CACHE_HOME`` is ignored.
        Reads only the environment (and the password database when ``$HOME``
        is unset).

        Example:
            ```python
            os.environ["ATEMPSTORE_SESSION_REPOSITORY"] = "/srv/jobs/checkpoints"
            assert SessionStorageRepository.get_default_location() == Path("/srv/jobs/checkpoints")
            ```
        """
        explicit = os.environ.get("ATEMPSTORE_SESSION_REPOSITORY")
        if explicit:
            return Path(explicit).expanduser()
        cache = os.environ.get("XDG_CACHE_HOME")
        if not cache or not os.path.isabs(cache):
            cache = os.path.join(os.path.expanduser("~"), ".cache")
        return Path(cache, "atempstore", "sessions")

    @property
    def location(self) -> Path:
        """The repository directory.

        Example:
            ```python
            storage = await SessionStorage.create(repo.location, prefix="import-")
            ```
        """
        return self._location

    async def get_storage_list(self) -> list[SessionStorage]:
        """Every storage in the repository, youngest (most recently saved) first.

        A storage's age is the modification time of its ``session`` file, or of
        its directory when it was never saved.  Only non-hidden directories
        whose name ends in ``.session`` are listed (symbolic links are not
        followed).  A repository that does not exist yet has no storages, and
        a storage removed while the list is being made is skipped.

        Example:
            ```python
            for storage in await repo.get_storage_list():
                print(storage.id)
            ```
        """
        paths = await run_sync(_list_storages, self._location, abandon_on_cancel=True)
        return [SessionStorage(path) for path in paths]

    async def get_last_storage(self) -> SessionStorage | None:
        """The youngest storage, or ``None`` when there is none.

        Example:
            ```python
            storage = await repo.get_last_storage()
            data = await storage.load_checkpoint() if storage else b""
            ```
        """
        storages = await self.get_storage_list()
        return storages[0] if storages else None

    def __repr__(self) -> str:
        return f"SessionStorageRepository({os.fspath(self._location)!r})"


# --------------------------------------------------------------------------
# The blocking halves: each runs whole in one worker-thread hop.


def _uncreate(location: Path) -> None:
    """Undo a `_create` whose caller was cancelled: nobody knows the storage."""
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(location)
        fsync_dir(location.parent)


def _create(base_dir: str, stem: str) -> Path:
    makedirs(base_dir, _DIR_MODE)
    attempt = 0
    while True:
        # mkdir is the claim: it fails if the name exists, so two creators in
        # the same second each get their own directory (no check-then-create).
        name = f"{stem}{STORAGE_SUFFIX}" if attempt == 0 else f"{stem}_({attempt}){STORAGE_SUFFIX}"
        path = os.path.join(base_dir, name)
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            attempt += 1
            continue
        # Without this, a power cut could lose the new directory's entry even
        # after a checkpoint in it was saved "durably".
        fsync_dir(base_dir)
        return Path(path)


def _save(location: str, data: bytes) -> None:
    # Every step relative to one directory fd: no path walk per step (this is
    # the hot path of the library's most latency-bound call), and a storage
    # directory renamed mid-save cannot split the save across two directories.
    dir_fd = open_dir(location)
    try:
        try:
            # Exclusive create, write, fsync, close; on failure the file is
            # removed and the original error propagates.
            write_new_file(NEXT_FILE, data, dir_fd=dir_fd)
        except FileExistsError:
            next_path = os.path.join(location, NEXT_FILE)
            raise LockedStorageError(
                f"{next_path} exists: another save_checkpoint() is in progress, or a"
                " crash interrupted one. Retry later, or call break_lock() once you know no"
                " other process is saving into this storage.",
                path=next_path,
            ) from None
        try:
            publish_replace(NEXT_FILE, SESSION_FILE, dir_fd=dir_fd)
        except BaseException:
            # The next file is ours (it exists, so nobody else could have
            # created one); leaving it would lock every later save.  If that
            # fails too, the caller still needs the rename's error; the
            # leftover next file will then report itself as LockedStorageError.
            with contextlib.suppress(OSError):
                unlink_quietly(NEXT_FILE, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load(location: Path) -> bytes:
    try:
        with open(location / SESSION_FILE, "rb") as file:
            return file.read()
    except FileNotFoundError:
        if not location.is_dir():
            raise _missing_storage(location) from None
        return b""


def _break_lock(location: Path) -> bool:
    try:
        os.unlink(location / NEXT_FILE)
    except FileNotFoundError:
        if not location.is_dir():
            raise _missing_storage(location) from None
        return False
    # Otherwise a power cut could bring the stale lock back.
    fsync_dir(location)
    return True


def _remove(location: Path) -> None:
    parent, name = os.path.split(os.path.abspath(location))
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(parent_fd, name)
    except FileNotFoundError:
        pass  # already gone: removing is idempotent
    finally:
        os.close(parent_fd)


def _list_storages(location: Path) -> list[Path]:
    try:
        scan = os.scandir(location)
    except FileNotFoundError:
        return []
    found: list[tuple[int, str, Path]] = []
    with scan:
        for entry in scan:
            name = entry.name
            if name.startswith(".") or not name.endswith(STORAGE_SUFFIX):
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    saved = os.stat(os.path.join(entry.path, SESSION_FILE)).st_mtime_ns
                except FileNotFoundError:
                    # Never saved: its age is the directory's.
                    saved = os.lstat(entry.path).st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed (or replaced) while we were listing
            found.append((saved, name, Path(entry.path)))
    # Youngest first; the name (which embeds the creation time) breaks ties.
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [path for _, _, path in found]
