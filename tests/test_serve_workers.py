"""The ``serve --workers`` supervisor (`atempstore._serve._workers._supervise`),
driven directly with small real worker processes standing in for
``atempstore serve --worker-fd``: one that dies at startup, one that dies
later, one killed by the stop signal, one that ignores it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from atempstore._serve import _workers
from atempstore._serve._server import _bind


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    listening = _bind("127.0.0.1", 0)
    listening.listen(8)
    try:
        yield listening
    finally:
        listening.close()


def _supervise(
    sock: socket.socket, code: str, *, workers: int = 1, exit_after: float | None, grace: float = 0
) -> tuple[int, list[str]]:
    warnings: list[str] = []
    command = [sys.executable, "-c", textwrap.dedent(code)]
    status = _workers._supervise(
        "/srv",
        "/cache",
        sock,
        command,
        workers,
        1 << 20,
        exit_after,
        grace,
        [],
        lambda line: None,
        warnings.append,
    )
    return status, warnings


def test_workers_that_die_at_startup_are_not_restarted_and_the_parent_stops(
    sock: socket.socket,
) -> None:
    # A worker that dies within a second of its start (a cache it cannot
    # create...) would only die again: it is reported, not replaced, and
    # with none left the parent stops with status 1, without waiting for
    # any exit_after.
    status, warnings = _supervise(sock, "import sys; sys.exit(3)", workers=2, exit_after=60)
    assert status == 1
    assert len(warnings) == 3, warnings
    assert all("died at startup (exit status 3); not restarted" in w for w in warnings[:2])
    assert warnings[2] == "no worker left; stopping"


def test_a_worker_that_dies_while_serving_is_replaced(sock: socket.socket, tmp_path: Path) -> None:
    # Each worker records its pid, lives 1.2 s (past the startup second),
    # then exits: the first is replaced by a second one, which the stop then
    # waits for (SIGTERM stays pending: workers are born with it blocked).
    code = f"""
        import os, time
        with open({str(tmp_path / "pids")!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        time.sleep(1.2)
    """
    status, warnings = _supervise(sock, code, exit_after=1.6)
    pids = (tmp_path / "pids").read_text().split()
    assert len(pids) == 2
    assert warnings == [f"worker 1 (pid {pids[0]}) died (exit status 0); started pid {pids[1]}"]
    assert status == 0


def test_a_worker_killed_by_the_stop_is_reported(sock: socket.socket) -> None:
    # A worker that lets SIGTERM in without handling it dies of it: the
    # supervisor says so by the signal's name and exits 1.
    code = """
        import signal, sys, time
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        time.sleep(30)
    """
    status, warnings = _supervise(sock, code, exit_after=0.3)
    assert status == 1
    assert len(warnings) == 1
    assert warnings[0].endswith("stopped with killed by SIGTERM")


def test_a_worker_that_does_not_stop_in_time_is_killed(sock: socket.socket) -> None:
    # The wait for a stop is grace + 10 s; a negative grace shortens it for
    # the test.  A worker still there then is killed and said so.
    code = """
        import time
        time.sleep(30)  # SIGTERM stays blocked: it never stops by itself
    """
    status, warnings = _supervise(sock, code, exit_after=0.3, grace=-9.5)
    assert status == 1
    assert len(warnings) == 1
    assert warnings[0].endswith("did not stop in time: killed")


def test_status_names_the_signal_or_the_number() -> None:
    assert _workers._status(3) == "exit status 3"
    assert _workers._status(-signal.SIGKILL) == "killed by SIGKILL"
    assert _workers._status(-200) == "killed by signal 200"


def test_a_worker_whose_parent_is_already_gone_stops_itself() -> None:
    # The parent died before the worker's prctl(PR_SET_PDEATHSIG) took: the
    # worker sees a parent pid that is not its parent and stops (SIGTERM).
    code = """
        import os, signal, sys
        signal.signal(signal.SIGTERM, lambda *_: (print("stopping"), sys.exit(0)))
        from atempstore._serve._workers import watch_parent
        watch_parent()
        print("serving on")
    """
    env = dict(os.environ, ATEMPSTORE_SERVE_PARENT="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopping"
