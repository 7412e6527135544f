"""``atempstore serve`` against Starlette's StaticFiles, measured in the same run.

32 concurrent clients download one 256 MiB file, whole, from:

* ``StaticFiles``: Starlette serving the file straight from the directory
  (the bar's peer), and, for context, the same with its read chunk raised
  from 64 KiB to 1 MiB (the size atempstore's reads grow to): most of the gap
  between the two servers is the thread hop per chunk, not the cache;
* ``atempstore serve``, cold: a new server process with an empty cache, so
  the first request starts the copy into the cache and the 32 downloads
  follow it (or read ahead of it from the source);
* ``atempstore serve``, warm: the same server again, the file now cached.

Both servers run in their own process on the same stack (uvicorn, h11, the
asyncio loop, one worker, no access log for StaticFiles; atempstore's
per-request log line goes to a file).  The clients live in this process, on
a lean asyncio protocol that counts bytes (and hashes one download per run,
so every run proves it got the exact bytes).  The source file and the
cached copy are in the page cache: this measures the servers, not the disk.

Bars: aggregate throughput >= 0.7x StaticFiles cold, >= 0.9x warm.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--size-mib 256] [--clients 32] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import fresh_dir, median, print_table, save

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
NAME = "big.bin"

STATIC_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

FileResponse.chunk_size = int(sys.argv[3])
app = Starlette(routes=[Mount("/", StaticFiles(directory=sys.argv[1]))])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            block = os.urandom(4 * MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(command: list[str], port: int, log: Path) -> Iterator[None]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    with open(log, "a") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {log.read_text()}") from None
                time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


class Download(asyncio.BufferedProtocol):
    """One GET over its own connection: counts the body, hashes it if asked."""

    def __init__(self, request: bytes, hasher: hashlib._Hash | None) -> None:
        self.request = request
        self.hasher = hasher
        self.buffer = memoryview(bytearray(MiB))
        self.head = bytearray()
        self.length = -1
        self.received = 0
        self.status = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buffer[:nbytes]
        if self.length < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    self.length = int(value)
            data = memoryview(bytes(self.head[end + 4 :]))
        self.received += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        if self.received >= self.length and not self.done.done():
            self.done.set_result(self.received)
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError(f"closed after {self.received} B"))


async def one_run(port: int, clients: int, size: int, expected: str) -> float:
    """Seconds for ``clients`` concurrent downloads of the whole file."""
    loop = asyncio.get_running_loop()
    request = f"GET /{NAME} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    hasher = hashlib.sha256()
    began = time.perf_counter()

    async def fetch(n: int) -> Download:
        protocol = Download(request, hasher if n == 0 else None)
        await loop.create_connection(lambda: protocol, "127.0.0.1", port)
        await protocol.done
        return protocol

    downloads = await asyncio.gather(*(fetch(n) for n in range(clients)))
    took = time.perf_counter() - began
    for d in downloads:
        assert (d.status, d.received) == (200, size), (d.status, d.received)
    assert hasher.hexdigest() == expected, "wrong bytes"
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB
    clients = args.clients
    times: dict[str, list[float]] = {"static": [], "static-1m": [], "cold": [], "warm": []}
    with fresh_dir("serve") as tmp:
        served = tmp / "www"
        served.mkdir()
        expected = make_file(served / NAME, size)
        log = tmp / "servers.log"
        for round_ in range(args.rounds):
            for key, chunk in (("static", 64 * 1024), ("static-1m", MiB)):
                port = free_port()
                static = [sys.executable, "-c", textwrap.dedent(STATIC_SERVER), str(served)]
                with server([*static, str(port), str(chunk)], port, log):
                    times[key].append(asyncio.run(one_run(port, clients, size, expected)))
            port = free_port()
            ours = [sys.executable, "-m", "atempstore.cli", "serve", str(served)]
            ours += ["--port", str(port), "--cache", str(tmp / f"cache-{round_}")]
            ours += ["--max-size", f"{2 * size}"]
            with server(ours, port, log):
                times["cold"].append(asyncio.run(one_run(port, clients, size, expected)))
                times["warm"].append(asyncio.run(one_run(port, clients, size, expected)))
            rates = (f"{k} {clients * size / v[-1] / 1e6:,.0f} MB/s" for k, v in times.items())
            print(f"round {round_ + 1}: " + ", ".join(rates))
        modes = {m: log.read_text().count(f" {m}\n") for m in ("copy", "follow", "cache", "source")}

    total = clients * size
    rate = {k: total / median(v) / 1e6 for k, v in times.items()}
    bars = {"static": None, "static-1m": None, "cold": 0.7, "warm": 0.9}
    labels = {
        "static": "Starlette StaticFiles",
        "static-1m": "StaticFiles, 1 MiB chunks",
        "cold": "atempstore serve, cold cache",
        "warm": "atempstore serve, warm cache",
    }
    rows = []
    for key in ("static", "static-1m", "cold", "warm"):
        ratio = rate[key] / rate["static"]
        bar = bars[key]
        verdict = "" if bar is None else ("PASS" if ratio >= bar else "FAIL") + f" (>= {bar})"
        rows.append([labels[key], median(times[key]), rate[key], ratio, verdict])
    print_table(
        f"{clients} concurrent clients downloading a {args.size_mib} MiB file"
        f" (median of {args.rounds} rounds, aggregate throughput)",
        ["server", "seconds", "MB/s", "vs StaticFiles", "bar"],
        rows,
    )
    print(f"\natempstore's log lines by cache mode: {modes}")
    save(
        "serve",
        {
            "size_mib": args.size_mib,
            "clients": clients,
            "rounds": args.rounds,
            "seconds": times,
            "mb_per_s": rate,
            "ratio_cold": rate["cold"] / rate["static"],
            "ratio_warm": rate["warm"] / rate["static"],
            "modes": modes,
        },
    )


if __name__ == "__main__":
    main()
