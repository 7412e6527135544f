"""atempstore.web: `CachedFileResponse` against a real uvicorn server on 127.0.0.1, over httpx.

Each test starts a Starlette app whose handler returns a `CachedFileResponse`
for a file of tmp_path, served by uvicorn on a real socket, and asks it with
httpx as a client would (not the in-process ASGI transport).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from atempstore import FileCache
from atempstore._serve._http import content_disposition, parse_ranges
from atempstore.web import CachedFileResponse

KiB = 1 << 10
MiB = 1 << 20


class Served:
    """A uvicorn server of one app, and where it listens."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        self.server = server
        self.task = task
        sock = server.servers[0].sockets[0]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"


async def start(app: Starlette) -> Served:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return Served(server, task)


async def stop(served: Served) -> None:
    served.server.should_exit = True
    await served.task


def app_for(
    cache: FileCache, root: Path, **options: object
) -> tuple[Starlette, Callable[[], object]]:
    """An app serving ``/f/{name}`` as ``root / name`` through ``cache``."""

    async def download(request: Request) -> Response:
        name = request.path_params["name"]
        return CachedFileResponse(cache, root / name, **options)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/f/{name:path}", download, methods=["GET", "HEAD"])])
    return app, lambda: None


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[FileCache]:
    async with FileCache(tmp_path / "cache", max_size=256 * MiB) as c:
        yield c


@pytest.fixture
def root(tmp_path: Path) -> Path:
    where = tmp_path / "files"
    where.mkdir()
    return where


@pytest.fixture
async def url(cache: FileCache, root: Path) -> AsyncIterator[str]:
    served = await start(app_for(cache, root)[0])
    try:
        yield served.url + "/f/"
    finally:
        await stop(served)


def data(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def cache_files(cache: FileCache) -> list[str]:
    return sorted(n for n in os.listdir(cache.directory) if not n.startswith(".usage"))


# -- the whole file, HEAD, 404 ----------------------------------------------------


async def test_get_streams_the_file_with_its_validators(root: Path, url: str) -> None:
    body = data(300 * KiB)
    (root / "a.txt").write_bytes(body)
    async with httpx.AsyncClient() as client:
        r = await client.get(url + "a.txt")
    assert r.status_code == 200
    assert r.content == body
    assert r.headers["content-length"] == str(len(body))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["etag"].startswith('"')
    mtime = os.stat(root / "a.txt").st_mtime
    assert email.utils.parsedate_to_datetime(r.headers["last-modified"]).timestamp() == int(mtime)
    assert "content-disposition" not in r.headers


async def test_head_answers_the_get_headers_and_starts_no_copy(
    root: Path, url: str, cache: FileCache
) -> None:
    body = data(2 * MiB)
    (root / "big.bin").write_bytes(body)
    async with httpx.AsyncClient() as client:
        head = await client.head(url + "big.bin")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == str(len(body))
        assert head.headers["content-type"] == "application/octet-stream"
        # No copy, no part file, no entry lock: nothing of it in the cache.
        assert [n for n in cache_files(cache) if n != ".usage"] == []
        assert cache.stats()["copies"] == 0
        get = await client.get(url + "big.bin")
    assert get.content == body
    assert get.headers["etag"] == head.headers["etag"]
    assert get.headers["last-modified"] == head.headers["last-modified"]


async def test_missing_file_and_directory_are_404(root: Path, url: str) -> None:
    (root / "sub").mkdir()
    async with httpx.AsyncClient() as client:
        for path in ("nope.txt", "sub"):
            for method in ("GET", "HEAD"):
                r = await client.request(method, url + path)
                assert r.status_code == 404, (method, path)


async def test_content_disposition_and_given_media_type(cache: FileCache, root: Path) -> None:
    (root / "x.bin").write_bytes(b"hello")
    app = app_for(cache, root, filename='résumé "1".pdf', media_type="application/pdf")[0]
    served = await start(app)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(served.url + "/f/x.bin")
    finally:
        await stop(served)
    assert r.content == b"hello"
    assert r.headers["content-type"] == "application/pdf"
    assert r.headers["content-disposition"] == (
        'attachment; filename="r_sum_ \\"1\\".pdf"; '
        "filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.pdf"
    )
    assert content_disposition("inline", "plain.txt") == 'inline; filename="plain.txt"'


# -- ranges -------------------------------------------------------------------------


async def test_one_range_in_each_form(root: Path, url: str) -> None:
    body = data(1000)
    (root / "r.bin").write_bytes(body)
    async with httpx.AsyncClient() as client:
        for spec, (start, stop) in {
            "bytes=10-19": (10, 20),
            "bytes=990-": (990, 1000),
            "bytes=-5": (995, 1000),
            "bytes=900-5000": (900, 1000),
        }.items():
            r = await client.get(url + "r.bin", headers={"range": spec})
            assert r.status_code == 206, spec
            assert r.content == body[start:stop], spec
            assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/1000"
            assert r.headers["content-length"] == str(stop - start)


async def test_several_ranges_are_multipart_merged_and_parsed_back(root: Path, url: str) -> None:
    body = data(1000)
    (root / "m.bin").write_bytes(body)
    async with httpx.AsyncClient() as client:
        r = await client.get(url + "m.bin", headers={"range": "bytes=500-509, 0-9,5-19,20-29,-10"})
        head = await client.head(url + "m.bin", headers={"range": "bytes=0-9,20-29"})
    assert r.status_code == 206
    ctype = r.headers["content-type"]
    assert ctype.startswith("multipart/byteranges; boundary=")
    assert int(r.headers["content-length"]) == len(r.content)
    boundary = ctype.split("boundary=")[1].encode()
    parts = r.content.split(b"--" + boundary)
    assert parts[0] == b""
    assert parts[-1] == b"--\r\n"
    got = []
    for part in parts[1:-1]:
        fields, _, payload = part.partition(b"\r\n\r\n")
        assert payload.endswith(b"\r\n")
        crange = next(f for f in fields.split(b"\r\n") if f.startswith(b"content-range"))
        first, last = crange.split(b" ")[-1].split(b"/")[0].split(b"-")
        got.append((int(first), int(last) + 1))
        assert payload[:-2] == body[int(first) : int(last) + 1]
        assert b"content-type: application/octet-stream" in fields
    # 0-9, 5-19 and 20-29 merge (overlapping, adjacent); sorted by offset.
    assert got == [(0, 30), (500, 510), (990, 1000)]
    assert head.status_code == 206
    assert head.content == b""
    assert head.headers["content-type"].startswith("multipart/byteranges")


async def test_range_edge_cases(root: Path, url: str) -> None:
    body = data(1000)
    (root / "e.bin").write_bytes(body)
    many = "bytes=" + ",".join(f"{i * 3}-{i * 3}" for i in range(101))
    async with httpx.AsyncClient() as client:
        past = await client.get(url + "e.bin", headers={"range": "bytes=1000-,2000-3000"})
        invalid = await client.get(url + "e.bin", headers={"range": "bytes=9-3"})
        garbage = await client.get(url + "e.bin", headers={"range": "pages=1-2"})
        too_many = await client.get(url + "e.bin", headers={"range": many})
        hundred = await client.get(url + "e.bin", headers={"range": many.rsplit(",", 1)[0]})
    assert past.status_code == 416
    assert past.headers["content-range"] == "bytes */1000"
    for r in (invalid, garbage, too_many):
        assert r.status_code == 200
        assert r.content == body
    assert hundred.status_code == 206  # exactly 100 ranges still are ranges
    assert parse_ranges("bytes=0-1,,4-5", 10) == [(0, 2), (4, 6)]


async def test_if_range_by_etag_and_by_date(root: Path, url: str) -> None:
    body = data(1000)
    (root / "i.bin").write_bytes(body)
    async with httpx.AsyncClient() as client:
        first = await client.get(url + "i.bin")
        tag, date = first.headers["etag"], first.headers["last-modified"]
        rng = {"range": "bytes=0-9"}
        assert (
            await client.get(url + "i.bin", headers={**rng, "if-range": tag})
        ).status_code == 206
        weak = await client.get(url + "i.bin", headers={**rng, "if-range": "W/" + tag})
        assert weak.status_code == 200  # If-Range compares strongly
        other = await client.get(url + "i.bin", headers={**rng, "if-range": '"other"'})
        assert other.status_code == 200
        assert other.content == body
        dated = await client.get(url + "i.bin", headers={**rng, "if-range": date})
        assert dated.status_code == 206
        old = email.utils.formatdate(0, usegmt=True)
        assert (
            await client.get(url + "i.bin", headers={**rng, "if-range": old})
        ).status_code == 200


# -- conditional requests ------------------------------------------------------------


async def test_304_and_412_start_no_copy(root: Path, url: str, cache: FileCache) -> None:
    (root / "c.bin").write_bytes(data(100 * KiB))
    async with httpx.AsyncClient() as client:
        head = await client.head(url + "c.bin")
        tag, date = head.headers["etag"], head.headers["last-modified"]
        for headers, status in [
            ({"if-none-match": tag}, 304),
            ({"if-none-match": "W/" + tag}, 304),  # weak comparison
            ({"if-none-match": f'"x", {tag}'}, 304),
            ({"if-none-match": "*"}, 304),
            ({"if-modified-since": date}, 304),
            ({"if-match": '"x"'}, 412),
            ({"if-match": "W/" + tag}, 412),  # If-Match compares strongly
            ({"if-unmodified-since": email.utils.formatdate(0, usegmt=True)}, 412),
        ]:
            for method in ("GET", "HEAD"):
                r = await client.request(method, url + "c.bin", headers=headers)
                assert r.status_code == status, (method, headers)
                if status == 304:
                    assert r.headers["etag"] == tag
                    assert r.content == b""
        assert cache.stats()["copies"] == 0
        assert [n for n in cache_files(cache) if n != ".usage"] == []
        ok = await client.get(url + "c.bin", headers={"if-match": tag, "if-none-match": '"x"'})
        assert ok.status_code == 200
        assert len(ok.content) == 100 * KiB
        assert cache.stats()["copies"] == 1


# -- versions: same size, same mtime, another file -----------------------------------


def _replace_cp_p(path: Path, new: bytes, tmp: Path) -> None:
    src = tmp / "new-cp"
    src.write_bytes(new)
    st = os.stat(path)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    subprocess.run(["cp", "-p", str(src), str(path)], check=True)  # rewrites in place


def _replace_touch_r(path: Path, new: bytes, tmp: Path) -> None:
    ref = tmp / "ref"
    shutil.copy2(path, ref)
    path.write_bytes(new)  # same inode, same size
    subprocess.run(["touch", "-r", str(ref), str(path)], check=True)


def _replace_rsync_t(path: Path, new: bytes, tmp: Path) -> None:
    # What rsync -t does: write a temp file, give it the old mtime, rename over.
    st = os.stat(path)
    staged = path.with_name("." + path.name + ".rsync")
    staged.write_bytes(new)
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(staged, path)


@pytest.mark.parametrize("replace", [_replace_cp_p, _replace_touch_r, _replace_rsync_t])
async def test_a_same_size_same_mtime_replacement_is_served_new(
    root: Path, url: str, cache: FileCache, tmp_path: Path, replace: Callable[..., None]
) -> None:
    old, new = b"A" * 5000, b"B" * 5000
    path = root / "v.bin"
    path.write_bytes(old)
    async with httpx.AsyncClient() as client:
        first = await client.get(url + "v.bin")
        assert first.content == old
        f = await cache.open(path)
        assert await f.wait_cached()
        await f.aclose()
        before = os.stat(path)
        replace(path, new, tmp_path)
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        second = await client.get(url + "v.bin")
        cond = await client.get(url + "v.bin", headers={"if-none-match": first.headers["etag"]})
    assert second.content == new
    assert second.headers["etag"] != first.headers["etag"]
    assert cond.status_code == 200
    assert cond.content == new


# -- a source that changes while it is served -----------------------------------------


async def test_a_growing_file_downloads_completely_as_of_its_length(root: Path, url: str) -> None:
    path = root / "app.log"
    path.write_bytes(data(4 * MiB))
    stop_writing = threading.Event()

    def writer() -> None:
        line = 0
        with open(path, "ab") as f:
            while not stop_writing.is_set():
                f.write(b"%09d " % line + b"x" * (KiB - 11) + b"\n")
                f.flush()
                line += 1
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=60) as client:
            got = await asyncio.gather(*(client.get(url + "app.log") for _ in range(5)))
    finally:
        stop_writing.set()
        thread.join()
    final = path.read_bytes()
    for r in got:
        assert r.status_code == 200
        length = int(r.headers["content-length"])
        assert len(r.content) == length  # complete
        assert r.content == final[:length]  # the prefix as of the request


@pytest.mark.parametrize("max_size", [256 * MiB, 1 * MiB], ids=["cached", "uncached"])
async def test_an_in_place_rewrite_never_yields_mixed_bytes(
    root: Path, tmp_path: Path, max_size: int
) -> None:
    size = 16 * MiB
    path = root / "w.bin"
    path.write_bytes(b"A" * size)
    # A slow client: the server is mid-body when the file is rewritten.  Cached,
    # the copy is done by then (a whole old version); uncached, every read goes
    # to the source and sees the rewrite (a cut).
    cache = FileCache(tmp_path / "cache2", max_size=max_size)
    await cache.__aenter__()
    served = await start(app_for(cache, root)[0])
    rewrite = asyncio.Event()

    def rewriter() -> None:
        with open(path, "r+b") as f:
            for offset in range(0, size, MiB):
                f.seek(offset)
                f.write(b"B" * MiB)
                f.flush()
        with open(path, "wb") as f:  # and again, truncated and longer
            f.write(b"C" * (size + MiB))

    outcomes = []
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(2):
                if max_size > size:  # the whole file in the cache first
                    async with cache.open(path) as f:
                        assert await f.wait_cached()
                received = bytearray()
                try:
                    async with client.stream("GET", served.url + "/f/w.bin") as r:
                        length = int(r.headers["content-length"])
                        async for chunk in r.aiter_raw():
                            received += chunk
                            if len(received) >= 256 * KiB and not rewrite.is_set():
                                rewrite.set()
                                await asyncio.to_thread(rewriter)
                    outcomes.append(("whole", len(received), length))
                except httpx.RemoteProtocolError:
                    outcomes.append(("cut", len(received), length))
                version = received[:1]
                # Never mixed: every byte received is of one version.
                assert received == version * len(received), outcomes
                rewrite.clear()
                path.write_bytes(b"A" * size)
    finally:
        await stop(served)
        await cache.aclose()
    for kind, n, length in outcomes:
        assert kind == "cut" or n == length
    # Each way was seen: the whole old version from the cache, a cut from the source.
    assert {kind for kind, _, _ in outcomes} == {"whole" if max_size > size else "cut"}


def test_atempstore_imports_without_starlette_and_web_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['starlette'] = None  # as if the serve extra were not installed\n"
        "import atempstore\n"
        "assert 'atempstore.web' not in sys.modules\n"
        "try:\n"
        "    import atempstore.web\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "pip install 'atempstore[serve]'" in out.stdout, out


async def test_a_client_that_goes_away_mid_body_is_one_quiet_line(
    root: Path, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atempstore.web")
    (root / "big.bin").write_bytes(os.urandom(32 * MiB))
    async with httpx.AsyncClient() as client, client.stream("GET", url + "big.bin") as r:
        async for _ in r.aiter_raw():
            break  # leave after the first chunk
    for _ in range(200):
        if any("went away" in rec.getMessage() for rec in caplog.records):
            break
        await asyncio.sleep(0.01)
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "atempstore.web"]
    assert any("the client went away" in m for m in messages), messages
    assert not any(rec.exc_info for rec in caplog.records)


async def test_the_response_tells_its_mode_and_note_for_an_access_log(
    cache: FileCache, root: Path
) -> None:
    (root / "m.bin").write_bytes(os.urandom(MiB))
    made: list[CachedFileResponse] = []

    async def handler(request: Request) -> Response:
        made.append(CachedFileResponse(cache, root / "m.bin"))
        return made[-1]

    served = await start(Starlette(routes=[Route("/m", handler, methods=["GET", "HEAD"])]))
    try:
        async with httpx.AsyncClient() as client:
            await client.head(served.url + "/m")
            first = await client.get(served.url + "/m")
            async with cache.open(root / "m.bin") as f:
                assert await f.wait_cached()
            await client.get(served.url + "/m")
    finally:
        await stop(served)
    assert first.status_code == 200
    assert [(r.mode, r.note) for r in made] == [("", ""), ("copy", ""), ("cache", "")]
