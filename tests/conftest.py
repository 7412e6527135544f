from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from .blocking import forbid_blocking_io

__all__ = (
    "forbid_blocking_io",
    "lock_is_held",
    "loop_thread_lines",
    "mounted_tmpfs",
    "names_path_under",
    "open_fds",
    "require_tool",
    "run_python",
    "run_traced",
    "spawn_python",
)

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """The path of the program ``name``; skip the test where it is missing, with
    the reason, except in CI (``CI=true``), where a missing tool is a failure:
    `.ci/run` installs every tool the tests use, so a skip there hides a gap."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_traced(
    code: str,
    injects: Sequence[str] = (),
    *args: str,
    options: Sequence[str] = (),
    log: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` (``args`` after it) under ``strace -f``.

    ``injects`` become ``-e inject=...`` (real syscall failures), ``options``
    further strace options (``-e trace=...``, ``-yy``, ``-P PATH``); the calls
    go to ``log`` when given.  A missing strace skips (fails in CI).
    """
    strace = require_tool("strace")
    injected = [arg for inject in injects for arg in ("-e", f"inject={inject}")]
    out = str(log) if log is not None else os.devnull
    # Importing portalocker calls tempfile.gettempdir(), which probes its
    # directory with a write and an unlink: settle it first, so that the
    # first write or unlink injected is the code's own.
    code = "import tempfile; tempfile.tempdir = '/tmp'\n" + textwrap.dedent(code)
    command = [strace, "-f", "-qq", "-o", out, *options, *injected]
    return subprocess.run(
        [*command, sys.executable, "-c", code, *args],
        env=_env(),
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def loop_thread_lines(stdout: str, log: Path) -> list[str]:
    """The ``strace -f`` lines of the event-loop thread of a tour script.

    The script prints ``loop-thread TID`` before its tour starts; the lines
    are that thread's, from that print on (its set-up before is not counted).
    """
    tid = re.search(r"loop-thread (\d+)", stdout)
    assert tid is not None, stdout
    own = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith(f"{tid[1]} ")
    ]
    start = next(i for i, line in enumerate(own) if "loop-thread" in line and "write(" in line)
    return own[start + 1 :]


def names_path_under(line: str, root: Path) -> bool:
    """Whether an ``strace -yy`` line names a path under ``root``: a path
    argument (``"/root/..."``) or an fd shown with its path (``3</root/...>``),
    not merely data that happens to contain it (a coverage data file records
    the command line, which holds the tour's directory)."""
    return re.search(rf"[<\"]{re.escape(str(root))}", line) is not None


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
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts: killed (if still running) and reaped after it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def fsync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds ``os.fsync`` is called on during the test (the calls still happen)."""
    calls: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


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


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (created) with ``options`` such as
    ``size=256k`` or ``nr_inodes=4``, for a real ENOSPC; unmounted afterwards.

    Skips the test, with the reason, where mounting is not permitted.
    """
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = "cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): " + (
            result.stderr.strip() or f"mount exited {result.returncode}"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI runs as root: a real ENOSPC must be tested there
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every temp-dir candidate inside tmp_path: $ATEMPSTORE_TEMPDIR first, then
    a fake HOME and a fake system temp dir (so no test touches the real ones)."""
    monkeypatch.setenv("ATEMPSTORE_TEMPDIR", str(tmp_path / "base"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "systmp"))
    (tmp_path / "systmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))
    return tmp_path / "base"
