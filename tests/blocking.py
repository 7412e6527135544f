"""A guard that fails a test when atempstore does blocking I/O on the event-loop thread.

Two nets, because each catches what the other misses:

* blockbuster patches the blocking functions of ``os``, ``io`` and friends and
  raises when one is called from a thread running an event loop, with an
  atempstore frame on the stack;
* an audit hook sees every ``open`` (builtins and ``os.open``), ``mkdir``,
  ``rename``... that names a path, whatever wrapper issued it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from blockbuster import blockbuster_ctx

import atempstore

_PACKAGE_DIR = str(Path(atempstore.__file__).parent)

# Audit events that name a file or directory (see the "Audit events table").
_PATH_EVENTS = frozenset(
    {
        "open",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.listdir",
        "os.mkdir",
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.scandir",
        "os.symlink",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
    }
)


class _State:
    active_thread: int | None = None
    violations: list[str] = []  # noqa: RUF012 - module-level singleton


def _from_atempstore() -> bool:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            return True
        frame = frame.f_back
    return False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _State.active_thread != threading.get_ident() or event not in _PATH_EVENTS:
        return
    target = args[0] if args else None
    if isinstance(target, int):
        return  # an fd: the call names no path (fdopen, ftruncate, fchmod)
    if _from_atempstore():
        _State.violations.append(f"{event}{args!r}")


sys.addaudithook(_hook)


@contextmanager
def forbid_blocking_io() -> Iterator[list[str]]:
    """Fail if atempstore names a path on this (the loop's) thread inside the block."""
    _State.violations = []
    _State.active_thread = threading.get_ident()
    try:
        with blockbuster_ctx(scanned_modules=["atempstore"]):
            yield _State.violations
    finally:
        _State.active_thread = None
    assert not _State.violations, f"blocking I/O on the event-loop thread: {_State.violations}"
