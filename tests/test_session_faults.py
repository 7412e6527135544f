"""SessionStorage under crashes and faults: kill -9, strace fault injection, a full tmpfs.

The guarantee under test (SPEC §4): whatever happens, a later
``load_checkpoint()`` returns the previous or the new checkpoint, whole.

* The kill -9 battery forks a worker that saves checkpoints in a loop and kills
  it at a random moment, ``ATEMPSTORE_CRASH_TRIALS`` times (default 500; set it
  to 10000 for the long run).
* The fault sweep runs a real save under ``strace -e inject`` and fails the
  Nth ``openat``/``write``/``fsync``/``rename``/``close`` with EIO or ENOSPC
  (``rename`` meaning the rename family: a save makes ``renameat``).
  ``-P`` restricts tracing (and therefore injection and its counting) to the
  storage's own paths, so Python's start-up never shifts N.
* A size- or inode-limited tmpfs gives a real ENOSPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from atempstore import LockedStorageError, SessionStorage
from atempstore._session import NEXT_FILE

from .conftest import REPO, mounted_tmpfs, require_tool, spawn_python

TRIALS = int(os.environ.get("ATEMPSTORE_CRASH_TRIALS", "500"))
STRACE = shutil.which("strace")
# Missing strace: a skip locally, a failure in CI (where .ci/run installs it).
needs_strace = pytest.mark.skipif(
    STRACE is None and os.environ.get("CI") != "true", reason="strace is not installed"
)


def make_checkpoint(seq: int) -> bytes:
    """Checkpoint number ``seq``: its own header, then 0..200 kB derived from ``seq``.

    Sizes vary so that kills land in short and long writes alike; the content
    is a function of ``seq``, so a torn or mixed file can never pass for one.
    """
    size = (seq * 2654435761) % 200_000
    digest = hashlib.sha256(seq.to_bytes(8, "little")).digest()
    body = (digest * (size // len(digest) + 1))[:size]
    return b"CKPT" + struct.pack("<qI", seq, size) + body


def checkpoint_seq(data: bytes) -> int:
    """The sequence number of a whole checkpoint; fails on anything else."""
    assert data[:4] == b"CKPT", f"not a checkpoint: {data[:16]!r}... ({len(data)} bytes)"
    (seq,) = struct.unpack_from("<q", data, 4)
    assert data == make_checkpoint(seq), f"checkpoint {seq} is torn ({len(data)} bytes)"
    return int(seq)


# --------------------------------------------------------------------------
# kill -9 battery

# The server imports atempstore once, then forks one worker per trial (a fresh
# interpreter per trial would cost ~100 ms; a fork costs ~1 ms).  It never
# starts a thread itself, so forking is safe.  It kills the worker with
# SIGKILL at a random moment, reaps it, reports the last save the worker
# acknowledged, and waits for the test to check the storage before the next
# trial resumes from it.
SERVER = """
import asyncio, hashlib, os, random, signal, struct, sys, time, traceback
from atempstore import SessionStorage

{helpers}

location, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
READY = -1


def worker(ack: int) -> None:
    async def main() -> None:
        storage = SessionStorage(location)
        await storage.break_lock()  # the previous worker is dead and reaped
        seq = checkpoint_seq(await storage.load_checkpoint()) + 1
        os.write(ack, struct.pack("<q", READY))
        while True:
            await storage.save_checkpoint(make_checkpoint(seq))
            # Only now has the save returned: the checkpoint must never be lost.
            os.write(ack, struct.pack("<q", seq))
            seq += 1

    asyncio.run(main())


for trial in range(trials):
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ack_r)
            worker(ack_w)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(3)
    os.close(ack_w)
    acks = b""
    if rng.random() < 0.1:
        time.sleep(rng.uniform(0, 0.004))  # may land in start-up, break_lock or load
    else:
        # Let 0-2 saves return, then kill at a random moment within about one
        # more save.  Timing the saves keeps the moments spread over the whole
        # save however slow the machine is right now.
        wanted = 1 + rng.randrange(3)  # READY, then that many acks
        span = 0.005
        while len(acks) < 8 * wanted:
            start = time.monotonic()
            chunk = os.read(ack_r, 8)  # 8-byte writes to a pipe arrive whole
            if not chunk:
                break  # the worker died on its own: reported below
            acks += chunk
            if len(acks) > 8:
                span = time.monotonic() - start
        time.sleep(rng.uniform(0, 1.5 * span))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    while chunk := os.read(ack_r, 65536):
        acks += chunk
    os.close(ack_r)
    seqs = [s for (s,) in struct.iter_unpack("<q", acks[: len(acks) // 8 * 8]) if s != READY]
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(trial, "killed" if killed else f"status={{status}}", seqs[-1] if seqs else -1,
          len(seqs), flush=True)
    if sys.stdin.readline().strip() != "go":
        break
print("done", flush=True)
"""


@pytest.mark.multiprocess
@pytest.mark.stress
@pytest.mark.timeout(max(300, TRIALS // 10))  # ~45 ms a trial; 10k trials: 1000 s
async def test_kill_9_battery(tmp_path: Path) -> None:
    storage = await SessionStorage.create(tmp_path)
    await storage.save_checkpoint(make_checkpoint(0))
    helpers = inspect.getsource(make_checkpoint) + "\n" + inspect.getsource(checkpoint_seq)
    seed = random.randrange(2**32)
    server = spawn_python(
        SERVER.format(helpers=helpers), str(storage.location), str(TRIALS), str(seed)
    )
    assert server.stdout is not None
    assert server.stdin is not None
    known = 0  # the checkpoint the storage held after the previous trial
    mid_save = saves = 0
    try:
        for trial in range(TRIALS):
            line = await asyncio.to_thread(server.stdout.readline)
            assert line, (
                f"server died (seed {seed}): {server.stderr.read() if server.stderr else ''}"
            )
            number, outcome, last_ack, acked = line.split()
            if (int(number), outcome) != (trial, "killed"):
                server.kill()
                _, errors = server.communicate()
                pytest.fail(f"worker did not die by SIGKILL (seed {seed}): {line}{errors}")
            saves += int(acked)
            leftover = sorted(os.listdir(storage.location))
            assert leftover in (["session"], ["session", NEXT_FILE]), leftover
            mid_save += NEXT_FILE in leftover

            seq = checkpoint_seq(await storage.load_checkpoint())  # whole, or it raises
            # Never older than the last save that returned; at most the one
            # save that completed but was killed before it could say so.
            floor = int(last_ack) if int(last_ack) >= 0 else known
            assert floor <= seq <= floor + 1, (
                f"trial {trial} (seed {seed}): loaded checkpoint {seq}, last acknowledged"
                f" {last_ack}, previous {known}"
            )
            known = seq
            server.stdin.write("go\n")
            server.stdin.flush()
        assert (await asyncio.to_thread(server.stdout.readline)).strip() == "done"
    finally:
        server.kill()
        server.communicate()
    print(f"{TRIALS} kills (seed {seed}): {mid_save} mid-save, {saves} saves acknowledged")
    # The kills must actually land inside saves, or the battery proves nothing.
    assert mid_save >= TRIALS // 10, f"only {mid_save}/{TRIALS} kills landed mid-save"
    assert saves >= TRIALS // 2, f"only {saves} saves returned in {TRIALS} trials"


# --------------------------------------------------------------------------
# strace fault sweep

SAVER = """
import asyncio, sys
from atempstore import SessionStorage

async def main() -> None:
    storage = SessionStorage(sys.argv[1])
    for n in range(2, len(sys.argv)):
        try:
            await storage.save_checkpoint(bytes.fromhex(sys.argv[n]))
        except OSError as exc:
            print("error", exc.errno, type(exc).__name__, flush=True)
            return
        print("saved", flush=True)

asyncio.run(main())
"""

# A step of the save and the syscalls that may carry it: a save works
# relative to its directory's fd, so it makes renameat and unlinkat (and
# aarch64 has no plain rename or unlink at all).
FAMILIES = {"rename": ("rename", "renameat", "renameat2"), "unlink": ("unlink", "unlinkat")}
TRACED = ("openat", "write", "fsync", "close", *FAMILIES["rename"], *FAMILIES["unlink"])


@dataclass
class Traced:
    stdout: str
    calls: list[str]  # one strace line per call on the storage's paths
    threads: set[str]  # the ids of the threads that made them


def traced_run(storage: SessionStorage, code: str, args: list[str], *injects: str) -> Traced:
    """Run ``code`` (``sys.argv[1]`` is the storage, then ``args``) in a child
    under strace, tracing (and injecting into) only the storage's own paths."""
    assert STRACE is not None
    log = storage.location.parent / f".strace-{os.getpid()}-{random.randrange(2**32)}.log"
    location = str(storage.location)
    paths = [location, f"{location}/session", f"{location}/{NEXT_FILE}"]
    # signal=none: start-up may run a helper process (ldconfig, via ctypes)
    # whose SIGCHLD strace would otherwise log.
    command = [STRACE, "--seccomp-bpf", "-f", "-qq", "-e", "signal=none", "-o", str(log)]
    command += [arg for path in paths for arg in ("-P", path)]
    command += ["-e", "trace=" + ",".join(TRACED)]
    for inject in injects:
        step, how = inject.split(":", 1)
        command += ["-e", f"inject={','.join(FAMILIES.get(step, (step,)))}:{how}"]
    command += [sys.executable, "-c", textwrap.dedent(code), location, *args]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Lines start with the thread id, padded to a width strace chooses.
    lines = [line.split(maxsplit=1) for line in log.read_text().splitlines()]
    # Only calls (a call another thread interrupted continues as "<... resumed>").
    assert all(re.match(r"([a-z0-9_]+\(|<\.\.\. [a-z0-9_]+ resumed>)", c) for _, c in lines), lines
    log.unlink()
    return Traced(result.stdout, [call for _, call in lines], {tid for tid, _ in lines})


def syscall(line: str) -> str:
    """The step a traced call performs: its name, with the family's for *at forms."""
    name = line.split("(", 1)[0]
    return next((step for step, names in FAMILIES.items() if name in names), name)


CHECKPOINTS = [b"new-1" * 4000, b"new-2" * 100, b"new-3" * 9000]


@pytest.fixture(scope="module")
def save_sequence(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """The syscalls three successful saves make on the storage's paths, per save."""
    require_tool("strace")
    storage = asyncio.run(SessionStorage.create(tmp_path_factory.mktemp("dry")))
    run = traced_run(storage, SAVER, [data.hex() for data in CHECKPOINTS])
    assert run.stdout.split() == ["saved"] * 3
    # strace counts calls per thread: N means "the Nth in this sequence" only
    # because the saves run one after another in one reused worker thread.
    assert len(run.threads) == 1, run.threads
    saves: list[list[str]] = []
    for line in run.calls:
        if line.startswith("openat(") and "O_DIRECTORY" in line:
            saves.append([])  # a save starts by opening its directory
        saves[-1].append(syscall(line))
    assert len(saves) == 3
    # What SPEC §4 prescribes, in this order: open the directory; create
    # session.next exclusively in it, write, fsync, close; rename it over
    # session; fsync the directory, close it.
    assert saves[0] == [
        "openat",
        "openat",
        "write",
        "fsync",
        "close",
        "rename",
        "fsync",
        "close",
    ]
    return saves


@needs_strace
@pytest.mark.faults
@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
@pytest.mark.parametrize("call", ["openat", "write", "fsync", "rename", "close"])
def test_fault_sweep(tmp_path: Path, save_sequence: list[list[str]], call: str, err: str) -> None:
    # Each case: the storage holds OLD, the child saves three checkpoints in a
    # row, and the Nth `call` on the storage's paths fails with `err`.
    code = getattr(errno, err)
    old = b"old" * 5000

    def one(n: int) -> str | None:
        base = tmp_path / str(n)
        storage = asyncio.run(SessionStorage.create(base))
        asyncio.run(storage.save_checkpoint(old))
        run = traced_run(
            storage, SAVER, [d.hex() for d in CHECKPOINTS], f"{call}:error={err}:when={n}"
        )
        injected = [line for line in run.calls if "(INJECTED)" in line]
        assert len(run.threads) == 1, run.threads  # so N counted what the dry run counted

        # Where the Nth call falls, according to the dry run.
        where = [
            (k, p) for k, save in enumerate(save_sequence) for p, c in enumerate(save) if c == call
        ]
        if n > len(where):
            expected_out = ["saved"] * 3
            expected_data = CHECKPOINTS[-1]
            assert injected == [], injected
        else:
            k, p = where[n - 1]
            renamed = p > save_sequence[k].index("rename")
            expected_out = ["saved"] * k + ["error", str(code), "OSError"]
            expected_data = CHECKPOINTS[k] if renamed else (CHECKPOINTS[k - 1] if k else old)
            assert len(injected) == 1, run.calls
            assert syscall(injected[0]) == call
        assert run.stdout.split() == expected_out, (n, run.calls)
        # Old or new, whole; and no next file left to lock the next save.
        assert asyncio.run(storage.load_checkpoint()) == expected_data, (n, run.calls)
        assert os.listdir(storage.location) == ["session"], (n, run.calls)
        asyncio.run(storage.save_checkpoint(b"after"))
        assert asyncio.run(storage.load_checkpoint()) == b"after"
        return None

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(1, 6)))


@needs_strace
@pytest.mark.faults
def test_after_fsync_error_data_is_written_afresh(tmp_path: Path) -> None:
    # fsyncgate: after a failed fsync the kernel may have marked the dirty
    # pages clean, so fsyncing the same file again can "succeed" without the
    # data on disk.  The retry must create a new file and write everything.
    storage = asyncio.run(SessionStorage.create(tmp_path))
    data = b"precious" * 5000
    code = """
    import asyncio, sys
    from atempstore import SessionStorage

    async def main() -> None:
        storage = SessionStorage(sys.argv[1])
        data = bytes.fromhex(sys.argv[2])
        try:
            await storage.save_checkpoint(data)
        except OSError as exc:
            print("error", exc.errno, flush=True)
        await storage.save_checkpoint(data)  # the caller's retry
        print("saved", flush=True)

    asyncio.run(main())
    """
    run = traced_run(storage, code, [data.hex()], "fsync:error=EIO:when=1")
    assert run.stdout.split() == ["error", str(errno.EIO), "saved"]
    calls = run.calls
    failed = next(i for i, line in enumerate(calls) if "(INJECTED)" in line)
    fd = re.match(r"fsync\((\d+)\)", calls[failed])
    assert fd, calls[failed]
    # The failed file is closed and removed...
    assert re.match(rf"close\({fd.group(1)}\) += 0$", calls[failed + 1]), calls[failed + 1]
    assert re.match(rf'unlinkat\(\d+, "{NEXT_FILE}", 0\) += 0$', calls[failed + 2])
    # ...and the next fsync comes after a fresh exclusive create and a full write.
    rest = calls[failed + 3 :]
    next_fsync = next(i for i, line in enumerate(rest) if line.startswith("fsync("))
    before = rest[:next_fsync]
    creates = [line for line in before if f'"{NEXT_FILE}"' in line and "O_EXCL" in line]
    assert len(creates) == 1, before
    assert creates[0].startswith("openat("), before
    assert any(re.match(rf"write\(\d+, .*, {len(data)}\) += {len(data)}$", line) for line in before)
    assert asyncio.run(storage.load_checkpoint()) == data


@needs_strace
@pytest.mark.faults
def test_failed_rollback_does_not_hide_the_real_error(tmp_path: Path) -> None:
    # The rename fails (EIO) and so does removing the next file (EPERM): the
    # caller must see the rename's EIO, not the clean-up's EPERM.  The leftover
    # next then locks the storage until break_lock(); the old checkpoint is intact.
    storage = asyncio.run(SessionStorage.create(tmp_path))
    asyncio.run(storage.save_checkpoint(b"old"))
    run = traced_run(
        storage, SAVER, [b"new".hex()], "rename:error=EIO:when=1", "unlink:error=EPERM:when=1"
    )
    assert run.stdout.split() == ["error", str(errno.EIO), "OSError"]
    assert [syscall(line) for line in run.calls if "(INJECTED)" in line] == ["rename", "unlink"]
    assert asyncio.run(storage.load_checkpoint()) == b"old"
    with pytest.raises(LockedStorageError):
        asyncio.run(storage.save_checkpoint(b"new"))
    assert asyncio.run(storage.break_lock()) is True
    asyncio.run(storage.save_checkpoint(b"new"))
    assert asyncio.run(storage.load_checkpoint()) == b"new"


DUEL = """
import asyncio, sys, time
import anyio
from atempstore import LockedStorageError, SessionStorage

async def main() -> None:
    storage = SessionStorage(sys.argv[1])
    next_file = anyio.Path(storage.location / "session.next")

    async def first() -> float:
        start = time.monotonic()
        await storage.save_checkpoint(b"first" * 1000)  # its fsync is delayed by strace
        return time.monotonic() - start

    async def second() -> str:
        while not await next_file.exists():
            await asyncio.sleep(0.001)
        try:
            await storage.save_checkpoint(b"second" * 1000)
        except LockedStorageError as exc:
            return "locked:" + str(exc.path)
        return "saved"

    took, outcome = await asyncio.gather(first(), second())
    print(outcome, round(took, 3), flush=True)

asyncio.run(main())
"""


@needs_strace
@pytest.mark.faults
@pytest.mark.multiprocess
def test_two_tasks_one_wins(tmp_path: Path) -> None:
    # strace holds the first task's fsync for a second, so the second task's
    # save deterministically overlaps it: the second gets LockedStorageError,
    # the first wins, and the storage holds the winner's checkpoint, whole.
    storage = asyncio.run(SessionStorage.create(tmp_path))
    asyncio.run(storage.save_checkpoint(b"old"))
    run = traced_run(storage, DUEL, [], "fsync:delay_enter=1s:when=1")
    outcome, took = run.stdout.split()
    assert outcome == f"locked:{storage.location / NEXT_FILE}"
    assert float(took) >= 0.9  # the first save really was held while the second tried
    assert asyncio.run(storage.load_checkpoint()) == b"first" * 1000
    assert os.listdir(storage.location) == ["session"]


# --------------------------------------------------------------------------
# A real ENOSPC from a small tmpfs


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount size-limited tmpfs file systems; unmounted after the test."""
    with contextlib.ExitStack() as mounts:
        points = (tmp_path / f"tmpfs{n}" for n in range(100))

        def mount(options: str) -> Path:
            return mounts.enter_context(mounted_tmpfs(next(points), options))

        yield mount


@pytest.mark.faults
async def test_real_enospc_on_a_small_tmpfs(small_tmpfs: Callable[[str], Path]) -> None:
    disk = small_tmpfs("size=512k")
    storage = await SessionStorage.create(disk)
    old = os.urandom(100 * 1024)
    await storage.save_checkpoint(old)
    with pytest.raises(OSError, match="No space left") as info:
        await storage.save_checkpoint(os.urandom(1024 * 1024))
    assert info.value.errno == errno.ENOSPC
    assert await storage.load_checkpoint() == old
    assert os.listdir(storage.location) == ["session"]  # the partial next is gone...
    medium = os.urandom(300 * 1024)
    await storage.save_checkpoint(medium)  # ...and so is the space it took
    assert await storage.load_checkpoint() == medium


@pytest.mark.faults
async def test_real_enospc_when_no_inode_is_left(small_tmpfs: Callable[[str], Path]) -> None:
    # Three inodes: the root, the storage directory, and `session`. A save
    # needs a fourth for `session.next` while `session` still exists.
    disk = small_tmpfs("size=1m,nr_inodes=3")
    storage = await SessionStorage.create(disk)
    await storage.save_checkpoint(b"old")  # next takes the last inode, then becomes session
    with pytest.raises(OSError, match="No space left") as info:
        await storage.save_checkpoint(b"new")
    assert info.value.errno == errno.ENOSPC
    assert await storage.load_checkpoint() == b"old"
    assert os.listdir(storage.location) == ["session"]
