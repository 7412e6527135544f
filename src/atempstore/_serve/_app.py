"""The ASGI app: GET and HEAD of the files under a directory, through a `FileCache`.

`create_app` is a Starlette app (for its lifespan, and to be mountable)
with no route pattern: every request goes to one ASGI endpoint, which routes
by itself, exactly.  A route pattern would see the path that uvicorn decoded
as UTF-8 (a name that is not UTF-8 becomes U+FFFD, unreachable) and matched
with ``$`` (``/small.txt%0A`` matched ``small.txt``).  The endpoint decodes
the raw target (``scope["raw_path"]``) to bytes, and those bytes are the
names, through ``os.fsdecode`` (surrogateescape) down to the file system.

Each request locates its path in one worker-thread hop (``_locate``), lets
``_http.answer`` decide the status and headers, and answers with Starlette's
own responses: a `StreamingResponse` over ``CachedFile.iter_bytes`` for file
bytes (it also watches for the client hanging up), plain ``Response``
objects for headers only, and `PlainTextResponse` / `HTMLResponse` for
errors and listings.  Every request ends with one log line (client, method,
target as sent, status, bytes sent, time, cache mode, Range, User-Agent, and
a note when something went wrong), which is why the endpoint is an ASGI
callable and not a request/response function: it sees the response start
and each chunk go out.  A source that changes once the headers are out cuts
the connection: the endpoint returns without finishing the body (the server
closes it), and the note says why; no exception leaves the app for it.

Starlette is imported at the top: this module is only imported once the
``serve`` extra is known to be there (``_serve/__init__`` loads it lazily).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from .. import FileCache
from .._threads import run_sync
from ._http import error_status
from ._locate import File, Listing, Refused, check_dirs, locate
from ._response import CachedFileResponse

__all__ = ("access_line", "create_app", "log")

log = logging.getLogger("atempstore.serve")


class _State:
    """What the app shares between its lifespan and its requests."""

    def __init__(self, directory: str, cache: FileCache) -> None:
        self.directory = directory
        self.cache = cache
        self.root: str | None = None


# scheme "://" authority: what an absolute-form target (RFC 9112 3.2.2) starts with.
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def _request_path(scope: Scope) -> bytes | None:
    """The path the request names below the app, as bytes; None if it names none.

    From the raw target: percent-decoded to bytes, never through a text
    codec, so every byte string a name can be arrives as it is.  An
    absolute-form target (``GET http://host/x``, which h11 passes as it came)
    names its path.  The ``root_path`` of a mount (``app.mount("/files", ...)``)
    is taken off.
    """
    raw: bytes | None = scope.get("raw_path")
    if raw is None:  # optional in ASGI: then only the decoded path is known
        decoded = str(scope.get("path", "")).encode("utf-8", "surrogateescape")
    else:
        if not raw.startswith(b"/"):
            match = _ABSOLUTE.match(raw)
            if match is None:
                return None  # "*" or garbage: no path of ours
            raw = raw[match.end() :] or b"/"
        decoded = urllib.parse.unquote_to_bytes(raw)
    root = str(scope.get("root_path", "")).encode("utf-8", "surrogateescape")
    if root and decoded.startswith(root) and decoded[len(root) : len(root) + 1] in (b"", b"/"):
        decoded = decoded[len(root) :]
    return decoded


def _shown(name: str) -> str:
    """A name as text for people: bytes that are not UTF-8 as ``\\xe9``, never mojibake."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _quoted(value: str | None) -> str:
    """A request header for the log line: quoted, with nothing that could fake a line."""
    if value is None:
        return '"-"'
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable() and char.isascii():
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")
    return '"' + "".join(out) + '"'


class _Exchange:
    """One request: where its answer goes, and what its log line reports."""

    __slots__ = ("head", "mode", "note", "receive", "scope", "send", "sent", "started", "status")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.head = scope["method"] == "HEAD"
        self.status = 0
        self.sent = 0
        self.note = ""
        self.mode = ""
        self.started = False

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
    note: bool = True,
) -> None:
    if note and not ex.note:
        ex.note = reason
    fields = dict(extra)
    if retry:
        fields["retry-after"] = "1"
    await ex.reply(_whole(PlainTextResponse, f"{status} {reason}\n".encode(), status, ex, **fields))


def _listing(rel: str, found: Listing, ex: _Exchange) -> Response:
    base = "/".join(p for p in rel.split("/") if p not in ("", "."))
    here = "/" + (f"{base}/" if base else "")
    title = html.escape(_shown(here))
    # Links are absolute, below the mount point when the app is mounted.
    prefix = str(ex.scope.get("root_path", "")).encode("utf-8", "surrogateescape")
    items = []
    for name, is_dir in found.entries:
        slash = "/" if is_dir else ""
        # quote() of bytes: a name that is not UTF-8 is percent-encoded as it is.
        href = urllib.parse.quote(prefix + os.fsencode(here + name)) + slash
        shown = html.escape(_shown(name))
        items.append(f'<li><a href="{html.escape(href)}">{shown}{slash}</a></li>')
    page = (
        f"<!doctype html>\n<meta charset=utf-8>\n<title>{title}</title>\n<h1>{title}</h1>\n"
        f"<ul>\n{chr(10).join(items)}\n</ul>\n"
    ).encode()
    return _whole(HTMLResponse, page, 200, ex)


class _Endpoint:
    """The ASGI app behind the one route: GET and HEAD of the files under DIR."""

    def __init__(self, state: _State, logger: logging.Logger) -> None:
        self.state = state
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # websockets: not ours (the lifespan is Starlette's)
        began = time.perf_counter()
        exchange = _Exchange(scope, receive, send)
        try:
            await self._handle(exchange)
        except asyncio.CancelledError:
            exchange.note = exchange.note or "cancelled (server stopping)"
            raise
        except BaseException as exc:
            exchange.note = exchange.note or f"failed: {exc!r}"
            if not exchange.started:
                exchange.status = 500  # what Starlette's error middleware answers
            raise
        finally:
            headers = Headers(scope=scope)
            self.log.info(
                access_line(
                    scope,
                    exchange.status,
                    exchange.sent,
                    time.perf_counter() - began,
                    exchange.mode,
                    headers.get("range"),
                    headers.get("user-agent"),
                    exchange.note,
                )
            )

    async def _root(self) -> str:
        state = self.state
        if state.root is None:  # the lifespan did not run (a bare ASGI test harness)
            cache_dir = os.fspath(state.cache.directory)
            state.root = (await run_sync(check_dirs, state.directory, cache_dir))[0]
        return state.root

    async def _handle(self, ex: _Exchange) -> None:
        if ex.scope["method"] not in ("GET", "HEAD"):
            await _plain(ex, 405, "method not allowed", extra=(("allow", "GET, HEAD"),))
            return
        path = _request_path(ex.scope)
        if path is None:
            await _plain(ex, 400, "the request target names no path")
            return
        # The bytes are the names: fsdecode keeps any byte (surrogateescape),
        # and the file system gets them back as they came.
        rel = os.fsdecode(path.lstrip(b"/"))
        headers = Headers(scope=ex.scope)
        root = await self._root()
        for _ in range(3):
            try:
                # Read-only: a request cancelled meanwhile may leave it behind.
                found = await run_sync(locate, root, rel, abandon_on_cancel=True)
            except Refused as exc:
                await _plain(ex, exc.status, exc.reason)
                return
            except OSError as exc:
                status, reason = error_status(exc)
                await _plain(ex, status, reason)
                return
            if isinstance(found, Listing):
                await ex.reply(_listing(rel, found, ex))
                return
            if rel.endswith("/"):
                await _plain(ex, 404, "not a directory")
                return
            if await self._file(ex, found, headers):
                return
        ex.note = "the file keeps changing"
        await _plain(ex, 503, "the file keeps changing; try again", retry=True)

    async def _file(self, ex: _Exchange, found: File, headers: Headers) -> bool:
        """Answer for ``found`` with the web layer's `CachedFileResponse`: the
        server is built on exactly what users' handlers return."""
        del headers  # the response reads them from the scope itself
        response = CachedFileResponse(self.state.cache, found.path, media_type=found.media_type)
        response.log_note = False  # the access line below tells it

        async def send(message: Message) -> None:
            # Counted for the access line: the status once it is out, and the
            # body bytes once each send of them returned.
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                ex.started = True
                await ex.send(message)
            elif message["type"] == "http.response.body":
                await ex.send(message)
                ex.sent += len(message.get("body", b""))
            else:
                await ex.send(message)

        await response(ex.scope, ex.receive, send)
        ex.mode, ex.note = response.mode, response.note or ex.note
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

    app = Starlette(lifespan=lifespan)
    # No route: the router hands every request to its default, the endpoint,
    # which routes by the raw bytes (see the module docstring).
    app.router.default = _Endpoint(state, logger or log)
    app.router.redirect_slashes = False
    app.state.cache = cache
    return app


def access_line(
    scope: Scope,
    status: int,
    sent: int,
    seconds: float,
    mode: str,
    range_: str | None,
    agent: str | None,
    note: str,
) -> str:
    """The access-log line of one request (the server logs refused heads with it too).

    ``client method target status bytes B ms mode "Range" "User-Agent" (note)``;
    the target as sent, ``-`` for what is not known, the note only if any.
    """
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "-"
    raw = scope.get("raw_path")
    target = raw.decode("latin-1") if raw is not None else str(scope.get("path", "-"))
    line = (
        f"{where} {scope.get('method', '-')} {target} {status or '-'} {sent} B"
        f" {1e3 * seconds:.1f} ms {mode or '-'} {_quoted(range_)} {_quoted(agent)}"
    )
    return f"{line} ({note})" if note else line
