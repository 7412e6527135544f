"""A short tour of atempstore: run it as it is (``python examples/demo.py``).

Two tasks contend for one inter-process lock, a result is published with
``open_atomic``, and the timings show the event-driven lock handoff.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from atempstore import Lock, LockTimeout, open_atomic


async def worker(name: str, lock_path: Path, log: list[str]) -> None:
    async with Lock(lock_path, timeout=5) as fh:
        log.append(f"{name} holds the lock")
        await fh.write(f"{name}\n")
        await asyncio.sleep(0.05)


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="atempstore-demo-") as tmp:
        root = Path(tmp)
        lock_path = root / "job.lock"
        log: list[str] = []
        await asyncio.gather(*(worker(f"task-{i}", lock_path, log) for i in range(3)))
        print("\n".join(log))

        holder = Lock(lock_path)
        await holder.acquire()
        try:
            await Lock(lock_path, timeout=0.1).acquire()
        except LockTimeout as exc:
            print("as expected:", exc)

        async def waiter() -> float:
            async with Lock(lock_path, timeout=5):
                return time.perf_counter()

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)
        released = time.perf_counter()
        await holder.release()
        print(f"handoff to a waiting task took {(await task - released) * 1e6:.0f} µs")

        result = root / "result.json"
        async with open_atomic(result, binary=False) as out:
            await out.write('{"ok": true}\n')
        print("published", result.name, "->", result.read_text().strip())


if __name__ == "__main__":
    asyncio.run(main())
