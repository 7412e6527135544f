"""Process directories in the per-user directory: created, owned, cleaned.

Every process gets ``<userdir>/<pid>-<random>/.lock`` and holds an exclusive
``flock`` on ``.lock`` for as long as it lives.  Who owns a process directory
is decided by one atomic step: ``link``-ing an already-locked file to the name
``.lock`` (see the package docstring).  Removal never follows a symlink out of
the directory.  Blocking functions: they run in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import InvalidNameError
from .._flock import try_lock_exclusive
from .._paths import check_name, open_dir_nofollow, remove_at
from ._base import choose_base, describe_error, lookup_username, open_userdir

__all__ = (
    "DEFAULT_GRACE",
    "LOCK_NAME",
    "CleanResult",
    "Verdict",
    "check_affix",
    "check_grace",
    "clean",
    "clean_for_command",
    "create_entry",
    "create_process_dir",
    "remove_own_dir",
    "remove_tree",
    "userdir_name",
)

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
class Verdict:
    """One entry of the per-user directory and what the cleaner did with it."""

    path: Path
    removed: bool
    reason: str


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


def create_process_dir(userdir_fd: int, userdir: str) -> tuple[str, int]:
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
                remove_tree(userdir_fd, name)
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


def remove_tree(parent_fd: int, name: str) -> None:
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


def remove_own_dir(userdir_fd: int, name: str) -> None:
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
            remove_tree(userdir_fd, name)
        except FileNotFoundError:
            return  # a cleaner finished it
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or attempt == _ATTEMPTS - 1:
                raise
            time.sleep(0.001 * (attempt + 1))
        else:
            return


def _examine(userdir_fd: int, name: str, now: float, grace: float, dry_run: bool) -> Verdict:
    """Decide about one entry of the per-user directory, and remove it if dead.

    The returned verdict's path is the bare ``name``; the caller anchors it.
    """
    st = os.lstat(name, dir_fd=userdir_fd)
    if not stat.S_ISDIR(st.st_mode):
        return Verdict(Path(name), False, "not a directory: left alone")
    dir_fd = open_dir_nofollow(name, dir_fd=userdir_fd)
    lock_fd: int | None = None
    try:
        lock_fd = _open_lock(dir_fd)
        if lock_fd is None:
            age = now - os.fstat(dir_fd).st_mtime
            if age < grace:
                why = f"no {LOCK_NAME} yet, {age:.0f} s old: its process may be starting"
                return Verdict(Path(name), False, why)
            reason = f"no {LOCK_NAME} after {age:.0f} s: its process died while starting"
            if dry_run:
                return Verdict(Path(name), True, reason)
            lock_fd = _claim(dir_fd)
            if lock_fd is None:
                # Its process linked .lock just now, so it is (or was) alive:
                # the lock decides, as for any other directory.
                lock_fd = _open_lock(dir_fd)
                if lock_fd is None or not try_lock_exclusive(lock_fd):
                    return Verdict(Path(name), False, "in use: its lock is held")
                reason = "its lock is not held: its process is gone"
        elif try_lock_exclusive(lock_fd):
            reason = "its lock is not held: its process is gone"
            if dry_run:
                return Verdict(Path(name), True, reason)
        else:
            return Verdict(Path(name), False, "in use: its lock is held")
        # We hold its lock while deleting, so a second cleaner skips it.  No
        # retry on ENOTEMPTY here: see remove_own_dir.
        remove_tree(userdir_fd, name)
        return Verdict(Path(name), True, reason)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        os.close(dir_fd)


def clean(
    userdir_fd: int, userdir: Path, own: str | None, grace: float, dry_run: bool
) -> list[Verdict]:
    with os.scandir(userdir_fd) as entries:
        names = sorted(entry.name for entry in entries)
    now = time.time()
    verdicts: list[Verdict] = []
    for name in names:
        if name == own:
            continue
        try:
            verdict = _examine(userdir_fd, name, now, grace, dry_run)
        except FileNotFoundError:
            continue  # removed meanwhile, by its owner or another cleaner
        except OSError as exc:
            # One stubborn entry must not stop the rest from being cleaned.
            verdict = Verdict(Path(name), False, f"could not remove it: {describe_error(exc)}")
        verdicts.append(Verdict(userdir / name, verdict.removed, verdict.reason))
    return verdicts


def create_entry(dir_fd: int, prefix: str, suffix: str, folder: bool) -> str:
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


def userdir_name(prefix: str, username: str) -> str:
    return check_name(f"{prefix}_{username}")


def clean_for_command(
    prefix: str = "atempstore", *, grace: float = DEFAULT_GRACE, dry_run: bool = False
) -> tuple[Path | None, list[Verdict]]:
    """What ``atempstore clean`` runs (no event loop): clean the per-user
    directory a manager with ``prefix`` would use, without creating one.

    Returns the per-user directory (None if it does not exist) and a verdict
    per entry.  ``dry_run`` decides but removes nothing.
    """
    check_grace(grace)
    base = choose_base()
    name = userdir_name(prefix, lookup_username())
    userdir_fd = open_userdir(base, name, create=False)
    userdir = Path(base, name)
    if userdir_fd is None:
        return None, []
    try:
        return userdir, clean(userdir_fd, userdir, None, grace, dry_run)
    finally:
        os.close(userdir_fd)


def check_grace(grace: float) -> None:
    if not grace >= 0:  # also refuses NaN
        raise ValueError(f"grace must be a number of seconds >= 0, not {grace!r}")


def check_affix(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\0" in value or "/" in value or (os.altsep and os.altsep in value):
        raise InvalidNameError(
            f"invalid {what} {value!r}: it must not contain a path separator or a NUL byte",
            name=value,
        )
    return value
