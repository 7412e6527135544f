"""Choosing the base directory and opening the per-user directory safely.

The base is the first candidate that can be created (every level 0700) and
that can hold a lock: ``$ATEMPSTORE_TEMPDIR``, ``~/.atempstore/tmp``,
``tempfile.gettempdir()``.  The per-user directory is checked on the opened
descriptor (``O_NOFOLLOW | O_DIRECTORY`` then ``fstat``), so a symlink or
directory planted by another user (the classic ``/tmp`` attack) is refused
rather than used.  Blocking functions: they run in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import stat
import tempfile

from .._durable import makedirs
from .._errors import NoUsableDirectoryError, UnsafeDirectoryError
from .._paths import open_dir_nofollow

__all__ = ("ENV_TEMPDIR", "choose_base", "describe_error", "lookup_username", "open_userdir")

#: Environment variable naming the first base directory to try.
ENV_TEMPDIR = "ATEMPSTORE_TEMPDIR"

_NEW_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def lookup_username() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        # Containers often run with an arbitrary uid that has no passwd entry.
        return str(uid)


def _probe_lock(base_fd: int) -> None:
    """Create a file in ``base_fd`` and ``flock`` it, then drop both.

    Catches the bases that look fine but cannot hold our locks: read-only or
    full filesystems, NFS mounts without lock support (ENOLCK).  An unnamed
    ``O_TMPFILE`` leaves nothing behind even if we are killed here.
    """
    named: str | None = None
    try:
        fd = os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=base_fd)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        named = f".atempstore-probe-{secrets.token_hex(8)}"
        fd = os.open(named, _NEW_FILE_FLAGS, 0o600, dir_fd=base_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        if named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(named, dir_fd=base_fd)


def _candidates() -> tuple[list[str], dict[str, str]]:
    """The base directories to try, in order, and those already known to fail."""
    paths: list[str] = []
    failures: dict[str, str] = {}
    configured = os.environ.get(ENV_TEMPDIR)
    if configured:
        paths.append(os.path.abspath(configured))
    home = os.path.expanduser("~")
    if home.startswith("~"):
        failures["~/.atempstore/tmp"] = (
            "the home directory is unknown (HOME unset, no passwd entry)"
        )
    else:
        paths.append(os.path.join(home, ".atempstore", "tmp"))
    try:
        paths.append(os.path.abspath(tempfile.gettempdir()))
    except OSError as exc:
        failures["the system temp directory"] = describe_error(exc)
    unique = list(dict.fromkeys(paths))
    return unique, failures


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {errno.errorcode.get(exc.errno or 0, exc.errno)})"
    return str(exc) or type(exc).__name__


def _try_base(path: str) -> str | None:
    """Create ``path`` (0700) and take a test lock in it; why it failed, or None."""
    try:
        makedirs(path)
    except OSError as exc:
        return f"cannot create it: {describe_error(exc)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open it as a directory: {describe_error(exc)}"
    try:
        _probe_lock(fd)
    except OSError as exc:
        return f"cannot take a test lock in it: {describe_error(exc)}"
    finally:
        os.close(fd)
    return None


def choose_base() -> str:
    paths, failures = _candidates()
    for path in paths:
        why = _try_base(path)
        if why is None:
            return path
        failures[path] = why
    listing = "; ".join(f"{where!r}: {why}" for where, why in failures.items())
    raise NoUsableDirectoryError(
        f"no usable base directory for temp files ({listing}). Set ${ENV_TEMPDIR} to a"
        " writable directory on a local filesystem that supports flock.",
        failures=failures,
    )


def _check_safe(fd: int, path: str) -> None:
    """Refuse an opened per-user directory that someone else could tamper with."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - O_DIRECTORY guarantees it
        raise UnsafeDirectoryError(f"{path!r} is not a directory; remove it", path=path)
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafeDirectoryError(
            f"{path!r} belongs to uid {st.st_uid}, not to you (uid {euid}): another user"
            f" may have planted it. Remove it, or set ${ENV_TEMPDIR} to a directory of yours.",
            path=path,
        )
    if st.st_mode & 0o022:
        raise UnsafeDirectoryError(
            f"{path!r} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}),"
            f" so they could plant files in it. Run 'chmod go-w {path}'.",
            path=path,
        )


def open_userdir(base: str, name: str, *, create: bool) -> int | None:
    """Open (creating it 0700 if asked) and vet ``base/name``; None if absent."""
    path = os.path.join(base, name)
    base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=base_fd)
        try:
            fd = open_dir_nofollow(name, dir_fd=base_fd)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=base_fd)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise UnsafeDirectoryError(
                f"{path!r} is {what}; atempstore only uses a real directory of yours there."
                " Remove it (it may have been planted by another user).",
                path=path,
            ) from exc
    finally:
        os.close(base_fd)
    try:
        _check_safe(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd
