"""`atempstore serve`: a real uvicorn server on 127.0.0.1, real httpx clients, real files."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from atempstore import FileCache
from atempstore._serve import FileServer, Unsatisfiable, parse_range, parse_size
from atempstore._serve._demo import client as demo_client
from atempstore._serve._http import answer

from .conftest import REPO, open_fds, require_tool, run_python

MiB = 1 << 20
BIG = 32 * MiB
SECRET = b"TOPSECRET outside the served directory"


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(BIG)


@dataclass
class Tree:
    root: Path
    cache: Path
    big: Path
    payload: bytes


@pytest.fixture
def tree(tmp_path: Path, payload: bytes) -> Tree:
    root = tmp_path / "www"
    (root / "sub" / "deep").mkdir(parents=True)
    big = root / "big.bin"
    big.write_bytes(payload)
    (root / "small.txt").write_text("hello\n")
    (root / "empty.bin").write_bytes(b"")
    (root / "sub" / "deep" / "file.txt").write_text("deep\n")
    (root / ".env").write_bytes(SECRET)
    (root / "sub" / ".git").mkdir()
    (root / "sub" / ".git" / "config").write_bytes(SECRET)
    (tmp_path / "outside.txt").write_bytes(SECRET)
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "secret.txt").write_bytes(SECRET)
    (root / "link-in.bin").symlink_to("big.bin")
    (root / "link-out.txt").symlink_to("../outside.txt")
    (root / "link-abs.txt").symlink_to(tmp_path / "outside.txt")
    (root / "dir-out").symlink_to("../outside_dir")
    (root / "link-hidden").symlink_to(".env")
    os.mkfifo(root / "pipe")
    return Tree(root, tmp_path / "cache", big, payload)


@pytest.fixture
async def server(tree: Tree) -> AsyncIterator[FileServer]:
    async with FileServer(tree.root, cache_dir=tree.cache, port=0) as running:
        yield running


@pytest.fixture
async def client(server: FileServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        yield c


async def raw_request(port: int, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send ``target`` byte for byte: httpx would normalize ``..`` away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("latin-1"))
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def download(client: httpx.AsyncClient, path: str) -> tuple[int, str, int]:
    digest = hashlib.sha256()
    n = 0
    async with client.stream("GET", path) as response:
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            n += len(chunk)
    return response.status_code, digest.hexdigest(), n


# --------------------------------------------------------------------------
# Downloads


async def test_get_whole_file(tree: Tree, client: httpx.AsyncClient) -> None:
    status, digest, n = await download(client, "/big.bin")
    assert (status, n, digest) == (200, BIG, sha(tree.payload))
    response = await client.get("/small.txt")
    assert response.content == b"hello\n"
    st = tree.root.joinpath("small.txt").stat()
    assert response.headers["content-length"] == "6"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["accept-ranges"] == "bytes"
    # Size and mtime, then the file's identity (inode, ctime): a file replaced
    # with the same size and mtime gets another ETag (SPEC §8).
    assert re.fullmatch(rf'"{st.st_size:x}-{st.st_mtime_ns:x}-[0-9a-f]+"', response.headers["etag"])
    assert response.headers["last-modified"] == email.utils.formatdate(
        st.st_mtime_ns // 10**9, usegmt=True
    )
    assert (await client.get("/sub/deep/file.txt")).content == b"deep\n"
    empty = await client.get("/empty.bin")
    assert (empty.status_code, empty.content, empty.headers["content-length"]) == (200, b"", "0")
    # A symlink to a file inside DIR is that file.
    assert sha((await client.get("/link-in.bin")).content) == sha(tree.payload)


async def test_32_concurrent_clients_get_exact_bytes_from_one_copy(
    tree: Tree, server: FileServer, client: httpx.AsyncClient
) -> None:
    results = await asyncio.gather(*(download(client, "/big.bin") for _ in range(32)))
    assert results == [(200, sha(tree.payload), BIG)] * 32
    stats = server.cache.stats()
    assert stats["copies"] == 1, stats
    assert stats["published"] == 1, stats
    assert stats["copied_bytes"] == BIG, stats
    cached = [p for p in os.listdir(tree.cache) if not p.startswith(".")]
    assert len(cached) == 1
    assert sha(tree.cache.joinpath(cached[0]).read_bytes()) == sha(tree.payload)
    # And once cached, it is served from the cache.
    status, digest, _ = await download(client, "/big.bin")
    assert (status, digest) == (200, sha(tree.payload))
    assert server.cache.stats()["hits"] == 1


@pytest.mark.parametrize("cold", [True, False])
async def test_ranges_at_start_middle_and_end(
    tree: Tree, server: FileServer, client: httpx.AsyncClient, cold: bool
) -> None:
    data = tree.payload
    if not cold:
        await download(client, "/big.bin")
    cases = [
        ("bytes=0-99", 0, 100),
        ("bytes=1000-1999", 1000, 2000),
        (f"bytes={BIG // 2}-{BIG // 2 + 3 * MiB - 1}", BIG // 2, BIG // 2 + 3 * MiB),
        ("bytes=-100", BIG - 100, BIG),
        (f"bytes={BIG - 10}-", BIG - 10, BIG),
        (f"bytes={BIG - 10}-{BIG * 2}", BIG - 10, BIG),  # clipped to the end
        ("bytes=0-0", 0, 1),
        (f"bytes=-{BIG * 2}", 0, BIG),  # a suffix longer than the file: all of it
    ]
    for header, start, stop in cases:
        response = await client.get("/big.bin", headers={"Range": header})
        assert response.status_code == 206, header
        assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{BIG}", header
        assert response.headers["content-length"] == str(stop - start)
        assert response.content == data[start:stop], header
    # A range near the end of a cold file does not wait for the copy.
    assert server.cache.stats()["copies"] == 1


async def test_unsatisfiable_ranges_get_416(client: httpx.AsyncClient) -> None:
    for path, header, size in [
        ("/big.bin", f"bytes={BIG}-", BIG),
        ("/big.bin", f"bytes={BIG + 5}-{BIG + 10}", BIG),
        ("/big.bin", "bytes=-0", BIG),
        ("/empty.bin", "bytes=0-", 0),
        ("/empty.bin", "bytes=-5", 0),
    ]:
        response = await client.get(path, headers={"Range": header})
        assert response.status_code == 416, header
        assert response.headers["content-range"] == f"bytes */{size}"


async def test_ranges_that_are_ignored_send_the_whole_file(
    tree: Tree, client: httpx.AsyncClient
) -> None:
    small = b"hello\n"
    for header in ["bytes=5-2", "items=0-1", "bytes=a-b", "bytes=-", "0-1"]:
        response = await client.get("/small.txt", headers={"Range": header})
        assert (response.status_code, response.content) == (200, small), header
    # Several ranges are no longer ignored: 206 multipart/byteranges (SPEC §8).
    several = await client.get("/small.txt", headers={"Range": "bytes=0-1,3-4"})
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges; boundary=")
    etag = (await client.head("/small.txt")).headers["etag"]
    partial = await client.get("/small.txt", headers={"Range": "bytes=1-2", "If-Range": etag})
    assert (partial.status_code, partial.content) == (206, b"el")
    stale = await client.get("/small.txt", headers={"Range": "bytes=1-2", "If-Range": '"0-0"'})
    assert (stale.status_code, stale.content) == (200, small)


async def test_head_sends_headers_only_and_starts_no_copy(
    tree: Tree, server: FileServer, client: httpx.AsyncClient
) -> None:
    head = await client.head("/big.bin")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(BIG)
    ranged = await client.head("/big.bin", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.headers["content-length"] == "10"
    assert server.cache.stats()["opens"] == 0  # HEAD never starts a copy
    get = await client.get("/big.bin", headers={"Range": "bytes=0-0"})
    assert head.headers["etag"] == get.headers["etag"]
    assert head.headers["last-modified"] == get.headers["last-modified"]
    async with server.cache.open(tree.big) as f:
        assert f.etag == head.headers["etag"]  # one validator, whoever computes it


async def test_conditional_requests(tree: Tree, client: httpx.AsyncClient) -> None:
    first = await client.get("/small.txt")
    etag = first.headers["etag"]
    modified = first.headers["last-modified"]
    for headers in [
        {"If-None-Match": etag},
        {"If-None-Match": f'"other", {etag}'},
        {"If-None-Match": f"W/{etag}"},
        {"If-None-Match": "*"},
        {"If-Modified-Since": modified},
        {"If-Modified-Since": email.utils.formatdate(time.time() + 3600, usegmt=True)},
    ]:
        response = await client.get("/small.txt", headers=headers)
        assert response.status_code == 304, headers
        assert response.content == b""
        assert response.headers["etag"] == etag
    head = await client.head("/small.txt", headers={"If-None-Match": etag})
    assert head.status_code == 304
    for headers in [
        {"If-None-Match": '"other"'},
        {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
        {"If-Modified-Since": "not a date"},
        # If-None-Match wins over If-Modified-Since.
        {"If-None-Match": '"other"', "If-Modified-Since": modified},
    ]:
        response = await client.get("/small.txt", headers=headers)
        assert (response.status_code, response.content) == (200, b"hello\n"), headers
    for headers in [
        {"If-Match": '"other"'},
        {"If-Match": f"W/{etag}"},  # If-Match compares strongly
        {"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
    ]:
        assert (await client.get("/small.txt", headers=headers)).status_code == 412, headers
    assert (await client.get("/small.txt", headers={"If-Match": etag})).status_code == 200
    # Changed: the old validator no longer matches, and the new bytes come.
    path = tree.root / "small.txt"
    path.write_text("changed\n")
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 5 * 10**9))
    response = await client.get("/small.txt", headers={"If-None-Match": etag})
    assert (response.status_code, response.content) == (200, b"changed\n")
    assert response.headers["etag"] != etag


# --------------------------------------------------------------------------
# What is not served


TRAVERSALS = [
    "/../outside.txt",
    "/%2e%2e/outside.txt",
    "/%2E%2E/outside.txt",
    "/..%2foutside.txt",
    "/%2e%2e%2foutside.txt",
    "/sub/../../outside.txt",
    "/sub/%2e%2e/%2e%2e/outside.txt",
    "/sub/deep/../../../outside.txt",
    "/link-out.txt",
    "/link-abs.txt",
    "/dir-out/secret.txt",
    "/dir-out/",
    "/.env",
    "/link-hidden",
    "/sub/.git/config",
    "/%2eenv",
    "/sub/%2egit/config",
]


async def test_traversal_attempts_are_refused(
    tree: Tree, server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atempstore.serve")
    for target in TRAVERSALS:
        status, body = await raw_request(server.port, target)
        assert status in (403, 404), (target, status)
        assert SECRET not in body, target
    statuses = {t: (await raw_request(server.port, t))[0] for t in TRAVERSALS}
    assert statuses["/../outside.txt"] == 403
    assert statuses["/%2e%2e/outside.txt"] == 403
    assert statuses["/link-out.txt"] == 403
    assert statuses["/dir-out/secret.txt"] == 403
    assert statuses["/.env"] == 404
    # An absolute path in the URL is still taken below DIR.
    absolute = "/" + str(tree.root.parent / "outside.txt").lstrip("/")
    status, body = await raw_request(server.port, "/" + absolute)
    assert status == 404
    assert SECRET not in body
    assert (await raw_request(server.port, "/small%00.txt"))[0] == 400
    assert server.cache.stats()["opens"] == 0
    refused = [r.getMessage() for r in caplog.records if " 403 " in r.getMessage()]
    assert any("/%2e%2e/outside.txt 403" in line for line in refused), refused


async def test_missing_odd_and_listed(
    tree: Tree, server: FileServer, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/nope.bin")).status_code == 404
    assert (await client.get("/small.txt/x")).status_code == 404
    assert (await client.get("/small.txt/")).status_code == 404
    # A FIFO would block a reader forever: refused at once.
    assert (await asyncio.wait_for(client.get("/pipe"), 10)).status_code == 404
    assert (await client.post("/small.txt")).status_code == 405
    listing = await client.get("/")
    assert listing.status_code == 200
    assert listing.headers["content-type"] == "text/html; charset=utf-8"
    assert 'href="/sub/"' in listing.text
    assert 'href="/big.bin"' in listing.text
    assert ".env" not in listing.text
    sub = await client.get("/sub/")
    assert 'href="/sub/deep/"' in sub.text
    assert ".git" not in sub.text
    # Permission denied by the file system is 403: see
    # test_permission_denied_by_the_file_system_is_403, which also runs as root.


async def test_one_log_line_per_request(
    server: FileServer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atempstore.serve")
    await client.get("/big.bin")
    await client.get("/big.bin", headers={"Range": "bytes=0-9"})
    await client.get("/nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "atempstore.serve"]
    assert len(lines) == 3, lines
    pattern = r"127\.0\.0\.1:\d+ GET {} {} {} B [0-9.]+ ms"
    assert re.match(pattern.format("/big.bin", 200, BIG), lines[0]), lines[0]
    assert re.search(r' (copy|cache) "-" "python-httpx/[0-9.]+"$', lines[0]), lines[0]
    assert re.match(pattern.format("/big.bin", 206, 10), lines[1]), lines[1]
    assert re.match(pattern.format("/nope", 404, len(b"404 not found\n")), lines[2]), lines[2]


async def test_client_hanging_up_stops_the_stream(
    server: FileServer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atempstore.serve")
    async with (
        httpx.AsyncClient(base_url=server.url) as leaver,
        leaver.stream("GET", "/big.bin") as response,
    ):
        async for _ in response.aiter_raw():
            break  # hang up after the first chunk
    deadline = time.monotonic() + 10
    while not any("client went away" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        await asyncio.sleep(0.02)
    line = next(r.getMessage() for r in caplog.records if "client went away" in r.getMessage())
    sent = int(line.split()[4])
    assert sent < BIG
    # The server is fine, and the copy went on without the client.
    assert (await client.get("/small.txt")).status_code == 200
    async with server.cache.open(server.root + "/big.bin") as f:
        assert await f.wait_cached()


async def test_no_blocking_io_on_the_loop(tree: Tree, no_blocking_io: list[str]) -> None:
    async with (
        FileServer(tree.root, cache_dir=tree.cache, port=0) as server,
        httpx.AsyncClient(base_url=server.url) as c,
    ):
        assert (await c.get("/big.bin")).status_code == 200
        assert (await c.get("/big.bin", headers={"Range": "bytes=-10"})).status_code == 206
        head = await c.head("/big.bin")
        etag = head.headers["etag"]
        assert (await c.get("/big.bin", headers={"If-None-Match": etag})).status_code == 304
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/link-in.bin")).status_code == 200
        assert (await c.get("/link-out.txt")).status_code == 403
        assert (await c.get("/nope")).status_code == 404
        assert (await raw_request(server.port, "/%2e%2e/outside.txt"))[0] == 403
    assert no_blocking_io == []


async def test_stop_closes_the_cache(tree: Tree) -> None:
    server = FileServer(tree.root, cache_dir=tree.cache, port=0, grace=1)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get("/big.bin", headers={"Range": "bytes=0-9"})).status_code == 206
    began = time.monotonic()
    await server.stop()
    assert time.monotonic() - began < 3
    with pytest.raises(RuntimeError, match="closed"):
        await server.cache.open(tree.big)
    assert [p for p in os.listdir(tree.cache) if p.endswith((".part", ".tmp"))] == []
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=server.url) as c:
            await c.get("/small.txt")
    await server.stop()  # a second stop does nothing


# --------------------------------------------------------------------------
# What real clients found (issue 13): names, routing, the access log


async def test_names_that_are_not_utf8_are_listed_and_served(
    tree: Tree, server: FileServer
) -> None:
    root = os.fsencode(tree.root)
    name = b"caf\xe9 \xff.txt"  # latin-1 bytes: not UTF-8
    with open(os.path.join(root, name), "wb") as f:
        f.write(b"a latin-1 name\n")
    os.mkdir(os.path.join(root, b"d\xe8r"))
    with open(os.path.join(root, b"d\xe8r", b"in\xfe.bin"), "wb") as f:
        f.write(b"inner\n")
    status, page = await raw_request(server.port, "/")
    assert status == 200, page
    assert b'href="/caf%E9%20%FF.txt"' in page
    assert b">caf\\xe9 \\xff.txt</a>" in page  # shown escaped, never as mojibake
    assert b'href="/d%E8r/"' in page
    for target in ("/caf%E9%20%FF.txt", "/caf%e9%20%ff.txt"):
        assert await raw_request(server.port, target) == (200, b"a latin-1 name\n"), target
    status, page = await raw_request(server.port, "/d%E8r/")
    assert status == 200
    assert b'href="/d%E8r/in%FE.bin"' in page
    assert await raw_request(server.port, "/d%E8r/in%FE.bin") == (200, b"inner\n")
    assert (await raw_request(server.port, "/d%E8r/in%FE.bin", "HEAD"))[0] == 200
    # The same name in UTF-8 is another name.
    assert (await raw_request(server.port, "/caf%C3%A9%20%FF.txt"))[0] == 404


async def test_the_path_must_match_a_name_byte_for_byte(tree: Tree, server: FileServer) -> None:
    for target in ("/small.txt%0A", "/small.txt%0a", "/small.txt%0D%0A", "/small.txt%20"):
        assert (await raw_request(server.port, target))[0] == 404, target
    (tree.root / "nl\n").write_bytes(b"a name ending in a newline\n")
    assert await raw_request(server.port, "/nl%0A") == (200, b"a name ending in a newline\n")
    assert (await raw_request(server.port, "/nl"))[0] == 404
    assert await raw_request(server.port, "/small.txt") == (200, b"hello\n")


async def test_an_absolute_form_target_is_served_as_its_path(
    tree: Tree, server: FileServer
) -> None:
    here = f"http://127.0.0.1:{server.port}"
    assert await raw_request(server.port, f"{here}/small.txt") == (200, b"hello\n")
    assert await raw_request(server.port, "HTTP://t/sub/deep/file.txt") == (200, b"deep\n")
    assert (await raw_request(server.port, f"{here}/"))[0] == 200
    assert (await raw_request(server.port, f"{here}/nope"))[0] == 404
    status, body = await raw_request(server.port, f"{here}/../outside.txt")
    assert status == 403
    assert SECRET not in body


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "atempstore.serve"]


async def test_every_answer_gets_one_access_line_with_range_and_user_agent(
    server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atempstore.serve")
    agent = {"User-Agent": 'probe/1.0 (say "hi")'}
    async with httpx.AsyncClient(base_url=server.url, headers=agent) as c:
        assert (await c.get("/big.bin", headers={"Range": "bytes=0-9"})).status_code == 206
        refused = await c.post("/small.txt")
        assert refused.status_code == 405
        assert refused.headers["allow"] == "GET, HEAD"
        assert (await c.get("/nope")).status_code == 404
        assert (await c.get("/sub")).status_code == 200
    assert (await raw_request(server.port, "http://t/nope"))[0] == 404
    lines = access_lines(caplog)
    assert len(lines) == 5, lines
    client_ = r"127\.0\.0\.1:\d+"
    assert re.fullmatch(
        client_ + r' GET /big\.bin 206 10 B [0-9.]+ ms (copy|follow|source) "bytes=0-9"'
        r' "probe/1\.0 \(say \\"hi\\"\)"',
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        client_ + r' POST /small\.txt 405 \d+ B [0-9.]+ ms - "-" "probe.*" \(method not allowed\)',
        lines[1],
    ), lines[1]
    assert re.fullmatch(client_ + r" GET /nope 404 \d+ B .* \(not found\)", lines[2]), lines[2]
    assert re.fullmatch(client_ + r' GET /sub 200 \d+ B [0-9.]+ ms - "-" "probe.*"', lines[3])
    # The target as sent with h11; httptools passes only its path on.
    assert re.search(r" GET (http://t)?/nope 404 ", lines[4]), lines[4]


async def test_a_connection_without_a_complete_head_is_closed_after_the_header_timeout(
    tree: Tree, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atempstore.serve")
    timeout = 0.5
    async with FileServer(tree.root, cache_dir=tree.cache, port=0, header_timeout=timeout) as s:
        before = open_fds()
        conns = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(50)]
        for _, writer in conns:
            writer.write(b"GET /small.txt HTTP/1.1\r\nHost: t\r\n")  # half a head
        began = time.monotonic()

        async def closed_after(reader: asyncio.StreamReader) -> float:
            assert await reader.read() == b""  # EOF: the server closed it, sending nothing
            return time.monotonic() - began

        took = await asyncio.wait_for(asyncio.gather(*(closed_after(r) for r, _ in conns)), 10)
        assert min(took) > timeout * 0.8, took  # not before its time
        # The server's 50 fds are closed (what is left open is ours, the clients').
        deadline = time.monotonic() + 5
        while open_fds() > before + 50:
            assert time.monotonic() < deadline, (open_fds(), before)
            await asyncio.sleep(0.02)
        for _, writer in conns:
            writer.close()
        lines = [line for line in access_lines(caplog) if " 408 " in line]
        assert len(lines) == 50, lines
        assert "no complete request head within 0.5 s" in lines[0]

        # A trickle does not push the deadline back: the head must be complete in time.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        began = time.monotonic()
        with pytest.raises((ConnectionError, BrokenPipeError)):
            for byte in b"GET /small.txt HTTP/1.1\r\nHost: t\r\n" * 20:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.02)
        assert time.monotonic() - began < 5
        writer.close()

        # Kept alive: a complete request is served, then the next head gets its deadline too.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        for piece in (b"GET /small.txt HT", b"TP/1.1\r\nHost: t\r\n", b"\r\n"):
            writer.write(piece)  # slow, but complete in time
            await asyncio.sleep(timeout / 5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(6) == b"hello\n"
        writer.write(b"GET /small.txt HTTP/1.1\r\n")
        began = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        # Closed by the head deadline, not uvicorn's 5 s keep-alive (which the bytes stopped).
        assert time.monotonic() - began < 3
        writer.close()
    assert open_fds() <= before


async def test_a_malformed_head_gets_its_400_and_one_access_line(
    server: FileServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert response.startswith(b"HTTP/1.1 400 ")
    assert [line for line in access_lines(caplog) if " 400 " in line] != []
    assert [r for r in caplog.records if r.name.startswith("uvicorn")] == []


# --------------------------------------------------------------------------
# Pure parts


def test_parse_range() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-4", 10) == (0, 5)
    assert parse_range("bytes = 2 - ", 10) == (2, 10)
    assert parse_range("BYTES=-3", 10) == (7, 10)
    assert parse_range("bytes=8-100", 10) == (8, 10)
    assert parse_range("bytes=0-1, 4-5", 10) is None
    assert parse_range("bytes=٣-4", 10) is None  # only ASCII digits
    for bad in ("bytes=10-", "bytes=10-12", "bytes=-0"):
        with pytest.raises(Unsatisfiable):
            parse_range(bad, 10)


def test_answer_is_decided_without_a_server() -> None:
    from starlette.datastructures import Headers

    def said(*fields: tuple[str, str], method: str = "GET") -> tuple[int, object, str]:
        raw = [(k.encode(), v.encode()) for k, v in fields]
        got = answer(method, Headers(raw=raw), size=10, mtime_ns=7 * 10**9, media="text/plain")
        return got.status, got.span, got.reason

    tag = '"a-1a13b8600"'
    assert said() == (200, (0, 10), "")
    assert said(method="HEAD") == (200, None, "")
    assert said(("range", "bytes=2-4")) == (206, (2, 5), "")
    assert said(("range", "bytes=10-")) == (416, None, "range not satisfiable")
    # Repeated fields are one list (RFC 9110 5.3): the second If-None-Match matches.
    assert said(("if-none-match", '"x"'), ("if-none-match", tag)) == (304, None, "")
    assert said(("if-match", '"x"'), ("if-match", f"W/{tag}")) == (412, None, "precondition failed")
    headers = dict(answer("GET", Headers(), size=0, mtime_ns=0, media="x/y").headers)
    assert headers["content-length"] == "0"
    assert headers["etag"] == '"0-0"'


async def test_the_demo_client_sends_targets_as_written(server: FileServer) -> None:
    """The demo's probes reach the server as written, not normalized by the client."""
    asked = [
        ("/big.bin", (("Range", "bytes=-100"),)),
        ("/small.txt", ()),
        ("/../outside.txt", ()),  # sent as written
        ("/nope", ()),
    ]
    async with demo_client("127.0.0.1", server.port) as fetch:
        replies = [await fetch(target, fields) for target, fields in asked]
    assert [r.status for r in replies] == [206, 200, 403, 404]
    assert replies[0].length == 100


def test_parse_size() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("100kb") == 100 << 10
    assert parse_size("4096") == 4096
    for bad in ("", "G", "-1G", "1X", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# --------------------------------------------------------------------------
# The command


def cli(*args: str) -> subprocess.Popen[str]:
    """``atempstore serve ARGS`` as a child with pipes (CI's own stop-after unset)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    env.pop("ATEMPSTORE_SERVE_EXIT_AFTER", None)
    return subprocess.Popen(
        [sys.executable, "-m", "atempstore.cli", "serve", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.multiprocess
def test_permission_denied_by_the_file_system_is_403(
    tree: Tree, children: list[subprocess.Popen[str]]
) -> None:
    # The server runs as a process of its own so that, under root (as in CI),
    # it can be stripped of the capabilities that let root read anything
    # (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): it then meets the mode bits as
    # any other user does, and the 403 path is really exercised.
    os.chmod(tree.root / "sub" / "deep", 0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search"
        prefix = [require_tool("setpriv"), f"--inh-caps={drop}", f"--bounding-set={drop}"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "atempstore.cli", "serve", str(tree.root)]
    command += ["--cache", str(tree.cache), "--port", "0", "--exit-after", "30"]
    proc = subprocess.Popen(
        [*prefix, *command], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    children.append(proc)
    try:
        url, _ = wait_for_url(proc)
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/sub/deep/file.txt").status_code == 403
            assert c.get("/small.txt").text == "hello\n"  # the rest is still served
    finally:
        os.chmod(tree.root / "sub" / "deep", 0o755)


def wait_for_url(proc: subprocess.Popen[str]) -> tuple[str, list[str]]:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.match(r"serving (.*) at (http://\S+)", line)
        if match:
            return match[2], seen
    proc.wait(10)
    raise AssertionError(f"no URL printed: {seen} {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.multiprocess
def test_demo_runs_checks_itself_and_cleans_up(children: list[subprocess.Popen[str]]) -> None:
    proc = cli("--demo", "--port", "0", "--exit-after", "0.2")
    children.append(proc)
    url, seen = wait_for_url(proc)
    out, err = proc.communicate(timeout=60)
    lines = seen + out.splitlines()
    assert proc.returncode == 0, (lines, err)
    checks = [line for line in lines if line.startswith("demo:") and line.rstrip().endswith("ok")]
    assert len(checks) >= 6, lines
    assert not any("WRONG" in line for line in lines)
    assert any(re.search(r"GET /large-64MiB\.bin 200 67108864 B .* copy", line) for line in lines)
    assert any("GET /%2e%2e/outside.txt 403" in line for line in lines)
    served = Path(re.match(r"serving (.*) at", seen[-1])[1])  # type: ignore[index]
    assert not served.parent.exists(), "the demo directory was left behind"
    assert url.startswith("http://127.0.0.1:")


@pytest.mark.multiprocess
def test_serve_dir_then_sigterm_stops_gracefully(
    tree: Tree, children: list[subprocess.Popen[str]]
) -> None:
    proc = cli(str(tree.root), "--cache", str(tree.cache), "--port", "0", "--max-size", "64M")
    children.append(proc)
    url, _ = wait_for_url(proc)
    with httpx.Client(base_url=url) as c:
        response = c.get("/big.bin")
        assert sha(response.content) == sha(tree.payload)
        assert c.get("/big.bin", headers={"Range": "bytes=5-9"}).content == tree.payload[5:10]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, (out, err)
    assert "GET /big.bin 200 33554432 B" in out
    assert "GET /big.bin 206 5 B" in out
    assert out.rstrip().endswith("stopped")
    assert err == ""


@pytest.mark.multiprocess
def test_stop_cuts_slow_downloads_after_the_grace(
    tree: Tree, children: list[subprocess.Popen[str]]
) -> None:
    proc = cli(str(tree.root), "--cache", str(tree.cache), "--port", "0", "--grace", "1")
    children.append(proc)
    url, _ = wait_for_url(proc)
    got = 0
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("GET", "/big.bin") as response:
        stream = response.iter_raw(64 * 1024)
        got += len(next(stream))
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in stream:  # a slow reader: the server waits `--grace`, then cuts
                got += len(chunk)
                time.sleep(0.01)
    out, err = proc.communicate(timeout=15)
    assert time.monotonic() - began < 6
    assert proc.returncode == 0, (out, err)
    assert got < BIG
    assert "cancelled (server stopping)" in out
    # The stop is an expected event: one line, no traceback.
    assert "Traceback" not in err, err
    assert len(err.splitlines()) <= 1, err
    assert [p for p in os.listdir(tree.cache) if p.endswith((".part", ".tmp"))] == []


@pytest.mark.multiprocess
@pytest.mark.faults
def test_exit_after_cancels_a_copy_in_progress_cleanly(
    tree: Tree, children: list[subprocess.Popen[str]]
) -> None:
    require_tool("strace")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    # Every copy_file_range takes 300 ms more: the 32 MiB copy would last ~4 s.
    command = ["strace", "-f", "-qq", "-o", "/dev/null"]
    command += ["-e", "inject=copy_file_range:delay_exit=300000"]
    command += [sys.executable, "-m", "atempstore.cli", "serve", str(tree.root)]
    command += ["--cache", str(tree.cache), "--port", "0", "--exit-after", "1"]
    proc = subprocess.Popen(
        command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    children.append(proc)
    url, _ = wait_for_url(proc)
    with httpx.Client(base_url=url) as c:
        # A range of the first bytes: answered as soon as the copy has them,
        # and the copy goes on after the response.
        assert c.get("/big.bin", headers={"Range": "bytes=0-9"}).content == tree.payload[:10]
    began = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)
    assert time.monotonic() - began < 4
    leftovers = sorted(os.listdir(tree.cache))
    assert [p for p in leftovers if not p.startswith(".")] == [], "a partial copy was published"
    assert [p for p in leftovers if p.endswith((".part", ".tmp"))] == [], leftovers

    async def usage() -> int:
        async with FileCache(tree.cache) as cache:
            return await cache.usage()

    assert asyncio.run(usage()) == 0


@pytest.mark.multiprocess
@pytest.mark.faults
def test_file_changing_mid_download_cuts_the_connection_never_mixes_bytes(
    tree: Tree, children: list[subprocess.Popen[str]]
) -> None:
    require_tool("strace")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    command = ["strace", "-f", "-qq", "-o", "/dev/null"]
    command += ["-e", "inject=copy_file_range:delay_exit=200000"]
    command += [sys.executable, "-m", "atempstore.cli", "serve", str(tree.root)]
    command += ["--cache", str(tree.cache), "--port", "0", "--exit-after", "1"]
    proc = subprocess.Popen(
        command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    children.append(proc)
    url, _ = wait_for_url(proc)
    got = bytearray()
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("GET", "/big.bin") as response:
        assert response.headers["content-length"] == str(BIG)
        chunks = response.iter_raw()
        got += next(chunks)
        # Rewritten in place while the copy runs (same size, new mtime).
        with open(tree.big, "r+b") as f:
            f.write(b"\0" * MiB)
        os.utime(tree.big, ns=(0, tree.big.stat().st_mtime_ns + 10**9))
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in chunks:
                got += chunk
    assert 0 < len(got) < BIG
    assert bytes(got) == tree.payload[: len(got)], "bytes of two versions were mixed"
    out, err = proc.communicate(timeout=30)
    assert "GET /big.bin 200" in out
    assert "(aborted: the source" in out
    assert err == "", err  # the access line says it all: no traceback, no other line
    assert [p for p in os.listdir(tree.cache) if not p.startswith(".")] == []


@pytest.mark.multiprocess
def test_errors_are_reported_plainly(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "atempstore.cli", "serve", *args]
        return subprocess.run(command, env=env, text=True, capture_output=True, timeout=30)

    missing = run(str(tmp_path / "nope"), "--port", "0")
    assert missing.returncode == 1
    assert "no such directory" in missing.stderr
    inside = run(str(tmp_path), "--cache", str(tmp_path / "c"), "--port", "0")
    assert inside.returncode == 1
    assert "inside the served directory" in inside.stderr
    assert run().returncode == 2
    assert run(str(tmp_path), "--max-size", "lots").returncode == 2
    with socket_in_use() as port:
        busy = run(str(tmp_path), "--cache", str(tmp_path.parent / "c2"), "--port", str(port))
    assert busy.returncode == 1
    assert "address already in use" in busy.stderr.lower()
    assert "Traceback" not in missing.stderr + inside.stderr + busy.stderr


def test_without_the_serve_extra_the_command_says_what_to_install(tmp_path: Path) -> None:
    result = run_python(
        """
        import sys
        sys.modules["uvicorn"] = None  # as if not installed
        from atempstore.cli import main
        sys.exit(main(["serve", sys.argv[1]]))
        """,
        str(tmp_path),
    )
    assert result.returncode == 2
    assert "pip install 'atempstore[serve]'" in result.stderr
    assert "uvicorn" in result.stderr


class socket_in_use:
    """A port some other program listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
