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

Part two, per-request cost: nginx (``sendfile on``), ``python -m http.server`` and
``atempstore serve --workers 2`` on the same warm 4 KiB and 1 MiB files, each
driven by the same ``wrk -t2 -c64 -d5s``, one server at a time.  Every server
writes an access log to a file (nginx included, so each pays for its log line).
wrk shares the machine's cores with the server it drives: on 2 cores the figures
are what the server manages with about half of them, for every server alike.

Bars (issue 13): atempstore >= 1.5x http.server on both sizes, >= 0.15x nginx
on 4 KiB and >= 0.5x nginx on 1 MiB.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--size-mib 256] [--clients 32] [--rounds 3]
[--wrk-duration 5] [--part all|cold|wrk]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from _harness import fresh_dir, median, print_table, save
from tests.servers import free_port, nginx_command, running

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
# Every server runs this checkout's atempstore.
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))
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


def count_modes(log: Path) -> dict[str, int]:
    """atempstore's access lines by how each body was served (``... 1.8 ms cache "-" "UA"``)."""
    found = re.findall(r" ms (copy|follow|cache|source) ", log.read_text(errors="replace"))
    return {m: found.count(m) for m in ("copy", "follow", "cache", "source")}


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


def cold_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The cold- and warm-cache rows: 32 whole downloads of one big file."""
    size = args.size_mib * MiB
    clients = args.clients
    times: dict[str, list[float]] = {"static": [], "static-1m": [], "cold": [], "warm": []}
    served = tmp / "www-big"
    served.mkdir()
    expected = make_file(served / NAME, size)
    log = tmp / "servers.log"
    for round_ in range(args.rounds):
        for key, chunk in (("static", 64 * 1024), ("static-1m", MiB)):
            port = free_port()
            static = [sys.executable, "-c", textwrap.dedent(STATIC_SERVER), str(served)]
            with running([*static, str(port), str(chunk)], port, log, env=ENV):
                times[key].append(asyncio.run(one_run(port, clients, size, expected)))
        port = free_port()
        ours = [sys.executable, "-m", "atempstore.cli", "serve", str(served)]
        ours += ["--port", str(port), "--cache", str(tmp / f"cache-{round_}")]
        ours += ["--max-size", f"{2 * size}"]
        with running(ours, port, log, env=ENV):
            times["cold"].append(asyncio.run(one_run(port, clients, size, expected)))
            times["warm"].append(asyncio.run(one_run(port, clients, size, expected)))
        rates = (f"{k} {clients * size / v[-1] / 1e6:,.0f} MB/s" for k, v in times.items())
        print(f"round {round_ + 1}: " + ", ".join(rates))
    modes = count_modes(log)

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
    return {
        "size_mib": args.size_mib,
        "clients": clients,
        "rounds": args.rounds,
        "seconds": times,
        "mb_per_s": rate,
        "ratio_cold": rate["cold"] / rate["static"],
        "ratio_warm": rate["warm"] / rate["static"],
        "modes": modes,
    }


# The per-request part: small and large warm files under wrk.
WRK_FILES = {"4k": ("small.bin", 4 * 1024), "1m": ("large.bin", MiB)}
WRK_SERVERS = ("nginx", "http.server", "atempstore")
# atempstore / peer, per file: the bars of issue 13.
WRK_BARS = {("http.server", "4k"): 1.5, ("http.server", "1m"): 1.5}
WRK_BARS |= {("nginx", "4k"): 0.15, ("nginx", "1m"): 0.5}


def fetch(port: int, name: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /{name} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        raise RuntimeError(f"GET /{name}: {head[:200]!r}")
    return body


def run_wrk(port: int, name: str, duration: int) -> dict[str, Any]:
    """``wrk -t2 -c64 -d<duration>s`` on one file: req/s and what went wrong."""
    command = ["wrk", "-t2", "-c64", f"-d{duration}s", f"http://127.0.0.1:{port}/{name}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration + 60)
    found = re.search(r"^Requests/sec:\s+([\d.]+)", out.stdout, re.M)
    if found is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out.stdout}{out.stderr}")
    requests = re.search(r"^\s+(\d+) requests in", out.stdout, re.M)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return {
        "req_per_s": float(found.group(1)),
        "requests": int(requests.group(1)) if requests else None,
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {},
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def wrk_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """nginx, http.server and atempstore serve under the same wrk, warm files."""
    for tool in ("nginx", "wrk"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            raise SystemExit(f"{tool} is not installed (.ci/run installs it)")
    root = tmp / "www"
    root.mkdir()
    contents = {}
    for key, (name, size) in WRK_FILES.items():
        contents[key] = os.urandom(size)
        (root / name).write_bytes(contents[key])
    log = tmp / "wrk-servers.log"
    results: dict[str, dict[str, Any]] = {}
    for label in WRK_SERVERS:
        port = free_port()
        cwd = None
        if label == "nginx":
            command = nginx_command(tmp / f"nginx-{port}", root, port, workers=2)
        elif label == "http.server":
            command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
            cwd = root
        else:
            command = [sys.executable, "-m", "atempstore.cli", "serve", str(root)]
            command += ["--workers", "2", "--port", str(port), "--host", "127.0.0.1"]
            command += ["--cache", str(tmp / "wrk-cache")]
        with running(command, port, log, cwd=cwd, env=ENV):
            # Warm: every server has read each file once (atempstore: it is cached).
            for key, (name, _) in WRK_FILES.items():
                for _ in range(3):
                    if fetch(port, name) != contents[key]:
                        raise RuntimeError(f"{label} served wrong bytes for {name}")
            for key, (name, _) in WRK_FILES.items():
                results[f"{label} {key}"] = run_wrk(port, name, args.wrk_duration)
                print(f"{label} {key}: {results[f'{label} {key}']['req_per_s']:,.0f} req/s")
    modes = count_modes(log)
    # Both workers accept on one socket: how the connections spread says whether
    # --workers 2 had two processes' worth of CPU at all.
    per_worker = [
        int(n) for n in re.findall(r"worker \d+ stopped: (\d+) requests", log.read_text())
    ]

    rows = []
    for label in WRK_SERVERS:
        row: list[Any] = [label]
        for key in WRK_FILES:
            r = results[f"{label} {key}"]
            problems = sum(r["socket_errors"].values()) + r["non_2xx"]
            row.append(r["req_per_s"])
            row.append(problems)
        rows.append(row)
    print_table(
        f"wrk -t2 -c64 -d{args.wrk_duration}s, warm files, one server at a time"
        " (wrk shares the 2 cores with the server)",
        ["server", "4 KiB req/s", "errors", "1 MiB req/s", "errors"],
        rows,
    )
    ratios: dict[str, float] = {}
    verdicts: dict[str, bool] = {}
    ratio_rows = []
    for (peer, key), bar in WRK_BARS.items():
        # A peer that answered nothing in the window (http.server timing out
        # under a short run) leaves no ratio to compare: infinite, not a crash.
        theirs = results[f"{peer} {key}"]["req_per_s"]
        ratio = results[f"atempstore {key}"]["req_per_s"] / theirs if theirs else float("inf")
        ratios[f"{peer} {key}"] = ratio
        verdicts[f"{peer} {key}"] = ratio >= bar
        verdict = ("PASS" if ratio >= bar else "FAIL") + f" (>= {bar})"
        ratio_rows.append([f"atempstore / {peer}", WRK_FILES[key][1], ratio, verdict])
    print_table(
        "atempstore serve --workers 2 against its peers",
        ["ratio", "file bytes", "x", "bar"],
        ratio_rows,
    )
    for name, r in results.items():
        if sum(r["socket_errors"].values()) or r["non_2xx"]:
            print(f"  {name}: socket errors {r['socket_errors']}, non-2xx {r['non_2xx']}")
    print(
        "  (http.server answers HTTP/1.0 and closes every connection, so wrk reconnects"
        " per request; timeouts are requests not answered within wrk's 2 s)"
    )
    print(f"\natempstore's log lines by cache mode (warm-up and wrk): {modes}")
    print(f"requests per atempstore worker: {per_worker}")
    return {
        "requests_per_worker": per_worker,
        "wrk": f"wrk -t2 -c64 -d{args.wrk_duration}s",
        "cores": os.cpu_count(),
        "note": "wrk shares the cores with the server",
        "results": results,
        "ratios": ratios,
        "bars": {f"{peer} {key}": bar for (peer, key), bar in WRK_BARS.items()},
        "pass": verdicts,
        "modes": modes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wrk-duration", type=int, default=5, metavar="SECONDS")
    parser.add_argument("--part", choices=("all", "cold", "wrk"), default="all")
    args = parser.parse_args()
    # Other work on the machine takes cores from the servers and from wrk alike, but
    # not in equal measure: the load says how far to trust one run.
    results: dict[str, Any] = {"load_average_before": os.getloadavg()}
    print(f"load average before: {results['load_average_before']}")
    with fresh_dir("serve") as tmp:
        if args.part in ("all", "wrk"):
            results["per_request"] = wrk_part(args, tmp)
        if args.part in ("all", "cold"):
            results |= cold_part(args, tmp)
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {results['load_average_after']}")
    save("serve", results)


if __name__ == "__main__":
    main()
