"""What ``atempstore serve`` does once its arguments are parsed.

Make the demo tree if asked, start a `FileServer` that handles SIGINT and
SIGTERM, print where it serves, run the demo's checks, serve until a signal
or ``--exit-after``, and remove the demo's own directory at the end.  The
command module (``_commands/serve.py``) only parses, sets up logging and
maps errors to exit statuses.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import Callable
from typing import Any

import anyio

from .._threads import run_sync
from ._demo import DEMO_FILES, exercise, make_demo
from ._server import FileServer
from ._workers import stops_handled

__all__ = ("run",)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


async def run(
    directory: str | None,
    *,
    cache_dir: str | None = None,
    max_size: int = 1 << 30,
    host: str = "127.0.0.1",
    port: int = 8000,
    demo: bool = False,
    exit_after: float | None = None,
    grace: float = 5.0,
    header_timeout: float = 10.0,
    worker_sock: socket.socket | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """What ``atempstore serve`` does; returns the exit status.

    With ``worker_sock`` it is one worker of ``--workers`` (see ``_workers``):
    it serves that socket until SIGTERM, and says nothing but its log lines.
    """
    # What every server this command starts is given, worker or not.
    settings: dict[str, Any] = {
        "max_size": max_size,
        "grace": grace,
        "header_timeout": header_timeout,
        "handle_signals": True,
    }
    if worker_sock is not None:
        async with FileServer(
            directory or "", cache_dir=cache_dir, sock=worker_sock, **settings
        ) as server:
            stops_handled()  # a stop asked while it started is handled now
            await server.wait()
        stats = server.cache.stats()
        # One line per worker at its stop: how the load and the copies fell.
        say(
            f"worker {os.getpid()} stopped: {server.requests} requests;"
            f" cache: {stats['copies']} copies ({stats['copied_bytes']} B),"
            f" {stats['follows']} follows, {stats['hits']} hits"
        )
        return 0
    base = None
    if demo:
        say("demo: creating the demo files...")
        base, directory, demo_cache = await run_sync(make_demo, directory)
        cache_dir = cache_dir or demo_cache
    assert directory is not None
    try:
        server = FileServer(directory, cache_dir=cache_dir, host=host, port=port, **settings)
        async with server:
            say(f"serving {server.root} at {server.url}")
            say(f"  cache: {server.cache_dir} (at most {_human(max_size)})")
            say(
                "  stop:  Ctrl-C" + (f" (or it stops after {exit_after:g} s)" if exit_after else "")
            )
            ok = True
            if demo:
                try:
                    ok = await exercise(server, say)
                except (OSError, asyncio.IncompleteReadError):
                    if not server.stopping:
                        raise
                    say("demo: interrupted")  # Ctrl-C while it ran
                else:
                    say(f"demo: try it: curl -o /dev/null {server.url}{DEMO_FILES[0][0]}")
            with anyio.move_on_after(exit_after):
                await server.wait()
        say("stopped")
        return 0 if ok else 1
    finally:
        if base is not None:
            await run_sync(shutil.rmtree, base, True)
