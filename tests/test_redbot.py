"""REDbot's verdict on `atempstore serve` is no worse than on nginx, on the same files.

REDbot (https://redbot.org, ``pip install redbot``) fetches a URL, then makes its own
follow-up requests (a Range request, If-None-Match / If-Modified-Since revalidation,
content negotiation with Accept-Encoding: gzip, HEAD...) and reports notes, each with
an id (its class name, e.g. ``RANGE_CORRECT``) and a level (``GOOD``, ``INFO``,
``WARN``, ``BAD`` in its HAR output).  This runs its command line (``-o har`` carries
the ids) against a real nginx and a real ``atempstore serve --workers 2`` subprocess,
both on 127.0.0.1 serving one directory, and asserts that every warning or bad note
atempstore gets, nginx gets too, and every good note nginx gets (a correct Range
reply, 304s to If-None-Match and If-Modified-Since, a correct Content-Length...),
atempstore gets too.  REDbot runs offline: its command line allows local addresses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, require_tool
from .servers import free_port, nginx_command, running

pytestmark = pytest.mark.multiprocess

MiB = 1 << 20

# Paths served by both; the listing is nginx's autoindex against atempstore's own.
PATHS = ("/notes.txt", "/blob.bin", "/sub/")

# Notes atempstore may get where nginx does not, with why each is acceptable.
# (None so far: add an entry only with its reason.)
ALLOWED: dict[str, str] = {}

# REDbot 2.7 needs Python 3.11; CI runs this check in its 3.13 job.  (A plain
# bool, not a version test in the `if`: mypy, set to 3.10, would call the
# rest of the fixture unreachable.)
REDBOT_RUNS_HERE = sys.version_info >= (3, 11)


@pytest.fixture
def redbot() -> list[str]:
    """The REDbot command (this interpreter's ``redbot.cli``); skipped where REDbot
    is not installed, except in CI, where the test extra installs it."""
    if not REDBOT_RUNS_HERE:
        pytest.skip("REDbot needs Python >= 3.11 (the 3.13 run of CI checks this)")
    if importlib.util.find_spec("redbot") is None:
        message = "redbot is not installed (pip install redbot; the test extra has it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return [sys.executable, "-m", "redbot.cli", "-o", "har"]


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("".join(f"line {n}: some plain text\n" for n in range(200)))
    (root / "blob.bin").write_bytes(os.urandom(MiB))
    (root / "sub" / "inner.txt").write_text("inside\n")
    return root


@pytest.fixture
def nginx(www: Path, tmp_path: Path) -> Iterator[str]:
    require_tool("nginx")
    port = free_port()
    command = nginx_command(tmp_path / "nginx", www, port)
    with running(command, port, tmp_path / "nginx.log"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def atempstore(www: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("ATEMPSTORE_SERVE_EXIT_AFTER", None)
    command = [sys.executable, "-m", "atempstore.cli", "serve", str(www), "--workers", "2"]
    command += ["--port", str(port), "--host", "127.0.0.1", "--cache", str(tmp_path / "cache")]
    with running(command, port, tmp_path / "atempstore.log", env=env):
        yield f"http://127.0.0.1:{port}"


def notes(redbot: list[str], url: str) -> dict[str, dict[str, str]]:
    """REDbot's notes on ``url``: id -> {level, summary} for every note it gave."""
    out = subprocess.run([*redbot, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    har = json.loads(out.stdout)
    assert "_red_error" not in har["log"], har["log"]["_red_error"]
    found: dict[str, dict[str, str]] = {}

    def collect(note: dict[str, Any]) -> None:
        found[note["note_id"]] = {"level": note["level"], "summary": note["summary"]}
        for sub in note.get("subnotes", ()):
            collect(sub)

    entries = har["log"]["entries"]
    assert entries, f"REDbot got no complete response from {url}: {out.stdout}"
    for note in entries[0]["_red_messages"]:
        collect(note)
    return found


def _said(n: dict[str, str]) -> str:
    return n["level"] + ": " + re.sub(r"\s+", " ", n["summary"])


def worse_than(
    ours: dict[str, dict[str, str]], theirs: dict[str, dict[str, str]]
) -> dict[str, str]:
    """What REDbot holds against ``ours`` and not against ``theirs``: a warning or
    bad note they did not get, or a good note they got (e.g. ``RANGE_CORRECT``)
    that ours lacks.  Info notes differ harmlessly (``CURRENT_AGE`` comes and goes
    with the second the Date header was stamped in) and are not compared."""
    worse = {
        note_id: _said(n)
        for note_id, n in ours.items()
        if n["level"] in ("WARN", "BAD") and note_id not in theirs
    }
    for note_id, n in theirs.items():
        if n["level"] == "GOOD" and ours.get(note_id, {}).get("level") != "GOOD":
            worse[note_id] = "missing: " + _said(n)
    return {k: v for k, v in worse.items() if k not in ALLOWED}


@pytest.mark.timeout(300)
def test_redbot_finds_nothing_worse_than_on_nginx(
    redbot: list[str], nginx: str, atempstore: str
) -> None:
    worse: dict[str, dict[str, str]] = {}
    for path in PATHS:
        theirs = notes(redbot, nginx + path)
        if not path.endswith("/"):
            # REDbot made its follow-up requests: otherwise there is little to compare.
            assert {"RANGE_CORRECT", "INM_304"} <= theirs.keys(), theirs
        found = worse_than(notes(redbot, atempstore + path), theirs)
        if found:
            worse[path] = found
    assert not worse, json.dumps(worse, indent=2)


def test_the_comparison_catches_a_lost_range_reply_and_a_new_warning() -> None:
    # As python -m http.server fares against nginx (no ETag, no Range), plus a warning.
    nginx = {
        "RANGE_CORRECT": {"level": "GOOD", "summary": "A ranged request returned..."},
        "FRESHNESS_HEURISTIC": {"level": "WARN", "summary": "heuristic"},
        "LM_PRESENT": {"level": "INFO", "summary": "last changed"},
    }
    other = {
        "FRESHNESS_HEURISTIC": {"level": "WARN", "summary": "heuristic"},
        "CL_INCORRECT": {"level": "BAD", "summary": "The Content-Length\n  is wrong"},
    }
    assert worse_than(other, nginx) == {
        "RANGE_CORRECT": "missing: GOOD: A ranged request returned...",
        "CL_INCORRECT": "BAD: The Content-Length is wrong",
    }
    assert worse_than(nginx, nginx) == {}
