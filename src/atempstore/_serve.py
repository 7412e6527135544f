"""`atempstore serve`: the files under a directory over HTTP, through a `FileCache`.

Three layers, read top to bottom:

1. *Locating* a request path (in a worker thread): the URL path is split into
   plain names (``..`` refused, hidden names never served), confined to the
   served directory with the physical resolution of ``_paths.confine``, and
   the last name is examined without following it: a symlink is served only
   if it leads to a file inside the directory, a FIFO or device never.
2. *HTTP semantics* (pure functions): ETag from size and mtime, conditional
   requests (304 / 412), one ``Range`` (206 / 416), HEAD.
3. *The app and its runner*: a Starlette app whose one route streams the file
   from the cache (``CachedFile.iter_bytes``), a per-request log line, and a
   uvicorn server whose graceful stop closes the cache (cancelling copies).

Starlette and uvicorn are optional (the ``serve`` extra): they are imported
inside the functions that need them, so ``import atempstore`` works without.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import hashlib
import html
import logging
import math
import mimetypes
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
import urllib.parse
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    MutableMapping,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import anyio

from ._cache import CachedFile, FileCache
from ._errors import InvalidNameError, PathOutsideStoreError, SourceChangedError
from ._paths import confine, open_beneath
from ._threads import run_sync

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

__all__ = ("FileServer", "create_app", "default_cache_dir", "parse_range", "parse_size", "run")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MiB = 1 << 20
log = logging.getLogger("atempstore.serve")

# --------------------------------------------------------------------------
# Sizes on the command line


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", re.ASCII)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824.  Units are binary (K, M, G, T; ``KiB``/``KB`` alike)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use a number of bytes or e.g. 512M, 1G, 1.5GiB)")
    size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise ValueError(f"the size must be > 0, got {text!r}")
    return size


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


# --------------------------------------------------------------------------
# Locating a request path: always in a worker thread (it names paths)


@dataclass(frozen=True)
class _File:
    path: str  # physical: no symlink anywhere in it
    size: int
    mtime_ns: int
    media_type: str


@dataclass(frozen=True)
class _Listing:
    entries: tuple[tuple[str, bool], ...]  # (name, is a directory), hidden names left out


class _Refused(Exception):
    """The request names something this server does not serve."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _split(rel: str) -> list[str]:
    parts = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue  # "a//b" and "a/./b" name a/b: nothing escapes through them
        if part == "..":
            # Refused outright rather than normalized: a client that sends it
            # (decoded from %2e%2e too) is probing, and "a/link/.." would mean
            # the link target's parent, as the kernel resolves it.
            raise _Refused(403, "'..' is not allowed in a path")
        if part.startswith("."):
            # .git, .env, .htpasswd: never served, whatever DIR holds.
            raise _Refused(404, "hidden files are not served")
        parts.append(part)
    return parts


def _media_type(name: str) -> str:
    # mimetypes reads /etc/mime.types on first use: one more reason to be here.
    media_type = mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"
    if media_type.startswith("text/"):
        media_type += "; charset=utf-8"
    return media_type


def _inside(root: str, path: str) -> str | None:
    """``path`` relative to ``root`` if strictly inside it, else None."""
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return rel


def _locate(root: str, rel: str, *, hops: int = 0) -> _File | _Listing:
    """What the URL path ``rel`` names under the physical directory ``root``."""
    parts = _split(rel)
    if not parts:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _list(fd)
        finally:
            os.close(fd)
    try:
        where = confine(root, os.path.join(*parts))
    except PathOutsideStoreError:
        raise _Refused(403, "a symlinked directory leads out of the served directory") from None
    except InvalidNameError:
        raise _Refused(400, "the path contains a NUL byte") from None
    # confine() decided on names; the O_NOFOLLOW walk makes the decision hold
    # even if a directory is swapped for a symlink after it looked (ELOOP).
    dir_fd = open_beneath(where.root, where.parents)
    try:
        st = os.stat(where.name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = _inside(root, os.path.realpath(where.path))
            if target is None or hops:
                raise _Refused(403, "a symlink that leads out of the served directory")
            # Served as its target, by the same rules (a link to .env is not a loophole).
            return _locate(root, "" if target == os.curdir else target, hops=1)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _Refused(404, "not a regular file")  # a FIFO would hang a reader
        fd = os.open(where.name, _OPEN, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)  # what we opened, not what the name meant a moment ago
        if stat.S_ISDIR(st.st_mode):
            return _list(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(404, "not a regular file")
        return _File(os.fspath(where.path), st.st_size, st.st_mtime_ns, _media_type(where.name))
    finally:
        os.close(fd)


def _list(fd: int) -> _Listing:
    entries = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue  # vanished while listing
            entries.append((entry.name, is_dir))
    entries.sort(key=lambda e: (not e[1], e[0]))
    return _Listing(tuple(entries))


def _check_dirs(directory: str, cache_dir: str | None) -> tuple[str, str]:
    """The physical served directory and the cache directory; refuses a cache inside DIR."""
    root = os.path.realpath(directory)
    if not os.path.isdir(root):
        if not os.path.exists(root):
            raise FileNotFoundError(errno.ENOENT, "no such directory to serve", directory)
        raise NotADirectoryError(
            errno.ENOTDIR, "not a directory; pass the directory to serve", directory
        )
    cache = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    real_cache = os.path.realpath(cache)
    inside = _inside(root, real_cache)
    # Below a hidden name (~/.cache when serving ~) it is never served: fine.
    if real_cache == root or (
        inside is not None and not any(p.startswith(".") for p in inside.split(os.sep))
    ):
        raise ValueError(
            f"the cache directory {cache!r} is inside the served directory {root!r}: its"
            " files would be served. Pass --cache with a directory outside it."
        )
    return root, cache


def default_cache_dir() -> str:
    """``${XDG_CACHE_HOME:-~/.cache}/atempstore/serve`` (it may read the password db: thread it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "atempstore", "serve")


# --------------------------------------------------------------------------
# HTTP semantics: pure functions


def _etag(size: int, mtime_ns: int) -> str:
    # The same strong validator as CachedFile.etag (a test holds them equal),
    # computed here so that HEAD and 304 answers never start a copy.
    return f'"{size:x}-{mtime_ns:x}"'


class Unsatisfiable(Exception):
    """The Range lies wholly past the end of the file: 416."""


_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.ASCII | re.IGNORECASE)


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` (stop exclusive) for one byte range, or None to send it all.

    A missing, malformed or multi-range header is ignored (RFC 9110 lets a
    server ignore Range; answering several ranges would need multipart
    bodies).  A range that starts at or past the end raises `Unsatisfiable`.
    """
    if not value:
        return None
    match = _RANGE.fullmatch(value)
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None  # "bytes=9-3" is invalid: ignore it
    if start >= size:
        raise Unsatisfiable
    return start, size if not last else min(int(last) + 1, size)


_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


def _tags(value: str) -> tuple[bool, list[tuple[bool, str]]]:
    """(is "*", [(weak, opaque-tag)]) of an If-Match / If-None-Match value."""
    if value.strip() == "*":
        return True, []
    return False, [(bool(m[1]), m[2]) for m in _TAG.finditer(value)]


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None  # an invalid date is ignored (RFC 9110 13.1.3)
    return parsed.timestamp() if parsed.tzinfo is not None else None


def _preconditions(method: str, headers: dict[str, str], etag: str, mtime: int) -> int | None:
    """RFC 9110 13.2.2, in its order: 412, 304, or None to go on.  ``mtime`` in seconds."""
    if_match = headers.get("if-match")
    if if_match is not None:
        star, tags = _tags(if_match)
        if not star and not any(not weak and tag == etag for weak, tag in tags):
            return 412
    else:
        since = _date(headers.get("if-unmodified-since"))
        if since is not None and mtime > since:
            return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        star, tags = _tags(if_none_match)
        # Weak comparison: W/"x" matches "x".
        if star or any(tag == etag for _, tag in tags):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD"):
        since = _date(headers.get("if-modified-since"))
        if since is not None and mtime <= since:
            return 304
    return None


def _range_applies(headers: dict[str, str], etag: str, mtime: int) -> bool:
    """If-Range: the range only if the client's copy is still current."""
    if_range = headers.get("if-range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == etag  # strong comparison only
    return _date(if_range) == mtime


# --------------------------------------------------------------------------
# The endpoint


class _State:
    """What the app shares between its lifespan and its requests."""

    def __init__(self, directory: str, cache: FileCache) -> None:
        self.directory = directory
        self.cache = cache
        self.root: str | None = None


class _Exchange:
    """One request, as its log line reports it."""

    __slots__ = ("mode", "note", "sent", "status")

    def __init__(self) -> None:
        self.status = 0
        self.sent = 0
        self.note = ""
        self.mode = ""


def _request_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        # Repeated fields combine into one comma-separated list (RFC 9110 5.3).
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class _Endpoint:
    """The ASGI app behind the one route: GET and HEAD of the files under DIR."""

    def __init__(self, state: _State, logger: logging.Logger) -> None:
        self.state = state
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        exchange = _Exchange()
        try:
            await self._handle(scope, receive, send, exchange)
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
            state.root = (await run_sync(_check_dirs, state.directory, cache_dir))[0]
        return state.root

    async def _handle(self, scope: Scope, receive: Receive, send: Send, ex: _Exchange) -> None:
        method = scope["method"]
        head = method == "HEAD"
        rel = scope.get("path_params", {}).get("path", "")
        headers = _request_headers(scope)
        root = await self._root()
        for _ in range(3):
            try:
                # Read-only: a request cancelled meanwhile may leave it behind.
                found = await run_sync(_locate, root, rel, abandon_on_cancel=True)
            except _Refused as exc:
                ex.note = exc.reason
                await _plain(send, ex, exc.status, exc.reason, head)
                return
            except OSError as exc:
                status, reason = _os_error_status(exc)
                ex.note = reason
                await _plain(send, ex, status, reason, head)
                return
            if isinstance(found, _Listing):
                await _listing(send, ex, rel, found, head)
                return
            if rel.endswith("/"):
                ex.note = "not a directory"
                await _plain(send, ex, 404, "not a directory", head)
                return
            if await self._file(send, receive, ex, found, method, headers):
                return
        ex.note = "the file keeps changing"
        await _plain(send, ex, 503, "the file keeps changing; try again", head, retry=True)

    async def _file(
        self,
        send: Send,
        receive: Receive,
        ex: _Exchange,
        found: _File,
        method: str,
        headers: dict[str, str],
    ) -> bool:
        """Answer for ``found``; False if it changed before the cache opened it."""
        head = method == "HEAD"
        etag = _etag(found.size, found.mtime_ns)
        mtime = found.mtime_ns // 1_000_000_000
        validators = [
            (b"etag", etag.encode()),
            (b"last-modified", email.utils.formatdate(mtime, usegmt=True).encode()),
        ]
        verdict = _preconditions(method, headers, etag, mtime)
        if verdict == 304:
            await _start(send, ex, 304, validators)
            await _end(send)
            return True
        if verdict == 412:
            await _plain(send, ex, 412, "precondition failed", head)
            return True
        size = found.size
        try:
            span = parse_range(headers.get("range"), size)
        except Unsatisfiable:
            span = None
            if _range_applies(headers, etag, mtime):
                ex.note = "range not satisfiable"
                extra = [(b"content-range", f"bytes */{size}".encode())]
                await _plain(send, ex, 416, "range not satisfiable", head, extra=extra)
                return True
        if span is not None and not _range_applies(headers, etag, mtime):
            span = None
        start, stop = span if span is not None else (0, size)
        response = [
            (b"content-type", found.media_type.encode()),
            (b"content-length", str(stop - start).encode()),
            (b"accept-ranges", b"bytes"),
            *validators,
        ]
        status = 200
        if span is not None:
            status = 206
            response.append((b"content-range", f"bytes {start}-{stop - 1}/{size}".encode()))
        if head or start == stop:
            # Headers only: no reason to open the cache (and start a copy).
            await _start(send, ex, status, response)
            await _end(send)
            return True
        try:
            f = await self.state.cache.open(found.path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, SourceChangedError):
            return False  # gone, replaced or changing since we looked: look again
        except OSError as exc:
            status, reason = _os_error_status(exc)
            ex.note = reason
            await _plain(send, ex, status, reason, head)
            return True
        try:
            if f.key != found.path or f.etag != etag:
                # The cache opened another file or version than we checked
                # (replaced meanwhile): never serve what was not checked.
                return False
            ex.mode = f.mode
            await _start(send, ex, status, response)
            await _stream(f, start, stop, send, receive, ex)
        finally:
            await f.aclose()
        return True


def _os_error_status(exc: OSError) -> tuple[int, str]:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return 404, "not found"
    if isinstance(exc, PermissionError):
        return 403, "permission denied"
    if exc.errno == errno.ELOOP:
        return 403, "a symlink appeared in the path"
    if exc.errno == errno.ENAMETOOLONG:
        return 414, "name too long"
    return 500, f"cannot read it: {exc.strerror or exc}"


async def _start(
    send: Send, ex: _Exchange, status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    ex.status = status
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _end(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _plain(
    send: Send,
    ex: _Exchange,
    status: int,
    reason: str,
    head: bool,
    *,
    extra: list[tuple[bytes, bytes]] | None = None,
    retry: bool = False,
) -> None:
    body = f"{status} {reason}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    if retry:
        headers.append((b"retry-after", b"1"))
    await _start(send, ex, status, headers)
    if not head:
        ex.sent = len(body)
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _listing(send: Send, ex: _Exchange, rel: str, found: _Listing, head: bool) -> None:
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
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(page)).encode()),
    ]
    await _start(send, ex, 200, headers)
    if not head:
        ex.sent = len(page)
    await send({"type": "http.response.body", "body": b"" if head else page})


async def _stream(
    f: CachedFile, start: int, stop: int, send: Send, receive: Receive, ex: _Exchange
) -> None:
    """Send ``[start, stop)`` of ``f``; stop early (and say so) if the client leaves."""
    finished = False

    async def watch(scope: anyio.CancelScope) -> None:
        # uvicorn (ASGI 2.3) drops sends to a closed connection silently: the
        # only news of a client that hung up is http.disconnect here.
        while (await receive())["type"] != "http.disconnect":
            pass
        if not finished:
            ex.note = "client went away"
            scope.cancel()

    with anyio.CancelScope() as scope:
        # A plain task, not a task group child: a group would wrap a
        # SourceChangedError from the stream into an ExceptionGroup.
        watcher = asyncio.ensure_future(watch(scope))
        try:
            # iter_bytes is an async generator: close it now, not at GC time.
            chunks = cast("AsyncGenerator[bytes, None]", f.iter_bytes(start, stop))
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    ex.sent += len(chunk)
            finished = True
            await _end(send)
        except SourceChangedError as exc:
            # Headers are out: the only honest signal left is a cut connection
            # (the client sees fewer bytes than Content-Length), never other bytes.
            ex.note = f"aborted: {exc}"
            raise
        finally:
            finished = True
            watcher.cancel()


# --------------------------------------------------------------------------
# The app


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
    from starlette.applications import Starlette
    from starlette.routing import Route

    if cache is None:
        if cache_dir is None:
            raise TypeError("create_app() needs a cache or a cache_dir")
        cache = FileCache(cache_dir, max_size=max_size)
    state = _State(os.fspath(directory), cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.root = (await run_sync(_check_dirs, state.directory, os.fspath(cache.directory)))[0]
        async with cache:  # its exit cancels the copies still running
            yield

    endpoint = _Endpoint(state, logger or log)
    app = Starlette(
        routes=[Route("/{path:path}", endpoint, methods=["GET", "HEAD"])], lifespan=lifespan
    )
    app.state.cache = cache
    return app


# --------------------------------------------------------------------------
# The server


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
    stops waiting for downloads).

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
        handle_signals: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.max_size = max_size
        self.host = host
        self.port = port
        self.grace = grace
        self.handle_signals = handle_signals
        self.logger = logger
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

        self.root, cache_dir = await run_sync(_check_dirs, self.directory, self.cache_dir)
        self.cache_dir = cache_dir
        cache = FileCache(cache_dir, max_size=self.max_size)
        await cache.__aenter__()  # errors (a cache dir we cannot create) surface here
        try:
            sock = await run_sync(_bind, self.host, self.port)
        except BaseException:
            await cache.aclose()
            raise
        try:
            self.port = sock.getsockname()[1]
            app = create_app(self.root, cache=cache, logger=self.logger)
            config = uvicorn.Config(
                app,
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


# --------------------------------------------------------------------------
# --demo: a directory of large files, and a self-check that exercises the server

_DEMO_FILES = (("large-64MiB.bin", 64 * MiB), ("medium-16MiB.bin", 16 * MiB))
_DEMO_TEXT = """\
atempstore serve --demo

The .bin files here are served through a FileCache: the first download copies
the file into the cache while it streams, later ones come from the cache.
Try:  curl -r 1000-1999 -o /dev/null -D - URL/large-64MiB.bin
"""


def _make_demo(directory: str | None) -> tuple[str | None, str, str | None]:
    """Create the demo files; returns (a base to remove at exit, DIR, a cache dir)."""
    base = None
    cache = None
    if directory is None:
        # Under the system temp dir, new and private (mkdtemp: 0700): the demo
        # never writes into the user's working directory.
        base = tempfile.mkdtemp(prefix="atempstore-demo-")
        directory = os.path.join(base, "files")
        cache = os.path.join(base, "cache")
        os.mkdir(directory)
        with open(os.path.join(base, "outside.txt"), "w") as out:
            out.write("a file outside the served directory: never served\n")
        os.symlink(os.path.join(os.pardir, "outside.txt"), os.path.join(directory, "outside.txt"))
    os.makedirs(os.path.join(directory, "docs"), exist_ok=True)
    for name, size in _DEMO_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as out:
                for _ in range(size // MiB):
                    out.write(os.urandom(MiB))
            os.replace(tmp, path)  # never a short file under the final name
    with open(os.path.join(directory, "docs", "README.txt"), "w") as out:
        out.write(_DEMO_TEXT)
    return base, directory, cache


def _digests(path: str, tail: int) -> tuple[str, str]:
    """sha256 of the whole file and of its last ``tail`` bytes."""
    whole = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while chunk := f.read(MiB):
            whole.update(chunk)
        f.seek(max(0, size - tail))
        end = hashlib.sha256(f.read())
    return whole.hexdigest(), end.hexdigest()


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    length: int
    sha256: str
    seconds: float


async def _request(
    host: str, port: int, target: str, headers: tuple[tuple[str, str], ...] = ()
) -> _Reply:
    """A minimal HTTP/1.1 GET (the serve extra does not pull in an HTTP client)."""
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                fields[name.strip().lower()] = value.strip()
        digest = hashlib.sha256()
        length = 0
        while chunk := await reader.read(MiB):
            digest.update(chunk)
            length += len(chunk)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return _Reply(status, fields, length, digest.hexdigest(), time.perf_counter() - began)


async def _exercise(server: FileServer, say: Callable[[str], None], clients: int = 4) -> bool:
    """Download, seek, revalidate and probe the demo like clients would; True if all is right."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(server.host, server.host)
    port = server.port
    name, size = _DEMO_FILES[0]
    whole, tail = await run_sync(_digests, os.path.join(server.root, name), MiB)
    ok = True

    def check(good: bool, line: str) -> None:
        nonlocal ok
        ok = ok and good
        say(f"demo: {line}: {'ok' if good else 'WRONG'}")

    copies = server.cache.stats()["copies"]
    began = time.perf_counter()
    replies = await asyncio.gather(*(_request(host, port, f"/{name}") for _ in range(clients)))
    took = time.perf_counter() - began
    copies = server.cache.stats()["copies"] - copies
    check(
        all(r.status == 200 and r.sha256 == whole for r in replies),
        f"{clients} clients downloaded {name} at once in {took:.2f} s"
        f" ({clients * size / took / 1e6:.0f} MB/s), {copies} cop{'y' if copies == 1 else 'ies'}"
        " into the cache, sha256",
    )
    reply = await _request(host, port, f"/{name}", (("Range", f"bytes=-{MiB}"),))
    check(
        reply.status == 206 and reply.sha256 == tail,
        f"Range: bytes=-{MiB} -> {reply.status} {reply.headers.get('content-range')}, sha256",
    )
    etag = replies[0].headers.get("etag", "")
    reply = await _request(host, port, f"/{name}", (("If-None-Match", etag),))
    check(reply.status == 304, f"If-None-Match: {etag} -> {reply.status}")
    for target in ("/../outside.txt", "/%2e%2e/outside.txt", "/outside.txt"):
        if target == "/outside.txt" and not os.path.islink(
            os.path.join(server.root, "outside.txt")
        ):
            continue
        reply = await _request(host, port, target)
        check(reply.status in (403, 404), f"GET {target} (outside DIR) -> {reply.status}")
    reply = await _request(host, port, f"/{name}")
    check(
        reply.status == 200 and reply.sha256 == whole,
        f"a later download took {reply.seconds:.2f} s (from the cache), sha256",
    )
    return ok


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
    say: Callable[[str], None] = print,
) -> int:
    """What ``atempstore serve`` does; returns the exit status."""
    base = None
    if demo:
        say("demo: creating the demo files...")
        base, directory, demo_cache = await run_sync(_make_demo, directory)
        cache_dir = cache_dir or demo_cache
    assert directory is not None
    try:
        server = FileServer(
            directory,
            cache_dir=cache_dir,
            max_size=max_size,
            host=host,
            port=port,
            grace=grace,
            handle_signals=True,
        )
        async with server:
            say(f"serving {server.root} at {server.url}")
            say(f"  cache: {server.cache_dir} (at most {_human(max_size)})")
            say(
                "  stop:  Ctrl-C" + (f" (or it stops after {exit_after:g} s)" if exit_after else "")
            )
            ok = True
            if demo:
                try:
                    ok = await _exercise(server, say)
                except (OSError, asyncio.IncompleteReadError):
                    if not server.stopping:
                        raise
                    say("demo: interrupted")  # Ctrl-C while it ran
                else:
                    say(f"demo: try it: curl -o /dev/null {server.url}{_DEMO_FILES[0][0]}")
            with anyio.move_on_after(exit_after):
                await server.wait()
        say("stopped")
        return 0 if ok else 1
    finally:
        if base is not None:
            await run_sync(shutil.rmtree, base, True)
