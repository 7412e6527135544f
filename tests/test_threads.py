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

from atempstore import _threads
from atempstore._threads import POOL_THREADS, SLOW_THREADS, caller_cancelled, run_sync, run_wait

from .cancelling import CancelPoint, cancel_points
from .conftest import run_python


async def started(event: threading.Event) -> None:
    """Wait (off the loop) until a worker has reached ``event``."""
    assert await asyncio.to_thread(event.wait, 5)


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
    full = threading.Event()

    def hold() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == POOL_THREADS:
                full.set()
        release.wait(5)
        with lock:
            running -= 1

    calls = asyncio.gather(*(run_sync(hold) for _ in range(POOL_THREADS + 8)))
    await started(full)
    # No 33rd call can start: the pool has made its POOL_THREADS threads, and
    # every one of them is inside a call (no sleep standing in for "by now").
    pool = _threads._get_pool()
    assert (pool._threads, pool._idle) == (POOL_THREADS, 0)
    assert peak == POOL_THREADS
    release.set()
    await calls
    assert peak == POOL_THREADS
    # The 8 calls that waited for a thread did not leave the pool believing
    # it has more idle threads than threads (a burst once inflated _idle).
    await run_sync(lambda: None)
    assert pool._idle <= pool._threads == POOL_THREADS


async def test_the_pool_counts_idle_threads_truly_after_bursts() -> None:
    # Bursts beyond the pool size, one after another: each time, the pool has
    # exactly its threads and every one idle once all calls are done (this
    # failed when a previous burst had left _idle above the thread count).
    release = threading.Event()
    for _ in range(3):
        release.clear()
        calls = asyncio.gather(*(run_sync(release.wait, 5) for _ in range(POOL_THREADS + 8)))
        await asyncio.sleep(0)
        release.set()
        await calls
    pool = _threads._get_pool()
    deadline = time.monotonic() + 5
    while pool._idle != pool._threads and time.monotonic() < deadline:
        await run_sync(time.sleep, 0.01)
    assert pool._idle <= pool._threads == POOL_THREADS


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
        import asyncio, sys, threading, time
        from atempstore._threads import run_sync

        running = threading.Event()

        def slow_write() -> None:
            running.set()
            time.sleep(0.3)
            with open(sys.argv[1], "w") as file:
                file.write("whole")

        loop = asyncio.new_event_loop()
        loop.create_task(run_sync(slow_write))
        loop.run_until_complete(asyncio.to_thread(running.wait, 5))  # the call is running
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
    running, finish, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        running.set()
        finish.wait(5)
        finished.set()

    task = asyncio.ensure_future(run_sync(slow))
    await started(running)
    task.cancel()
    await asyncio.sleep(0)  # the task has seen the cancellation...
    assert not task.done()  # ...and waits for the call
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The state change finished before the cancellation was delivered.
    assert finished.is_set()


async def test_undo_runs_when_cancelled_during_the_call() -> None:
    undone: list[str] = []

    running, finish = threading.Event(), threading.Event()

    def claim() -> str:
        running.set()
        finish.wait(5)
        return "token"

    task = asyncio.ensure_future(run_sync(claim, undo=undone.append))
    await started(running)
    task.cancel()
    await asyncio.sleep(0)
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == ["token"]


async def test_a_shielded_call_failing_after_its_caller_was_cancelled_is_reported() -> None:
    # A release or a roll-back (shield=True) that fails while its caller,
    # cancelled, waits it out: the caller raises CancelledError, so the error
    # goes to the loop's exception handler instead of being lost.
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    running, finish = threading.Event(), threading.Event()

    def release() -> None:
        running.set()
        finish.wait(5)
        raise OSError("EIO while releasing")

    try:
        task = asyncio.ensure_future(run_sync(release, shield=True))
        await started(running)
        task.cancel()
        await asyncio.sleep(0)
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        loop.set_exception_handler(None)
    [context] = reported
    assert isinstance(context["exception"], OSError)


async def test_a_failing_undo_is_reported_and_the_caller_still_gets_its_cancellation() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    running, finish = threading.Event(), threading.Event()

    def claim() -> str:
        running.set()
        finish.wait(5)
        return "token"

    def undo(_token: str) -> None:
        raise OSError("EIO while giving it back")

    try:
        task = asyncio.ensure_future(run_sync(claim, undo=undo))
        await started(running)
        task.cancel()
        await asyncio.sleep(0)
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)  # not a hang
        # No wait for the report: the worker schedules it before the caller's
        # wake-up, so it has run by the time the caller has resumed.
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
        cancelled = threading.Event()

        def cancel() -> None:
            assert task is not None
            task.cancel()
            cancelled.set()

        loop.call_soon_threadsafe(cancel)
        assert cancelled.wait(5)
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
    running, finish = threading.Event(), threading.Event()

    def read() -> None:
        running.set()
        finish.wait(10)

    task = asyncio.ensure_future(run_sync(read, abandon_on_cancel=True))
    await started(running)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)  # the call still runs: it was abandoned
    assert not finish.is_set()
    finish.set()


async def test_run_wait_delivers_and_can_be_abandoned() -> None:
    assert await run_wait(lambda: 7) == 7
    release = threading.Event()
    ran_to_the_end = threading.Event()

    def blocked() -> None:
        release.wait(5)
        ran_to_the_end.set()

    waiting = threading.Event()

    def blocked_and_said_so() -> None:
        waiting.set()
        blocked()

    task = asyncio.ensure_future(run_wait(blocked_and_said_so))
    await started(waiting)
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


async def test_a_shielded_call_runs_even_if_cancelled_before_it_starts() -> None:
    # A release or a roll-back must happen once asked for: in every phase the
    # call ran exactly once, and the caller still got its cancellation.
    async def prepare() -> list[int]:
        return []

    async def call(ran: list[int]) -> None:
        await run_sync(ran.append, 1, shield=True)

    async def check(ran: list[int], point: CancelPoint) -> None:
        assert ran == [1], point

    points = await cancel_points(prepare, call, check)
    assert [p.phase for p in points] == ["before", "during", "after"]


async def test_caller_cancelled_tells_a_call_its_caller_is_gone() -> None:
    seen: list[bool] = []

    async def prepare() -> list[bool]:
        seen.clear()
        return seen

    async def call(seen: list[bool]) -> None:
        await run_sync(lambda: seen.append(caller_cancelled()))

    async def check(seen: list[bool], point: CancelPoint) -> None:
        # Cancelled while the call ran: it knows; cancelled after: it did not.
        assert seen == ({"before": [], "during": [True], "after": [False]}[point.phase]), point

    await cancel_points(prepare, call, check)
    assert seen == [False]  # not cancelled
    assert caller_cancelled() is False  # outside a call
