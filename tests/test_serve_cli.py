"""`atempstore serve` as a subprocess: --workers, --header-timeout, and what it prints on stderr."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import REPO
from .test_serve import cli

pytestmark = pytest.mark.multiprocess

MiB = 1 << 20
BIG = 16 * MiB


def started(proc: subprocess.Popen[str]) -> tuple[str, list[int]]:
    """The URL it serves at and its worker pids (none without --workers)."""
    assert proc.stdout is not None
    url, seen = None, []
    for line in proc.stdout:
        seen.append(line)
        if match := re.match(r"serving .* at (http://\S+)", line):
            url = match[1]
        if match := re.match(r"\s+workers: \d+ \(pids ([0-9, ]+)\)", line):
            assert url is not None
            return url, [int(p) for p in match[1].split(", ")]
        if url is not None and line.startswith("  stop:"):
            return url, []
    proc.wait(10)
    raise AssertionError(f"it did not start: {seen} {proc.stderr.read() if proc.stderr else ''}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "small.txt").write_text("hello\n")
    return root


def test_workers_share_one_socket_and_one_copy_and_stop_together(
    www: Path, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    payloads = {}
    for n in range(3):
        payloads[n] = os.urandom(BIG)
        (www / f"big-{n}.bin").write_bytes(payloads[n])
    proc = cli(str(www), "--cache", str(tmp_path / "cache"), "--port", "0", "--workers", "2")
    children.append(proc)
    url, pids = started(proc)
    assert len(pids) == 2
    assert all(alive(p) for p in pids)
    assert proc.stdout is not None
    lines: list[str] = []
    rounds = 0
    with httpx.Client(base_url=url, timeout=60) as probe:
        assert probe.get("/small.txt").text == "hello\n"
    # A round: 16 clients, each on a connection of its own, of one cold file.
    # The kernel hands each connection to one worker; the round counts once
    # both workers served it (the log says "follow" for readers of the copy
    # that the other worker makes).
    for n in range(3):
        rounds += 1
        script = f"""
import asyncio, hashlib, httpx
async def one(i):
    await asyncio.sleep(i * 0.02)
    async with httpx.AsyncClient(base_url={url!r}, timeout=60) as c:
        r = await c.get("/big-{n}.bin")
        return r.status_code, hashlib.sha256(r.content).hexdigest()
async def main():
    for got in await asyncio.gather(*(one(i) for i in range(16))):
        print(*got)
asyncio.run(main())
"""
        ran = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr
        assert (
            ran.stdout.split("\n")[:16] == [f"200 {hashlib.sha256(payloads[n]).hexdigest()}"] * 16
        )
        while len([line for line in lines if f"GET /big-{n}.bin " in line]) < 16:
            lines.append(proc.stdout.readline())
        modes = [line.split()[8] for line in lines if f"GET /big-{n}.bin " in line]
        if "follow" in modes:
            break
    else:
        pytest.fail(f"no round was served by both workers: {lines}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)
    assert wait_gone(pids, 5) == [], "a worker outlived the stop"
    stops = re.findall(
        r"worker (\d+) stopped: (\d+) requests; cache: (\d+) copies \((\d+) B\), (\d+) follows", out
    )
    assert sorted(int(s[0]) for s in stops) == sorted(pids), out
    assert sum(int(s[1]) for s in stops) == 1 + 16 * rounds
    # One copy per file (small.txt too) across the two processes, of exactly its size.
    assert sum(int(s[2]) for s in stops) == rounds + 1, stops
    assert sum(int(s[3]) for s in stops) == BIG * rounds + len("hello\n"), stops
    assert sum(int(s[4]) for s in stops) > 0, stops
    cached = [p for p in os.listdir(tmp_path / "cache") if not p.startswith(".")]
    assert len(cached) == rounds + 1
    assert out.rstrip().endswith("stopped")
    assert err == "", err


def test_a_dead_worker_is_reported_and_replaced_and_exit_after_stops_all(
    www: Path, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    proc = cli(str(www), "--cache", str(tmp_path / "cache"), "--port", "0", "--workers", "2")
    children.append(proc)
    url, pids = started(proc)
    time.sleep(1.2)  # past the "died at startup" window
    os.kill(pids[0], signal.SIGKILL)
    assert proc.stderr is not None
    report = proc.stderr.readline()
    match = re.fullmatch(
        rf"atempstore serve: worker 1 \(pid {pids[0]}\) died \(killed by SIGKILL\);"
        r" started pid (\d+)\n",
        report,
    )
    assert match, report
    replacement = int(match[1])
    assert alive(replacement)
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(10):
            assert c.get("/small.txt").text == "hello\n"
    # The parent killed with SIGKILL: its workers get SIGTERM from the kernel, and stop.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert wait_gone([pids[1], replacement], 15) == [], "orphan workers still serve"


def test_exit_after_stops_every_worker(www: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), ATEMPSTORE_SERVE_EXIT_AFTER="1.5")
    command = [sys.executable, "-m", "atempstore.cli", "serve", str(www), "--port", "0"]
    command += ["--cache", str(tmp_path / "cache"), "--workers", "3"]
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    assert time.monotonic() - began < 15
    pids = [int(p) for p in re.findall(r"worker (\d+) stopped", done.stdout)]
    assert len(pids) == 3, done.stdout
    assert wait_gone(pids, 5) == []
    assert done.stderr == ""


def test_header_timeout_closes_connections_that_never_finish_their_head(
    www: Path, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    proc = cli(
        str(www), "--cache", str(tmp_path / "cache"), "--port", "0", "--header-timeout", "0.5"
    )
    children.append(proc)
    url, _ = started(proc)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/small.txt").status_code == 200  # every lazy import done
    time.sleep(0.2)
    before = fds(proc.pid)
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    try:
        for conn in conns:
            conn.sendall(b"GET /small.txt HTTP/1.1\r\nHost: t\r\n")
        deadline = time.monotonic() + 0.3
        held = max_held = 0
        while time.monotonic() < deadline:
            held = fds(proc.pid) - before
            max_held = max(max_held, held)
        assert max_held >= 45, max_held  # the server holds them while their deadline runs
        for conn in conns:
            assert conn.recv(100) == b""  # then closes each one
        deadline = time.monotonic() + 5
        while fds(proc.pid) > before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fds(proc.pid) <= before
    finally:
        for conn in conns:
            conn.close()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert len(re.findall(r" - - 408 0 B .* \(no complete request head within 0\.5 s", out)) == 50
    assert err == ""


def test_a_client_going_away_is_one_line_and_no_traceback(
    www: Path, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    (www / "big.bin").write_bytes(os.urandom(64 * MiB))
    proc = cli(str(www), "--cache", str(tmp_path / "cache"), "--port", "0")
    children.append(proc)
    url, _ = started(proc)
    for _ in range(3):
        with httpx.Client(base_url=url, timeout=10) as c, c.stream("GET", "/big.bin") as r:
            next(r.iter_raw())  # then hang up
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/small.txt").status_code == 200
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert out.count("(client went away)") == 3, out
    assert err == "", err


def test_demo_with_workers_is_refused(children: list[subprocess.Popen[str]]) -> None:
    proc = cli("--demo", "--workers", "2", "--port", "0")
    children.append(proc)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "--demo runs one worker" in err
