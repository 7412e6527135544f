"""TempFileManager: real directories, real processes, real locks, real kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atempstore
from atempstore import (
    AtempstoreError,
    CleanResult,
    InvalidNameError,
    NoUsableDirectoryError,
    PathOutsideStoreError,
    TempFileManager,
    UnsafeDirectoryError,
    get_manager,
)

from .conftest import (
    REPO,
    lock_is_held,
    mounted_tmpfs,
    require_tool,
    run_python,
    spawn_python,
)

USER = pwd.getpwuid(os.geteuid()).pw_name
OTHER_UID = 65534  # nobody


def snapshot(root: Path, *, skip: Path | None = None) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under ``root`` (links not followed): inode, mode, uid, link target.

    ``skip``: a subtree left out (its own entry included).
    """
    result: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if skip is not None and (path == skip or skip in path.parents):
                continue
            st_ = path.lstat()
            target = os.readlink(path) if path.is_symlink() else ""
            result[str(path.relative_to(root))] = (st_.st_ino, st_.st_mode, st_.st_uid, target)
    return result


HOLDER = """
import asyncio, sys
from atempstore import TempFileManager

async def main() -> None:
    manager = TempFileManager(prefix=sys.argv[1])
    print(await manager.gettempdir(), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # hold the manager until told

asyncio.run(main())
"""


@contextlib.contextmanager
def holder(prefix: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A child process that holds a started manager; yields it and its dir."""
    proc = spawn_python(HOLDER, prefix)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield proc, Path(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# --------------------------------------------------------------------------
# Layout, modes, lifecycle


async def test_layout_modes_and_lock(base: Path) -> None:
    async with TempFileManager(prefix="layout") as manager:
        assert manager.tmpdir() == base
        assert manager.userdir == base / f"layout_{USER}"
        assert manager.username() == USER
        assert manager.dir.parent == manager.userdir
        assert manager.pid() == str(os.getpid())
        assert re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{16}}", manager.dir.name)
        assert await manager.gettempdir() == manager.dir
        for directory in (base, manager.userdir, manager.dir):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        lock_path = manager.dir / ".lock"
        assert stat.S_IMODE(lock_path.stat().st_mode) == 0o600
        assert sorted(p.name for p in manager.dir.iterdir()) == [".lock"]
        assert lock_is_held(lock_path)
        own = manager.dir
    assert not own.exists()
    assert manager.userdir.is_dir()  # shared with the user's other processes


async def test_two_managers_get_distinct_dirs_and_exclude_each_other(base: Path) -> None:
    async with TempFileManager() as one, TempFileManager() as two:
        assert one.dir != two.dir
        assert one.userdir == two.userdir
        result = await one.clean_userdir(grace=0)
        assert result == CleanResult(removed=[], skipped=[two.dir])
        assert two.dir.is_dir()


async def test_constructor_does_no_io(base: Path) -> None:
    manager = TempFileManager(prefix="lazy")
    assert not base.exists()
    with pytest.raises(RuntimeError, match="not started"):
        _ = manager.dir
    with pytest.raises(RuntimeError, match="not started"):
        manager.tmpdir()
    assert "not started" in repr(manager)
    await manager.cleanup()  # never started: nothing to do, and it is now closed
    assert not base.exists()
    with pytest.raises(RuntimeError, match="cleaned up"):
        await manager.create_path()


@pytest.mark.parametrize("prefix", ["", "a/b", "..", ".", "x\0y", ".hidden"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(InvalidNameError):
        TempFileManager(prefix=prefix)


async def test_lazy_start_and_aclose(base: Path) -> None:
    manager = TempFileManager()
    path = await manager.create_path()  # starts the manager
    assert path.parent == manager.dir
    await manager.aclose()
    assert not manager.dir.exists()
    await manager.cleanup()  # idempotent
    await manager.aclose()
    with pytest.raises(RuntimeError, match="cleaned up"):
        await manager.gettempdir()


async def test_get_manager_is_a_started_process_wide_default(base: Path) -> None:
    first = await get_manager()
    try:
        assert first is await get_manager()
        assert first.dir.is_dir()
        assert first.prefix == "atempstore"
        gathered = await asyncio.gather(*(get_manager() for _ in range(10)))
        assert all(m is first for m in gathered)
    finally:
        await first.cleanup()
    second = await get_manager()
    try:
        assert second is not first
        assert second.dir.is_dir()
        assert second.dir != first.dir
    finally:
        await second.cleanup()


async def test_cancelled_enter_leaves_no_directory(base: Path) -> None:
    manager = TempFileManager(prefix="cancel")

    async def enter() -> None:
        async with manager:
            pytest.fail("the body must not run")

    # Hold the manager's state mutex so the start hop is stuck in its worker
    # thread when the cancellation arrives; let it go only afterwards.
    with manager._core._cond:
        task = asyncio.create_task(enter())
        await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done(), "a state-changing hop must finish before the cancel lands"
    with pytest.raises(asyncio.CancelledError):
        await task
    userdir = base / f"cancel_{USER}"
    # The start hop finished (it is not abandoned), so the directory was made,
    # then removed because nobody would ever reach __aexit__.
    assert userdir.is_dir()
    assert list(userdir.iterdir()) == []


# --------------------------------------------------------------------------
# create_path


async def test_create_path_files_and_folders(base: Path) -> None:
    async with TempFileManager() as manager:
        path = await manager.create_path(prefix="up-", suffix=".bin", text=True, mode="w")
        assert path.parent == manager.dir
        assert path.name.startswith("up-")
        assert path.name.endswith(".bin")
        assert path.read_bytes() == b""
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        folder = await manager.create_path(prefix="work-", folder=True)
        assert folder.is_dir()
        assert folder.parent == manager.dir
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        paths = await asyncio.gather(*(manager.create_path() for _ in range(100)))
        assert len(set(paths)) == 100
        assert all(p.is_file() and p.parent == manager.dir for p in paths)


@pytest.mark.parametrize(("prefix", "suffix"), [("../", ""), ("", "/../x"), ("a\0", "")])
async def test_create_path_refuses_separators(base: Path, prefix: str, suffix: str) -> None:
    async with TempFileManager() as manager:
        before = snapshot(base.parent)
        with pytest.raises(InvalidNameError):
            await manager.create_path(prefix=prefix, suffix=suffix)
        assert snapshot(base.parent) == before


# --------------------------------------------------------------------------
# remove_path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "victim").write_text("keep me")
    (out / "sub" / "deep").write_text("keep me too")
    return out


async def test_remove_path_files_folders_and_links(base: Path, outside: Path) -> None:
    async with TempFileManager() as manager:
        d = manager.dir
        path = await manager.create_path()
        await manager.remove_path(path)
        assert not path.exists()

        (d / "tree" / "inner").mkdir(parents=True)
        (d / "tree" / "inner" / "f").write_text("x")
        (d / "tree" / "to_outside").symlink_to(outside)
        (d / "tree" / "to_victim").symlink_to(outside / "victim")
        await manager.remove_path("tree")  # relative to dir
        assert not (d / "tree").exists()

        (d / "link").symlink_to(outside)
        await manager.remove_path(d / "link")  # the link, not its target
        assert not (d / "link").is_symlink()

        (d / "a" / "b").mkdir(parents=True)
        (d / "a" / "b" / "f").write_text("x")
        await manager.remove_path("a/b/../b/f")
        assert not (d / "a" / "b" / "f").exists()
        assert (d / "a" / "b").is_dir()

        with pytest.raises(FileNotFoundError):
            await manager.remove_path("missing")
        assert (outside / "victim").read_text() == "keep me"
        assert (outside / "sub" / "deep").read_text() == "keep me too"


async def test_remove_path_refuses_what_is_not_strictly_inside(base: Path, outside: Path) -> None:
    async with TempFileManager() as manager:
        d = manager.dir
        (d / "a").mkdir()
        (d / "a" / "link").symlink_to(outside / "sub")
        (d / "out").symlink_to(outside)
        before = snapshot(base.parent)
        refused: list[str | Path] = [
            outside / "victim",
            "../" + d.name,
            "..",
            ".",
            "",
            str(d),
            "a/..",
            "out/victim",  # through a symlink in a parent
            "a/link/../victim",  # a/link/.. is outside/, not a/
            "a/link/deep",
            f"../{d.name}/out/victim",
            "/",
        ]
        for name in refused:
            with pytest.raises(PathOutsideStoreError):
                await manager.remove_path(name)
        with pytest.raises(InvalidNameError, match="lock"):
            await manager.remove_path(".lock")
        with pytest.raises(InvalidNameError, match="lock"):
            await manager.remove_path("a/../.lock")
        assert snapshot(base.parent) == before
        assert lock_is_held(d / ".lock")


async def test_remove_path_accepts_outside_links_that_lead_inside(
    base: Path, outside: Path
) -> None:
    async with TempFileManager() as manager:
        (manager.dir / "in").mkdir()
        (manager.dir / "in" / "f").write_text("x")
        (outside / "to_inside").symlink_to(manager.dir / "in")
        await manager.remove_path(outside / "to_inside" / "f")
        assert not (manager.dir / "in" / "f").exists()
        assert (outside / "to_inside").is_symlink()


async def test_clean_tempdir_keeps_dir_and_lock(base: Path, outside: Path) -> None:
    async with TempFileManager() as manager:
        await manager.create_path()
        folder = await manager.create_path(folder=True)
        (folder / "link").symlink_to(outside)
        await manager.clean_tempdir()
        assert [p.name for p in manager.dir.iterdir()] == [".lock"]
        assert lock_is_held(manager.dir / ".lock")
        assert (outside / "victim").exists()
        assert (await manager.create_path()).is_file()  # still usable


_COMPONENTS = st.sampled_from(
    [
        "d1",
        "d2",
        "f0",
        "f1",
        "f2",
        "..",
        ".",
        "link_out",
        "link_out_file",
        "link_up",
        "link_top_out",
        "link_in",
        "victim",
        "sub",
        "deep",
        "outside",
        "missing",
        ".lock",
    ]
)


def _populate(inside: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    (out / "sub").mkdir(parents=True)
    (out / "victim").write_text("v")
    (out / "sub" / "deep").write_text("d")
    (out / "link_in").symlink_to(inside / "d1")
    for entry in inside.iterdir():
        if entry.name != ".lock":
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    (inside / "d1" / "d2").mkdir(parents=True)
    (inside / "f0").write_text("0")
    (inside / "d1" / "f1").write_text("1")
    (inside / "d1" / "d2" / "f2").write_text("2")
    (inside / "d1" / "link_out").symlink_to(out)
    (inside / "d1" / "link_out_file").symlink_to(out / "victim")
    (inside / "d1" / "d2" / "link_up").symlink_to("..")
    (inside / "link_top_out").symlink_to(out / "sub")
    (inside / "link_up").symlink_to("..")
    (inside / "d1" / "link_in").symlink_to(out / "link_in")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    anchor=st.sampled_from(["relative", "dir", "outside", "sandbox"]),
    parts=st.lists(_COMPONENTS, min_size=1, max_size=6),
)
def test_remove_path_never_touches_anything_outside_dir(
    started: tuple[TempFileManager, Path], anchor: str, parts: list[str]
) -> None:
    manager, sandbox = started
    inside, out = manager.dir, sandbox / "outside"
    _populate(inside, out)
    anchors = {"relative": "", "dir": str(inside), "outside": str(out), "sandbox": str(sandbox)}
    path = os.path.join(anchors[anchor], *parts)
    outside_before = snapshot(sandbox, skip=inside)
    inside_before = snapshot(inside)
    refused, error = False, 0
    try:
        asyncio.run(manager.remove_path(path))
    except (PathOutsideStoreError, InvalidNameError):
        refused = True
    except OSError as exc:
        error = exc.errno or -1
    if refused:
        assert snapshot(inside) == inside_before, "a refused path changed something"
    # Otherwise: removed, or a missing name / a file used as a directory / a loop.
    assert error in (0, errno.ENOENT, errno.ENOTDIR, errno.ELOOP), (path, error)
    assert snapshot(sandbox, skip=inside) == outside_before, path
    assert lock_is_held(inside / ".lock")


@pytest.fixture
def started(base: Path) -> Iterator[tuple[TempFileManager, Path]]:
    manager = TempFileManager()
    asyncio.run(manager.gettempdir())
    try:
        yield manager, base.parent
    finally:
        asyncio.run(manager.cleanup())


@pytest.mark.stress
async def test_remove_path_survives_a_symlink_swapped_in_mid_call(
    base: Path, outside: Path
) -> None:
    """A parent swapped for a symlink between the check and the deletion fails
    the walk (O_NOFOLLOW) instead of deleting outside."""
    async with TempFileManager() as manager:
        sub, parked = manager.dir / "sub", manager.dir / "parked"
        stop = threading.Event()

        def swapper() -> None:
            # Alternate "sub" between a real directory holding an inside victim
            # and a symlink to the outside directory holding the real victim.
            while not stop.is_set():
                shutil.rmtree(parked, ignore_errors=True)
                parked.mkdir()
                (parked / "victim").write_text("inside")
                sub.unlink(missing_ok=True)
                parked.rename(sub)
                time.sleep(0.0005)
                sub.rename(parked)
                sub.symlink_to(outside)
                time.sleep(0.0005)

        thread = threading.Thread(target=swapper)
        thread.start()
        removed = refused = 0
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                try:
                    await manager.remove_path("sub/victim")
                    removed += 1
                except (PathOutsideStoreError, FileNotFoundError, NotADirectoryError):
                    refused += 1
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    refused += 1
                assert (outside / "victim").read_text() == "keep me"
        finally:
            stop.set()
            thread.join()
        # Both outcomes happened: the race was real, not one-sided.
        assert removed > 0, refused
        assert refused > 0, removed
        assert (outside / "victim").read_text() == "keep me"


# --------------------------------------------------------------------------
# Safety of userdir


def _plant_symlink(userdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "attacker"
    target.mkdir(mode=0o700)
    userdir.symlink_to(target)


def _plant_other_owner(userdir: Path, tmp_path: Path) -> None:
    userdir.mkdir(mode=0o700)
    os.chown(userdir, OTHER_UID, OTHER_UID)


def _plant_group_writable(userdir: Path, tmp_path: Path) -> None:
    userdir.mkdir()
    userdir.chmod(0o770)


def _plant_world_writable(userdir: Path, tmp_path: Path) -> None:
    userdir.mkdir()
    userdir.chmod(0o1777)


def _plant_file(userdir: Path, tmp_path: Path) -> None:
    userdir.write_text("not a directory")


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        (_plant_symlink, "symlink"),
        (_plant_other_owner, "belongs to uid 65534"),
        (_plant_group_writable, "writable by group or others"),
        (_plant_world_writable, "writable by group or others"),
        (_plant_file, "not a directory"),
    ],
)
async def test_unsafe_userdir_is_refused(
    base: Path, tmp_path: Path, plant: Callable[[Path, Path], None], message: str
) -> None:
    if plant is _plant_other_owner and os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    base.mkdir()
    userdir = base / f"atempstore_{USER}"
    plant(userdir, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeDirectoryError, match=message) as caught:
        async with TempFileManager():
            pytest.fail("an unsafe userdir was used")
    assert isinstance(caught.value, PermissionError)
    assert caught.value.path == str(userdir)
    # Refused, not worked around: nothing was created there, and no fallback
    # to the next base (~/.atempstore/tmp) either.
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "home").exists()
    with pytest.raises(UnsafeDirectoryError):
        await atempstore.TempFileManager().clean_userdir()


async def test_mode_0755_userdir_is_accepted(base: Path) -> None:
    base.mkdir()
    userdir = base / f"atempstore_{USER}"
    userdir.mkdir()
    userdir.chmod(0o755)
    async with TempFileManager() as manager:
        assert manager.userdir == userdir


# --------------------------------------------------------------------------
# Base directory candidates


async def test_uncreatable_candidate_falls_through(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setenv("ATEMPSTORE_TEMPDIR", str(tmp_path / "file" / "base"))
    async with TempFileManager() as manager:
        home_base = tmp_path / "home" / ".atempstore" / "tmp"
        assert manager.tmpdir() == home_base
        # Every level it created is private, not just the last one.
        assert stat.S_IMODE((tmp_path / "home" / ".atempstore").stat().st_mode) == 0o700
        assert stat.S_IMODE(home_base.stat().st_mode) == 0o700


async def test_missing_home_falls_through_to_system_temp(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("in the way")
    monkeypatch.setenv("ATEMPSTORE_TEMPDIR", str(tmp_path / "file" / "base"))
    monkeypatch.setenv("HOME", str(tmp_path / "file" / "home"))
    async with TempFileManager() as manager:
        assert manager.tmpdir() == tmp_path / "systmp"


async def test_no_usable_candidate_names_every_one(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    monkeypatch.setenv("ATEMPSTORE_TEMPDIR", str(blocker / "env"))
    monkeypatch.setenv("HOME", str(blocker / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "sys"))
    with pytest.raises(NoUsableDirectoryError) as caught:
        await TempFileManager().gettempdir()
    error = caught.value
    assert isinstance(error, OSError)
    assert isinstance(error, AtempstoreError)
    expected = [str(blocker / "env"), str(blocker / "home/.atempstore/tmp"), str(blocker / "sys")]
    assert list(error.failures) == expected
    for candidate in expected:
        assert candidate in str(error)
        assert "Not a directory" in error.failures[candidate]
    assert "ATEMPSTORE_TEMPDIR" in str(error)


@pytest.mark.faults
@pytest.mark.multiprocess
def test_candidate_that_cannot_be_locked_falls_through(base: Path, tmp_path: Path) -> None:
    """Real ENOLCK (what NFS without lockd answers) on the first test lock."""
    require_tool("strace")
    code = """
import asyncio
from atempstore import TempFileManager

async def main() -> None:
    async with TempFileManager() as manager:
        print(manager.tmpdir())

asyncio.run(main())
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(tmp_path / "strace.log"),
            "-e",
            "trace=flock",
            "-e",
            "inject=flock:error=ENOLCK:when=1",
            sys.executable,
            "-c",
            code,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "home" / ".atempstore" / "tmp"
    assert "ENOLCK" in (tmp_path / "strace.log").read_text()
    assert base.is_dir()  # it could be created, just not locked


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with no free inode left (real ENOSPC on any create)."""
    with mounted_tmpfs(tmp_path / "full", "size=1m,nr_inodes=4") as mnt:
        (mnt / "base").mkdir()
        with contextlib.suppress(OSError):
            for i in range(10):
                (mnt / f"fill{i}").write_text("")
        with pytest.raises(OSError, match="No space left on device"):
            (mnt / "base" / "probe").write_text("")
        yield mnt


@pytest.mark.faults
async def test_full_filesystem_candidate_falls_through(
    base: Path, tmp_path: Path, full_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base on a full filesystem cannot hold a lock file: the next one is used."""
    monkeypatch.setenv("ATEMPSTORE_TEMPDIR", str(full_tmpfs / "base"))
    async with TempFileManager() as manager:
        assert manager.tmpdir() == tmp_path / "home" / ".atempstore" / "tmp"


# --------------------------------------------------------------------------
# clean_userdir


async def test_clean_userdir_decides_by_lock_and_grace(base: Path, tmp_path: Path) -> None:
    async with TempFileManager() as manager, TempFileManager() as alive:
        userdir = manager.userdir
        old = time.time() - 3600

        dead = userdir / "111-dead"  # .lock exists, nobody holds it
        dead.mkdir()
        (dead / ".lock").touch()
        (dead / "data").mkdir()
        (dead / "data" / "f").write_text("x")

        dead_old = userdir / "112-dead-old"
        dead_old.mkdir()
        (dead_old / ".lock").touch()
        os.utime(dead_old, (old, old))

        young = userdir / "113-starting"  # no .lock yet, just made
        young.mkdir()

        abandoned = userdir / "114-abandoned"  # no .lock, an hour old
        abandoned.mkdir()
        (abandoned / "half").write_text("x")
        os.utime(abandoned, (old, old))

        stray = userdir / "stray-file"
        stray.write_text("not ours to judge")

        result = await manager.clean_userdir()
        assert set(result.removed) == {dead, dead_old, abandoned}
        assert set(result.skipped) == {alive.dir, young, stray}
        assert len(result.removed) + len(result.skipped) == 6
        assert not dead.exists()
        assert not dead_old.exists()
        assert not abandoned.exists()
        assert young.is_dir()
        assert stray.read_text() == "not ours to judge"
        assert lock_is_held(alive.dir / ".lock")
        assert lock_is_held(manager.dir / ".lock")

        assert (await manager.clean_userdir(grace=0)).removed == [young]
        with pytest.raises(ValueError, match="grace"):
            await manager.clean_userdir(grace=-1)
        with pytest.raises(ValueError, match="grace"):
            await manager.clean_userdir(grace=float("nan"))


async def test_clean_userdir_removes_read_only_trees(base: Path, tmp_path: Path) -> None:
    """Dead processes' read-only subdirectories (Go module caches...) are removed too,
    and a link to a read-only directory outside is neither followed nor chmodded."""
    outside = tmp_path / "ro-outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    outside.chmod(0o500)
    async with TempFileManager() as manager:
        dead = manager.userdir / "115-dead"
        (dead / "ro" / "deeper").mkdir(parents=True)
        (dead / ".lock").touch()
        (dead / "ro" / "deeper" / "f").write_text("x")
        (dead / "ro" / "link").symlink_to(outside)
        (dead / "ro" / "deeper").chmod(0o500)
        (dead / "ro").chmod(0o000)
        result = await manager.clean_userdir()
        assert result.removed == [dead]
    assert stat.S_IMODE(outside.stat().st_mode) == 0o500
    assert (outside / "keep").exists()
    outside.chmod(0o700)


UNPRIVILEGED_CLEANUP = """
import asyncio, os
import anyio
from atempstore import TempFileManager

# Python itself lives under /root (0700 here): import and warm up everything
# as root, then become 'nobody' for the part under test.
asyncio.run(anyio.to_thread.run_sync(lambda: None))
os.setgroups([])
os.setgid(65534)
os.setuid(65534)

async def main() -> None:
    async with TempFileManager() as manager:
        tree = await manager.create_path(folder=True)
        os.makedirs(tree / "a" / "b")
        (tree / "a" / "b" / "f").write_text("x")
        os.chmod(tree / "a" / "b", 0o500)
        os.chmod(tree / "a", 0o000)
        print(manager.username(), manager.dir, flush=True)
    print("gone" if not manager.dir.exists() else "left", flush=True)

asyncio.run(main())
"""


@pytest.mark.multiprocess
def test_cleanup_as_unprivileged_user_removes_read_only_trees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As root, permissions never stop rmdir; a real user needs the chmod fallback."""
    if os.geteuid() != 0:
        pytest.skip("switching to the 'nobody' uid needs root")
    shared = Path(tempfile.mkdtemp(prefix="atempstore-nobody-", dir="/tmp"))
    try:
        os.chown(shared, OTHER_UID, OTHER_UID)
        monkeypatch.setenv("ATEMPSTORE_TEMPDIR", str(shared / "base"))
        monkeypatch.setenv("HOME", str(shared))
        proc = run_python(UNPRIVILEGED_CLEANUP)
        assert proc.returncode == 0, proc.stderr
        words = proc.stdout.split()
        assert words[0] == "nobody", proc.stdout
        assert words[-1] == "gone", proc.stdout
    finally:
        shutil.rmtree(shared)


# --------------------------------------------------------------------------
# Real processes: liveness, kill -9, atexit, fork


@pytest.mark.multiprocess
async def test_live_process_is_skipped_and_killed_one_removed(base: Path) -> None:
    with holder("proc") as (proc, child_dir):
        async with TempFileManager(prefix="proc") as manager:
            assert child_dir.parent == manager.userdir
            result = await manager.clean_userdir(grace=0)
            assert result.skipped == [child_dir]
            assert result.removed == []
            proc.kill()  # SIGKILL: no atexit, no cleanup
            proc.wait()
            assert child_dir.is_dir()  # it really was left behind
            result = await manager.clean_userdir()
            assert result.removed == [child_dir]
            assert not child_dir.exists()
            assert manager.dir.is_dir()


ATEXIT = """
import asyncio
from atempstore import TempFileManager, get_manager

async def main() -> None:
    manager = TempFileManager()
    path = await manager.create_path(suffix=".data")
    path.write_text("x")
    default = await get_manager()
    await default.create_path(folder=True)
    print(manager.dir, default.dir, sep="\\n", flush=True)

asyncio.run(main())
"""


@pytest.mark.multiprocess
def test_atexit_cleans_up_when_cleanup_is_never_called(base: Path) -> None:
    proc = run_python(ATEXIT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    dirs = [Path(line) for line in proc.stdout.split()]
    assert len(dirs) == 2
    for directory in dirs:
        assert directory.parent == base / f"atempstore_{USER}"
        assert not directory.exists()


FORK = """
import asyncio, fcntl, os, sys, warnings
from atempstore import TempFileManager

warnings.simplefilter("ignore", DeprecationWarning)  # fork() with worker threads
manager = TempFileManager()
directory = asyncio.run(manager.gettempdir())
pid = os.fork()
if pid == 0:
    sys.exit(0)  # runs atexit in the child: it must not clean the parent's dir
os.waitpid(pid, 0)
fd = os.open(directory / ".lock", os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("lock lost")
except BlockingIOError:
    print("lock held")
os.close(fd)
print("dir kept" if directory.is_dir() else "dir removed")
print(directory, flush=True)
"""


@pytest.mark.multiprocess
def test_forked_child_exit_leaves_parent_dir_and_lock(base: Path) -> None:
    proc = run_python(FORK)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["lock held", "dir kept"], proc.stdout
    assert not Path(lines[2]).exists()  # the parent's own atexit removed it


STARTER = """
import asyncio, sys
from atempstore import TempFileManager

async def main() -> None:
    starts, keep = int(sys.argv[1]), int(sys.argv[2])
    kept = []
    for i in range(starts):
        manager = TempFileManager(prefix="race")
        directory = await manager.gettempdir()
        # While it lives, its directory and lock must stay put: a cleaner that
        # removed it would make this create_path fail and the process crash.
        await manager.create_path()
        assert (directory / ".lock").exists(), directory
        if i < starts - keep:
            await manager.cleanup()
        else:
            kept.append(manager)
    for manager in kept:
        print(manager.dir, flush=True)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

asyncio.run(main())
"""


@pytest.mark.multiprocess
@pytest.mark.stress
async def test_cleaner_racing_starting_processes_removes_no_live_dir(base: Path) -> None:
    """1200 manager starts in 4 processes race two cleaners looping with grace=0
    (stricter than the default); the last 200 stay alive to the end.  Killed
    processes' directories appear too, and the cleaners must take those."""
    starts, keep, processes = 300, 50, 4
    async with TempFileManager(prefix="race") as cleaner:
        with holder("race") as (victim, victim_dir):
            victim.kill()  # SIGKILL: its directory stays behind
            victim.wait()
        starters = [spawn_python(STARTER, str(starts), str(keep)) for _ in range(processes)]
        removed: set[Path] = set()
        rounds = 0
        try:
            ready = asyncio.gather(
                *(asyncio.to_thread(_read_until_ready, proc) for proc in starters)
            )

            async def clean_until_ready() -> None:
                nonlocal rounds
                while not ready.done():
                    result = await cleaner.clean_userdir(grace=0)
                    removed.update(result.removed)
                    rounds += 1

            await asyncio.gather(clean_until_ready(), clean_until_ready())
            outputs = await ready
            result = await cleaner.clean_userdir(grace=0)
            removed.update(result.removed)
            live = [Path(line) for lines in outputs for line in lines]
            assert len(live) == keep * processes
            assert len(set(live)) == len(live)
            assert not removed & set(live), "a live directory was removed"
            for directory in live:
                assert lock_is_held(directory / ".lock"), directory
            assert victim_dir in removed
            assert set(result.skipped) == set(live)
            assert rounds > 10, "the cleaners did not actually race the starters"
        finally:
            for proc in starters:
                if proc.poll() is None:
                    assert proc.stdin is not None
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.write("\n")
                        proc.stdin.flush()
            errors = [proc.communicate(timeout=60)[1] for proc in starters]
        assert [proc.returncode for proc in starters] == [0] * processes, errors
        leftovers = [p for p in cleaner.userdir.iterdir() if p != cleaner.dir]
        assert leftovers == []  # the starters cleaned up at exit


def _read_until_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        if line.strip() == "ready":
            return lines
        lines.append(line.strip())
    raise AssertionError(f"starter died: {proc.stderr.read() if proc.stderr else ''}")


# --------------------------------------------------------------------------
# Never blocks the loop; the docs example runs


async def test_no_public_coroutine_blocks_the_loop(
    base: Path, tmp_path: Path, no_blocking_io: list[str]
) -> None:
    async with TempFileManager(prefix="loop") as manager:
        assert manager.tmpdir() == base
        assert manager.username() == USER
        assert manager.pid() == str(os.getpid())
        assert manager.dir.parent == manager.userdir
        assert await manager.gettempdir() == manager.dir
        path = await manager.create_path(suffix=".x")
        folder = await manager.create_path(folder=True)
        await manager.remove_path(path)
        await manager.remove_path(folder.name)
        await manager.create_path()
        await manager.clean_tempdir()
        assert isinstance(await manager.clean_userdir(), CleanResult)
        assert await manager.access(tmp_path)
        assert await manager.create(tmp_path / "made" / "here")
        assert not await manager.create(tmp_path / "made" / "here")
        with pytest.raises(PathOutsideStoreError):
            await manager.remove_path("..")
    lazy = TempFileManager(prefix="loop")
    await lazy.create_path()
    await lazy.aclose()
    default = await get_manager()
    assert default is await get_manager()
    await default.cleanup()
    assert no_blocking_io == []


async def test_access_and_create(base: Path, tmp_path: Path) -> None:
    manager = TempFileManager()
    target = tmp_path / "x" / "y" / "z"
    assert await manager.create(target) is True
    for level in (tmp_path / "x", tmp_path / "x" / "y", target):
        assert stat.S_IMODE(level.stat().st_mode) == 0o700
    assert await manager.create(target) is False
    assert await manager.access(target) is True
    assert await manager.access(tmp_path / "missing") is False
    assert not base.exists()  # neither needed the manager to start


def _docs_example() -> str:
    text = (REPO / "docs" / "tempfiles.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return next(str(block) for block in blocks if "Starlette(" in block)


async def test_docs_upload_example_runs(base: Path) -> None:
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(_docs_example(), "docs/tempfiles.md", "exec"), namespace)
    app = namespace["app"]
    payload = os.urandom(300_000)
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        manager = app.state.temp  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/upload", content=payload)
        assert response.status_code == 200
        assert response.json()["size"] == len(payload)
        assert [p.name for p in manager.dir.iterdir()] == [".lock"]
    assert not manager.dir.exists()
