"""The sessions of one `FileCache` in this process: one per entry, shared by its readers.

Opening a source asks the table for a session: an existing one of the same
version is shared; otherwise one task per entry probes the directory (in a
worker-thread hop, `_probe.probe`; the others wait for its result), retries
with a short backoff while another process holds the entry for a moment, and
starts the session the probe decided on: a `Copier` for ``"copy"``, inotify
for ``"follow"``.  `SessionTable.stop` is the first half of
`FileCache.aclose`: it stops every copy and follow, and gives up on a copy
whose source read hangs.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Protocol

from anyio import CapacityLimiter

from .._errors import SourceChangedError
from .._threads import run_sync
from ._copier import Copier
from ._directory import Directory
from ._doorbell import Doorbell
from ._fd import SharedFd
from ._notifier import Notifier
from ._probe import Probe, is_mode
from ._probe import discard as discard_probe
from ._probe import probe as probe_entry
from ._record import entry_name
from ._session import CopySession
from ._source import Origin
from ._stats import Stats

__all__ = ("SessionTable", "Settings")


class Settings(Protocol):
    """What the table reads from its `FileCache` (at each open: they may change)."""

    wait_window: int
    chunk_size: int
    poll_interval: float
    lock_timeout: float


class SessionTable:
    """The sessions of one cache (on the loop), by entry name, and the opens in flight."""

    def __init__(
        self, cache: Settings, directory: Directory, notifier: Notifier, stats: Stats
    ) -> None:
        self._cache = cache
        self._dir = directory
        self._notifier = notifier
        self._stats = stats
        self._sessions: dict[str, CopySession] = {}
        #: Every session not yet closed (shared or not).
        self.live: set[CopySession] = set()
        self._gates: dict[str, asyncio.Event] = {}
        self._limiter: CapacityLimiter | None = None
        self._read_limiter: CapacityLimiter | None = None
        self._doorbell: Doorbell | None = None
        self.closed = False
        self._probing = 0
        self._probes_done: asyncio.Event | None = None

    def start(
        self, doorbell: Doorbell, limiter: CapacityLimiter, read_limiter: CapacityLimiter
    ) -> None:
        """On the loop, once the cache is ready: what copies and reads run with."""
        self._doorbell = doorbell
        self._limiter = limiter
        self._read_limiter = read_limiter

    async def share(self, origin: Origin) -> tuple[CopySession, Origin | None]:
        """The session to share for ``origin``, and ``origin`` back if the session
        has its own (the reader closes it, in its `CachedFile.aclose` hop)."""
        name = entry_name(origin.key)
        while True:
            current = self._sessions.get(name)
            if current is not None and current.shareable and current.version == origin.version:
                current.acquire()
                return current, origin
            gate = self._gates.get(name)
            if gate is None:
                break
            await gate.wait()  # another task is probing this entry: share its result
        gate = self._gates[name] = asyncio.Event()
        try:
            session = await self._start_session(name, origin)
        finally:
            del self._gates[name]
            gate.set()
        self._sessions[name] = session
        return session, None

    async def _start_session(self, name: str, origin: Origin) -> CopySession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._cache.lock_timeout
        delay = 0.001
        wait = False
        while True:
            if self.closed:
                raise RuntimeError(f"{self._cache!r} was closed while opening {origin.key!r}")
            # Usually on a file thread, never waiting for the ledger; if the
            # ledger is held, again on a slow thread, which may wait for it.
            assert self._limiter is not None
            probe = Probe(name, wait, queued=self._limiter.available_tokens == 0)
            self._probing += 1
            try:
                # A caller cancelled after the thread obtained fds, locks or
                # space: the thread (or the caller) gives them back.
                await run_sync(
                    partial(probe_entry, self._dir),
                    probe,
                    origin.version,
                    slow=wait,
                    undo=self._discard,
                )
            finally:
                self._probing -= 1
                if self._probing == 0 and self._probes_done is not None:
                    self._probes_done.set()
            if self._is_closed():
                # aclose() ran during the hop: start nothing it would not stop.
                await run_sync(self._discard, probe, slow=True, shield=True)
                raise RuntimeError(f"{self._cache!r} was closed while opening {origin.key!r}")
            if probe.kind == "busy":
                wait = True
                continue
            if probe.kind != "wait":
                break
            if loop.time() >= deadline:
                probe.kind = "source"
                break
            # Another process holds the entry for a moment (starting a copy,
            # evicting it): a short, bounded backoff.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self._make_session(name, origin, probe)

    def _is_closed(self) -> bool:
        return self.closed

    def _discard(self, probe: Probe) -> None:
        """In a worker thread: give back what ``probe`` obtained.  Space it
        reserved goes back to the ledger; if the ledger is held and this thread
        may not wait (``probe.wait``), the entry's record keeps the reservation
        and the next holder of the entry gives it back (`Directory.heal`)."""
        discard_probe(self._dir, probe)

    def _make_session(self, name: str, origin: Origin, probe: Probe) -> CopySession:
        kind = probe.kind
        assert is_mode(kind)  # the probe loop ends on a way to serve
        assert self._read_limiter is not None
        session = CopySession(
            name=name,
            origin=origin,
            mode=kind,
            data=SharedFd(probe.data_fd) if probe.data_fd is not None else None,
            wait_window=self._cache.wait_window,
            read_limiter=self._read_limiter,
            stats=self._stats,
            on_closed=self._forget,
        )
        session.acquire()
        self.live.add(session)
        if kind == "copy":
            assert probe.data_fd is not None
            assert probe.lock_fd is not None
            assert session.data is not None
            assert self._limiter is not None
            self._stats.count("copies")
            assert self._doorbell is not None
            copier = Copier(
                origin=origin,
                name=name,
                root=self._dir.root,
                part=session.data,
                part_fd=probe.data_fd,
                lock_fd=probe.lock_fd,
                reserved=probe.reserved,
                ledger=self._dir,
                stats=self._stats,
                chunk_size=self._cache.chunk_size,
                clock_ns=self._dir.clock_ns,
                post=self._doorbell.post,
            )
            session.start_copy(copier, self._limiter)
        elif kind == "follow":
            assert probe.data_fd is not None
            assert probe.lock_fd is not None
            self._stats.count("follows")
            if probe.watch is not None:
                session.cleanup.append(self._notifier.subscribe(probe.watch, session))
            # Without inotify, followers poll fast; with it, only as a safety net.
            poll = self._cache.poll_interval if probe.watch is not None else 0.01
            session.start_follow(probe.lock_fd, probe.data_fd, probe.progress, poll)
        elif kind == "cache":
            self._stats.count("hits")
        else:
            self._stats.count("uncached")
        # Ownership passed to the session.
        probe.data_fd = probe.lock_fd = None
        probe.reserved = 0
        return session

    def _forget(self, session: CopySession) -> None:
        self.live.discard(session)
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]

    async def stop(self, close_timeout: float) -> None:
        """Stop every copy and follow and wait for them; open no session after.

        A copy that does not reach its next chunk within ``close_timeout`` (its
        source read hangs) is given up on: its readers get `SourceChangedError`.
        Resumable: a cancelled call may be made again.
        """
        self.closed = True
        if self._probing:
            # Opens in the middle of a probe finish it (and give back what it
            # got, seeing the cache closed) before the ledger closes.
            if self._probes_done is None:
                self._probes_done = asyncio.Event()
            await self._probes_done.wait()
        sessions = list(self.live)
        for session in sessions:
            session.cancel_copy()
            if session.copier is None and session.task is not None:
                session.task.cancel()
        tasks = {s.task for s in sessions if s.task is not None and not s.task.done()}
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=close_timeout)
            if stuck:
                # A copy that did not reach its next chunk in time: its source
                # read hangs.  Its thread is left to it (a daemon thread: it
                # never keeps the interpreter from exiting, and a cancelled
                # copy publishes nothing); its readers get an error now.
                for session in sessions:
                    if session.task in stuck:
                        session.abort(
                            SourceChangedError(
                                f"the source {session.origin.key!r} did not answer within"
                                f" {close_timeout} s of the cache closing; open it"
                                " again through an open cache",
                                path=session.origin.key,
                            )
                        )
                        session.task.cancel()  # the copy's await gives up on its thread
                await asyncio.wait(stuck)
