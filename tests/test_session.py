"""SessionStorage: the SPEC §4 contract, on real files and real processes.

Crash and fault batteries (kill -9, strace fault injection, a full tmpfs) are in
``test_session_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from atempstore import (
    AtempstoreError,
    LockedStorageError,
    SessionStorage,
    SessionStorageRepository,
)
from atempstore._session import NEXT_FILE, slug
from atempstore.cli import main as cli_main

from .conftest import REPO, run_python

# 2024-05-01T12:34:56Z
FIXED = 1714566896.0
FIXED_NAME = "2024-05-01T12.34.56"


def fixed_clock() -> float:
    return FIXED


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(argv))
    return status, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------
# create, id, location, session_file


def test_slug_never_adds_a_path_component() -> None:
    assert slug("session-") == "session-"
    assert slug("My Job/../x") == "my-job----x"
    assert slug("..") == "--"
    assert slug("a\0b\\c:d") == "a-b-c-d"
    assert slug("") == ""
    for text in ["é/ü", "İstanbul", "a.b", "/", "x\ny"]:
        assert re.fullmatch(r"[a-z0-9-]*", slug(text)), text


async def test_create_names_directory_after_prefix_and_utc_time(tmp_path: Path) -> None:
    base = tmp_path / "deep" / "base"  # created on demand, parents too
    storage = await SessionStorage.create(base, prefix="Nightly Job/", clock=fixed_clock)
    assert storage.id == f"nightly-job-{FIXED_NAME}.session"
    assert storage.location == base / storage.id
    assert storage.session_file == storage.location / "session"
    assert storage.location.is_dir()
    assert stat.S_IMODE(storage.location.stat().st_mode) == 0o700
    # Every directory the library created is private, not only the last one
    # (os.makedirs(mode=) applies its mode to the last level only).
    for created in (tmp_path / "deep", base):
        assert stat.S_IMODE(created.stat().st_mode) == 0o700, created
    assert not storage.session_file.exists()
    assert os.listdir(storage.location) == []


async def test_create_default_prefix_uses_the_real_utc_clock(tmp_path: Path) -> None:
    before = time.time()
    storage = await SessionStorage.create(tmp_path)
    after = time.time()
    match = re.fullmatch(r"session-(\d{4}-\d\d-\d\dT\d\d\.\d\d\.\d\d)\.session", storage.id)
    assert match, storage.id
    allowed = {time.strftime("%Y-%m-%dT%H.%M.%S", time.gmtime(t)) for t in (before, after)}
    assert match.group(1) in allowed


async def test_create_appends_counter_on_clash(tmp_path: Path) -> None:
    ids = [(await SessionStorage.create(tmp_path, clock=fixed_clock)).id for _ in range(3)]
    assert ids == [
        f"session-{FIXED_NAME}.session",
        f"session-{FIXED_NAME}_(1).session",
        f"session-{FIXED_NAME}_(2).session",
    ]


async def test_create_never_reuses_a_directory_among_concurrent_tasks(tmp_path: Path) -> None:
    storages = await asyncio.gather(
        *(SessionStorage.create(tmp_path, clock=fixed_clock) for _ in range(40))
    )
    assert len({s.id for s in storages}) == 40
    assert sorted(os.listdir(tmp_path)) == sorted(s.id for s in storages)


CREATOR = """
import asyncio, sys
from atempstore import SessionStorage

async def main() -> None:
    for _ in range(int(sys.argv[2])):
        storage = await SessionStorage.create(sys.argv[1], clock=lambda: 1714566896.0)
        print(storage.id, flush=True)

asyncio.run(main())
"""


@pytest.mark.multiprocess
def test_create_never_reuses_a_directory_among_processes(tmp_path: Path) -> None:
    # Every process claims names from the same clock second: mkdir is the only
    # arbiter, so a check-then-create would hand one directory to two of them.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_python(CREATOR, str(tmp_path), "25"), range(4)))
    ids: list[str] = []
    for result in results:
        assert result.returncode == 0, result.stderr
        ids += result.stdout.split()
    assert len(ids) == 100
    assert len(set(ids)) == 100
    assert sorted(os.listdir(tmp_path)) == sorted(ids)


async def test_create_in_a_file_fails_with_the_real_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError):
        await SessionStorage.create(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        await SessionStorage.create(tmp_path / "file" / "below")


def test_constructor_records_only(tmp_path: Path) -> None:
    storage = SessionStorage(tmp_path / "nowhere" / "x.session")
    assert storage.id == "x.session"
    assert storage.location == tmp_path / "nowhere" / "x.session"
    assert storage.session_file == tmp_path / "nowhere" / "x.session" / "session"
    assert not (tmp_path / "nowhere").exists()
    assert storage == SessionStorage(str(tmp_path / "nowhere" / "x.session"))
    assert len({storage, SessionStorage(storage.location)}) == 1
    assert "x.session" in repr(storage)


# --------------------------------------------------------------------------
# save_checkpoint / load_checkpoint


async def test_load_before_any_save_is_empty(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    assert await storage.load_checkpoint() == b""


async def test_save_then_load_round_trips(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    for data in [b"first", b"", b"\0" * 10, os.urandom(3 * 1024 * 1024), b"last"]:
        await storage.save_checkpoint(data)
        assert await storage.load_checkpoint() == data
        assert storage.session_file.read_bytes() == data
        assert os.listdir(storage.location) == ["session"]  # no next left behind
    # A fresh object on the same directory sees the same checkpoint.
    assert await SessionStorage(storage.location).load_checkpoint() == b"last"


async def test_session_file_is_private(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(b"secret token")
    assert stat.S_IMODE(storage.session_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", ["text", bytearray(b"x"), memoryview(b"x"), None, 3, [b"x"]])
async def test_save_refuses_anything_but_bytes(tmp_path: Path, bad: object) -> None:
    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(b"kept")
    with pytest.raises(TypeError, match="bytes"):
        await storage.save_checkpoint(bad)  # type: ignore[arg-type]
    assert await storage.load_checkpoint() == b"kept"
    assert os.listdir(storage.location) == ["session"]


async def test_bytes_subclass_is_bytes(tmp_path: Path) -> None:
    class Payload(bytes):
        pass

    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(Payload(b"sub"))
    assert await storage.load_checkpoint() == b"sub"


async def test_load_of_a_missing_storage_raises(tmp_path: Path) -> None:
    # b"" would make a wrong path look like "start from scratch".
    storage = SessionStorage(tmp_path / "gone.session")
    with pytest.raises(FileNotFoundError) as info:
        await storage.load_checkpoint()
    assert info.value.filename == str(storage.location)
    with pytest.raises(FileNotFoundError):
        await storage.save_checkpoint(b"x")
    assert not storage.location.exists()


async def test_save_replaces_atomically_for_a_concurrent_reader(tmp_path: Path) -> None:
    # A reader in another thread opens `session` over and over while we save
    # checkpoints of different sizes: it must only ever see whole ones.
    storage = await SessionStorage.create(tmp_path)
    checkpoints = [bytes([n]) * (1000 * (n % 7 + 1)) for n in range(1, 60)]
    valid = set(checkpoints)
    await storage.save_checkpoint(checkpoints[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(storage.session_file.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for data in checkpoints[1:]:
            await storage.save_checkpoint(data)
    finally:
        stop.set()
        thread.join()
    assert seen
    assert all(data in valid for data in seen)


# --------------------------------------------------------------------------
# The next file as a lock: LockedStorageError, break_lock


async def test_existing_next_raises_locked_storage_error(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(b"old")
    stale = storage.location / NEXT_FILE
    stale.write_bytes(b"someone else's half-written checkpoint")
    with pytest.raises(LockedStorageError) as info:
        await storage.save_checkpoint(b"new")
    error = info.value
    assert isinstance(error, OSError)
    assert isinstance(error, AtempstoreError)
    assert error.path == str(stale)
    assert "break_lock" in str(error)
    assert str(stale) in str(error)
    # The other writer's file and the checkpoint are untouched.
    assert stale.read_bytes() == b"someone else's half-written checkpoint"
    assert await storage.load_checkpoint() == b"old"

    assert await storage.break_lock() is True
    assert not stale.exists()
    assert await storage.break_lock() is False
    await storage.save_checkpoint(b"new")
    assert await storage.load_checkpoint() == b"new"


async def test_a_symlink_named_next_is_a_lock_not_a_target(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path / "repo")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (storage.location / NEXT_FILE).symlink_to(victim)
    with pytest.raises(LockedStorageError):
        await storage.save_checkpoint(b"payload")
    assert victim.read_bytes() == b"precious"
    assert await storage.break_lock() is True
    assert victim.read_bytes() == b"precious"  # the link went, not its target


async def test_break_lock_on_a_missing_storage_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await SessionStorage(tmp_path / "gone.session").break_lock()


async def test_concurrent_saves_never_tear(tmp_path: Path) -> None:
    # Eight tasks hammer one storage. Every save either returns or raises
    # LockedStorageError (another save was in flight); the storage always holds
    # one whole checkpoint that some save returned, and no next is left.
    storage = await SessionStorage.create(tmp_path)
    saved: set[bytes] = set()
    locked = 0

    async def writer(task: int) -> None:
        nonlocal locked
        for n in range(15):
            data = f"{task}:{n}:".encode() * (40_000 + 997 * n)
            try:
                await storage.save_checkpoint(data)
            except LockedStorageError:
                locked += 1
            else:
                saved.add(data)

    await asyncio.gather(*(writer(task) for task in range(8)))
    assert saved
    assert await storage.load_checkpoint() in saved
    assert os.listdir(storage.location) == ["session"]
    # Eight threads writing ~1 MB each at once overlap; if they never did, the
    # saves were serialised somewhere and this test proved nothing.
    assert locked > 0


async def test_cancelled_save_finishes_or_rolls_back(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(b"old")
    big = os.urandom(8 * 1024 * 1024)
    for delay in [0, 0.0005, 0.002, 0.01]:
        task = asyncio.create_task(storage.save_checkpoint(big))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The worker thread has finished before the cancellation was delivered.
        assert os.listdir(storage.location) == ["session"]
        assert await storage.load_checkpoint() in (b"old", big)
        await storage.save_checkpoint(b"old")


# --------------------------------------------------------------------------
# remove


async def test_remove_deletes_the_storage_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    storage = await SessionStorage.create(tmp_path / "repo")
    await storage.save_checkpoint(b"data")
    (storage.location / NEXT_FILE).write_bytes(b"stale")
    (storage.location / "link").symlink_to(outside)
    (storage.location / "sub").mkdir()
    (storage.location / "sub" / "deeplink").symlink_to(outside / "keep")
    await storage.remove()
    assert not storage.location.exists()
    assert (outside / "keep").read_bytes() == b"keep"
    await storage.remove()  # idempotent
    assert os.listdir(tmp_path / "repo") == []


async def test_remove_of_a_symlinked_storage_removes_only_the_link(tmp_path: Path) -> None:
    real = await SessionStorage.create(tmp_path / "real")
    await real.save_checkpoint(b"data")
    (tmp_path / "repo").mkdir()
    link = tmp_path / "repo" / "x.session"
    link.symlink_to(real.location)
    await SessionStorage(link).remove()
    assert not link.exists()
    assert await real.load_checkpoint() == b"data"


# --------------------------------------------------------------------------
# SessionStorageRepository


def test_default_location_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ATEMPSTORE_SESSION_REPOSITORY", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".cache" / "atempstore" / "sessions"
    assert SessionStorageRepository.get_default_location() == default

    monkeypatch.setenv("XDG_CACHE_HOME", "")  # ${XDG_CACHE_HOME:-...}: empty is unset
    assert SessionStorageRepository.get_default_location() == default
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # XDG: relative is invalid
    assert SessionStorageRepository.get_default_location() == default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert SessionStorageRepository.get_default_location() == (
        tmp_path / "xdg" / "atempstore" / "sessions"
    )
    monkeypatch.setenv("ATEMPSTORE_SESSION_REPOSITORY", str(tmp_path / "explicit"))
    assert SessionStorageRepository.get_default_location() == tmp_path / "explicit"
    assert SessionStorageRepository().location == tmp_path / "explicit"
    assert SessionStorageRepository(tmp_path / "given").location == tmp_path / "given"
    monkeypatch.setenv("ATEMPSTORE_SESSION_REPOSITORY", "")
    assert SessionStorageRepository().location == tmp_path / "xdg" / "atempstore" / "sessions"
    assert not (tmp_path / "xdg").exists()  # nothing created by merely asking


async def test_storage_list_of_a_missing_repository_is_empty(tmp_path: Path) -> None:
    repo = SessionStorageRepository(tmp_path / "none")
    assert await repo.get_storage_list() == []
    assert await repo.get_last_storage() is None
    assert not (tmp_path / "none").exists()


async def test_storage_list_of_a_file_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        await SessionStorageRepository(tmp_path / "file").get_storage_list()


def set_mtime(path: Path, seconds: float) -> None:
    os.utime(path, (seconds, seconds), follow_symlinks=False)


async def test_storage_list_is_youngest_first(tmp_path: Path) -> None:
    repo = SessionStorageRepository(tmp_path)
    a, b, c, never = [await SessionStorage.create(tmp_path, prefix=p) for p in "abcn"]
    for storage in (a, b, c):
        await storage.save_checkpoint(storage.id.encode())
    # Timestamps are set explicitly: the kernel's clock for mtimes is coarse
    # (a jiffy), so saves a few microseconds apart could tie.
    set_mtime(a.session_file, 3000)
    set_mtime(b.session_file, 1000)
    set_mtime(c.session_file, 2000)
    set_mtime(never.location, 2500)  # never saved: its directory's age counts
    assert await repo.get_storage_list() == [a, never, c, b]
    assert await repo.get_last_storage() == a

    await b.save_checkpoint(b"fresh")  # now the most recently saved
    assert (await repo.get_storage_list())[0] == b
    assert await repo.get_last_storage() == b


async def test_storage_list_breaks_ties_by_name(tmp_path: Path) -> None:
    repo = SessionStorageRepository(tmp_path)
    first = await SessionStorage.create(tmp_path, clock=fixed_clock)
    second = await SessionStorage.create(tmp_path, clock=fixed_clock)
    for storage in (first, second):
        set_mtime(storage.location, 1000)
    assert await repo.get_storage_list() == [second, first]


async def test_storage_list_shows_only_visible_session_directories(tmp_path: Path) -> None:
    repo = SessionStorageRepository(tmp_path)
    real = await SessionStorage.create(tmp_path)
    (tmp_path / ".hidden.session").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "x.session.bak").mkdir()
    (tmp_path / "file.session").write_bytes(b"")
    (tmp_path / "link.session").symlink_to(real.location)
    (tmp_path / "dangling.session").symlink_to(tmp_path / "nothing")
    assert await repo.get_storage_list() == [real]
    assert all(isinstance(s, SessionStorage) for s in await repo.get_storage_list())


async def test_storage_list_skips_entries_that_vanish(tmp_path: Path) -> None:
    # One thread creates and deletes storages (and their session files) as
    # fast as it can while we list: a listing may miss them, never fail.
    repo = SessionStorageRepository(tmp_path)
    keeper = await SessionStorage.create(tmp_path, prefix="keeper-")
    await keeper.save_checkpoint(b"keep")
    stop = threading.Event()
    churned = 0

    def churn() -> None:
        nonlocal churned
        while not stop.is_set():
            for n in range(20):
                path = tmp_path / f"churn{n}.session"
                path.mkdir()
                (path / "session").write_bytes(b"x")
            for n in range(20):
                path = tmp_path / f"churn{n}.session"
                (path / "session").unlink()
                path.rmdir()
            churned += 1

    thread = threading.Thread(target=churn)
    thread.start()
    listings = 0
    try:
        # Enough overlap to hit the windows, however loaded the machine is.
        deadline = time.monotonic() + 60
        while listings < 50 or churned < 5:
            assert time.monotonic() < deadline, (listings, churned)
            storages = await repo.get_storage_list()
            assert keeper in storages
            listings += 1
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------
# The event loop never does path I/O


async def test_no_public_coroutine_blocks_the_loop(
    tmp_path: Path, no_blocking_io: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATEMPSTORE_SESSION_REPOSITORY", str(tmp_path / "repo"))
    repo = SessionStorageRepository()
    assert await repo.get_storage_list() == []
    storage = await SessionStorage.create(repo.location, prefix="job-")
    assert storage.id.startswith("job-")
    assert storage.session_file.name == "session"
    assert await storage.load_checkpoint() == b""
    await storage.save_checkpoint(b"one")
    await storage.save_checkpoint(b"two")
    assert await storage.load_checkpoint() == b"two"
    assert await storage.break_lock() is False
    assert await repo.get_storage_list() == [storage]
    assert await repo.get_last_storage() == storage
    await storage.remove()
    assert await repo.get_last_storage() is None
    assert no_blocking_io == []


# --------------------------------------------------------------------------
# atempstore sessions


async def test_cli_lists_storages(tmp_path: Path) -> None:
    older = await SessionStorage.create(tmp_path, prefix="older-", clock=fixed_clock)
    newer = await SessionStorage.create(tmp_path, prefix="newer-", clock=fixed_clock)
    never = await SessionStorage.create(tmp_path, prefix="never-", clock=fixed_clock)
    await older.save_checkpoint(b"x" * 1234)
    await newer.save_checkpoint(b"y" * 10)
    (newer.location / NEXT_FILE).write_bytes(b"")
    set_mtime(older.session_file, FIXED)
    set_mtime(newer.session_file, FIXED + 60)
    set_mtime(never.location, FIXED - 60)

    status, out, err = await asyncio.to_thread(cli, "sessions", "--repository", str(tmp_path))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "LAST", "SAVED", "(UTC)", "SIZE", "STATE"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        [newer.id, "2024-05-01", "12:35:56", "10", "locked"],
        [older.id, "2024-05-01", "12:34:56", "1234", "-"],
        [never.id, "never", "-", "-"],
    ]


async def test_cli_uses_the_default_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATEMPSTORE_SESSION_REPOSITORY", str(tmp_path / "default"))
    status, out, _ = await asyncio.to_thread(cli, "sessions")
    assert status == 0
    assert "no session storages" in out
    assert str(tmp_path / "default") in out
    storage = await SessionStorage.create(tmp_path / "default")
    status, out, _ = await asyncio.to_thread(cli, "sessions")
    assert status == 0
    assert storage.id in out


async def test_cli_breaks_a_lock(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(b"old")
    (storage.location / NEXT_FILE).write_bytes(b"stale")
    status, out, err = await asyncio.to_thread(
        cli, "sessions", "--repository", str(tmp_path), "--break-lock", storage.id
    )
    assert (status, err) == (0, "")
    assert "removed" in out
    assert os.listdir(storage.location) == ["session"]
    status, out, _ = await asyncio.to_thread(
        cli, "sessions", "--repository", str(tmp_path), "--break-lock", storage.id
    )
    assert status == 0
    assert "not locked" in out
    await storage.save_checkpoint(b"new")


@pytest.mark.parametrize("bad", ["../x.session", "a/b", "..", ".hidden.session", ""])
async def test_cli_break_lock_refuses_paths(tmp_path: Path, bad: str) -> None:
    victim = tmp_path / "x.session"
    victim.mkdir()
    (victim / NEXT_FILE).write_bytes(b"")
    (tmp_path / "repo").mkdir()
    status, _, err = await asyncio.to_thread(
        cli, "sessions", "--repository", str(tmp_path / "repo"), "--break-lock", bad
    )
    assert status == 2
    assert "invalid" in err
    assert (victim / NEXT_FILE).exists()


async def test_cli_break_lock_of_unknown_storage_fails(tmp_path: Path) -> None:
    (tmp_path / "file.session").write_bytes(b"")
    for name in ["nope.session", "file.session"]:
        status, _, err = await asyncio.to_thread(
            cli, "sessions", "--repository", str(tmp_path), "--break-lock", name
        )
        assert status == 1
        assert f"no session storage {name!r}" in err


async def test_cli_reports_os_errors_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    status, out, err = await asyncio.to_thread(
        cli, "sessions", "--repository", str(tmp_path / "file")
    )
    assert status == 1
    assert out == ""
    assert err.startswith("atempstore sessions: ")
    assert "Not a directory" in err
    assert "Traceback" not in err


@pytest.mark.multiprocess
def test_cli_entry_point_runs(tmp_path: Path) -> None:
    result = run_python(
        "import sys; from atempstore.cli import main; sys.exit(main())",
        "sessions",
        "--repository",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "no session storages" in result.stdout


# --------------------------------------------------------------------------
# The docs page's example runs as written


def docs_example() -> str:
    page = (REPO / "docs" / "sessions.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    runnable: list[str] = [block for block in blocks if "asyncio.run(" in block]
    assert len(runnable) == 1, "docs/sessions.md should have one runnable example"
    return runnable[0]


@pytest.mark.multiprocess
def test_docs_example_checkpoints_and_resumes(tmp_path: Path) -> None:
    code = docs_example()
    env_code = (
        f"import os; os.environ['ATEMPSTORE_SESSION_REPOSITORY'] = {str(tmp_path)!r}\n" + code
    )
    # First run: killed part-way by the example's own "crash" switch.
    first = run_python(env_code, "--crash-after", "3")
    assert first.returncode != 0
    assert "processed item 2" in first.stdout
    assert "processed item 3" not in first.stdout
    # Second run resumes after the last checkpoint and finishes.
    second = run_python(env_code)
    assert second.returncode == 0, second.stderr
    assert "resuming at item 3" in second.stdout
    assert "processed item 2" not in second.stdout
    assert "done" in second.stdout
