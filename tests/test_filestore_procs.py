"""FileStore as a multi-process work queue: real processes, real SIGKILL, real flock.

The sizes are the issue's (8 producers x 1000 messages, 6 consumers, 100k
names from 4 processes); ``ATEMPSTORE_QUEUE_MESSAGES`` and
``ATEMPSTORE_NAME_DELIVERIES`` shrink or grow them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atempstore import FileStore

from .conftest import run_python, spawn_python

pytestmark = pytest.mark.multiprocess

PRODUCERS = 8
CONSUMERS = 6
PER_PRODUCER = int(os.environ.get("ATEMPSTORE_QUEUE_MESSAGES", "1000"))
NAME_PROCESSES = 4
NAME_DELIVERIES = int(os.environ.get("ATEMPSTORE_NAME_DELIVERIES", "100000"))

# What a message holds: a header naming it, then bytes derived from it, so a
# consumer can check every byte without sharing state with the producer.
PAYLOAD = """
import hashlib

def payload(producer: int, seq: int) -> bytes:
    header = f"{producer}:{seq}:".encode()
    seed = hashlib.sha256(header).digest()
    size = seed[0] * 8 + seed[1] % 8  # 0..2047 bytes of body
    body = (seed * (size // len(seed) + 1))[:size]
    return header + body

def check(data: bytes) -> tuple[str, bool]:
    producer, seq, _ = data.split(b":", 2)
    ident = f"{int(producer)}:{int(seq)}"
    return ident, data == payload(int(producer), int(seq))
"""

PRODUCER = (
    PAYLOAD
    + """
import asyncio, sys
from atempstore import FileStore

async def main(root: str, producer: int, count: int) -> None:
    store = FileStore(root)
    # Eight deliveries in flight at a time, like an async web handler would.
    sem = asyncio.Semaphore(8)

    async def one(seq: int) -> None:
        async with sem:
            await store.deliver(payload(producer, seq))

    await asyncio.gather(*(one(seq) for seq in range(count)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""
)

# A zygote: imports atempstore once, then forks consumers on request, so a
# restart after kill -9 costs a fork instead of an interpreter start (the
# kill rate of the test would otherwise saturate two cores with imports).
# It is single-threaded when it forks.  It does the SIGKILL and reaps the
# child itself, so the child's flock is released before the reply.
ZYGOTE = (
    PAYLOAD
    + """
import asyncio, os, signal, sys
from atempstore import FileStore

ROOT, LOG, ERRORS = sys.argv[1], sys.argv[2], sys.argv[3]

def consumer() -> None:
    log = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def main() -> None:
        store = FileStore(ROOT)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        # SIGTERM was blocked since the fork: one sent before the handler
        # existed is delivered now, to the handler, instead of killing us.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

        async def work() -> None:
            async for message in store.consume(recover_interval=0.5):
                ident, ok = check(await message.read())
                # One write() of one line with O_APPEND: whole even under kill -9.
                os.write(log, f"{ident} {'ok' if ok else 'BAD'}\\n".encode())
                await message.done()

        task = asyncio.create_task(work())
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.aclose()

    import contextlib
    asyncio.run(main())

children: dict[int, int] = {}
print("ready", flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "start":
        # Blocked across the fork, so that a SIGTERM sent at once (a quit
        # right after a restart) waits for the child's handler instead of
        # killing it in the instant before it could block the signal itself.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if pid == 0:
            code = 0
            try:
                err = os.open(ERRORS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.dup2(err, 2)
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                consumer()
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        children[int(arg)] = pid
        print(f"started {arg} {pid}", flush=True)
    elif command == "kill":
        pid = children.pop(int(arg))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(f"killed {arg}", flush=True)
    elif command == "quit":
        statuses = []
        for pid in children.values():
            os.kill(pid, signal.SIGTERM)
        for pid in children.values():
            statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        print(f"bye {statuses}", flush=True)
        break
"""
)


class Zygote:
    """Talks to the zygote process: start, kill -9 and stop consumers."""

    def __init__(self, root: Path, log: Path, errors: Path) -> None:
        self.proc = spawn_python(ZYGOTE, str(root), str(log), str(errors))
        assert self.ask("") == "ready", self.proc.stderr

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, slot: int) -> None:
        assert self.ask(f"start {slot}").startswith(f"started {slot} ")

    def kill(self, slot: int) -> None:
        assert self.ask(f"kill {slot}") == f"killed {slot}"

    def quit(self) -> str:
        return self.ask("quit")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def zygote(root: Path, log: Path, errors: Path) -> Iterator[Zygote]:
    z = Zygote(root, log, errors)
    try:
        yield z
    finally:
        z.close()


def start_producers(root: Path) -> list[subprocess.Popen[str]]:
    return [spawn_python(PRODUCER, str(root), str(p), str(PER_PRODUCER)) for p in range(PRODUCERS)]


def finish(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err


def logged(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line]


def wait_for_all(log: Path, expected: int, deadline: float) -> list[str]:
    while True:
        lines = logged(log)
        if len({line.split()[0] for line in lines}) >= expected:
            return lines
        assert time.monotonic() < deadline, f"only {len(lines)} of {expected} consumed"
        time.sleep(0.02)


def wait_until_drained(root: Path, deadline: float) -> None:
    """Every message logged is also done(): new/ and cur/ empty."""
    while any(os.listdir(root / area) for area in ("new", "cur")):
        assert time.monotonic() < deadline, {a: os.listdir(root / a) for a in ("new", "cur")}
        time.sleep(0.02)


def run_queue(tmp_path: Path, *, kill: bool) -> tuple[list[str], int]:
    root, log, errors = tmp_path / "store", tmp_path / "log", tmp_path / "errors"
    asyncio.run(FileStore(root).prepare())
    expected = PRODUCERS * PER_PRODUCER
    kills = 0
    rng = random.Random(1234)
    with zygote(root, log, errors) as z:
        for slot in range(CONSUMERS):
            z.start(slot)
        producers = start_producers(root)
        deadline = time.monotonic() + 150
        if kill:
            while len({line.split()[0] for line in logged(log)}) < expected:
                assert time.monotonic() < deadline, "the queue stopped making progress"
                time.sleep(rng.uniform(0.020, 0.080))
                slot = rng.randrange(CONSUMERS)
                z.kill(slot)
                kills += 1
                z.start(slot)
        lines = wait_for_all(log, expected, deadline)
        finish(producers)
        wait_until_drained(root, deadline)
        assert z.quit().startswith("bye [0, 0, 0, 0, 0, 0]")
    assert not errors.exists() or errors.read_text() == ""
    lines = logged(log)
    return lines, kills


def check_log(lines: list[str]) -> collections.Counter[str]:
    expected = {f"{p}:{s}" for p in range(PRODUCERS) for s in range(PER_PRODUCER)}
    counts = collections.Counter(line.split()[0] for line in lines)
    assert [line for line in lines if not line.endswith(" ok")] == []  # every byte checked
    assert set(counts) == expected  # 0 lost, nothing invented
    return counts


def test_no_kills_no_duplicates(tmp_path: Path) -> None:
    lines, _ = run_queue(tmp_path, kill=False)
    counts = check_log(lines)
    assert sum(counts.values()) == len(counts), "a message was handled twice without a crash"
    root = tmp_path / "store"
    assert os.listdir(root / "tmp") == []
    assert os.listdir(root / ".consumers") == []  # every consumer cleaned up after itself


def test_sigkilled_consumers_lose_nothing(tmp_path: Path) -> None:
    lines, kills = run_queue(tmp_path, kill=True)
    counts = check_log(lines)
    duplicates = sum(counts.values()) - len(counts)
    print(f"kills={kills} duplicates={duplicates}")
    assert kills >= 20, "the run was too short to mean anything"
    assert duplicates <= kills
    root = tmp_path / "store"
    assert os.listdir(root / "tmp") == []
    # A consumer killed just before the end may leave its lock file (nobody
    # ran recover() after its death); recover() removes it, and there is no
    # claim left to give back.
    store = FileStore(root)
    assert asyncio.run(store.status()).dead_claims == []
    assert asyncio.run(store.recover()) == []
    assert [n for n in os.listdir(root / ".consumers") if n.endswith(".lock")] == []


NAMES = """
import asyncio, sys
from atempstore import FileStore

async def main(root: str, count: int) -> None:
    store = FileStore(root)
    sem = asyncio.Semaphore(16)

    async def one() -> None:
        async with sem:
            await store.deliver(b"", durable=False)

    # Start together, so the names share their seconds.
    sys.stdin.readline()
    await asyncio.gather(*(one() for _ in range(count)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@contextlib.contextmanager
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmpfs when there is one: this test is about names, not the disk, and the
    scratch ext4 disk slows down after many recent creates and deletes (100k
    of them take ~20 s there, ~6 s on tmpfs)."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="atempstore-names-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_many_processes_never_collide(tmp_path: Path) -> None:
    """``link`` into new/ fails on a collision, so a collision would raise."""
    with scratch(tmp_path) as base:
        root = base / "store"
        asyncio.run(FileStore(root).prepare())
        per_process = NAME_DELIVERIES // NAME_PROCESSES
        procs = [spawn_python(NAMES, str(root), str(per_process)) for _ in range(NAME_PROCESSES)]
        time.sleep(0.5)  # let every interpreter reach the start line
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        finish(procs)
        names = os.listdir(root / "new")
        assert len(names) == len(set(names)) == per_process * NAME_PROCESSES
        assert os.listdir(root / "tmp") == []
        seconds = collections.Counter(name.split(".")[0] for name in names)
        # Most names share a second with thousands of others: the counter, pid
        # and randomness are what keep them apart.
        assert max(seconds.values()) > 1000


IDLE_CONSUMER = """
import asyncio, sys, time
from atempstore import FileStore

async def main(root: str) -> None:
    store = FileStore(root)
    async for message in store.consume():
        print(f"{time.monotonic()!r} {(await message.read()).decode()}", flush=True)
        await message.done()

asyncio.run(main(sys.argv[1]))
"""


@contextlib.contextmanager
def idle_consumer(root: Path) -> Iterator[subprocess.Popen[str]]:
    proc = spawn_python(IDLE_CONSUMER, str(root))
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def wait_for_consumer(root: Path, proc: subprocess.Popen[str]) -> None:
    """The consumer is ready once it holds its lock (it claims a first message)."""

    async def probe() -> None:
        await FileStore(root).deliver(b"warm-up")

    asyncio.run(probe())
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[1] == "warm-up", proc.stderr


def test_idle_consumer_wakes_within_50ms(tmp_path: Path) -> None:
    root = tmp_path / "store"
    asyncio.run(FileStore(root).prepare())
    latencies: list[float] = []
    with idle_consumer(root) as proc:
        wait_for_consumer(root, proc)
        assert proc.stdout is not None
        stdout = proc.stdout

        async def deliver_all() -> None:
            store = FileStore(root)
            for i in range(20):
                await asyncio.sleep(0.05)  # idle again before each delivery
                sent = time.monotonic()
                await store.deliver(f"m{i}".encode())
                # CLOCK_MONOTONIC is system-wide: the child's stamp compares.
                line = await asyncio.to_thread(stdout.readline)
                stamp, text = line.split()
                assert text == f"m{i}"
                latencies.append(float(stamp) - sent)

        asyncio.run(deliver_all())
    median = statistics.median(latencies)
    print(f"delivery->consume: median {median * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms")
    assert median < 0.050


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_consumer_costs_no_cpu(tmp_path: Path) -> None:
    root = tmp_path / "store"
    asyncio.run(FileStore(root).prepare())
    with idle_consumer(root) as proc:
        wait_for_consumer(root, proc)
        time.sleep(0.2)  # let the thread pool settle after the warm-up message
        before, start = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)
        used, elapsed = cpu_seconds(proc.pid) - before, time.monotonic() - start
    print(f"idle consumer: {used * 1e3:.0f} ms of CPU in {elapsed:.2f} s")
    assert used / elapsed < 0.02


# --------------------------------------------------------------------------
# fork(): a child's inherited store leaves the parent's claims and lock alone

FORKER = """
import asyncio, fcntl, gc, json, multiprocessing, os, sys
from atempstore import FileStore

ROOT, HOW = sys.argv[1], sys.argv[2]


def held(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


store = FileStore(ROOT)


async def setup() -> list[str]:
    await store.prepare()
    names = [await store.deliver(str(i).encode()) for i in range(3)]
    for name in names[:2]:
        assert await store.claim(name)
    return names


NAMES = asyncio.run(setup())
OWNER = store.owner
LOCK = os.path.join(ROOT, ".consumers", f"{OWNER}.lock")


def in_child() -> None:
    global store
    if HOW in ("aclose", "mp-aclose"):
        asyncio.run(store.aclose())
    elif HOW == "gc":
        # A daemonizing child closes every fd, then opens its own files,
        # which take the freed numbers; the store is collected after that.
        os.closerange(3, 4096)
        mine = [os.open(os.devnull, os.O_WRONLY) for _ in range(64)]
        del store
        gc.collect()
        for fd in mine:
            os.write(fd, b"still mine")  # EBADF if the collection closed it
    elif HOW == "exit":
        sys.exit(0)  # a normal exit: atexit hooks and finalizers run
    elif HOW == "settle":
        message = store.message(NAMES[0]) if NAMES[0] in store._held else None
        assert message is None, "the child must not hold the parent's messages"
    elif HOW == "claim":
        # The inherited store claims for the child, under an owner of its own,
        # then the child dies holding the claim.
        assert asyncio.run(store.claim(NAMES[2]))
        assert store.owner != OWNER, "claimed under the parent's owner"
        os._exit(0)


if HOW == "settle":
    inherited = store.message(NAMES[0])
if HOW.startswith("mp-"):
    child = multiprocessing.get_context("fork").Process(target=in_child)
    child.start()
    child.join()
    code = child.exitcode
else:
    pid = os.fork()
    if pid == 0:
        try:
            if HOW == "settle":
                try:
                    asyncio.run(inherited.done())
                except RuntimeError as exc:
                    assert "parent" in str(exc), exc
                    assert inherited.state == "forked", inherited
                else:
                    raise AssertionError("a child settled its parent's message")
            in_child()
        except BaseException as exc:
            if isinstance(exc, SystemExit) and not exc.code:
                raise
            import traceback
            traceback.print_exc()
            os._exit(1)
        if HOW != "exit":
            os._exit(0)
        sys.exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

report = {
    "child": code,
    "cur": sorted(os.listdir(os.path.join(ROOT, "cur"))),
    "new": sorted(os.listdir(os.path.join(ROOT, "new"))),
    "lock_exists": os.path.exists(LOCK),
    "lock_held": os.path.exists(LOCK) and held(LOCK),
}


async def parent_goes_on() -> None:
    report["recovered"] = await FileStore(ROOT).recover()
    for name in NAMES[:2]:
        await store.message(name).done()  # the parent still settles its own
    await store.aclose()
    report["consumers"] = os.listdir(os.path.join(ROOT, ".consumers"))


asyncio.run(parent_goes_on())
print(json.dumps({"names": NAMES, "owner": OWNER, **report}))
"""


@pytest.mark.parametrize("how", ["aclose", "mp-aclose", "gc", "exit", "settle", "claim"])
def test_forked_child_leaves_the_parents_claims_alone(tmp_path: Path, how: str) -> None:
    root = tmp_path / "store"
    done = run_python_quietly(FORKER, str(root), how)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    names, owner = report["names"], report["owner"]
    assert report["child"] == 0, done.stderr
    # The parent's two claims are still its own, its lock file there and held.
    mine = [f"{name}~{owner}" for name in names[:2]]
    assert [c for c in report["cur"] if c.endswith(owner)] == sorted(mine)
    assert report["lock_exists"]
    assert report["lock_held"]
    if how == "claim":
        # The child's claim was its own: once the child is dead, it comes back.
        assert report["new"] == []
        assert report["recovered"] == [names[2]]
    else:
        assert report["cur"] == sorted(mine)
        assert report["new"] == [names[2]]  # nothing of the parent's given back
        assert report["recovered"] == []
    assert report["consumers"] == []  # the parent cleaned up after itself


ORPHANING = """
import asyncio, os, sys
from atempstore import FileStore

store = FileStore(sys.argv[1])


async def setup() -> list[str]:
    await store.prepare()
    names = [await store.deliver(str(i).encode()) for i in range(2)]
    for name in names:
        assert await store.claim(name)
    return names


names = asyncio.run(setup())
if os.fork() == 0:
    sys.stdin.readline()  # the child lives on, with the store it inherited
    os._exit(0)
print(" ".join(names), flush=True)
os._exit(0)  # the parent dies without aclose(), as in a crash
"""


def test_a_dead_parent_is_recovered_while_its_forked_child_lives(tmp_path: Path) -> None:
    """The child's copy of the lock fd must not keep a dead parent 'alive'."""
    root = tmp_path / "store"
    parent = spawn_python(ORPHANING, str(root))
    try:
        assert parent.stdout is not None
        names = sorted(parent.stdout.readline().split())
        assert parent.wait(timeout=60) == 0
        # The child still runs (it waits on the stdin it shares with us).
        recovered = asyncio.run(FileStore(root).recover())
        assert sorted(recovered) == names
    finally:
        assert parent.stdin is not None
        parent.stdin.write("bye\n")
        parent.stdin.close()
        parent.kill()
        parent.wait(timeout=30)
        for stream in (parent.stdout, parent.stderr):
            if stream is not None:
                stream.close()


def run_python_quietly(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`run_python`, with Python's warning about fork() in a threaded process
    silenced: the pool threads exist, and forking anyway is the point."""
    return run_python(
        "import warnings\nwarnings.simplefilter('ignore', DeprecationWarning)\n" + code, *args
    )
