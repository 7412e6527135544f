"""Every example in examples/ runs as it is and does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

EXAMPLES = REPO / "examples"


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``examples/<name>`` as a user would; return its output, fail on a bad exit."""
    environment = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=environment,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.mark.multiprocess
def test_worker_pool_loses_nothing_when_a_worker_is_killed() -> None:
    out = run_example("worker_pool.py")
    assert "killed worker 0 (SIGKILL)" in out
    assert "0 lost" in out
    assert "left in the queue: {'tmp': 0, 'new': 0, 'cur': 0}" in out


def test_stream_file_shares_one_copy_between_readers() -> None:
    out = run_example("stream_file.py", "--size-mib", "8", "--rate-mb", "40")
    lines = out.splitlines()
    readers = [line for line in lines if " from " in line and "first byte" in line]
    assert len(readers) == 5, out
    # One copy for all five readers.  The number of cache hits depends on whether
    # the copy was already published when the example re-opens the file to wait
    # for it (then that open is a hit too), so only the later reader's is certain.
    stats = re.search(r"copies: (\d+), cache hits: (\d+)", out)
    assert stats is not None, out
    assert stats.group(1) == "1", out
    assert int(stats.group(2)) >= 1, out
    assert "(opened in cache mode)" in readers[-1]


def test_web_handler_uploads_and_downloads() -> None:
    out = run_example("web_handler.py")
    assert out.rstrip().endswith("all as expected"), out
    assert "PUT /files/data.bin (24 MiB, with its sha256)    -> 201" in out
    assert "with Range: bytes=1000-1999  -> 206" in out
    assert "with Range: bytes=0-9,-10    -> 206" in out  # multipart/byteranges
    assert "with If-None-Match: *        -> 304" in out


def test_web_handler_writes_no_http_of_its_own() -> None:
    # Ranges, validators and conditional requests are CachedFileResponse's.
    text = (EXAMPLES / "web_handler.py").read_text()
    assert "CachedFileResponse(" in text
    for handwritten in ("StreamingResponse", "content-range", "RANGE", "bytes="):
        assert handwritten not in text.split("# -- running it")[0], handwritten


def test_fastapi_app_serves_downloads_with_cached_file_response() -> None:
    pytest.importorskip("fastapi")
    out = run_example("fastapi_app.py")
    assert out.rstrip().endswith("all as expected"), out
    assert "HEAD /downloads/video.mp4 (HEAD: no copy)" in out
    assert "Range: bytes=-1000        -> 206" in out
    assert "If-None-Match: its ETag   -> 304" in out
    assert "/downloads/missing.bin                         -> 404" in out


def test_web_handler_publishes_uploads_across_file_systems(tmp_path: Path) -> None:
    # Temp files on another file system than the served directory: the
    # rename fails with EXDEV, and the upload is copied with open_atomic.
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no tmpfs on another device than the temp dir")
    temp_base = shm / f"atempstore-test-{os.getpid()}"
    try:
        out = run_example("web_handler.py", env={"ATEMPSTORE_TEMPDIR": str(temp_base)})
        assert out.rstrip().endswith("all as expected"), out
        # The temp file manager cleaned up after itself.
        assert [p for p in temp_base.rglob("*") if p.is_file() and p.name != ".lock"] == []
    finally:
        subprocess.run(["rm", "-rf", str(temp_base)], check=False)


def test_demo_tours_locks_and_atomic_files() -> None:
    out = run_example("demo.py")
    for task in ("task-0", "task-1", "task-2"):
        assert f"{task} holds the lock" in out
    assert "as expected: timed out after 0.1 s" in out
    assert "handoff to a waiting task took" in out
    assert 'published result.json -> {"ok": true}' in out
