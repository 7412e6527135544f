"""A FastAPI app that serves downloads through a `FileCache` with `CachedFileResponse`.

Run it as it is: it makes a few files, starts the app on a free port, asks
for them whole, in ranges, conditionally and with HEAD, prints what happened
and exits::

    python examples/fastapi_app.py
    python examples/fastapi_app.py --serve --port 8000   # keep serving

It needs FastAPI and uvicorn: ``pip install fastapi 'atempstore[serve]'``.

The handler is three lines: check the name, build the path, return a
`CachedFileResponse`.  Everything HTTP asks of a download (ranges, several
at once as ``multipart/byteranges``, ``If-Range``, 304 and 412, ``HEAD``
without starting a copy, 404 for what is not there) is the response's.  The
cache is opened and closed by the app's lifespan, so a stopping server
cancels the copies still running and removes their temporary files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request

from atempstore import FileCache
from atempstore.web import CachedFileResponse

MiB = 1 << 20
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # no "/", no "..", no hidden names


def make_app(files: Path, cache_dir: Path) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with FileCache(cache_dir, max_size=1 << 30) as cache:
            app.state.cache = cache
            yield

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/downloads/{name}", methods=["GET", "HEAD"])
    async def download(name: str, request: Request) -> CachedFileResponse:
        if not NAME.fullmatch(name):
            raise HTTPException(status_code=400, detail="bad file name")
        return CachedFileResponse(request.app.state.cache, files / name, filename=name)

    return app


# -- running it ------------------------------------------------------------------


Check = Callable[[httpx.Response], bool]


async def exercise(base: str, files: Path) -> bool:
    video = os.urandom(8 * MiB)
    (files / "video.mp4").write_bytes(video)
    (files / "notes.txt").write_text("remember the milk\n")
    results = []
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def show(what: str, check: Check, method: str, path: str, **headers: str) -> None:
            began = time.perf_counter()
            fields = {name.replace("_", "-"): value for name, value in headers.items()}
            r = await client.request(method, path, headers=fields)
            took = time.perf_counter() - began
            results.append(check(r))
            print(
                f"{method:<4} {what:<46} -> {r.status_code}, {len(r.content):>9,} bytes"
                f" in {took * 1e3:6.1f} ms"
            )

        await show(
            "/downloads/video.mp4 (HEAD: no copy)",
            lambda r: r.status_code == 200 and r.headers["content-length"] == str(len(video)),
            "HEAD",
            "/downloads/video.mp4",
        )
        await show(
            "/downloads/video.mp4 (copied into the cache)",
            lambda r: r.status_code == 200 and r.content == video,
            "GET",
            "/downloads/video.mp4",
        )
        await show(
            "/downloads/video.mp4 Range: bytes=-1000",
            lambda r: r.status_code == 206 and r.content == video[-1000:],
            "GET",
            "/downloads/video.mp4",
            range="bytes=-1000",
        )
        etag = (await client.head("/downloads/video.mp4")).headers["etag"]
        await show(
            "/downloads/video.mp4 If-None-Match: its ETag",
            lambda r: r.status_code == 304,
            "GET",
            "/downloads/video.mp4",
            if_none_match=etag,
        )
        await show(
            "/downloads/notes.txt",
            lambda r: (
                r.text == "remember the milk\n"
                and r.headers["content-type"] == "text/plain; charset=utf-8"
                and r.headers["content-disposition"] == 'attachment; filename="notes.txt"'
            ),
            "GET",
            "/downloads/notes.txt",
        )
        await show(
            "/downloads/missing.bin",
            lambda r: r.status_code == 404,
            "GET",
            "/downloads/missing.bin",
        )
        await show(
            "/downloads/..secret",
            lambda r: r.status_code == 400,
            "GET",
            "/downloads/..secret",
        )
    return all(results)


async def main(port: int, keep_serving: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="atempstore-fastapi-") as tmp:
        files = Path(tmp, "files")
        files.mkdir()
        app = make_app(files, Path(tmp, "cache"))
        sock = socket.create_server(("127.0.0.1", port))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                return 1
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        print(f"serving downloads at {base}/downloads/")
        ok = True
        if keep_serving:
            await task
        else:
            ok = await exercise(base, files)
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
