"""The durable primitives' fallbacks and error paths (`atempstore._durable`).

These are blocking helpers, tested directly: the kernel's answers that a
normal run never gives (no ``renameat2``, a full disk, a racing ``mkdir``)
come from ``strace -e inject=...`` in a child process or a small tmpfs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atempstore import _durable
from tests.conftest import mounted_tmpfs, run_traced

_RENAME = """
    import os, sys
    from atempstore._durable import rename_noreplace
    d = sys.argv[1]
    src, dst, other = (os.path.join(d, n) for n in ("src", "dst", "other"))
    open(src, "w").write("message")
    rename_noreplace(src, dst)
    print("moved", os.path.exists(src), open(dst).read())
    open(other, "w").write("other")
    try:
        rename_noreplace(other, dst)
    except FileExistsError:
        print("refused", open(dst).read(), open(other).read())
"""


@pytest.mark.parametrize("error", ["ENOSYS", "EINVAL"])
def test_rename_noreplace_falls_back_to_link_and_unlink(tmp_path: Path, error: str) -> None:
    # A kernel or filesystem without renameat2(RENAME_NOREPLACE) answers
    # ENOSYS or EINVAL: the link+unlink route must keep the same guarantee,
    # moving the file and never replacing an existing target.
    result = run_traced(_RENAME, [f"renameat2:error={error}"], str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["moved False message", "refused message other"]


def test_rename_noreplace_fallback_takes_its_link_back_when_the_source_was_taken(
    tmp_path: Path,
) -> None:
    # Another process moved src away between our link and our unlink (the
    # unlink says ENOENT): it won, so our copy under dst must go, or the
    # message would be delivered from two places.
    code = """
        import os, sys
        from atempstore._durable import rename_noreplace
        d = sys.argv[1]
        src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
        open(src, "w").write("message")
        try:
            rename_noreplace(src, dst)
        except FileNotFoundError:
            print("lost", os.path.exists(dst))
    """
    result = run_traced(
        code, ["renameat2:error=ENOSYS", "unlink:error=ENOENT:when=1"], str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lost False"
    assert (tmp_path / "src").read_text() == "message"  # the injected unlink never happened


def test_rename_noreplace_reports_other_errors_with_both_paths(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "missing"), str(tmp_path / "dst")
    with pytest.raises(FileNotFoundError) as caught:
        _durable.rename_noreplace(src, dst)
    assert (caught.value.filename, caught.value.filename2) == (src, dst)


def test_makedirs_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("")
    with pytest.raises(FileExistsError):
        _durable.makedirs(str(tmp_path / "a"))


def test_makedirs_creates_every_level_with_the_mode(tmp_path: Path) -> None:
    leaf = tmp_path / "a" / "b" / "c"
    assert _durable.makedirs(str(leaf), 0o700) is True
    for level in (tmp_path / "a", tmp_path / "a" / "b", leaf):
        assert level.stat().st_mode & 0o777 == 0o700
    assert _durable.makedirs(str(leaf)) is False


def test_makedirs_loses_a_race_quietly(tmp_path: Path) -> None:
    # makedirs(a/b) with a missing: mkdir(a/b) ENOENT, mkdir(a), mkdir(a/b).
    # If another process created a/b just before the last one (EEXIST), the
    # directory is there as asked: no error, and not "created by us".
    # strace counts per thread: a fresh thread's third mkdir is makedirs's
    # last, whatever the interpreter (or coverage) did before on the main one.
    code = """
        import os, sys, threading
        from atempstore._durable import makedirs
        result = []
        thread = threading.Thread(
            target=lambda: result.append(makedirs(os.path.join(sys.argv[1], "a", "b")))
        )
        thread.start()
        thread.join()
        print(result)
    """
    result = run_traced(code, ["mkdir:error=EEXIST:when=3"], str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[False]"
    assert (tmp_path / "a").is_dir()


@pytest.mark.parametrize("durable", [True, False])
def test_write_new_file_on_a_full_disk_leaves_nothing(tmp_path: Path, durable: bool) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        target = small / "data"
        with pytest.raises(OSError, match="No space left") as caught:
            _durable.write_new_file(target, b"x" * (1 << 20), durable=durable)
        assert caught.value.errno == 28  # ENOSPC, not a clean-up's error
        assert os.listdir(small) == []


def test_write_new_file_error_survives_a_failing_cleanup(tmp_path: Path) -> None:
    # The write fails (ENOSPC) and the clean-up's unlink fails too (EIO): the
    # caller must still see ENOSPC, the error that explains what happened.
    code = """
        import sys
        from atempstore._durable import write_new_file
        try:
            write_new_file(sys.argv[1] + "/f", b"data")
        except OSError as exc:
            print(exc.errno)
    """
    result = run_traced(code, ["write:error=ENOSPC:when=1", "unlink:error=EIO"], str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "28"


def test_publish_new_file_on_a_disk_without_inodes_raises_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # O_TMPFILE failing for a reason other than "unsupported" (ENOSPC: no
    # inode left) is a real error: raised, not hidden by the staging route.
    with mounted_tmpfs(tmp_path / "small", "nr_inodes=1") as small:
        with pytest.raises(OSError, match="No space left") as caught:
            _durable.publish_new_file(small, "msg", b"data", staging=small / ".staging")
        assert caught.value.errno == 28
        assert os.listdir(small) == []


def test_publish_new_file_falls_back_to_staging_without_o_tmpfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A system without O_TMPFILE (not Linux, or an old kernel) publishes
    # through the staging name, with the same result and nothing left over.
    monkeypatch.setattr(_durable, "_O_TMPFILE", None)
    _durable.publish_new_file(tmp_path, "msg", b"data", staging=tmp_path / ".staging")
    assert os.listdir(tmp_path) == ["msg"]
    assert (tmp_path / "msg").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        _durable.publish_new_file(tmp_path, "msg", b"other", staging=tmp_path / ".staging")
    assert os.listdir(tmp_path) == ["msg"]
    assert (tmp_path / "msg").read_bytes() == b"data"


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 1), (False, 0)])
def test_write_new_file_fsyncs_only_when_durable(
    tmp_path: Path, fsync_calls: list[int], durable: bool, fsyncs: int
) -> None:
    calls = fsync_calls
    _durable.write_new_file(tmp_path / "f", b"data", durable=durable)
    assert (tmp_path / "f").read_bytes() == b"data"
    assert len(calls) == fsyncs
