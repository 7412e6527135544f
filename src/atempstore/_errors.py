"""The exception hierarchy: one root, and each class also the builtin a user catches.

``except AtempstoreError`` catches everything the library raises on purpose;
``except OSError`` / ``ValueError`` / ``PermissionError`` / ``TimeoutError``
keep working for code that does not know about atempstore, and the lock errors
are also portalocker's own classes, so code written against portalocker keeps
catching them.  Each exception carries its context as read-only properties and
survives pickling (it may cross a ``multiprocessing`` boundary).
"""

from __future__ import annotations

import os

import portalocker.exceptions as _pl

__all__ = (
    "AlreadyLocked",
    "AtempstoreError",
    "InvalidNameError",
    "LockException",
    "LockTimeout",
    "LockedStorageError",
    "NoUsableDirectoryError",
    "PathOutsideStoreError",
    "SourceChangedError",
    "UnsafeDirectoryError",
)


def _fspath(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


class AtempstoreError(Exception):
    """Root of every error atempstore raises on purpose.

    Example:
        ```python
        try:
            await store.claim("../etc")
        except AtempstoreError as exc:
            print("atempstore refused:", exc)
        ```
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        path = _fspath(path)
        if path is not None and path not in message:
            message = f"{message} ({path!r})"  # the message always names the path
        # Cooperative: the next class in the MRO is the builtin (OSError,
        # ValueError...) or portalocker's exception, which each want the message.
        super().__init__(message)
        self._path = path

    @property
    def path(self) -> str | None:
        """The file or directory the error is about, if there is one."""
        return self._path


class _PathOSError(AtempstoreError, OSError):
    """Our `OSError`s: ``filename`` is the path, as the builtin errors have it."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message, path=path)
        # Code that logs ``exc.filename`` of any OSError gets ours too.
        self.filename = self.path

    def __str__(self) -> str:
        # OSError's own __str__ would print "[Errno None] None: 'path'" once
        # ``filename`` is set; the message already names the path.
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[object, ...]:
        # OSError pickles (errno, strerror, filename) once filename is set,
        # which our constructors do not take: rebuild from the message and
        # the read-only context instead.
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


def _rebuild(cls: type[_PathOSError], message: str, state: dict[str, object]) -> _PathOSError:
    error = cls.__new__(cls)
    error.args = (message,)
    error.__dict__.update(state)
    error.filename = error.path
    return error


class LockException(AtempstoreError, _pl.LockException):
    """Taking or releasing a lock failed (also ``portalocker.LockException``).

    Example:
        ```python
        try:
            await lock(fh, LOCK_EX)
        except LockException as exc:
            print(exc.path)
        ```
    """


class AlreadyLocked(LockException, _pl.AlreadyLocked):
    """The lock is held elsewhere and the caller asked not to wait.

    Also ``portalocker.AlreadyLocked``.

    Example:
        ```python
        try:
            await Lock("job.lock", fail_when_locked=True).acquire()
        except AlreadyLocked:
            print("another worker is on it")
        ```
    """


class LockTimeout(AlreadyLocked, TimeoutError):
    """The lock stayed held elsewhere for longer than the timeout.

    An `AlreadyLocked` (so also portalocker's) and a `TimeoutError`.

    Example:
        ```python
        try:
            async with Lock("job.lock", timeout=0.5):
                ...
        except LockTimeout as exc:
            print(f"gave up after {exc.timeout} s on {exc.path}")
        ```
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self._timeout = timeout

    @property
    def timeout(self) -> float | None:
        """How many seconds were waited before giving up."""
        return self._timeout


class LockedStorageError(_PathOSError):
    """A checkpoint save is in progress elsewhere, or a crash left its ``next`` file.

    An `OSError`.  Remedy: retry later, or call `SessionStorage.break_lock`
    when you know the other writer is gone.

    Example:
        ```python
        try:
            await storage.save_checkpoint(b"state")
        except LockedStorageError:
            await storage.break_lock()
        ```
    """


class PathOutsideStoreError(AtempstoreError, ValueError):
    """A path given to the library resolves outside the directory it is confined to.

    A `ValueError`.  Nothing was touched.

    Example:
        ```python
        try:
            await manager.remove_path("/etc/passwd")
        except PathOutsideStoreError as exc:
            print("refused:", exc.path)
        ```
    """


class InvalidNameError(AtempstoreError, ValueError):
    """A name that must be a single, plain file name is not one.

    A `ValueError`; `name` is the offending value.

    Example:
        ```python
        try:
            await store.remove("../x", "new")
        except InvalidNameError as exc:
            print("bad name:", exc.name)
        ```
    """

    def __init__(self, message: str, *, name: object = None) -> None:
        super().__init__(message)
        self._name = name

    @property
    def name(self) -> object:
        """The rejected name, as it was given."""
        return self._name


class UnsafeDirectoryError(_PathOSError, PermissionError):
    """A directory is a symlink, not a directory, someone else's, or writable by others.

    A `PermissionError`.  atempstore refuses to use it rather than falling back,
    because a planted directory is an attack, not an accident.

    Example:
        ```python
        try:
            async with TempFileManager() as manager:
                ...
        except UnsafeDirectoryError as exc:
            print("fix the permissions of", exc.path)
        ```
    """


class NoUsableDirectoryError(_PathOSError):
    """None of the candidate base directories could be created and locked.

    An `OSError`; `failures` maps every candidate to why it failed.

    Example:
        ```python
        try:
            await get_manager()
        except NoUsableDirectoryError as exc:
            for candidate, why in exc.failures.items():
                print(candidate, why)
        ```
    """

    def __init__(self, message: str, *, failures: dict[str, str] | None = None) -> None:
        # ``path`` (and so ``filename``) is the first candidate, the one the
        # user's configuration asked for; the message names every candidate.
        super().__init__(message, path=next(iter(failures), None) if failures else None)
        self._failures = dict(failures or {})

    @property
    def failures(self) -> dict[str, str]:
        """Each candidate directory and the reason it was not usable."""
        return dict(self._failures)


class SourceChangedError(_PathOSError):
    """A cached file's source changed or vanished while it was being copied.

    An `OSError`.  Readers never get mixed bytes; reopen to read the new version.

    Example:
        ```python
        try:
            data = await reader.read(0, 4096)
        except SourceChangedError:
            ...  # reopen through the cache
        ```
    """
