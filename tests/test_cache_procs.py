"""FileCache across real processes: one copy per file, followers, kill -9, injected faults."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import (
    REPO,
    loop_thread_lines,
    names_path_under,
    run_traced,
    spawn_python,
)
from .test_cache import change_source

MiB = 1 << 20

# A throttled Source over a real file that logs every pread (pid, offset, n)
# to a shared log: the log proves how many times the bytes were copied.
PRELUDE = """
import asyncio, hashlib, json, os, sys, time
from atempstore import FileCache, SourceChangedError

class Slow:
    def __init__(self, path, rate, log):
        self.path, self.rate, self.log = path, rate, log
        self.key = "slow:" + path
    @property
    def size(self):
        return os.stat(self.path).st_size
    @property
    def mtime(self):
        return os.stat(self.path).st_mtime
    def pread(self, offset, n):
        time.sleep(n / self.rate)
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), n, offset)
        with open(self.log, "a") as log:
            log.write(f"{os.getpid()} {offset} {len(data)}\\n")
        return data

def say(*words):
    print(*words, flush=True)
"""


def child(body: str) -> str:
    return PRELUDE + textwrap.dedent(body)


def copier_reads(log: Path) -> dict[int, list[tuple[int, int]]]:
    per_pid: dict[int, list[tuple[int, int]]] = {}
    for line in log.read_text().splitlines():
        pid, offset, n = map(int, line.split())
        per_pid.setdefault(pid, []).append((offset, n))
    return per_pid


def expect(proc: subprocess.Popen[str], word: str, timeout: float = 30) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(word):
            return line.strip()
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"child never said {word!r}; stderr:\n{err}")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


READ_ALL = """
async def main(directory, path, log, rate):
    async with FileCache(directory, max_size=256 * 2**20) as cache:
        say("ready")
        sys.stdin.readline()  # the parent starts everyone at once
        async with cache.open(Slow(path, rate, log)) as f:
            mode = f.mode
            say("opened", mode)
            digest = hashlib.sha256()
            async for chunk in f.iter_bytes():
                digest.update(chunk)
            cached = await f.wait_cached()
        say(json.dumps({"mode": mode, "sha": digest.hexdigest(), "cached": cached,
                        "stats": cache.stats(), "usage": await cache.usage()}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


@pytest.mark.multiprocess
def test_two_processes_opening_one_source_copy_it_once(tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    log = tmp_path / "reads.log"
    procs = [
        spawn_python(child(READ_ALL), str(tmp_path / "cache"), str(path), str(log), "20e6")
        for _ in range(2)
    ]
    for proc in procs:
        expect(proc, "ready")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [finish(proc) for proc in procs]

    assert sorted(str(r["mode"]) for r in results) == ["copy", "follow"]
    for result in results:
        assert result["sha"] == hashlib.sha256(data).hexdigest()
        assert result["cached"] is True
        assert result["usage"] == len(data)
    # One process read the source, once, in order; the other read nothing from it.
    reads = copier_reads(log)
    assert len(reads) == 1
    (chunks,) = reads.values()
    assert sum(n for _, n in chunks) == len(data)
    position = 0
    for offset, n in chunks:
        assert offset == position
        position += n
    names = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(names) == 1
    assert (tmp_path / "cache" / names[0]).read_bytes() == data


@pytest.mark.multiprocess
def test_follower_survives_kill_9_of_the_copier_and_the_entry_heals(tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    log = tmp_path / "reads.log"
    cache_dir = tmp_path / "cache"
    copier = spawn_python(
        child(
            """
            async def main(directory, path, log):
                async with FileCache(directory, max_size=256 * 2**20) as cache:
                    async with cache.open(Slow(path, 8e6, log)) as f:
                        await f.read(0, 1)
                        say("copying", f.mode)
                        await f.wait_cached()
                        say("finished")  # must not happen: we are killed first

            asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
            """
        ),
        str(cache_dir),
        str(path),
        str(log),
    )
    assert expect(copier, "copying") == "copying copy"
    follower = spawn_python(child(READ_ALL), str(cache_dir), str(path), str(log), "40e6")
    expect(follower, "ready")
    assert follower.stdin is not None
    follower.stdin.write("go\n")
    follower.stdin.flush()
    assert expect(follower, "opened") == "opened follow"
    time.sleep(0.3)
    copier.send_signal(signal.SIGKILL)
    copier.communicate()
    result = finish(follower)
    assert result["sha"] == hashlib.sha256(data).hexdigest()
    assert result["cached"] is False  # it finished from the source
    assert [p for p in os.listdir(cache_dir) if not p.startswith(".")] == []

    # The dead copier left a part file and a reservation; the next open heals both.
    again = spawn_python(child(READ_ALL), str(cache_dir), str(path), str(log), "200e6")
    expect(again, "ready")
    assert again.stdin is not None
    again.stdin.write("go\n")
    again.stdin.flush()
    result = finish(again)
    assert result["mode"] == "copy"
    assert result["sha"] == hashlib.sha256(data).hexdigest()
    assert result["cached"] is True
    assert result["usage"] == len(data)
    assert [p for p in os.listdir(cache_dir) if p.endswith((".part", ".tmp"))] == []


# --------------------------------------------------------------------------
# Injected faults on the path (copy_file_range) code path, with strace


def strace_python(inject: list[str], code: str, *args: str) -> subprocess.Popen[str]:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    command = ["strace", "-f", "-qq", "-o", "/dev/null"]
    for rule in inject:
        command += ["-e", f"inject={rule}"]
    return subprocess.Popen(
        [*command, sys.executable, "-c", code, *args],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


SLOW_COPY = "copy_file_range:delay_exit=20000"

READ_PATH = """
async def main(directory, path):
    async with FileCache(directory, max_size=256 * 2**20) as cache:
        got = bytearray()
        outcome = "whole"
        try:
            async with cache.open(path) as f:
                got += await f.read(0, 1000)
                say("started", f.mode)
                async for chunk in f.iter_bytes(1000):
                    got += chunk
                cached = await f.wait_cached()
                mode = f.mode
        except SourceChangedError:
            outcome, cached, mode = "changed", False, "error"
        say(json.dumps({"outcome": outcome, "sha": hashlib.sha256(got).hexdigest(),
                        "length": len(got), "cached": cached, "mode": mode,
                        "usage": await cache.usage()}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.multiprocess
@pytest.mark.faults
@pytest.mark.parametrize("change", ["truncated", "rewritten", "deleted"])
def test_local_file_changing_mid_copy_is_never_published(tmp_path: Path, change: str) -> None:
    original = os.urandom(4 * MiB)
    path = tmp_path / "src.bin"
    path.write_bytes(original)
    cache_dir = tmp_path / "cache"
    # Every copy_file_range takes 150 ms more: the copy lasts ~1 s.
    proc = strace_python(
        ["copy_file_range:delay_exit=150000"], child(READ_PATH), str(cache_dir), str(path)
    )
    assert expect(proc, "started") == "started copy"
    change_source(path, change)
    result = finish(proc)
    got_length = int(str(result["length"]))
    assert result["sha"] == hashlib.sha256(original[:got_length]).hexdigest(), "mixed bytes"
    if change != "deleted":
        # A deleted file still reads whole through the copier's fd; a changed one cannot.
        assert result["outcome"] == "changed"
    assert result["cached"] is False
    assert result["usage"] == 0
    assert [p for p in os.listdir(cache_dir) if not p.startswith(".")] == []
    assert [p for p in os.listdir(cache_dir) if p.endswith((".part", ".tmp"))] == []


@pytest.mark.multiprocess
@pytest.mark.faults
@pytest.mark.parametrize(
    "rule", ["fsync:error=EIO", "copy_file_range:error=ENOSPC:when=3", "utimensat:error=EIO"]
)
def test_cache_disk_errors_serve_exact_bytes_uncached(tmp_path: Path, rule: str) -> None:
    original = os.urandom(4 * MiB)
    path = tmp_path / "src.bin"
    path.write_bytes(original)
    cache_dir = tmp_path / "cache"
    # Created beforehand: creating it fsyncs its parent, and the rule may fail every fsync.
    cache_dir.mkdir(mode=0o700)
    # Slow copies let the reader run alongside (strace keeps one rule per syscall).
    rules = [rule] if rule.startswith("copy_file_range") else [rule, SLOW_COPY]
    proc = strace_python(rules, child(READ_PATH), str(cache_dir), str(path))
    result = finish(proc)
    assert result["outcome"] == "whole"
    assert result["length"] == len(original)
    assert result["sha"] == hashlib.sha256(original).hexdigest()
    assert result["cached"] is False
    assert result["mode"] == "source"
    assert result["usage"] == 0
    assert [p for p in os.listdir(cache_dir) if not p.startswith(".")] == []
    assert [p for p in os.listdir(cache_dir) if p.endswith((".part", ".tmp"))] == []


# --------------------------------------------------------------------------
# The event-loop thread makes no syscall on a cache or source fd

CACHE_TOUR = r"""
import asyncio, os, sys, threading, time
from pathlib import Path

from atempstore import FileCache

root = Path(sys.argv[1])
data = (root / "src.bin").read_bytes()


class Slow:
    key = "slow:tour"
    size = len(data)
    mtime = 1_700_000_000.0

    def pread(self, offset, n):
        time.sleep(n / 20e6)
        return data[offset : offset + n]


async def tour():
    async with FileCache(root / "cache", max_size=8 << 20) as one, FileCache(
        root / "cache", max_size=8 << 20
    ) as two:
        # A copy (the last reader's close gives the session's fds back), then
        # a cached copy shared by two readers (the second one's own source fd).
        async with one.open(root / "src.bin") as f:
            await f.read(0, 10)
            await f.wait_cached()
        a = await one.open(root / "src.bin")
        b = await one.open(root / "src.bin")
        await a.read(0, 10)
        await a.aclose()
        await b.aclose()
        # Opens that fail after the source was opened, and a file served uncached.
        for bad in (root, root / "missing"):
            try:
                await one.open(bad)
            except OSError:
                pass
        async with one.open(root / "big.bin") as f:
            await f.read(0, 10)
        # A follower of another cache's copy (its progress and its fds).
        copying = await one.open(Slow())
        await copying.read(0, 10)
        async with two.open(Slow()) as follower:
            assert follower.mode == "follow", follower.mode
            await follower.read(0, 100)
        # Closing the cache with a copy running.
        await copying.aclose()


print("loop-thread", threading.get_native_id(), flush=True)
asyncio.run(tour())
print("tour done", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.faults
def test_the_loop_thread_closes_no_cache_or_source_fd(tmp_path: Path) -> None:
    """strace -f -yy: no call of the loop thread names a file of the tour (a
    path, or an fd shown with its path): close of cache files, source files,
    part and lock files all happen in the hop of the operation they belong to."""
    root = tmp_path / "tour"
    root.mkdir()
    (root / "src.bin").write_bytes(os.urandom(3 * MiB))
    (root / "big.bin").write_bytes(os.urandom(9 * MiB))
    log = tmp_path / "strace.log"
    options = ["-yy", "-s", "4096", "-e", "trace=%file,%desc", "-e", "signal=none"]
    result = run_traced(CACHE_TOUR, (), str(root), options=options, log=log)
    assert result.returncode == 0, result.stderr
    assert "tour done" in result.stdout, result.stdout
    own = loop_thread_lines(result.stdout, log)
    touched = [line for line in own if names_path_under(line, root) and "tour done" not in line]
    closes = [line for line in touched if " close(" in line]
    assert closes == [], "\n".join(closes[:40])
    assert touched == [], "\n".join(touched[:40])
