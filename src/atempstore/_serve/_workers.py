"""``atempstore serve --workers N``: N worker processes on one listening socket.

The parent binds and listens once, then starts N workers, each an
``atempstore serve`` of its own (``--worker-fd``) that serves the inherited
socket with a `FileServer`: the kernel hands each new connection to one of
the processes waiting in ``accept``.  The workers share the cache directory,
which is made for several processes (one copy per file across all of them;
a reader in one worker follows a copy that another one makes).

The parent runs no event loop and no thread: it waits, watches its workers
and handles signals.  SIGINT, SIGTERM or ``--exit-after`` stop every worker
gracefully (SIGTERM to each: each stops accepting, gives its downloads
``grace`` seconds, closes its cache); a worker still alive ``grace`` + 10 s
later is killed and said so.  A worker that dies while serving is reported
on stderr and replaced; one that dies within a second of its start is not
replaced (it would only die again, e.g. on a cache directory it cannot
create), and with no worker left the parent stops with status 1.  Each
worker asks the kernel for SIGTERM if the parent dies (``PR_SET_PDEATHSIG``),
so a parent killed with SIGKILL leaves no orphan serving on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from ._locate import check_dirs
from ._server import _bind

__all__ = ("serve_workers", "stops_handled", "watch_parent")

_STOPS = {signal.SIGINT, signal.SIGTERM}
_RESPAWN_AFTER = 1.0  # a worker that lived less than this is not replaced
_BACKLOG = 2048  # uvicorn's default


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Worker:
    def __init__(self, number: int, command: Sequence[str], fd: int) -> None:
        self.number = number
        env = dict(os.environ, ATEMPSTORE_SERVE_PARENT=str(os.getpid()))
        env.pop("ATEMPSTORE_SERVE_EXIT_AFTER", None)  # the parent's to keep, not each worker's
        # Born with SIGINT and SIGTERM blocked (the mask is inherited): a stop
        # asked while it starts stays pending until its server handles it,
        # instead of killing it half started.  It unblocks them once serving.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            self.proc = subprocess.Popen(command, pass_fds=(fd,), env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.began = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid


def serve_workers(
    directory: str,
    *,
    workers: int,
    cache_dir: str | None,
    max_size: int,
    host: str,
    port: int,
    exit_after: float | None,
    grace: float,
    header_timeout: float,
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    """Run ``workers`` worker processes until a signal or ``exit_after``; the exit status."""
    root, cache = check_dirs(directory, cache_dir)
    sock = _bind(host, port)
    try:
        sock.listen(_BACKLOG)  # connections wait here until a worker accepts them
        fd = sock.fileno()
        command = [sys.executable, "-m", "atempstore.cli", "serve", root, "--cache", cache]
        command += ["--max-size", str(max_size), "--grace", repr(grace)]
        command += ["--header-timeout", repr(header_timeout), "--worker-fd", str(fd)]
        stop: list[int] = []

        def on_signal(sig: int, frame: object) -> None:
            stop.append(sig)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return _supervise(
                root, cache, sock, command, workers, max_size, exit_after, grace, stop, say, warn
            )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        sock.close()


def _supervise(
    root: str,
    cache: str,
    sock: socket.socket,
    command: list[str],
    workers: int,
    max_size: int,
    exit_after: float | None,
    grace: float,
    stop: list[int],
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    fd = sock.fileno()
    host, port = sock.getsockname()[:2]
    running = [_Worker(n, command, fd) for n in range(1, workers + 1)]
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    say(f"serving {root} at {url}")
    say(f"  cache: {cache} (at most {max_size} B, shared by the workers)")
    say(f"  workers: {workers} (pids {', '.join(str(w.pid) for w in running)})")
    say("  stop:  Ctrl-C" + (f" (or it stops after {exit_after:g} s)" if exit_after else ""))
    deadline = None if exit_after is None else time.monotonic() + exit_after
    status = 0
    while not stop and (deadline is None or time.monotonic() < deadline):
        for worker in list(running):
            code = worker.proc.poll()
            if code is None:
                continue
            running.remove(worker)
            lived = time.monotonic() - worker.began
            if lived < _RESPAWN_AFTER:
                warn(
                    f"worker {worker.number} (pid {worker.pid}) died at startup ({_status(code)});"
                    " not restarted"
                )
                continue
            replacement = _Worker(worker.number, command, fd)
            running.append(replacement)
            warn(
                f"worker {worker.number} (pid {worker.pid}) died ({_status(code)});"
                f" started pid {replacement.pid}"
            )
        if not running:
            warn("no worker left; stopping")
            status = 1
            break
        time.sleep(0.05)  # a signal cuts it short (its handler runs, then it goes on)
    for worker in running:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    limit = time.monotonic() + grace + 10
    for worker in running:
        try:
            code = worker.proc.wait(max(0.0, limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
            warn(f"worker {worker.number} (pid {worker.pid}) did not stop in time: killed")
            status = 1
            continue
        if code != 0:
            warn(f"worker {worker.number} (pid {worker.pid}) stopped with {_status(code)}")
            status = 1
    say("stopped")
    return status


def watch_parent() -> None:
    """In a worker: get SIGTERM when the parent dies (Linux), and stop now if it is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    parent = os.environ.get("ATEMPSTORE_SERVE_PARENT")
    if parent is not None and os.getppid() != int(parent):  # died before the prctl took
        os.kill(os.getpid(), signal.SIGTERM)


def stops_handled() -> None:
    """In a worker whose server handles SIGINT/SIGTERM now: let them (and a pending one) in."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
