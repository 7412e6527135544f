"""The public surface: every name exported, documented, and nothing private leaking."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import atempstore

from .conftest import require_tool, run_python


def test_all_names_exist_and_are_sorted_once() -> None:
    assert isinstance(atempstore.__all__, tuple)
    assert len(set(atempstore.__all__)) == len(atempstore.__all__)
    for name in atempstore.__all__:
        assert hasattr(atempstore, name), name


def test_every_public_module_declares_all_and_exports_only_real_names() -> None:
    for module_info in pkgutil.walk_packages(atempstore.__path__, "atempstore."):
        module = importlib.import_module(module_info.name)
        declared = getattr(module, "__all__", None)
        assert declared is not None, f"{module_info.name} has no __all__"
        for name in declared:
            assert hasattr(module, name), f"{module_info.name}.__all__ names missing {name}"


def test_every_public_name_is_documented_with_an_example() -> None:
    for name in atempstore.__all__:
        if name.startswith(("__", "LOCK_")):
            continue
        obj = getattr(atempstore, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{name} has no docstring"
        assert "Example" in doc or "```" in doc, f"{name}'s docstring has no example"


def test_top_level_names_come_from_private_modules() -> None:
    for name in atempstore.__all__:
        obj = getattr(atempstore, name)
        module = getattr(obj, "__module__", "atempstore")
        if module and module.startswith("atempstore."):
            assert module.split(".")[1].startswith("_"), f"{name} lives in {module}"


def test_version_comes_from_package_metadata() -> None:
    assert atempstore.__version__ != "0.0.0"


FIRST_USE = """
import asyncio, os, sys, threading
import atempstore
from atempstore import FileCache, FileStore, Lock, SessionStorage, TempFileManager, open_atomic

on_loop: list[str] = []
watching = False

def hook(event: str, args: tuple) -> None:
    # "import" fires when a module is actually found and loaded.
    if event == "import" and watching and threading.current_thread() is threading.main_thread():
        on_loop.append(args[0])

sys.addaudithook(hook)

async def main(base: str) -> None:
    global watching
    watching = True
    async with Lock(os.path.join(base, "lock"), timeout=5) as fh:
        await fh.write("x")
    async with open_atomic(os.path.join(base, "atomic"), binary=True) as out:
        await out.write(b"x")
    async with TempFileManager(prefix="first-use") as temp:
        await temp.remove_path(await temp.create_path())
    storage = await SessionStorage.create(os.path.join(base, "sessions"))
    await storage.save_checkpoint(b"x")
    await storage.load_checkpoint()
    async with FileStore(os.path.join(base, "store")) as store:
        await store.prepare()
        await store.deliver(b"x")
        messages = store.consume()
        message = await anext(messages)
        await message.read()
        await message.done()
        await messages.aclose()
    source = os.path.join(base, "source")
    with open(source, "wb") as file:
        file.write(b"x" * 100_000)
    async with FileCache(os.path.join(base, "cache"), max_size=10**7) as cache:
        async with cache.open(source) as reader:
            assert await reader.read(0, 10) == b"x" * 10
    watching = False

print(os.getpid(), flush=True)
asyncio.run(main(sys.argv[1]))
print(" ".join(sorted(set(on_loop))) or "none")
"""


def test_first_use_imports_nothing_on_the_event_loop(tmp_path: Path) -> None:
    # An import is blocking I/O (stat, read, and module code holding the GIL):
    # a library that imports lazily on the loop stalls it the first time each
    # component is used (anyio's backend module alone took 15-20 ms here).
    # A fresh interpreter, so that nothing was imported by earlier tests.
    result = run_python(FIRST_USE, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1:] == ["none"], result.stdout


@pytest.mark.faults
def test_inotify_fds_are_closed_off_the_event_loop(tmp_path: Path) -> None:
    # Closing an inotify fd waits for an RCU grace period in the kernel
    # (milliseconds): consume() and FileCache must do it in a worker thread.
    # The first-use script above uses both.
    require_tool("strace")
    log = tmp_path / "strace.log"
    done = subprocess.run(
        [
            *("strace", "-f", "-qq", "-e", "signal=none", "-o", str(log)),
            *("-e", "trace=inotify_init1,close"),
            *(sys.executable, "-c", FIRST_USE, str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    main_thread = done.stdout.split()[0]
    open_fds: dict[str, str] = {}  # inotify fd -> thread that opened it
    closes = []
    for line in log.read_text().splitlines():
        thread, call = line.split(maxsplit=1)
        if opened := re.match(r"inotify_init1\(.*\) += (\d+)$", call):
            open_fds[opened.group(1)] = thread
        elif (closed := re.match(r"close\((\d+)\) += 0$", call)) and closed.group(1) in open_fds:
            del open_fds[closed.group(1)]
            closes.append(thread)
    assert len(closes) >= 2, log.read_text()  # the consumer's and the cache's
    assert main_thread not in closes
