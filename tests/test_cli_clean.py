"""``atempstore clean``: the installed command, against real live and killed processes."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from .conftest import REPO
from .test_tempfiles import holder

USER = pwd.getpwuid(os.geteuid()).pw_name


def atempstore(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the console script that ``pip install`` made from pyproject's entry point."""
    script = Path(sys.executable).parent / "atempstore"
    assert script.exists(), "the 'atempstore' console script is not installed"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_entry_point_is_declared() -> None:
    (script,) = entry_points(group="console_scripts", name="atempstore")
    assert script.value == "atempstore.cli:main"
    usage = atempstore("clean", "--help")
    assert usage.returncode == 0
    for option in ("--prefix", "--dry-run", "--grace"):
        assert option in usage.stdout


@pytest.mark.multiprocess
def test_clean_removes_dead_processes_dirs_only(base: Path) -> None:
    with holder("cli") as (_live, live_dir), holder("cli") as (dead, dead_dir):
        dead.kill()  # SIGKILL: its directory stays behind
        dead.wait()
        assert dead_dir.is_dir()

        dry = atempstore("clean", "--prefix", "cli", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove {dead_dir}: its lock is not held" in dry.stdout
        assert f"skipped {live_dir}: in use" in dry.stdout
        assert "would remove 1, skipped 1" in dry.stdout
        assert dead_dir.is_dir()  # a dry run removes nothing

        real = atempstore("clean", "--prefix", "cli")
        assert real.returncode == 0, real.stderr
        assert f"removed {dead_dir}" in real.stdout
        assert f"skipped {live_dir}" in real.stdout
        assert not dead_dir.exists()
        assert live_dir.is_dir()
        # The command made no process directory of its own.
        assert sorted(live_dir.parent.iterdir()) == [live_dir]


def test_clean_with_nothing_there(base: Path) -> None:
    done = atempstore("clean", "--prefix", "never-used")
    assert done.returncode == 0, done.stderr
    assert "nothing to clean" in done.stdout
    assert not (base / f"never-used_{USER}").exists()


def test_clean_refuses_an_unsafe_userdir(base: Path) -> None:
    userdir = base / f"cli_{USER}"
    userdir.mkdir(parents=True)
    userdir.chmod(0o777)
    (userdir / "123-planted").mkdir()
    refused = atempstore("clean", "--prefix", "cli", "--grace", "0")
    assert refused.returncode == 1
    assert str(userdir) in refused.stderr
    assert "chmod go-w" in refused.stderr
    assert (userdir / "123-planted").is_dir()


def test_clean_grace_spares_young_lockless_dirs(base: Path) -> None:
    userdir = base / f"cli_{USER}"
    userdir.mkdir(parents=True, mode=0o700)
    (userdir / "123-starting").mkdir()
    spared = atempstore("clean", "--prefix", "cli")
    assert "skipped" in spared.stdout
    assert (userdir / "123-starting").is_dir()
    taken = atempstore("clean", "--prefix", "cli", "--grace", "0")
    assert taken.returncode == 0, taken.stderr
    assert f"removed {userdir / '123-starting'}" in taken.stdout
    assert not (userdir / "123-starting").exists()
