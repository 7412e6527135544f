"""The one offload helper: results, errors, and what cancellation may and may not do."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from types import FrameType

import pytest

from atempstore._threads import POOL_THREADS, SLOW_THREADS, run_sync, run_wait

from .conftest import run_python


async def test_result_and_error_come_back() -> None:
    assert await run_sync(lambda: threading.current_thread() is threading.main_thread()) is False
    with pytest.raises(ZeroDivisionError):
        await run_sync(lambda: 1 / 0)


class Resource:
    """Something whose finalization a caller may count on."""


async def test_the_worker_keeps_nothing_alive_once_it_has_woken_the_caller() -> None:
    # A caller that drops its last reference right after the await must see
    # the object finalized at once (a FileStore whose lock fd then closes),
    # however late the worker thread runs on after waking the loop.  The
    # call makes its own worker thread stall for 0.3 s right after that
    # wake-up (a profile hook is per thread), which a loaded machine can do.
    stall_over = threading.Event()

    def stall_after_the_wake_up(frame: FrameType, event: str, arg: object) -> None:
        if event == "return" and frame.f_code.co_name == "call_soon_threadsafe":
            sys.setprofile(None)
            time.sleep(0.3)
            stall_over.set()

    def use(resource: Resource) -> None:
        assert isinstance(resource, Resource)
        sys.setprofile(stall_after_the_wake_up)

    resource = Resource()
    alive = weakref.ref(resource)
    await run_sync(use, resource)
    del resource
    assert not stall_over.is_set()  # the worker is still stalled...
    assert alive() is None  # ...and holds nothing of the call any more
    assert await asyncio.to_thread(stall_over.wait, 5)


async def test_stop_iteration_cannot_end_the_awaiting_coroutine() -> None:
    # A future cannot carry StopIteration: it is delivered as a RuntimeError.
    with pytest.raises(RuntimeError, match="StopIteration"):
        await run_sync(next, iter(()))


async def test_concurrent_calls_overlap_up_to_the_pool_size() -> None:
    # POOL_THREADS calls that each wait for all the others: they must all run
    # at once (a pool that ran them one by one would break the barrier).
    barrier = threading.Barrier(POOL_THREADS, timeout=5)
    arrivals = await asyncio.gather(*(run_sync(barrier.wait) for _ in range(POOL_THREADS)))
    assert sorted(arrivals) == list(range(POOL_THREADS))
    # And never more: calls beyond the pool size wait for a free thread.
    running = peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def hold() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1

    calls = asyncio.gather(*(run_sync(hold) for _ in range(POOL_THREADS + 8)))
    while running < POOL_THREADS:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # time for a 33rd call to start, if it could
    assert peak == POOL_THREADS
    release.set()
    await calls
    assert peak == POOL_THREADS


async def test_slow_work_never_occupies_the_file_threads() -> None:
    # More stuck slow calls than the file pool has threads: a file call must
    # still get a thread at once (SPEC.md: 40 readers stuck on a source whose
    # pread takes a second, and an unrelated open_atomic takes milliseconds).
    stuck = threading.Event()
    started = threading.Semaphore(0)

    def hang() -> None:
        started.release()
        stuck.wait(10)

    hung = [asyncio.ensure_future(run_sync(hang, slow=True)) for _ in range(POOL_THREADS + 8)]
    try:
        for _ in range(POOL_THREADS + 8):
            assert await asyncio.to_thread(started.acquire, True, 5)
        begin = time.perf_counter()
        assert await run_sync(threading.current_thread) is not threading.current_thread()
        assert time.perf_counter() - begin < 0.5
    finally:
        stuck.set()
        await asyncio.gather(*hung)


def test_slow_work_does_not_keep_the_interpreter_from_exiting() -> None:
    # A source read that hangs forever must not hang the interpreter's exit:
    # slow threads are daemon threads (nothing they do is ever published).
    result = run_python(
        """
        import asyncio, threading
        from atempstore._threads import run_sync

        started = threading.Event()

        def hang() -> None:
            started.set()
            threading.Event().wait()

        async def main() -> None:
            asyncio.ensure_future(run_sync(hang, slow=True, abandon_on_cancel=True))
            await asyncio.to_thread(started.wait, 5)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        print("exiting", flush=True)
        """,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["exiting"]
    assert SLOW_THREADS >= 40


def test_work_handed_over_finishes_at_interpreter_exit(tmp_path: Path) -> None:
    # The loop is abandoned while a write is in flight and the interpreter
    # exits: the worker thread is not killed half-way, the write lands.
    target = tmp_path / "landed"
    result = run_python(
        """
        import asyncio, sys, time
        from atempstore._threads import run_sync

        def slow_write() -> None:
            time.sleep(0.3)
            with open(sys.argv[1], "w") as file:
                file.write("whole")

        loop = asyncio.new_event_loop()
        loop.create_task(run_sync(slow_write))
        loop.run_until_complete(asyncio.sleep(0.05))  # the call is running now
        print("exiting", flush=True)
        """,
        str(target),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["exiting"]
    assert target.read_text() == "whole"


async def test_context_variables_reach_the_thread() -> None:
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("r-42")
    assert await run_sync(request_id.get) == "r-42"


async def test_cancellation_waits_for_the_call_to_finish() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    task = asyncio.ensure_future(run_sync(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The state change finished before the cancellation was delivered.
    assert finished.is_set()


async def test_undo_runs_when_cancelled_during_the_call() -> None:
    undone: list[str] = []

    def claim() -> str:
        time.sleep(0.2)
        return "token"

    task = asyncio.ensure_future(run_sync(claim, undo=undone.append))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == ["token"]


async def test_a_failing_undo_is_reported_and_the_caller_still_gets_its_cancellation() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def claim() -> str:
        time.sleep(0.2)
        return "token"

    def undo(_token: str) -> None:
        raise OSError("EIO while giving it back")

    try:
        task = asyncio.ensure_future(run_sync(claim, undo=undo))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)  # not a hang
        await asyncio.sleep(0.01)  # the report is scheduled on the loop
    finally:
        loop.set_exception_handler(None)
    [context] = reported
    assert isinstance(context["exception"], OSError)
    assert "rolling back" in str(context["message"])


async def test_undo_runs_when_cancelled_after_the_call_returned() -> None:
    loop = asyncio.get_running_loop()
    undone: list[str] = []
    task: asyncio.Future[str] | None = None

    def claim() -> str:
        # The cancellation reaches the loop before the result does: the call
        # finished, but the caller will never see its result.
        assert task is not None
        loop.call_soon_threadsafe(task.cancel)
        time.sleep(0.01)
        return "token"

    task = asyncio.ensure_future(run_sync(claim, undo=undone.append))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == ["token"]


async def test_no_undo_when_the_caller_gets_the_result() -> None:
    undone: list[str] = []
    assert await run_sync(lambda: "token", undo=undone.append) == "token"
    assert undone == []


async def test_abandoning_a_read_returns_at_once() -> None:
    task = asyncio.ensure_future(run_sync(time.sleep, 0.5, abandon_on_cancel=True))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.3


async def test_run_wait_delivers_and_can_be_abandoned() -> None:
    assert await run_wait(lambda: 7) == 7
    release = threading.Event()
    ran_to_the_end = threading.Event()

    def blocked() -> None:
        release.wait(5)
        ran_to_the_end.set()

    task = asyncio.ensure_future(run_wait(blocked))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # does not wait for the other party
    release.set()
    assert await asyncio.to_thread(ran_to_the_end.wait, 5)


@pytest.mark.multiprocess
async def test_a_forked_child_gets_a_working_pool() -> None:
    await run_sync(os.getpid)  # the parent's pool exists, with threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = asyncio.run(asyncio.wait_for(run_sync(os.getpid), 5)) == os.getpid()
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        await asyncio.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)  # noqa: ASYNC222 - reaping a SIGKILLed child is immediate
    pytest.fail("the forked child's run_sync never ran")
