"""``atempstore serve --demo``: a tree of large files, and one pass of clients over it.

`make_demo` writes the demo tree (in a new private directory under the
system temp dir unless DIR is given; never a short file under a final name).
`exercise` then plays the clients a user would try by hand: four downloads
at once (one copy into the cache), a ``Range`` of the last MiB, a 304
revalidation, probes out of the directory, and a download from the cache,
each checked by sha256 against the file on disk, one verdict line each.

Its HTTP client is httpx (part of the ``serve`` extra), which sends each
request target as written (``/../outside.txt`` is the probe, not what a
client library would normalize it to).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from .._threads import run_sync
from ._server import FileServer

__all__ = ("DEMO_FILES", "client", "exercise", "make_demo")

MiB = 1 << 20
DEMO_FILES = (("large-64MiB.bin", 64 * MiB), ("medium-16MiB.bin", 16 * MiB))
_DEMO_TEXT = """\
atempstore serve --demo

The .bin files here are served through a FileCache: the first download copies
the file into the cache while it streams, later ones come from the cache.
Try:  curl -r 1000-1999 -o /dev/null -D - URL/large-64MiB.bin
"""


def make_demo(directory: str | None) -> tuple[str | None, str, str | None]:
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
    for name, size in DEMO_FILES:
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
class Reply:
    status: int
    headers: Mapping[str, str]  # names in lower case
    length: int
    sha256: str
    seconds: float


Fields = tuple[tuple[str, str], ...]
Fetch = Callable[[str, Fields], Awaitable[Reply]]


@contextlib.asynccontextmanager
async def client(host: str, port: int) -> AsyncIterator[Fetch]:
    """A ``fetch(target, headers)`` that GETs ``target`` from ``host:port``."""
    import httpx  # the serve extra's; imported with the demo, not with atempstore

    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as session:

        async def fetch(target: str, headers: Fields) -> Reply:
            began = time.perf_counter()
            digest, length = hashlib.sha256(), 0
            sent_as_is = {"target": target.encode("latin-1")}
            try:
                async with session.stream(
                    "GET", target, headers=headers, extensions=sent_as_is
                ) as response:
                    async for chunk in response.aiter_raw():
                        digest.update(chunk)
                        length += len(chunk)
            except httpx.TransportError as exc:
                # Ours at the boundary: the caller handles the OSError a
                # stopping server causes.
                raise ConnectionError(f"GET {target}: {exc!r}") from exc
            seconds = time.perf_counter() - began
            return Reply(
                response.status_code, response.headers, length, digest.hexdigest(), seconds
            )

        yield fetch


async def exercise(server: FileServer, say: Callable[[str], None], clients: int = 4) -> bool:
    """Download, seek, revalidate and probe the demo like clients would; True if all is right."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(server.host, server.host)
    name, size = DEMO_FILES[0]
    whole, tail = await run_sync(_digests, os.path.join(server.root, name), MiB)
    ok = True

    def check(good: bool, line: str) -> None:
        nonlocal ok
        ok = ok and good
        say(f"demo: {line}: {'ok' if good else 'WRONG'}")

    async with client(host, server.port) as fetch:
        copies = server.cache.stats()["copies"]
        began = time.perf_counter()
        replies = await asyncio.gather(*(fetch(f"/{name}", ()) for _ in range(clients)))
        took = time.perf_counter() - began
        copies = server.cache.stats()["copies"] - copies
        check(
            all(r.status == 200 and r.sha256 == whole for r in replies),
            f"{clients} clients downloaded {name} at once in {took:.2f} s"
            f" ({clients * size / took / 1e6:.0f} MB/s), {copies}"
            f" cop{'y' if copies == 1 else 'ies'} into the cache, sha256",
        )
        reply = await fetch(f"/{name}", (("Range", f"bytes=-{MiB}"),))
        check(
            reply.status == 206 and reply.sha256 == tail,
            f"Range: bytes=-{MiB} -> {reply.status} {reply.headers.get('content-range')}, sha256",
        )
        etag = replies[0].headers.get("etag", "")
        reply = await fetch(f"/{name}", (("If-None-Match", etag),))
        check(reply.status == 304, f"If-None-Match: {etag} -> {reply.status}")
        for target in ("/../outside.txt", "/%2e%2e/outside.txt", "/outside.txt"):
            if target == "/outside.txt" and not os.path.islink(
                os.path.join(server.root, "outside.txt")
            ):
                continue
            reply = await fetch(target, ())
            check(reply.status in (403, 404), f"GET {target} (outside DIR) -> {reply.status}")
        reply = await fetch(f"/{name}", ())
        check(
            reply.status == 200 and reply.sha256 == whole,
            f"a later download took {reply.seconds:.2f} s (from the cache), sha256",
        )
    return ok
