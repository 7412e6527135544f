"""The ASGI app: GET and HEAD of the files under a directory, through a `FileCache`.

`create_app` is a Starlette app with one route.  Each request locates its
path in one worker-thread hop (``_locate``), lets ``_http.answer`` decide
the status and headers, and answers with Starlette's own responses: a
`StreamingResponse` over ``CachedFile.iter_bytes`` for file bytes (it also
watches for the client hanging up), plain ``Response`` objects for headers
only, and `PlainTextResponse` / `HTMLResponse` for errors and listings.
Every request ends with one log line (client, method, path as sent, status,
bytes sent, time, cache mode, and a note when something went wrong), which
is why the endpoint is an ASGI callable and not a request/response function:
it sees the response start and each chunk go out.

Starlette is imported at the top: this module is only imported once the
``serve`` extra is known to be there (``_serve/__init__`` loads it lazily).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .. import CachedFile, FileCache
from .._errors import SourceChangedError
from .._threads import run_sync
from ._http import Answer, answer, error_status, etag
from ._locate import File, Listing, Refused, check_dirs, locate

__all__ = ("create_app", "log")

log = logging.getLogger("atempstore.serve")


class _State:
    """What the app shares between its lifespan and its requests."""

    def __init__(self, directory: str, cache: FileCache) -> None:
        self.directory = directory
        self.cache = cache
        self.root: str | None = None


class _Exchange:
    """One request: where its answer goes, and what its log line reports."""

    __slots__ = ("head", "mode", "note", "receive", "scope", "send", "sent", "status")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.head = scope["method"] == "HEAD"
        self.status = 0
        self.sent = 0
        self.note = ""
        self.mode = ""

    async def reply(self, response: Response) -> None:
        """Send a response whose body is in memory."""
        self.status = response.status_code
        self.sent = len(response.body)
        await response(self.scope, self.receive, self.send)


def _whole(cls: type[Response], body: bytes, status: int, ex: _Exchange, **fields: str) -> Response:
    # HEAD gets the headers of the GET, Content-Length included, and no body:
    # the response does not count on the server to drop it.
    fields["content-length"] = str(len(body))
    return cls(b"" if ex.head else body, status, headers=fields)


async def _plain(
    ex: _Exchange,
    status: int,
    reason: str,
    *,
    extra: tuple[tuple[str, str], ...] = (),
    retry: bool = False,
) -> None:
    fields = dict(extra)
    if retry:
        fields["retry-after"] = "1"
    await ex.reply(_whole(PlainTextResponse, f"{status} {reason}\n".encode(), status, ex, **fields))


def _listing(rel: str, found: Listing, ex: _Exchange) -> Response:
    base = "/".join(p for p in rel.split("/") if p not in ("", "."))
    title = html.escape("/" + base + ("/" if base else ""))
    items = []
    for name, is_dir in found.entries:
        href = urllib.parse.quote("/" + (f"{base}/" if base else "") + name) + (
            "/" if is_dir else ""
        )
        items.append(
            f'<li><a href="{html.escape(href)}">{html.escape(name)}{"/" if is_dir else ""}</a></li>'
        )
    page = (
        f"<!doctype html>\n<meta charset=utf-8>\n<title>{title}</title>\n<h1>{title}</h1>\n"
        f"<ul>\n{chr(10).join(items)}\n</ul>\n"
    ).encode()
    return _whole(HTMLResponse, page, 200, ex)


async def _stream(ex: _Exchange, f: CachedFile, said: Answer) -> None:
    """Send ``said.span`` of ``f``; stop early (and say so) if the client leaves."""
    assert said.span is not None
    # iter_bytes is an async generator: closed below, not at GC time.
    chunks = cast("AsyncGenerator[bytes, None]", f.iter_bytes(*said.span))
    finished = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal finished
        try:
            async for chunk in chunks:
                yield chunk
                ex.sent += len(chunk)  # once the send of it returned
        except SourceChangedError as exc:
            # Headers are out: the only honest signal left is a cut connection
            # (the client sees fewer bytes than Content-Length), never other bytes.
            ex.note = f"aborted: {exc}"
            raise
        finished = True

    async def receive() -> Message:
        # uvicorn (ASGI 2.3) drops sends to a closed connection silently: the
        # only news of a client that hung up is the http.disconnect that
        # StreamingResponse listens for (and then cancels the stream).
        message = await ex.receive()
        if message["type"] == "http.disconnect" and not finished:
            ex.note = "client went away"
        return message

    stream = cast("AsyncGenerator[bytes, None]", body())
    ex.status = said.status
    try:
        await StreamingResponse(stream, said.status, headers=dict(said.headers))(
            ex.scope, receive, ex.send
        )
    finally:
        finished = True
        # A cancelled stream leaves both generators suspended where it stopped.
        await stream.aclose()
        await chunks.aclose()


class _Endpoint:
    """The ASGI app behind the one route: GET and HEAD of the files under DIR."""

    def __init__(self, state: _State, logger: logging.Logger) -> None:
        self.state = state
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        exchange = _Exchange(scope, receive, send)
        try:
            await self._handle(exchange)
        except asyncio.CancelledError:
            exchange.note = exchange.note or "cancelled (server stopping)"
            raise
        except BaseException as exc:
            exchange.note = exchange.note or f"failed: {exc!r}"
            raise
        finally:
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            raw = scope.get("raw_path") or scope.get("path", "").encode()
            target = raw.decode("latin-1")
            line = (
                f"{where} {scope.get('method')} {target} {exchange.status or '-'}"
                f" {exchange.sent} B {1e3 * (time.perf_counter() - began):.1f} ms"
            )
            if exchange.mode:
                line += f" {exchange.mode}"
            if exchange.note:
                line += f" ({exchange.note})"
            self.log.info(line)

    async def _root(self) -> str:
        state = self.state
        if state.root is None:  # the lifespan did not run (a bare ASGI test harness)
            cache_dir = os.fspath(state.cache.directory)
            state.root = (await run_sync(check_dirs, state.directory, cache_dir))[0]
        return state.root

    async def _handle(self, ex: _Exchange) -> None:
        rel = ex.scope.get("path_params", {}).get("path", "")
        headers = Headers(scope=ex.scope)
        root = await self._root()
        for _ in range(3):
            try:
                # Read-only: a request cancelled meanwhile may leave it behind.
                found = await run_sync(locate, root, rel, abandon_on_cancel=True)
            except Refused as exc:
                ex.note = exc.reason
                await _plain(ex, exc.status, exc.reason)
                return
            except OSError as exc:
                status, reason = error_status(exc)
                ex.note = reason
                await _plain(ex, status, reason)
                return
            if isinstance(found, Listing):
                await ex.reply(_listing(rel, found, ex))
                return
            if rel.endswith("/"):
                ex.note = "not a directory"
                await _plain(ex, 404, "not a directory")
                return
            if await self._file(ex, found, headers):
                return
        ex.note = "the file keeps changing"
        await _plain(ex, 503, "the file keeps changing; try again", retry=True)

    async def _file(self, ex: _Exchange, found: File, headers: Headers) -> bool:
        """Answer for ``found``; False if it changed before the cache opened it."""
        said = answer(
            ex.scope["method"],
            headers,
            size=found.size,
            mtime_ns=found.mtime_ns,
            media=found.media_type,
        )
        if said.reason:
            if said.status == 416:
                ex.note = said.reason
            await _plain(ex, said.status, said.reason, extra=said.headers)
            return True
        if said.span is None:
            # Headers only: no reason to open the cache (and start a copy).
            await ex.reply(Response(status_code=said.status, headers=dict(said.headers)))
            return True
        try:
            f = await self.state.cache.open(found.path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, SourceChangedError):
            return False  # gone, replaced or changing since we looked: look again
        except OSError as exc:
            status, reason = error_status(exc)
            ex.note = reason
            await _plain(ex, status, reason)
            return True
        try:
            if f.key != found.path or f.etag != etag(found.size, found.mtime_ns):
                # The cache opened another file or version than we checked
                # (replaced meanwhile): never serve what was not checked.
                return False
            ex.mode = f.mode
            await _stream(ex, f, said)
        finally:
            await f.aclose()
        return True


def create_app(
    directory: str | os.PathLike[str],
    *,
    cache: FileCache | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    max_size: int = 1 << 30,
    logger: logging.Logger | None = None,
) -> Starlette:
    """A Starlette app serving the files under ``directory`` through a `FileCache`.

    Pass a ``cache`` or a ``cache_dir`` (then a cache of ``max_size`` bytes is
    made there).  The app's lifespan opens the cache at startup and closes it at
    shutdown (copies still running are cancelled, their temporary files
    removed).  One log line per request goes to ``logger``
    (``atempstore.serve`` by default), at INFO.

    Example:
        ```python
        app = create_app("/srv/media", cache_dir="/var/cache/media", max_size=20 * 2**30)
        uvicorn.run(app, host="127.0.0.1", port=8000)
        ```
    """
    if cache is None:
        if cache_dir is None:
            raise TypeError("create_app() needs a cache or a cache_dir")
        cache = FileCache(cache_dir, max_size=max_size)
    state = _State(os.fspath(directory), cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.root = (await run_sync(check_dirs, state.directory, os.fspath(cache.directory)))[0]
        async with cache:  # its exit cancels the copies still running
            yield

    endpoint = _Endpoint(state, logger or log)
    app = Starlette(
        routes=[Route("/{path:path}", endpoint, methods=["GET", "HEAD"])], lifespan=lifespan
    )
    app.state.cache = cache
    return app
