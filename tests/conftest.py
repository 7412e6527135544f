from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .blocking import forbid_blocking_io

__all__ = (
    "forbid_blocking_io",
    "lock_is_held",
    "open_fds",
    "run_python",
    "spawn_python",
)

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def spawn_python(code: str, *args: str) -> subprocess.Popen[str]:
    """Start ``python -c code`` in a child process (real process, real files).

    Its stdin, stdout and stderr are pipes; the caller waits for it or kills it.
    """
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_env(),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` to completion and return what it printed."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_env(),
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def no_blocking_io() -> Iterator[list[str]]:
    """Inside the test, atempstore must not do path I/O on the event-loop thread."""
    with forbid_blocking_io() as violations:
        yield violations


def lock_is_held(lock_path: str | os.PathLike[str]) -> bool:
    """Ask the kernel, through a new open file description (flock is per description)."""
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))
