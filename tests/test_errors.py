"""The exception hierarchy: one root, the builtins users catch, and pickling."""

from __future__ import annotations

import pickle

import portalocker
import pytest

from atempstore import (
    AlreadyLocked,
    AtempstoreError,
    InvalidNameError,
    LockedStorageError,
    LockException,
    LockTimeout,
    NoUsableDirectoryError,
    PathOutsideStoreError,
    SourceChangedError,
    UnsafeDirectoryError,
)

EXPECTED_BASES: list[tuple[type[AtempstoreError], tuple[type[BaseException], ...]]] = [
    (LockException, (portalocker.LockException,)),
    (AlreadyLocked, (LockException, portalocker.AlreadyLocked)),
    (LockTimeout, (AlreadyLocked, portalocker.AlreadyLocked, TimeoutError)),
    (LockedStorageError, (OSError,)),
    (PathOutsideStoreError, (ValueError,)),
    (InvalidNameError, (ValueError,)),
    (UnsafeDirectoryError, (PermissionError, OSError)),
    (NoUsableDirectoryError, (OSError,)),
    (SourceChangedError, (OSError,)),
]


@pytest.mark.parametrize(("cls", "bases"), EXPECTED_BASES)
def test_each_error_is_also_the_builtin_users_catch(
    cls: type[AtempstoreError], bases: tuple[type[BaseException], ...]
) -> None:
    assert issubclass(cls, AtempstoreError)
    for base in bases:
        assert issubclass(cls, base), (cls, base)


@pytest.mark.parametrize(
    "error",
    [
        LockTimeout("timed out on /x", path="/x", timeout=2.5),
        AlreadyLocked("held: /x", path="/x"),
        LockedStorageError("busy: /s", path="/s"),
        PathOutsideStoreError("outside: /etc", path="/etc"),
        InvalidNameError("bad name '../x'", name="../x"),
        UnsafeDirectoryError("unsafe: /u", path="/u"),
        NoUsableDirectoryError("none works", failures={"/a": "read-only"}),
        SourceChangedError("changed: /src", path="/src"),
    ],
)
def test_errors_pickle_with_their_context(error: AtempstoreError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.path == error.path
    for attribute in ("timeout", "name", "failures"):
        if hasattr(error, attribute):
            assert getattr(copy, attribute) == getattr(error, attribute)


def test_context_is_read_only() -> None:
    error = LockTimeout("t", path="/x", timeout=1.0)
    with pytest.raises(AttributeError):
        error.timeout = 2.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        error.path = "/y"  # type: ignore[misc]


@pytest.mark.parametrize(
    "error",
    [
        LockedStorageError("a save is in progress", path="/s/session.next"),
        UnsafeDirectoryError("belongs to another user", path="/u"),
        SourceChangedError("changed while it was read", path="/src"),
        NoUsableDirectoryError("none works", failures={"/a": "read-only", "/b": "ENOLCK"}),
    ],
)
def test_os_errors_carry_filename_and_name_it(error: OSError) -> None:
    # As the builtin errors do: `exc.filename` is the path, and the message
    # names it even when the raiser's text did not.
    assert isinstance(error, AtempstoreError)
    assert error.filename == error.path
    assert error.filename is not None
    assert error.filename in str(error)
    assert not str(error).startswith("[Errno")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.filename == error.filename
    assert str(copy) == str(error)
