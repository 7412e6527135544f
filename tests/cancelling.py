"""Cancel a public coroutine at each of its thread hops, deterministically.

Every await of a public coroutine that creates or changes something is a
thread hop through ``atempstore._threads.run_sync``.  `cancel_points` runs
the coroutine under test again and again, and each time cancels it at one
point: hop *k*, in one of three phases,

* ``"before"``: the task is cancelled once the hop is handed to the pool and
  before the worker starts it (the call must then never run);
* ``"during"``: the task is cancelled while the worker runs the call (the
  caller must wait the call out, then roll back what it made);
* ``"after"``: the call has returned and the task is cancelled just before
  the result reaches it (what the call made must be undone: nobody will
  ever see it).

After each cancelled run the test's ``check`` asserts that nothing was left
behind and that every object still tells the truth about its state.  The
sweep ends when the coroutine completes without reaching the next hop, so a
new await in the library is covered without editing the test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from atempstore import _threads

__all__ = ("PHASES", "CancelPoint", "cancel_points")

T = TypeVar("T")

Phase = Literal["before", "during", "after"]
PHASES: tuple[Phase, ...] = ("before", "during", "after")


@dataclass(frozen=True)
class CancelPoint:
    """Where one run was cancelled: at thread hop ``hop`` (0-based), in ``phase``."""

    hop: int
    phase: Phase

    def __str__(self) -> str:
        return f"hop {self.hop} {self.phase}"


class _Injector:
    """Counts the hops made by one task and cancels it at one of them."""

    def __init__(self, task: asyncio.Task[Any], point: CancelPoint) -> None:
        self.task = task
        self.point = point
        self.loop = task.get_loop()
        self.hops = 0
        self.fired = False
        self.target: _threads._Hop | None = None
        # Set once the worker is done with the target hop: a read-only call
        # the caller abandoned (abandon_on_cancel) may still be running when
        # the caller has already returned, and `check` must see its end.
        self.target_done = threading.Event()

    def _cancel_and_wait(self) -> None:
        """In the worker: cancel the task and wait until it has seen it."""
        seen = threading.Event()

        def cancel() -> None:
            self.task.cancel()
            # One more turn of the loop lets the task run up to wait_out().
            self.loop.call_soon(seen.set)

        self.loop.call_soon_threadsafe(cancel)
        seen.wait(5)


@contextmanager
def _injecting(injector: _Injector) -> Iterator[None]:
    real_submit = _threads._Pool.submit
    real_run = _threads._Hop.run

    def submit(pool: _threads._Pool, hop: _threads._Hop) -> None:
        mine = asyncio.current_task() is injector.task if _on_loop(injector) else False
        if mine:
            index = injector.hops
            injector.hops += 1
            if index == injector.point.hop:
                injector.target = hop
        real_submit(pool, hop)

    def run(hop: _threads._Hop) -> Callable[[], None] | None:
        phase = injector.point.phase if hop is injector.target else None
        if phase == "before":
            # The worker has the hop but has not started it: the task, woken
            # with CancelledError, drops it, and it must never run.
            injector.fired = True
            injector._cancel_and_wait()
        elif phase == "during":
            injector.fired = True
            func = hop._func

            def cancelled_meanwhile(*args: object) -> object:
                injector._cancel_and_wait()
                return func(*args)

            hop._func = cancelled_meanwhile
        try:
            deliver = real_run(hop)
            if phase == "after" and deliver is not None:
                injector.fired = True
                injector._cancel_and_wait()  # the result is on its way, the caller is gone
        finally:
            if phase is not None:
                injector.target_done.set()
        return deliver

    _threads._Pool.submit = submit  # type: ignore[method-assign,assignment]
    _threads._Hop.run = run  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        _threads._Pool.submit = real_submit  # type: ignore[method-assign]
        _threads._Hop.run = real_run  # type: ignore[method-assign]


def _on_loop(injector: _Injector) -> bool:
    try:
        return asyncio.get_running_loop() is injector.loop
    except RuntimeError:
        return False


async def cancel_points(
    prepare: Callable[[], Awaitable[T]],
    call: Callable[[T], Awaitable[object]],
    check: Callable[[T, CancelPoint], Awaitable[None]],
    *,
    max_hops: int = 40,
) -> list[CancelPoint]:
    """Cancel ``call(prepare())`` at every hop and phase; ``check`` after each.

    ``prepare`` builds fresh state for one run (its hops are not counted);
    ``call`` is the public coroutine under test; ``check(state, point)``
    asserts what must hold after a cancellation at ``point`` (nothing left
    behind, objects truthful) and cleans up.  Returns the points exercised.
    """
    exercised: list[CancelPoint] = []
    for hop in range(max_hops):
        reached = False
        for phase in PHASES:
            point = CancelPoint(hop, phase)
            state = await prepare()
            task = asyncio.ensure_future(_run(call, state))
            injector = _Injector(task, point)
            with _injecting(injector):
                try:
                    await task
                except asyncio.CancelledError:
                    if not injector.fired:
                        raise
                else:
                    assert not injector.fired, f"cancelled at {point}, the call still returned"
                if injector.target is not None:
                    assert await asyncio.to_thread(injector.target_done.wait, 10), point
            if not injector.fired:
                # Finished before reaching this hop: every hop is covered.  (The
                # caller got its result: what it made is the test's to clean up.)
                return exercised
            reached = True
            exercised.append(point)
            await check(state, point)
        assert reached
    raise AssertionError(f"the call made more than {max_hops} hops")


async def _run(call: Callable[[T], Awaitable[object]], state: T) -> object:
    return await call(state)
