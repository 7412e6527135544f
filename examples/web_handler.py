"""Async web handlers that take uploads and serve downloads with atempstore.

Run it as it is: it starts a server on a free port, uploads a file, downloads
it whole and in part, prints what happened and exits::

    python examples/web_handler.py
    python examples/web_handler.py --serve --port 8000   # keep serving

It needs Starlette and uvicorn: ``pip install 'atempstore[serve]'``.

``PUT /files/{name}``
    The body is streamed into a private file from a `TempFileManager`, never
    into the public directory where a half-written upload would be visible.
    It is hashed on the way; if the client sent ``X-Content-SHA256`` and it
    does not match, the upload is refused and its temporary file removed.
    Only a complete, verified upload is published, with one rename (or, across
    file systems, `open_atomic`: a temporary copy beside the target, fsynced,
    then renamed).  A server killed mid-upload leaves its temporary files in
    its own directory, which the next start removes (`clean_userdir`).
``GET /files/{name}`` (and ``HEAD``)
    The handler returns a `CachedFileResponse`: streamed through a
    `FileCache` (the first download copies the file into the cache while it
    streams, later ones come from the cache), with every rule of HTTP a
    download needs and none written here: ranges (several at once as
    ``multipart/byteranges``), ``If-Range``, 304 / 412 for conditional
    requests, ``HEAD`` without starting a copy, 404, and a
    ``Content-Disposition`` naming the file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import os
import re
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiofiles
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from atempstore import FileCache, TempFileManager, open_atomic
from atempstore.web import CachedFileResponse

MiB = 1 << 20
MAX_UPLOAD = 1 << 30
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # no "/", no "..", no hidden names


# -- the handlers ----------------------------------------------------------------


def target(request: Request) -> Path | None:
    name = request.path_params["name"]
    return Path(request.app.state.files, name) if NAME.fullmatch(name) else None


def publish(tmp: Path, dest: Path) -> bool:
    """Move a finished upload into place atomically; False if it must be copied."""
    try:
        os.replace(tmp, dest)  # same file system: one atomic rename
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True


async def upload(request: Request) -> Response:
    dest = target(request)
    if dest is None:
        return PlainTextResponse("bad file name\n", status_code=400)
    temp: TempFileManager = request.app.state.temp
    tmp = await temp.create_path(prefix="upload-", suffix=".part")
    digest = hashlib.sha256()
    size = 0
    try:
        async with aiofiles.open(tmp, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD:
                    return PlainTextResponse("too large\n", status_code=413)
                digest.update(chunk)
                await out.write(chunk)
        expected = request.headers.get("x-content-sha256")
        if expected is not None and expected != digest.hexdigest():
            return PlainTextResponse("checksum mismatch\n", status_code=400)
        if not await asyncio.to_thread(publish, tmp, dest):
            # Another file system: copy beside the target, fsync, then rename.
            async with open_atomic(dest, overwrite=True) as out, aiofiles.open(tmp, "rb") as src:
                while chunk := await src.read(MiB):
                    await out.write(chunk)
    finally:
        with contextlib.suppress(FileNotFoundError):
            await temp.remove_path(tmp)  # gone already when it was renamed into place
    return PlainTextResponse(f"{size} bytes, sha256 {digest.hexdigest()}\n", status_code=201)


async def download(request: Request) -> Response:
    path = target(request)
    if path is None:
        return PlainTextResponse("bad file name\n", status_code=400)
    # Opening, ranges, validators, HEAD, 404: all the response's business.
    return CachedFileResponse(request.app.state.cache, path, filename=path.name)


def make_app(files: Path, cache_dir: Path) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with TempFileManager(prefix="web-upload") as temp, FileCache(cache_dir) as cache:
            # Uploads that a killed server left half-written: their process is gone.
            cleaned = await temp.clean_userdir()
            if cleaned.removed:
                print(f"removed {len(cleaned.removed)} directories left by dead servers")
            app.state.temp, app.state.cache, app.state.files = temp, cache, files
            yield

    return Starlette(
        routes=[
            Route("/files/{name}", upload, methods=["PUT"]),
            Route("/files/{name}", download, methods=["GET", "HEAD"]),
        ],
        lifespan=lifespan,
    )


# -- running it ------------------------------------------------------------------


Check = Callable[[int, bytes], bool]


def call(url: str, method: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    """A blocking HTTP call with the standard library (run in a thread below)."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


async def exercise(base: str) -> bool:
    payload = os.urandom(24 * MiB)
    sha = hashlib.sha256(payload).hexdigest()
    results = []

    async def show(
        what: str, check: Check, path: str, data: bytes | None = None, **headers: str
    ) -> None:
        method = "GET" if data is None else "PUT"
        began = time.perf_counter()
        fields = {name.replace("_", "-"): value for name, value in headers.items()}
        status, body = await asyncio.to_thread(call, base + path, method, data, fields)
        took = time.perf_counter() - began
        results.append(check(status, body))
        print(f"{method} {what:<44} -> {status}, {len(body):>10,} bytes in {took * 1e3:6.1f} ms")

    def whole(status: int, body: bytes) -> bool:
        return status == 200 and hashlib.sha256(body).hexdigest() == sha

    await show(
        "/files/data.bin (24 MiB, with its sha256)",
        lambda status, body: status == 201 and sha in body.decode(),
        "/files/data.bin",
        payload,
        x_content_sha256=sha,
    )
    await show(
        "/files/bad.bin (with a wrong sha256)",
        lambda status, body: status == 400,
        "/files/bad.bin",
        b"x" * 1000,
        x_content_sha256="0" * 64,
    )
    await show("/files/data.bin (copied into the cache)", whole, "/files/data.bin")
    await show(
        "/files/data.bin with Range: bytes=1000-1999",
        lambda status, body: status == 206 and body == payload[1000:2000],
        "/files/data.bin",
        range="bytes=1000-1999",
    )
    await show("/files/data.bin again (from the cache)", whole, "/files/data.bin")
    await show(
        "/files/data.bin with Range: bytes=0-9,-10",
        lambda status, body: status == 206 and payload[:10] in body and payload[-10:] in body,
        "/files/data.bin",
        range="bytes=0-9,-10",
    )
    await show(
        "/files/data.bin with If-None-Match: *",
        lambda status, body: status == 304 and body == b"",
        "/files/data.bin",
        if_none_match="*",
    )
    await show(
        "/files/bad.bin (its upload was refused)",
        lambda status, body: status == 404,
        "/files/bad.bin",
    )
    await show("/files/..secret", lambda status, body: status == 400, "/files/..secret")
    return all(results)


async def main(port: int, keep_serving: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="atempstore-web-") as tmp:
        files = Path(tmp, "files")
        files.mkdir()
        app = make_app(files, Path(tmp, "cache"))
        sock = socket.create_server(("127.0.0.1", port))
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                return 1
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        print(f"serving uploads and downloads at {base}/files/")
        ok = True
        if keep_serving:
            await task
        else:
            ok = await exercise(base)
            server.should_exit = True
            await task
        print("all as expected" if ok else "SOMETHING WENT WRONG")
        return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", action="store_true", help="keep serving (Ctrl-C to stop)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.port, args.serve)))
