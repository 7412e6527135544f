"""`CachedFileResponse`: what a web handler returns to serve a file through a `FileCache`.

A Starlette `Response` whose whole work happens when it is called with the
request's ASGI scope: it reads the method and headers from there, learns the
file's version (one hop), lets ``_http.answer`` decide the status, headers
and spans, and streams those spans from the cache.  No HTTP rule is decided
here; they are all in ``_http`` (shared with ``atempstore serve``).

Which hop comes first depends on the request:

* a plain GET opens the source through the cache at once (one hop: the open
  resolves the version and starts or joins the copy);
* a HEAD, or a request with a precondition (``If-None-Match``,
  ``If-Modified-Since``, ``If-Match``, ``If-Unmodified-Since``), first asks
  `FileCache.stat` (one hop, nothing in the cache directory touched), so a
  HEAD, a 304 or a 412 never starts a copy; only an answer with a body then
  opens the source, and is decided again on the version that the open found
  if the file changed in between.

Once the headers are out, a source that changes cuts the response (the
client sees fewer bytes than ``Content-Length``): the response returns
without finishing its body, which makes the server close the connection,
and logs one line.  A complete cached copy is never cut: it is one version.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, cast

import anyio
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import CachedFile, FileCache, Source
from .._errors import SourceChangedError
from .._threads import run_sync
from ._http import Answer, answer, content_disposition, error_status, media_type

if TYPE_CHECKING:
    from .._cache._source import FileInfo

__all__ = ("CachedFileResponse", "log")

log = logging.getLogger("atempstore.web")

_CONDITIONS = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
#: How often a file that changes between its stat and its open is looked at again.
_TRIES = 3


class _Cut(Exception):
    """The body cannot go on (client gone, source changed): stop, quietly."""


class CachedFileResponse(Response):
    """Serve ``source`` (a path or a `Source`) through ``cache`` (a `FileCache`).

    Return it from a Starlette or FastAPI handler.  When the server calls it,
    it answers the request with every rule of SPEC §8: ``200`` streamed from
    the cache with ``ETag``, ``Last-Modified``, ``Content-Length`` and
    ``Accept-Ranges``; ``206`` for one range, ``206 multipart/byteranges``
    for several; ``416``; ``If-Range``; ``304`` and ``412`` for the
    conditional headers; ``HEAD`` with the same headers, no body and no copy
    started; ``404`` for a missing source or a directory.  ``media_type`` is
    guessed from the name unless given; ``filename`` adds a
    ``Content-Disposition`` (``content_disposition_type``, with an RFC 5987
    ``filename*`` for a name not in ASCII).  ``status_code`` is the status
    of a whole-file answer; ``headers`` are added to every 200 and 206.

    The constructor does no I/O.

    Example:
        ```python
        from fastapi import FastAPI
        from atempstore import FileCache
        from atempstore.web import CachedFileResponse

        cache = FileCache("/var/cache/media", max_size=20 * 2**30)
        app = FastAPI()

        @app.get("/videos/{name}")
        async def video(name: str) -> CachedFileResponse:
            return CachedFileResponse(cache, f"/mnt/nfs/videos/{name}", filename=name)
        ```
    """

    def __init__(
        self,
        cache: FileCache,
        source: Source | str | os.PathLike[str],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        filename: str | None = None,
        content_disposition_type: str = "attachment",
        background: BackgroundTask | None = None,
    ) -> None:
        self.cache = cache
        self.source = source
        self.status_code = status_code
        self.media_type = media_type
        self.filename = filename
        self.content_disposition_type = content_disposition_type
        self.background = background
        self.body = b""
        self.extra = tuple((k.lower(), v) for k, v in (headers or {}).items())
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.extra]
        #: After the call, for an access log: the cache mode the body came in
        #: (``""`` if no body was read) and what went wrong, if anything.
        self.mode = ""
        self.note = ""
        # Whether this response logs its note itself: a server that writes the
        # note into its own access line (``atempstore serve``) turns it off,
        # so each event is told once.
        self.log_note = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method", "GET"))
        request = Headers(scope=scope)
        conditional = method == "HEAD" or any(name in request for name in _CONDITIONS)
        if self.media_type is None and not mimetypes.inited:
            await run_sync(mimetypes.init)  # reads /etc/mime.types: never on the loop
        for _ in range(_TRIES):
            try:
                if await self._serve(method, request, conditional, scope, receive, send):
                    break
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                await _plain(send, method, 404, "not found")
                break
            except SourceChangedError:
                continue  # changed before a byte went out: look again
            except OSError as exc:
                await _plain(send, method, *error_status(exc))
                break
        else:
            self.note = "the file keeps changing; answered 503"
            await _plain(send, method, 503, "the file keeps changing; try again")
        if self.note and self.log_note:
            if self.note == _GONE:  # expected: not a warning
                log.info("%s: the client went away", _key(self.source))
            else:
                log.warning("%s: %s", _key(self.source), self.note)
        if self.background is not None:
            await self.background()

    def _decide(self, method: str, request: Headers, info: FileInfo) -> Answer:
        name = self.filename or os.path.basename(info.key) or info.key
        extra = self.extra
        if self.filename is not None:
            disposition = content_disposition(self.content_disposition_type, self.filename)
            extra = (*extra, ("content-disposition", disposition))
        return answer(
            method,
            request,
            size=info.size,
            mtime_ns=info.mtime_ns,
            media=self.media_type or media_type(name),
            tag=info.etag,
            extra=extra,
        )

    async def _serve(
        self,
        method: str,
        request: Headers,
        conditional: bool,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> bool:
        """Answer once; False if the file changed before anything was sent."""
        said: Answer | None = None
        info: FileInfo | None = None
        if conditional:
            info = await self.cache.stat(self.source)
            said = self._decide(method, request, info)
            if said.span is None and not said.parts:
                await _headers_only(send, method, said)
                return True
        f = await self.cache.open(self.source)
        try:
            if said is None or info is None or f.info.etag != info.etag:
                said = self._decide(method, request, f.info)
            if said.span is None and not said.parts:
                await _headers_only(send, method, said)
                return True
            status = self.status_code if said.status == 200 else said.status
            self.mode = f.mode
            self.note = await _stream(f, said, status, scope, receive, send)
            return True
        finally:
            await f.aclose()


_GONE = "client went away"


def _key(source: object) -> str:
    return os.fsdecode(source) if isinstance(source, (str, os.PathLike)) else repr(source)


async def _plain(send: Send, method: str, status: int, reason: str) -> None:
    body = f"{status} {reason}\n".encode()
    await _start(send, status, (("content-type", "text/plain; charset=utf-8"),), len(body))
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _headers_only(send: Send, method: str, said: Answer) -> None:
    if said.reason:  # 412, 416: the reason as the body
        body = f"{said.status} {said.reason}\n".encode()
        fields = (*said.headers, ("content-type", "text/plain; charset=utf-8"))
        await _start(send, said.status, fields, len(body))
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        return
    # 304, and HEAD: the GET's headers (Content-Length included), no body.
    await send(
        {
            "type": "http.response.start",
            "status": said.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in said.headers],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _start(send: Send, status: int, fields: tuple[tuple[str, str], ...], n: int) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]
    headers.append((b"content-length", str(n).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _stream(
    f: CachedFile, said: Answer, status: int, scope: Scope, receive: Receive, send: Send
) -> str:
    """Send the answer's bytes of ``f``; returns a note ("" if all went out).

    Raises `SourceChangedError` if ``f`` changed before the headers went out.
    """
    pieces: list[tuple[bytes, int, int]] = (
        [(p.head, p.start, p.stop) for p in said.parts]
        if said.parts
        else [(b"", *cast("tuple[int, int]", said.span))]
    )
    # The first bytes are read before the headers go out: a source found
    # changed then is looked at again instead of being cut.
    head, start, stop = pieces[0]
    first = await f.read(start, min(stop - start, 64 * 1024))
    if len(first) < min(stop - start, 64 * 1024):
        raise SourceChangedError(f"{f.key!r} got shorter", path=f.key)
    fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in said.headers]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    spec = tuple(int(x) for x in str(scope.get("asgi", {}).get("spec_version", "2.0")).split("."))

    async def out(data: bytes) -> None:
        try:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        except OSError:  # ASGI 2.4: the client went away
            raise _Cut("the client went away") from None

    changed: SourceChangedError | None = None
    gone = finished = False

    async def body() -> None:
        nonlocal changed, gone, finished
        pieces[0] = (head + first, start + len(first), stop)
        try:
            for prefix, begin, end in pieces:
                if prefix:
                    await out(prefix)
                chunks = cast("AsyncGenerator[bytes, None]", f.iter_bytes(begin, end))
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        await out(chunk)
            await send({"type": "http.response.body", "body": said.epilogue, "more_body": False})
            # The server may say http.disconnect as soon as the response is
            # complete: that is no client going away.
            finished = True
        except _Cut:
            gone = True
        except SourceChangedError as exc:
            changed = exc

    async with anyio.create_task_group() as group:
        if spec < (2, 4):
            # Before ASGI 2.4 a send to a closed connection is dropped
            # silently: only the http.disconnect message tells.
            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not finished:
                    gone = True
                    group.cancel_scope.cancel()

            group.start_soon(watch)
        await body()
        group.cancel_scope.cancel()
    if changed is not None:
        # Headers are out: a cut connection is the only honest signal left.
        return f"aborted: {changed}"
    return _GONE if gone else ""
