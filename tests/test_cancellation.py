"""Every public coroutine of TempFileManager and SessionStorage, cancelled at
each of its thread hops (before, during and after the call): nothing is left
behind, and what finished is whole.

The lock, FileStore and cache coroutines have the same sweep in their own
test modules; `tests/cancelling.py` is the harness they share.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from atempstore import SessionStorage, SessionStorageRepository, TempFileManager

from .cancelling import CancelPoint, cancel_points
from .conftest import open_fds


def tree(root: Path) -> set[str]:
    """Every name under ``root`` (relative), hidden ones included."""
    found: set[str] = set()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(parent, name), root))
    return found


# --------------------------------------------------------------------------
# TempFileManager


@dataclass
class Managed:
    manager: TempFileManager
    fds: int
    before: set[str] = field(default_factory=set)


ManagerCall = Callable[[TempFileManager], Awaitable[object]]

MANAGER_CALLS: dict[str, ManagerCall] = {
    "gettempdir": lambda m: m.gettempdir(),
    "create_path": lambda m: m.create_path(suffix=".x"),
    "create_path folder": lambda m: m.create_path(folder=True),
    "remove_path": lambda m: m.remove_path("victim"),
    "clean_tempdir": lambda m: m.clean_tempdir(),
    "clean_userdir": lambda m: m.clean_userdir(),
    "access": lambda m: m.access(m.dir),
    "create": lambda m: m.create(m.dir / "made" / "deep"),
}


@pytest.mark.parametrize("what", sorted(MANAGER_CALLS))
async def test_temp_file_manager_cancelled_at_each_hop(base: Path, what: str) -> None:
    call = MANAGER_CALLS[what]
    managers: list[TempFileManager] = []

    async def prepare() -> Managed:
        manager = TempFileManager(prefix="cancel")
        managers.append(manager)
        await manager.gettempdir()
        (manager.dir / "victim").mkdir()
        (manager.dir / "victim" / "f").write_bytes(b"x")
        return Managed(manager, open_fds(), tree(manager.dir))

    async def check(state: Managed, point: CancelPoint) -> None:
        after = tree(state.manager.dir)
        if what.startswith("create_path"):
            # A path the cancelled caller never saw is not left behind.
            assert after == state.before, (point, after - state.before)
        elif what == "remove_path":
            assert after in (state.before, state.before - {"victim", "victim/f"}), point
        elif what == "clean_tempdir":
            assert after in (state.before, {".lock"}), point
        elif what == "create":
            assert after - state.before in (set(), {"made", "made/deep"}), point
        else:
            assert after == state.before, point
        assert open_fds() == state.fds, point
        # Still usable, and still owning its directory.
        assert (await state.manager.create_path()).exists()
        await state.manager.cleanup()
        assert not state.manager.dir.exists()

    points = await cancel_points(prepare, lambda s: call(s.manager), check)
    assert points, "the call made no thread hop"
    for manager in managers:
        await manager.cleanup()


async def test_temp_file_manager_start_and_cleanup_cancelled_at_each_hop(base: Path) -> None:
    fds = open_fds()
    made: list[TempFileManager] = []

    async def prepare() -> TempFileManager:
        made.append(TempFileManager(prefix="start"))
        return made[-1]

    async def enter(manager: TempFileManager) -> None:
        await manager.__aenter__()

    async def after_enter(manager: TempFileManager, point: CancelPoint) -> None:
        # Cancelled while starting: nobody reaches __aexit__, so nothing may
        # be left for atexit: no process directory, no fd.
        userdirs = list(base.glob("start_*"))
        assert all(list(u.iterdir()) == [] for u in userdirs), point
        assert open_fds() == fds, point
        await manager.cleanup()

    assert await cancel_points(prepare, enter, after_enter)
    for manager in made:
        await manager.cleanup()
    assert open_fds() == fds

    async def started() -> TempFileManager:
        manager = TempFileManager(prefix="stop")
        await manager.gettempdir()
        return manager

    async def after_cleanup(manager: TempFileManager, point: CancelPoint) -> None:
        # cleanup changes state: it finishes, or it never started and can run again.
        await manager.cleanup()
        assert not manager.dir.exists(), point
        assert open_fds() == fds, point

    assert await cancel_points(started, lambda m: m.cleanup(), after_cleanup)


# --------------------------------------------------------------------------
# SessionStorage


@pytest.mark.parametrize("saved", [False, True])
async def test_save_checkpoint_cancelled_at_each_hop(tmp_path: Path, saved: bool) -> None:
    storage = await SessionStorage.create(tmp_path)
    if saved:
        await storage.save_checkpoint(b"old" * 1000)
    old = await storage.load_checkpoint()
    fds = open_fds()

    async def prepare() -> SessionStorage:
        if (await storage.load_checkpoint()) != old:
            await storage.save_checkpoint(old)
        return storage

    async def check(s: SessionStorage, point: CancelPoint) -> None:
        # The save finished or never happened: whole either way, and no
        # session.next is left to lock out the next save.
        assert await s.load_checkpoint() in (old, b"new" * 1000), point
        assert sorted(os.listdir(s.location)) in ([], ["session"]), point
        assert open_fds() == fds, point
        await s.save_checkpoint(b"next")  # not locked out

    points = await cancel_points(prepare, lambda s: s.save_checkpoint(b"new" * 1000), check)
    assert points


async def test_session_create_and_remove_cancelled_at_each_hop(tmp_path: Path) -> None:
    fds = open_fds()
    counter = iter(range(1000))

    async def fresh_base() -> Path:
        base = tmp_path / f"base{next(counter)}"
        base.mkdir()
        return base

    async def after_create(base: Path, point: CancelPoint) -> None:
        # A storage the cancelled caller never got is not left behind.
        assert os.listdir(base) == [], point
        assert open_fds() == fds, point

    assert await cancel_points(fresh_base, SessionStorage.create, after_create)

    async def made() -> SessionStorage:
        storage = await SessionStorage.create(await fresh_base())
        await storage.save_checkpoint(b"state")
        return storage

    async def after_remove(storage: SessionStorage, point: CancelPoint) -> None:
        await storage.remove()  # finished, or never started: can run again
        assert not storage.location.exists(), point
        assert open_fds() == fds, point

    assert await cancel_points(made, lambda s: s.remove(), after_remove)


async def test_session_reads_cancelled_at_each_hop(tmp_path: Path) -> None:
    repo = SessionStorageRepository(tmp_path / "repo")
    storage = await SessionStorage.create(repo.location)
    await storage.save_checkpoint(b"x")
    fds = open_fds()

    async def prepare() -> SessionStorage:
        return storage

    async def check(s: SessionStorage, point: CancelPoint) -> None:
        assert open_fds() == fds, point
        assert await s.load_checkpoint() == b"x", point

    calls: list[Callable[[SessionStorage], Awaitable[object]]] = [
        lambda s: s.load_checkpoint(),
        lambda s: s.break_lock(),
        lambda s: repo.get_storage_list(),
        lambda s: repo.get_last_storage(),
    ]
    for call in calls:
        assert await cancel_points(prepare, call, check)
