"""The work queue: deliver, claim, settle, status; `Message` and `QueueStatus`.

`QueueCore` is the blocking, loop-free half: one method per `FileStore`
hop, with the ``un...`` method that rolls a hop back for a cancelled caller.
Delivery publishes a whole, fsynced file into ``new/`` without ever
replacing one; a claim is one ``rename`` from ``new/<name>`` to
``cur/<name>~<owner>``, which exactly one of any number of claimers wins
(the kernel serialises renames of one entry).  `Message` is the claim a
caller holds: its `Message.state` always says what happened to the file,
and it only ever acts on its own claim.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from .._durable import fsync_dir, publish_new_file
from .._threads import run_sync
from ._names import AREAS, Layout, claimed_name, order_key, visible_names
from ._owners import Owner, Owners, forget_at_fork, give_back, recover, survey
from ._store import read_file
from ._watcher import Backlog, Watcher

__all__ = ("Claim", "Claimed", "Message", "MessageState", "QueueCore", "QueueStatus")

#: What has become of a claimed `Message`.
MessageState = Literal["held", "settling", "done", "released", "closed", "forked"]
_Action = Literal["done", "release"]
#: A won claim: the claimed file's name in ``cur/`` and the owner it is held under.
Claim = tuple[str, Owner]
#: What `QueueCore.claim_next` won: the message's name, then its `Claim`.
Claimed = tuple[str, str, Owner]
_Names = list[str]


@dataclass(frozen=True)
class QueueStatus:
    """A snapshot of a store, as `FileStore.status` sees it.

    Example:
        ```python
        status = await store.status()
        print(status.counts["new"], "waiting, oldest", status.oldest_age, "s")
        ```
    """

    #: The store's directory.
    path: Path
    #: Files per area: ``{"tmp": ..., "new": ..., "cur": ...}`` (hidden entries excluded).
    counts: dict[str, int]
    #: Age in seconds of the oldest message waiting in ``new/``; None when empty.
    oldest_age: float | None
    #: Claimed messages whose consumer is alive (holds its lock).
    live_claims: int
    #: Names of claimed messages whose consumer is gone: `FileStore.recover` gives them back.
    dead_claims: list[str] = field(default_factory=list)
    #: Files in ``cur/`` named like a claim whose owner has no lock file
    #: (``.consumers`` was tampered with); left alone.
    unknown_claims: list[str] = field(default_factory=list)


class QueueCore:
    """The queue's blocking operations and the messages a store holds.

    Example (no event loop):
        ```python
        queue = QueueCore(Layout("spool"))  # a prepared store
        queue.deliver("job-1", b"data", True)
        claimed, owner = queue.claim("job-1")
        ```
    """

    __slots__ = ("__weakref__", "held", "layout", "owners")

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.owners = Owners(layout)
        self.held: dict[str, Message] = {}
        forget_at_fork(self)

    def forget_inherited(self) -> None:
        """In a forked child: the parent's owner and messages are not ours."""
        self.owners.forget_inherited()
        for message in self.held.values():
            message._state = "forked"
        self.held.clear()

    def deliver(self, name: str, data: bytes | bytearray | memoryview, durable: bool) -> str:
        publish_new_file(
            self.layout.dirs["new"],
            name,
            data,
            staging=os.path.join(self.layout.dirs["tmp"], name),
            durable=durable,
        )
        return name

    def undeliver(self, name: str, durable: bool) -> None:
        new = self.layout.dirs["new"]
        try:
            os.unlink(os.path.join(new, name))
        except FileNotFoundError:
            return  # already claimed: it is delivered
        if durable:
            fsync_dir(new)

    def claim(self, name: str) -> Claim | None:
        """Claim ``name``: its file in ``cur/`` and the owner it is claimed
        under, or None if another claimer won (or it was never there)."""
        src = os.path.join(self.layout.dirs["new"], name)
        with self.owners.mutex:
            owner = self.owners.take()
            claimed = claimed_name(name, owner.id)
            try:
                os.rename(src, os.path.join(self.layout.dirs["cur"], claimed))
            except FileNotFoundError:
                if os.path.lexists(src):
                    # Not a lost race: cur/ itself is gone.  Returning False
                    # would make a consumer skip every message, silently.
                    cur = self.layout.dirs["cur"]
                    raise FileNotFoundError(
                        errno.ENOENT, "the store has no cur/ directory; run prepare()", cur
                    ) from None
                return None
            return claimed, owner

    def unclaim(self, name: str, got: Claim | None) -> None:
        if got is not None:  # won, but the cancelled caller will never know
            give_back(self.layout, got[0], name)

    def claim_next(self, watcher: Watcher, backlog: Backlog, rescan: bool) -> Claimed | None:
        """Claim the oldest message ``backlog`` and ``watcher`` know of, or None."""
        new = self.layout.dirs["new"]
        # The inotify fd is read here too, not on the loop.
        arrived, overflow = watcher.drain()
        if rescan or overflow:
            backlog.rescan(new)
        else:
            backlog.add(new, arrived)
        while (name := backlog.pop()) is not None:
            got = self.claim(name)
            if got is not None:
                return name, *got
        return None

    def unclaim_next(self, got: Claimed | None) -> None:
        if got is not None:
            give_back(self.layout, got[1], got[0])

    def adopt(self, name: str, claimed: str, owner: Owner) -> Message:
        message = Message(self, name, os.path.join(self.layout.dirs["cur"], claimed), owner)
        self.held[name] = message
        return message

    def recover(self) -> _Names:
        return recover(self.layout, self.owners.id)

    def status(self, now: float) -> QueueStatus:
        dirs = self.layout.dirs
        counts: dict[str, int] = {area: len(visible_names(dirs[area])) for area in AREAS}
        oldest = None
        new = dirs["new"]
        keys = [k for k in (order_key(n, os.path.join(new, n)) for n in visible_names(new)) if k]
        if keys:
            sec, usec, _, _ = min(keys)
            oldest = max(0.0, now - (sec + usec / 1_000_000))
        live, dead, unknown = survey(self.layout, self.owners.id)
        return QueueStatus(
            path=Path(self.layout.root),
            counts=counts,
            oldest_age=oldest,
            live_claims=live,
            dead_claims=dead,
            unknown_claims=unknown,
        )

    def close(self, held: dict[str, Message], closed: list[Owner]) -> None:
        """Give back ``held`` and release the consumer lock; the owner let go goes
        into ``closed`` (a cancelled caller still learns it there)."""
        with self.owners.mutex:
            owner = self.owners.current
            if owner is None:
                return
            left = 0
            for name, message in held.items():
                if message._owner is not owner or message._state != "held":
                    continue  # a done()/release() in flight settles it
                try:
                    give_back(self.layout, message._claimed, name)
                except FileNotFoundError:
                    pass  # settled meanwhile
                except FileExistsError:
                    left += 1
            self.owners.let_go(owner, unlink=not left)
            closed.append(owner)

    @staticmethod
    def closed(held: dict[str, Message], closed: list[Owner]) -> None:
        """Tell the messages `close` gave back that they are no longer held (on the loop)."""
        for owner in closed:
            for message in held.values():
                if message._owner is owner and message._state == "held":
                    message._settled("closed")


class Message:
    """A message claimed by a `FileStore`, yielded by `FileStore.consume`.

    Read it with `read`, then settle it once: `done` removes it, `release`
    gives it back to ``new/`` for another consumer.  As an async context
    manager it calls `done` when the block succeeds and `release` when it
    raises.

    Its `state` always tells what happened to the file, even after a
    cancelled `done` or `release`, and a `Message` only ever acts on its own
    claim: once settled (or given back by `FileStore.aclose`, or inherited by
    a forked child) it cannot touch a later claim of the same name.

    Example:
        ```python
        async for message in store.consume():
            async with message:
                await process(await message.read())
        ```
    """

    __slots__ = ("_claimed", "_owner", "_path", "_queue", "_state", "name")

    def __init__(self, queue: QueueCore, name: str, path: str, owner: Owner) -> None:
        self._queue = queue
        #: The message's name in ``new/`` (without the owner suffix).
        self.name = name
        self._path = path
        self._claimed = os.path.basename(path)
        self._owner = owner
        self._state: MessageState = "held"

    def __repr__(self) -> str:
        return f"<Message {self.name!r} {self._state}>"

    @property
    def path(self) -> Path:
        """The claimed file, ``cur/<name>~<owner>``.

        Example:
            ```python
            size = (await anyio.Path(message.path).stat()).st_size
            ```
        """
        return Path(self._path)

    @property
    def state(self) -> MessageState:
        """``"held"``; ``"settling"`` while a `done` or `release` runs; then
        ``"done"``, ``"released"``, ``"closed"`` (given back by
        `FileStore.aclose`) or ``"forked"`` (claimed by the parent of this
        forked process, which alone can settle it).

        Example:
            ```python
            await message.done()
            assert message.state == "done"
            ```
        """
        return self._state

    def _check_held(self, action: _Action) -> bool:
        state = self._state
        if state == "held":
            return True
        if (state, action) in (("done", "done"), ("released", "release")):
            return False  # a second done() / release() does nothing
        why = {
            "settling": "being settled by another done() or release() call",
            "done": "done",
            "released": "released",
            "closed": "given back by aclose()",
            "forked": (
                f"claimed by process {self._owner.pid}, the parent of this forked process;"
                " only that process can settle it"
            ),
        }[state]
        raise RuntimeError(f"cannot {action}() message {self.name!r}: it was already {why}")

    async def read(self) -> bytes:
        """The message's bytes.

        Example:
            ```python
            payload = json.loads(await message.read())
            ```
        """
        return await run_sync(read_file, self._path, abandon_on_cancel=True)

    async def _settle(self, action: _Action, func: Callable[[], None]) -> None:
        if not self._check_held(action):
            return
        self._state = "settling"
        ran = False

        def hop() -> None:
            nonlocal ran
            func()
            ran = True

        try:
            await run_sync(hop)
        finally:
            # Whether or not the caller was cancelled: the hop either ran to
            # its end or never started, and the state says which.
            if ran:
                self._settled("done" if action == "done" else "released")
            elif self._owner is self._queue.owners.current:
                self._state = "held"  # never ran, or failed: still ours
            else:
                self._settled("closed")  # failed because aclose() gave it back

    async def done(self) -> None:
        """Remove the message: it was handled.  A second call does nothing.

        Example:
            ```python
            await handle(await message.read())
            await message.done()
            ```
        """
        await self._settle("done", lambda: os.unlink(self._path))

    async def release(self) -> None:
        """Give the message back to ``new/`` for any consumer.  A second call does nothing.

        Example:
            ```python
            if not ready_for(message):
                await message.release()
            ```
        """
        queue = self._queue
        await self._settle("release", lambda: give_back(queue.layout, self._claimed, self.name))

    def _settled(self, state: MessageState) -> None:
        self._state = state
        if self._queue.held.get(self.name) is self:
            del self._queue.held[self.name]

    async def __aenter__(self) -> Message:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "held":
            return
        if exc_type is None:
            await self.done()
        else:
            await self.release()
