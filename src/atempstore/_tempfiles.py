"""Per-process temp directories that are cleaned up after dead processes, safely.

The async counterpart of OMERO's ``omero.util.temp_files.TempFileManager``.
Every process gets its own directory under a per-user directory::

    <base>/<prefix>_<user>/<pid>-<random>/.lock

and holds an exclusive ``flock`` on ``.lock`` for as long as it lives.  The
kernel drops that lock when the process dies, however it dies, so "is the
owner alive?" is answered by trying the lock, never by the pid: pids are
reused, and differ between containers sharing one base directory.

Who owns a process directory is decided by one atomic step: ``link``-ing an
already-locked file to the name ``.lock``.  A new process does it right after
``mkdir``; a cleaner that finds an old directory with no ``.lock`` (its
creator died before that step) does the same before deleting it.  ``link``
never replaces, so exactly one of them wins, and a ``.lock`` is locked from
the instant it has its name: a cleaner can never take the lock of a process
that is still starting, not even with ``grace=0``.

Everything that names a path runs in a worker thread, one hop per public
operation (see ``_threads``).  The per-user directory is checked on the
opened descriptor (``O_NOFOLLOW | O_DIRECTORY`` then ``fstat``), so a symlink
or directory planted by another user (the classic ``/tmp`` attack) is refused
rather than used.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import stat
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import AsyncResource

from ._durable import makedirs
from ._errors import InvalidNameError, NoUsableDirectoryError, UnsafeDirectoryError
from ._locks import try_lock_exclusive
from ._paths import check_name, confine, open_beneath, open_dir_nofollow, remove_at
from ._threads import run_sync

__all__ = ("CleanResult", "TempFileManager", "get_manager")

#: Environment variable naming the first base directory to try.
ENV_TEMPDIR = "ATEMPSTORE_TEMPDIR"
#: The lock file inside each process directory.
LOCK_NAME = ".lock"
#: Seconds a directory without a ``.lock`` is left alone (its process may be starting).
DEFAULT_GRACE = 60.0

_LOCK_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NEW_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Names tried before giving up on creating a process directory.  Only a
# cleaner running with grace=0 against this very directory can make an
# attempt fail, so running out means something is badly wrong.
_ATTEMPTS = 16


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CleanResult:
    """What `TempFileManager.clean_userdir` did: directories removed and skipped.

    ``skipped`` holds directories whose process is alive (their lock is held),
    young directories with no ``.lock`` yet (a process still starting), and
    anything that could not be removed; the manager's own directory is in
    neither list.

    Example:
        ```python
        result = await manager.clean_userdir()
        for path in result.removed:
            print("removed leftovers of a dead process:", path)
        print(len(result.skipped), "directories still in use")
        ```
    """

    removed: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Verdict:
    """One entry of the per-user directory and what the cleaner did with it."""

    path: Path
    removed: bool
    reason: str


# --------------------------------------------------------------------------
# Blocking helpers (run in a worker thread)


def _lookup_username() -> str:
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
        failures["the system temp directory"] = _why(exc)
    unique = list(dict.fromkeys(paths))
    return unique, failures


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {errno.errorcode.get(exc.errno or 0, exc.errno)})"
    return str(exc) or type(exc).__name__


def _try_base(path: str) -> str | None:
    """Create ``path`` (0700) and take a test lock in it; why it failed, or None."""
    try:
        makedirs(path)
    except OSError as exc:
        return f"cannot create it: {_why(exc)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open it as a directory: {_why(exc)}"
    try:
        _probe_lock(fd)
    except OSError as exc:
        return f"cannot take a test lock in it: {_why(exc)}"
    finally:
        os.close(fd)
    return None


def _choose_base() -> str:
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


def _open_userdir(base: str, name: str, *, create: bool) -> int | None:
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


def _open_lock(dir_fd: int) -> int | None:
    """Open an existing ``.lock`` (never following a link, never blocking on a FIFO)."""
    try:
        return os.open(LOCK_NAME, _LOCK_OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _claim(dir_fd: int) -> int | None:
    """Make ``.lock`` in ``dir_fd`` ours, already locked; None if it exists.

    The file is created and locked under a private name first and only then
    linked to ``.lock``: a ``.lock`` is never visible unlocked, and ``link``
    fails instead of replacing, so of two claimants exactly one wins.
    """
    tmp = f"{LOCK_NAME}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new inode: nobody else has it
        os.link(tmp, LOCK_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
    return fd


def _create_process_dir(userdir_fd: int, userdir: str) -> tuple[str, int]:
    """Create this process's directory and its held ``.lock``: (name, lock fd)."""
    for _ in range(_ATTEMPTS):
        # The pid tells a human whose directory it is; the 64 random bits keep
        # processes with the same pid (other hosts, other containers) apart.
        name = f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.mkdir(name, 0o700, dir_fd=userdir_fd)
        except FileExistsError:
            continue
        try:
            dir_fd = open_dir_nofollow(name, dir_fd=userdir_fd)
            try:
                lock_fd = _claim(dir_fd)
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            continue  # a cleaner (grace=0) removed it while we set it up
        except BaseException:
            with contextlib.suppress(OSError):
                _remove_tree(userdir_fd, name)
            raise
        if lock_fd is None:
            continue  # a cleaner claimed it first and is removing it
        return name, lock_fd
    raise OSError(
        errno.EAGAIN,
        f"could not create a process directory after {_ATTEMPTS} attempts: something keeps"
        " removing new directories (a cleaner running with grace=0?)",
        userdir,
    )


def _chmod_dir_nofollow(parent_fd: int, name: str) -> None:
    """Give the owner rwx on directory ``name`` without following a symlink.

    ``O_PATH | O_NOFOLLOW`` pins the entry itself; chmod through its
    ``/proc/self/fd`` link then reaches exactly that inode (this is how glibc
    implements ``fchmodat(AT_SYMLINK_NOFOLLOW)``, which Python < 3.13 lacks).
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode) | stat.S_IRWXU)
    finally:
        os.close(fd)


def _grant_owner_access(parent_fd: int, name: str) -> None:
    """Make the tree under directory ``name`` removable by its owner."""
    _chmod_dir_nofollow(parent_fd, name)
    fd = open_dir_nofollow(name, dir_fd=parent_fd)
    try:
        with os.scandir(fd) as entries:
            subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for sub in subdirs:
            with contextlib.suppress(FileNotFoundError):
                _grant_owner_access(fd, sub)
    finally:
        os.close(fd)


def _remove_tree(parent_fd: int, name: str) -> None:
    """Delete ``name`` in ``parent_fd`` (a file, a link as a link, or a whole tree).

    A file or link costs one ``unlink``; a directory goes to ``remove_at``,
    and if a read-only directory stops that, the tree is made writable (ours
    only, never through a link) and removed again.  Tools such as Go's module
    cache create read-only directories; a temp directory full of them must
    still be removable.
    """
    try:
        os.unlink(name, dir_fd=parent_fd)
        return
    except IsADirectoryError:
        pass
    except PermissionError:
        # POSIX's errno for unlinking a directory; also a read-only parent.
        if not stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode):
            raise
    try:
        remove_at(parent_fd, name)
    except PermissionError:
        _grant_owner_access(parent_fd, name)
        remove_at(parent_fd, name)


def _remove_own_dir(userdir_fd: int, name: str) -> None:
    """Remove the owner's directory after its lock was released.

    From that moment a cleaner may delete it concurrently; if the cleaner finds
    ``.lock`` already gone it claims the directory by linking a fresh one in,
    which makes our final ``rmdir`` fail with ENOTEMPTY.  Both sides only
    delete after that, and no process will ever start in this directory (its
    name is ours), so going again converges.  Only the owner may retry: a
    *cleaner* that retried could delete a directory that a starting process
    claimed between the cleaner's unlink of ``.lock`` and its ``rmdir``, so
    for a cleaner ENOTEMPTY means "someone else took it" and it stops.
    """
    for attempt in range(_ATTEMPTS):
        try:
            _remove_tree(userdir_fd, name)
        except FileNotFoundError:
            return  # a cleaner finished it
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or attempt == _ATTEMPTS - 1:
                raise
            time.sleep(0.001 * (attempt + 1))
        else:
            return


def _examine(userdir_fd: int, name: str, now: float, grace: float, dry_run: bool) -> _Verdict:
    """Decide about one entry of the per-user directory, and remove it if dead.

    The returned verdict's path is the bare ``name``; the caller anchors it.
    """
    st = os.lstat(name, dir_fd=userdir_fd)
    if not stat.S_ISDIR(st.st_mode):
        return _Verdict(Path(name), False, "not a directory: left alone")
    dir_fd = open_dir_nofollow(name, dir_fd=userdir_fd)
    lock_fd: int | None = None
    try:
        lock_fd = _open_lock(dir_fd)
        if lock_fd is None:
            age = now - os.fstat(dir_fd).st_mtime
            if age < grace:
                why = f"no {LOCK_NAME} yet, {age:.0f} s old: its process may be starting"
                return _Verdict(Path(name), False, why)
            reason = f"no {LOCK_NAME} after {age:.0f} s: its process died while starting"
            if dry_run:
                return _Verdict(Path(name), True, reason)
            lock_fd = _claim(dir_fd)
            if lock_fd is None:
                # Its process linked .lock just now, so it is (or was) alive:
                # the lock decides, as for any other directory.
                lock_fd = _open_lock(dir_fd)
                if lock_fd is None or not try_lock_exclusive(lock_fd):
                    return _Verdict(Path(name), False, "in use: its lock is held")
                reason = "its lock is not held: its process is gone"
        elif try_lock_exclusive(lock_fd):
            reason = "its lock is not held: its process is gone"
            if dry_run:
                return _Verdict(Path(name), True, reason)
        else:
            return _Verdict(Path(name), False, "in use: its lock is held")
        # We hold its lock while deleting, so a second cleaner skips it.  No
        # retry on ENOTEMPTY here: see _remove_own_dir.
        _remove_tree(userdir_fd, name)
        return _Verdict(Path(name), True, reason)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        os.close(dir_fd)


def _clean(
    userdir_fd: int, userdir: Path, own: str | None, grace: float, dry_run: bool
) -> list[_Verdict]:
    with os.scandir(userdir_fd) as entries:
        names = sorted(entry.name for entry in entries)
    now = time.time()
    verdicts: list[_Verdict] = []
    for name in names:
        if name == own:
            continue
        try:
            verdict = _examine(userdir_fd, name, now, grace, dry_run)
        except FileNotFoundError:
            continue  # removed meanwhile, by its owner or another cleaner
        except OSError as exc:
            # One stubborn entry must not stop the rest from being cleaned.
            verdict = _Verdict(Path(name), False, f"could not remove it: {_why(exc)}")
        verdicts.append(_Verdict(userdir / name, verdict.removed, verdict.reason))
    return verdicts


def _create_entry(dir_fd: int, prefix: str, suffix: str, folder: bool) -> str:
    """Create a new uniquely named empty file (0600) or directory (0700) in
    ``dir_fd``; returns its name.

    Like ``tempfile.mkstemp``/``mkdtemp`` (exclusive create, never through a
    planted link), but relative to the held directory fd: no path walk, and
    always the manager's own directory.
    """
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            if folder:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            else:
                os.close(os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd))
        except FileExistsError:
            continue  # 48 random bits: only a name planted on purpose gets here
        return name
    raise FileExistsError(errno.EEXIST, "no unused temporary name found", prefix + suffix)


def _userdir_name(prefix: str, username: str) -> str:
    return check_name(f"{prefix}_{username}")


def clean_for_command(
    prefix: str = "atempstore", *, grace: float = DEFAULT_GRACE, dry_run: bool = False
) -> tuple[Path | None, list[_Verdict]]:
    """What ``atempstore clean`` runs (no event loop): clean the per-user
    directory a manager with ``prefix`` would use, without creating one.

    Returns the per-user directory (None if it does not exist) and a verdict
    per entry.  ``dry_run`` decides but removes nothing.
    """
    _check_grace(grace)
    base = _choose_base()
    name = _userdir_name(prefix, _lookup_username())
    userdir_fd = _open_userdir(base, name, create=False)
    userdir = Path(base, name)
    if userdir_fd is None:
        return None, []
    try:
        return userdir, _clean(userdir_fd, userdir, None, grace, dry_run)
    finally:
        os.close(userdir_fd)


def _check_grace(grace: float) -> None:
    if not grace >= 0:  # also refuses NaN
        raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")


def _check_affix(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\0" in value or "/" in value or (os.altsep and os.altsep in value):
        raise InvalidNameError(
            f"invalid {what} {value!r}: it must not contain a path separator or a NUL byte",
            name=value,
        )
    return value


# --------------------------------------------------------------------------
# TempFileManager


@dataclass(frozen=True)
class _Opened:
    """What a started manager holds: its paths and its open descriptors."""

    base: str
    userdir: str
    dir: str
    real_dir: str  # dir with symlinks in the base resolved, as confine() sees it
    dir_name: str
    userdir_fd: int
    dir_fd: int
    lock_fd: int
    owner_pid: int


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
        self._prefix = check_name(prefix)
        self._username: str | None = None
        # Guards the fields below.  Operations run in worker threads and use
        # the descriptors, so cleanup waits until none is in flight before it
        # closes them (a closed fd number can be reused for another file).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._opened: _Opened | None = None
        self._busy = 0
        self._closed = False
        _managers.add(self)

    def __repr__(self) -> str:
        opened = self._opened
        if self._closed:
            state = "closed"
        elif opened is None:
            state = "not started"
        else:
            state = repr(opened.dir)
        return f"<TempFileManager prefix={self._prefix!r} {state}>"

    # -- plain (non-I/O) accessors ------------------------------------------

    @property
    def prefix(self) -> str:
        """The prefix given to the constructor.

        Example:
            ```python
            assert TempFileManager(prefix="myapp").prefix == "myapp"
            ```
        """
        return self._prefix

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
        if self._username is None:
            self._username = _lookup_username()
        return self._username

    def pid(self) -> str:
        """This process's id, as a string (part of `dir`'s name).

        Example:
            ```python
            async with TempFileManager() as manager:
                assert manager.dir.name.startswith(manager.pid())
            ```
        """
        return str(os.getpid())

    def _started(self) -> _Opened:
        opened = self._opened
        if opened is None:
            raise RuntimeError(
                "this TempFileManager has not started yet: use 'async with' or await one of"
                " its coroutines (for example gettempdir()) first"
            )
        return opened

    # -- lifecycle (blocking parts, in a worker thread) ---------------------

    def _start(self) -> _Opened:
        """Choose the base, vet userdir, create and lock dir (caller holds _cond)."""
        if self._closed:
            raise RuntimeError(
                f"{self!r} was cleaned up; create a new TempFileManager"
                " (or call get_manager() again)"
            )
        if self._opened is not None:
            return self._opened
        base = _choose_base()
        name = _userdir_name(self._prefix, self.username())
        userdir = os.path.join(base, name)
        userdir_fd = _open_userdir(base, name, create=True)
        assert userdir_fd is not None
        try:
            dir_name, lock_fd = _create_process_dir(userdir_fd, userdir)
            try:
                dir_fd = open_dir_nofollow(dir_name, dir_fd=userdir_fd)
            except BaseException:
                os.close(lock_fd)
                _remove_own_dir(userdir_fd, dir_name)
                raise
        except BaseException:
            os.close(userdir_fd)
            raise
        directory = os.path.join(userdir, dir_name)
        self._opened = _Opened(
            base=base,
            userdir=userdir,
            dir=directory,
            real_dir=os.path.realpath(directory),
            dir_name=dir_name,
            userdir_fd=userdir_fd,
            dir_fd=dir_fd,
            lock_fd=lock_fd,
            owner_pid=os.getpid(),
        )
        atexit.register(self._at_exit)
        return self._opened

    def _ensure_started(self) -> _Opened:
        """Start the manager if needed (in a worker thread)."""
        with self._cond:
            return self._start()

    # _enter/_leave bracket every operation (plain calls, not a context
    # manager: they run twice per operation and a generator-based one costs
    # more than the rest of a remove_path).
    def _enter(self) -> _Opened:
        """Start if needed, and keep cleanup from closing the fds until `_leave`."""
        with self._lock:
            opened = self._start()
            self._busy += 1
        return opened

    def _leave(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._closed and not self._busy:
                self._cond.notify_all()

    def _close(self) -> None:
        """Release the lock, then delete `dir` (blocking); safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            opened = self._opened
            if opened is None:
                return  # never started: nothing on disk
            atexit.unregister(self._at_exit)
            forked = os.getpid() != opened.owner_pid
            if not forked:
                self._cond.wait_for(lambda: not self._busy)
        os.close(opened.dir_fd)
        if forked:
            # A forked child shares the parent's open file description:
            # LOCK_UN here would release the *parent's* lock and deleting
            # would pull the directory from under it.  Just let go.
            os.close(opened.lock_fd)
            os.close(opened.userdir_fd)
            return
        try:
            # Lock first: if deleting fails halfway, what is left has an
            # unheld .lock and any later clean_userdir finishes the job.
            try:
                fcntl.flock(opened.lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(opened.lock_fd)
            _remove_own_dir(opened.userdir_fd, opened.dir_name)
        finally:
            os.close(opened.userdir_fd)

    def _at_exit(self) -> None:
        try:
            self._close()
        except Exception as exc:  # an exit hook must not hide the program's own outcome
            where = self._opened.dir if self._opened else self._prefix
            sys.stderr.write(f"atempstore: could not remove {where!r} at exit: {exc}\n")

    async def __aenter__(self) -> TempFileManager:
        was_started = self._opened is not None
        try:
            await run_sync(self._ensure_started)
        except BaseException:
            if not was_started and self._opened is not None:
                # Cancelled while the worker finished starting: nobody will
                # reach __aexit__, so do not leave the directory to atexit.
                with anyio.CancelScope(shield=True):
                    await run_sync(self._close)
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
        return Path((await run_sync(self._ensure_started)).dir)

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
        _check_affix("prefix", prefix)
        _check_affix("suffix", suffix)
        return await run_sync(
            self._create_path_sync, prefix, suffix, folder, undo=self._discard_created
        )

    def _create_path_sync(self, prefix: str, suffix: str, folder: bool) -> Path:
        opened = self._enter()
        try:
            name = _create_entry(opened.dir_fd, prefix, suffix, folder)
        finally:
            self._leave()
        return Path(f"{opened.dir}/{name}")

    def _discard_created(self, path: Path) -> None:
        """Undo a `create_path` whose caller was cancelled: nobody knows the name."""
        opened = self._enter()
        try:
            with contextlib.suppress(FileNotFoundError):
                _remove_tree(opened.dir_fd, path.name)
        finally:
            self._leave()

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
        await run_sync(self._remove_path_sync, os.fspath(name))

    def _remove_path_sync(self, name: str) -> None:
        opened = self._enter()
        try:
            head, leaf = os.path.split(name)
            if head in ("", opened.dir, opened.real_dir) and leaf not in ("", ".", ".."):
                # The common case, a name directly in dir (what create_path
                # returned): nothing to resolve, act on the held dir fd.
                if "\0" in leaf:
                    why = f"invalid path {name!r}: it contains a NUL byte"
                    raise InvalidNameError(why, name=name)
                parent_fd, parents = opened.dir_fd, False
            else:
                target = confine(opened.real_dir, name)
                leaf, parents = target.name, bool(target.parents)
                parent_fd = open_beneath(target.root, target.parents)
            try:
                if leaf == LOCK_NAME and not parents:
                    raise InvalidNameError(
                        f"{name!r} is the manager's own lock file: it must live as long as"
                        " the manager",
                        name=name,
                    )
                _remove_tree(parent_fd, leaf)
            finally:
                if parent_fd != opened.dir_fd:
                    os.close(parent_fd)
        finally:
            self._leave()

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
        await run_sync(self._clean_tempdir_sync)

    def _clean_tempdir_sync(self) -> None:
        opened = self._enter()
        try:
            # A fresh open file description to list: the held one's read offset
            # is shared by every thread that might list it at the same time.
            listing_fd = open_dir_nofollow(".", dir_fd=opened.dir_fd)
            try:
                with os.scandir(listing_fd) as entries:
                    names = [entry.name for entry in entries if entry.name != LOCK_NAME]
            finally:
                os.close(listing_fd)
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    _remove_tree(opened.dir_fd, name)
        finally:
            self._leave()

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
        _check_grace(grace)
        verdicts = await run_sync(self._clean_userdir_sync, grace)
        return CleanResult(
            removed=[v.path for v in verdicts if v.removed],
            skipped=[v.path for v in verdicts if not v.removed],
        )

    def _clean_userdir_sync(self, grace: float) -> list[_Verdict]:
        opened = self._enter()
        try:
            return _clean(opened.userdir_fd, Path(opened.userdir), opened.dir_name, grace, False)
        finally:
            self._leave()

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
        await run_sync(self._close)

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
    def _usable_here(self) -> bool:
        opened = self._opened
        return opened is not None and not self._closed and opened.owner_pid == os.getpid()


# --------------------------------------------------------------------------
# The process-wide default

_default: TempFileManager | None = None
_default_mutex = threading.Lock()
_managers: weakref.WeakSet[TempFileManager] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    # A lock held by another thread at fork() time stays held forever in the
    # child; the child's exit hook must still be able to run.
    global _default_mutex
    _default_mutex = threading.Lock()
    for manager in list(_managers):
        manager._lock = threading.Lock()
        manager._cond = threading.Condition(manager._lock)
        manager._busy = 0


os.register_at_fork(after_in_child=_reinit_after_fork)


def _default_manager() -> TempFileManager:
    global _default
    with _default_mutex:
        manager = _default
        if manager is None or not manager._usable_here():
            manager = TempFileManager()
            manager._ensure_started()
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
    if manager is not None and manager._usable_here():
        return manager
    return await run_sync(_default_manager)
