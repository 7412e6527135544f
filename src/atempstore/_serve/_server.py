"""The server's lifecycle: `FileServer` runs `create_app` on uvicorn.

It owns what happens around the requests: checking the directories and
opening the cache before binding (so that a bad ``--cache`` is an error, not
a server that fails every request), binding the socket ourselves (``port=0``
picks one, and the port is known before uvicorn starts), the graceful stop
(stop accepting, give downloads ``grace`` seconds, cancel the rest, close the
cache so that copies still running are cancelled and their temporary files
removed), and SIGINT/SIGTERM handled inside the event loop.  uvicorn is
imported only when a server starts.

The connections are uvicorn's own HTTP protocol (httptools where installed,
else h11: whichever uvicorn's "auto" picks), subclassed for what uvicorn
does not do or says too loudly (see `_protocol_class`): a connection that
has not sent a complete request head within ``header_timeout`` seconds is
closed (uvicorn waits for it forever: 50 such connections held 50 fds), a
malformed head that uvicorn answers 400 gets an access-log line, and the
expected events that the access line already tells (a response cut because
its source changed, a download cancelled at the end of a graceful stop, a
malformed head) are not logged a second time by uvicorn, with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import FileCache
from .._threads import run_sync
from ._app import access_line, create_app, log
from ._locate import check_dirs

if TYPE_CHECKING:
    import uvicorn

__all__ = ("FileServer",)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# uvicorn's words for events that our access line has already told.
_TOLD = frozenset(
    {
        "ASGI callable returned without completing response.",  # a cut response
        "Invalid HTTP request received.",  # our 400 line
    }
)


class _AlreadyTold(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in _TOLD:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        # A download cancelled when the grace ran out: its access line says
        # "cancelled (server stopping)", and uvicorn said "Cancel N running task(s)".
        return not isinstance(exc, asyncio.CancelledError)


def _connection_logger() -> logging.Logger:
    """``uvicorn.error`` less what is told already, for our connections only."""
    parent = logging.getLogger("uvicorn.error")
    # Outside the logger tree on purpose: a filter on uvicorn.error itself
    # would also silence other servers of the process.
    quiet = logging.Logger(parent.name, parent.getEffectiveLevel())
    quiet.parent = parent
    quiet.addFilter(_AlreadyTold())
    return quiet


def _protocol_class(header_timeout: float, access: logging.Logger) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a request-head deadline and our log lines.

    The deadline is armed when a connection is made and again when a
    response completes on a kept-alive connection with no next request
    parsed yet; it is disarmed when a request head is complete, seen as the
    protocol's ``cycle`` changing (both h11 and httptools make a new
    ``RequestResponseCycle`` for each head, pipelined ones included).  Bytes
    that trickle in do not push it back: the head has to be complete in time.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class _Protocol(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = _connection_logger()
            self._deadline: asyncio.TimerHandle | None = None
            self._waiting_since = 0.0
            self._waiting_bytes = 0
            self._waiting_cycle: object = None

        def _arm(self) -> None:
            if header_timeout <= 0:
                return
            self._waiting_cycle = self.cycle
            self._waiting_since = time.perf_counter()
            self._waiting_bytes = 0
            self._deadline = self.loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._waiting_bytes:  # a connection that sent nothing made no request
                self._log_refused(
                    408,
                    self._waiting_since,
                    f"no complete request head within {header_timeout:g} s, closed",
                )
            self.transport.close()

        def _log_refused(self, status: int, since: float, note: str) -> None:
            scope = {"client": self.client}
            took = time.perf_counter() - since
            access.info(access_line(scope, status, 0, took, "", None, None, note))

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._waiting_bytes += len(data)
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_cycle:
                self._disarm()  # a head is complete: its request is under way

        def on_response_complete(self) -> None:
            super().on_response_complete()
            cycle = self.cycle
            idle = cycle is None or cycle.response_complete  # no next head parsed yet
            if idle and self._deadline is None and not self.transport.is_closing():
                self._arm()

        def send_400_response(self, msg: str) -> None:
            since = self._waiting_since if self._deadline is not None else time.perf_counter()
            self._disarm()
            self._log_refused(400, since, "invalid HTTP request")
            super().send_400_response(msg)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return _Protocol


def _make_server(config: uvicorn.Config, handle_signals: bool) -> uvicorn.Server:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, with signal handling that stays inside the event loop.

        uvicorn re-raises a caught SIGTERM after its shutdown, which kills the
        process before the caller's own cleanup (the demo directory) runs.
        """

        def __init__(self, config: uvicorn.Config, handle_signals: bool) -> None:
            super().__init__(config)
            self.handle_signals = handle_signals

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if not self.handle_signals:
                yield
                return
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        def _on_signal(self, sig: int) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for downloads
            self.should_exit = True

    return _Server(config, handle_signals)


class FileServer:
    """``atempstore serve`` as an object: a uvicorn server for `create_app`.

    ``port=0`` picks a free port (see `port` and `url` once started).  A
    graceful stop stops accepting, lets downloads in progress finish for up to
    ``grace`` seconds, cancels the rest, then closes the cache.  With
    ``handle_signals``, SIGINT and SIGTERM start that stop (a second SIGINT
    stops waiting for downloads).  A connection that has not sent a complete
    request head ``header_timeout`` seconds after it was made (or after its
    previous response) is closed; 0 waits forever.  ``sock`` is a socket
    bound already (``--workers``: each worker serves the one its parent
    bound), used instead of binding ``host:port``.

    Example:
        ```python
        async with FileServer("/srv/media", cache_dir="/var/cache/media", port=0) as server:
            print("serving at", server.url)
            await server.wait()
        ```
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        max_size: int = 1 << 30,
        host: str = "127.0.0.1",
        port: int = 8000,
        grace: float = 5.0,
        header_timeout: float = 10.0,
        handle_signals: bool = False,
        logger: logging.Logger | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.max_size = max_size
        self.host = host
        self.port = port
        self.grace = grace
        self.header_timeout = header_timeout
        self.handle_signals = handle_signals
        self.logger = logger
        self.sock = sock
        self.root = ""
        self._cache: FileCache | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def cache(self) -> FileCache:
        """The server's cache (once started)."""
        if self._cache is None:
            raise RuntimeError("the server is not started")
        return self._cache

    @property
    def url(self) -> str:
        """``http://host:port/``, with the port actually bound."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        """Check the directories, open the cache, bind, and serve (returns once listening)."""
        import uvicorn

        self.root, cache_dir = await run_sync(check_dirs, self.directory, self.cache_dir)
        self.cache_dir = cache_dir
        cache = FileCache(cache_dir, max_size=self.max_size)
        await cache.__aenter__()  # errors (a cache dir we cannot create) surface here
        try:
            sock = (
                self.sock if self.sock is not None else await run_sync(_bind, self.host, self.port)
            )
        except BaseException:
            await cache.aclose()
            raise
        try:
            self.port = sock.getsockname()[1]
            app = create_app(self.root, cache=cache, logger=self.logger)
            config = uvicorn.Config(
                app,
                http=_protocol_class(self.header_timeout, self.logger or log),
                lifespan="on",
                log_config=None,
                log_level="warning",
                access_log=False,  # ours says more: bytes, time, cache mode
                timeout_graceful_shutdown=math.ceil(self.grace),
            )
            server = _make_server(config, self.handle_signals)
        except BaseException:
            sock.close()
            await cache.aclose()
            raise
        self._cache = cache
        self._server = server

        async def run() -> None:
            try:
                await server.serve(sockets=[sock])
            except SystemExit as exc:  # uvicorn exits on startup failures; a task must not
                raise RuntimeError(
                    f"the HTTP server stopped at startup (status {exc.code})"
                ) from None
            finally:
                sock.close()

        self._task = task = asyncio.get_running_loop().create_task(run())
        while not server.started:
            if task.done():
                await cache.aclose()
                task.result()
                raise RuntimeError("the HTTP server stopped at startup")
            await asyncio.sleep(0.005)

    @property
    def requests(self) -> int:
        """Responses completed so far (cut ones not counted)."""
        return 0 if self._server is None else self._server.server_state.total_requests

    @property
    def stopping(self) -> bool:
        """True once a stop was asked (a signal or `stop`)."""
        return self._server is not None and self._server.should_exit

    async def wait(self) -> None:
        """Wait until the server stops (a signal, or `stop` from another task)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def stop(self) -> None:
        """Stop gracefully (see the class); a second call does nothing."""
        task, self._task = self._task, None
        if task is not None and self._server is not None:
            self._server.should_exit = True
            await asyncio.wait({task})
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
        if self._cache is not None:
            await self._cache.aclose()  # done by the lifespan already, unless startup failed

    async def __aenter__(self) -> FileServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
