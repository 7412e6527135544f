"""`TempFileManager`'s blocking core and base selection, directly
(`atempstore._tempfiles._core`, `._base`): candidates that fail, a user
without a passwd entry, a close that waits for an operation in flight,
clean-up errors at exit."""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from atempstore import InvalidNameError
from atempstore._tempfiles import _base, _core
from atempstore._tempfiles._core import ManagerCore
from tests.conftest import REPO, lock_is_held, require_tool


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "base"
    monkeypatch.setenv(_base.ENV_TEMPDIR, str(where))
    return where


def _setpriv(code: str, *options: str, env: dict[str, str] | None = None) -> str:
    setpriv = require_tool("setpriv")
    environ = dict(os.environ if env is None else env, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(
        [setpriv, *options, sys.executable, "-c", textwrap.dedent(code)],
        env=environ,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_uid_without_passwd_entry_is_named_by_number_and_has_no_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Containers often run as an arbitrary uid: the user directory is named
    # by the number, and with HOME unset there is no home candidate (said
    # so, not tried as a literal "~").  (The uid is changed for this process's
    # lookups only: the interpreter's files are not readable by another uid.)
    uid = 48213
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.setattr(os, "getuid", lambda: uid)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv(_base.ENV_TEMPDIR, raising=False)
    assert _base.lookup_username() == "48213"
    paths, failures = _base._candidates()
    assert not any("~" in path or ".atempstore" in path for path in paths)
    assert list(failures) == ["~/.atempstore/tmp"]


def test_without_the_variable_the_home_candidate_comes_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(_base.ENV_TEMPDIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    paths, failures = _base._candidates()
    assert paths[0] == str(tmp_path / ".atempstore" / "tmp")
    assert failures == {}


def test_no_system_temp_directory_is_a_reason_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def none() -> str:
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", none)
    monkeypatch.setenv(_base.ENV_TEMPDIR, str(tmp_path))
    paths, failures = _base._candidates()
    assert str(tmp_path) in paths
    assert (
        "No usable temporary directory found (errno ENOENT)"
        in failures["the system temp directory"]
    )


def test_describe_error_of_what_is_not_an_oserror() -> None:
    assert _base.describe_error(ValueError("bad value")) == "bad value"
    assert _base.describe_error(RuntimeError()) == "RuntimeError"


def test_the_probe_without_o_tmpfile_uses_a_named_file_and_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filesystem without O_TMPFILE (EOPNOTSUPP): the probe's named file is
    # locked and removed again, whether or not the lock works.
    real_open = os.open

    def no_tmpfile(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_tmpfile)
    fd = real_open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _base._probe_lock(fd)
        assert os.listdir(tmp_path) == []

        def enolck(fd_: int, operation: int) -> None:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        monkeypatch.setattr(fcntl, "flock", enolck)
        with pytest.raises(OSError, match="No locks available"):
            _base._probe_lock(fd)
        assert os.listdir(tmp_path) == []
    finally:
        os.close(fd)


def test_a_userdir_that_cannot_be_opened_raises_its_error(tmp_path: Path) -> None:
    # EACCES on the user directory (not ELOOP/ENOTDIR, which mean "planted"):
    # the real error comes out, not an UnsafeDirectoryError.
    (tmp_path / "u").mkdir(mode=0o000)
    code = f"""
        from atempstore._tempfiles._base import open_userdir
        try:
            open_userdir({str(tmp_path)!r}, "u", create=True)
        except Exception as exc:
            print(type(exc).__name__)
    """
    assert _setpriv(code, "--bounding-set=-dac_override,-dac_read_search") == "PermissionError"


def test_a_failed_start_leaves_no_process_dir(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The process directory was created and locked, but opening it failed:
    # it is removed again and its lock let go, so nothing is left that a
    # cleaner would have to wait out.
    def refuse(name: str, *, dir_fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(_core, "open_dir_nofollow", refuse)
    core = ManagerCore("covtest")
    with pytest.raises(OSError, match="Too many open files"):
        core.ensure_started()
    userdirs = list(base.iterdir())
    assert len(userdirs) == 1
    assert list(userdirs[0].iterdir()) == []
    assert core.opened is None


def test_close_waits_for_an_operation_in_flight(base: Path) -> None:
    # A descriptor closed under a running operation could be reused for
    # another file: close() waits until the operation has left.
    core = ManagerCore("covtest")
    opened = core.enter()
    closer = threading.Thread(target=core.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()
    assert os.path.isdir(opened.dir)
    core.leave()
    closer.join(10)
    assert not closer.is_alive()
    assert not os.path.exists(opened.dir)


def test_discard_created_removes_the_entry_nobody_knows(base: Path) -> None:
    core = ManagerCore("covtest")
    path = core.create_path("p", ".s", folder=True)
    assert path.is_dir()
    core.discard_created(path)
    assert not path.exists()
    core.discard_created(path)  # already gone: nothing to do
    core.close()


def test_remove_path_refuses_a_nul_byte(base: Path) -> None:
    core = ManagerCore("covtest")
    opened = core.ensure_started()
    with pytest.raises(InvalidNameError, match="NUL byte"):
        core.remove_path(os.path.join(opened.dir, "a\0b"))
    core.close()


def test_a_cleanup_error_at_exit_is_reported_not_raised(
    base: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An exit hook that raised would hide the program's own outcome: it says
    # what it could not remove on stderr instead.  The lock is let go first,
    # so a later cleaner can finish the job.
    def fail(userdir_fd: int, name: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_core, "remove_own_dir", fail)
    core = ManagerCore("covtest")
    opened = core.ensure_started()
    core.at_exit()
    err = capsys.readouterr().err
    assert f"could not remove {opened.dir!r} at exit" in err
    assert "Permission denied" in err
    assert not lock_is_held(os.path.join(opened.dir, ".lock"))
