"""`open_atomic`'s owner and mode handling where chown is not permitted, its
errors while creating the temp file, and ``durable=False``
(`atempstore._atomic`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atempstore import open_atomic
from tests.conftest import REPO, require_tool, run_traced

_OVERWRITE = """
    import asyncio, os, sys
    from atempstore import open_atomic
    async def main():
        async with open_atomic(sys.argv[1], overwrite=True) as fh:
            await fh.write(b"new")
    asyncio.run(main())
    st = os.stat(sys.argv[1])
    print(st.st_uid, st.st_gid, oct(st.st_mode & 0o7777), open(sys.argv[1], "rb").read())
"""


def _without_chown(code: str, *args: str, groups: str | None = None) -> str:
    """Run ``code`` as root without CAP_CHOWN (and in ``groups``); its output."""
    setpriv = require_tool("setpriv")
    command = [setpriv, "--bounding-set=-chown"]
    if groups is not None:
        command.append(f"--groups={groups}")
    command += [sys.executable, "-c", textwrap.dedent(code), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(
        command, env=env, text=True, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _foreign_target(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the target another owner")
    target = tmp_path / "target"
    target.write_bytes(b"old")
    os.chown(target, 12345, 12345)
    target.chmod(0o6750)
    return target


def test_overwrite_without_chown_drops_set_id_bits(tmp_path: Path) -> None:
    # Not allowed to give the new file the target's owner: the file is ours,
    # so it must not keep set-user/group-id bits (a setuid file of ours that
    # someone else's program trusted), but keeps the rest of the mode.
    target = _foreign_target(tmp_path)
    assert _without_chown(_OVERWRITE, str(target)) == "0 0 0o750 b'new'"
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_without_chown_keeps_a_group_we_belong_to(tmp_path: Path) -> None:
    target = _foreign_target(tmp_path)
    assert _without_chown(_OVERWRITE, str(target), groups="12345") == "0 12345 0o750 b'new'"


def test_an_error_copying_the_owner_leaves_no_temp_file(tmp_path: Path) -> None:
    # fchown fails with EIO (not "not permitted"): open_atomic raises it and
    # neither the target nor the directory is changed.
    target = _foreign_target(tmp_path)
    code = """
        import asyncio, sys
        from atempstore import open_atomic
        async def main():
            try:
                async with open_atomic(sys.argv[1], overwrite=True) as fh:
                    await fh.write(b"new")
            except OSError as exc:
                print("error", exc.errno)
        asyncio.run(main())
    """
    result = run_traced(code, ["fchown:error=EIO"], str(target))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "error 5"
    assert sorted(os.listdir(tmp_path)) == ["target"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 2), (False, 0)])
async def test_durable_false_publishes_without_fsync(
    tmp_path: Path, fsync_calls: list[int], durable: bool, fsyncs: int
) -> None:
    calls = fsync_calls
    target = tmp_path / "f"
    async with open_atomic(target, durable=durable) as fh:
        await fh.write(b"data")
    assert target.read_bytes() == b"data"
    assert len(calls) == fsyncs  # the file, then its directory
    assert os.listdir(tmp_path) == ["f"]
