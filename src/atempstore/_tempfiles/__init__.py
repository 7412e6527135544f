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

The package, one concern a file: ``_base`` chooses the base directory and
opens the per-user directory safely; ``_procdirs`` creates, owns and cleans
process directories; ``_core`` is the blocking, loop-free core of a manager;
``_manager`` is the async `TempFileManager` facade and `get_manager`.
"""

from __future__ import annotations

from ._base import ENV_TEMPDIR as ENV_TEMPDIR
from ._manager import TempFileManager as TempFileManager
from ._manager import get_manager as get_manager
from ._procdirs import DEFAULT_GRACE as DEFAULT_GRACE
from ._procdirs import LOCK_NAME as LOCK_NAME
from ._procdirs import CleanResult as CleanResult
from ._procdirs import clean_for_command as clean_for_command

__all__ = (
    "DEFAULT_GRACE",
    "ENV_TEMPDIR",
    "LOCK_NAME",
    "CleanResult",
    "TempFileManager",
    "clean_for_command",
    "get_manager",
)
