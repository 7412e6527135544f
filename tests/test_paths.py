"""Name checks, confinement and never-following removal; durable publication helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atempstore import InvalidNameError, PathOutsideStoreError
from atempstore._durable import makedirs, publish_link, temp_name, write_new_file
from atempstore._paths import check_name, confine, open_beneath, remove_at


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "/abs", "nul\0byte", ".hidden", 3])
def test_check_name_refuses_what_is_not_one_plain_name(bad: object) -> None:
    with pytest.raises(InvalidNameError) as refused:
        check_name(bad)
    assert refused.value.name == bad
    assert repr(bad) in str(refused.value)


def test_check_name_accepts_maildir_info_and_hidden_on_request() -> None:
    assert check_name("1700000000.M1P2.host:2,S") == "1700000000.M1P2.host:2,S"
    assert check_name(".lock", allow_hidden=True) == ".lock"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (root / "a" / "out").symlink_to(outside)
    (root / "a" / "in").symlink_to(root / "a")
    return root, outside


def test_confine_resolves_parents_physically(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    assert confine(root, "a/x").path == root.resolve() / "a" / "x"
    assert confine(root, root / "a" / "x").parents == ("a",)
    assert confine(root, "a/in/x").parents == ("a",)  # a link inside, to inside
    # The last component is not followed: the link itself is named.
    assert confine(root, "a/out").name == "out"
    for escape in ("a/out/precious", "a/out/..", "../outside/precious", str(outside), ".", "a/.."):
        with pytest.raises(PathOutsideStoreError):
            confine(root, escape)


def test_open_beneath_refuses_a_symlinked_component(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    fd = open_beneath(str(root.resolve()), ("a",))
    os.close(fd)
    # ELOOP or ENOTDIR: a link swapped in is not followed
    with pytest.raises(OSError, match=r"symbolic links|Not a directory"):
        open_beneath(str(root.resolve()), ("a", "out"))


def test_remove_at_never_follows_links(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    fd = open_beneath(str(root.resolve()), ())
    try:
        remove_at(fd, "a")  # a directory holding links out and in
    finally:
        os.close(fd)
    assert not (root / "a").exists()
    assert (outside / "precious").read_text() == "keep me"


def test_write_new_file_is_exclusive_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "new"
    write_new_file(target, b"data")
    assert target.read_bytes() == b"data"
    assert os.stat(target).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_new_file(target, b"other")
    assert target.read_bytes() == b"data"

    broken = tmp_path / "broken"
    with pytest.raises(TypeError):
        write_new_file(broken, object())  # type: ignore[arg-type]  # fails after the create
    assert not broken.exists()


def test_publish_link_never_replaces_and_always_removes_the_temp(tmp_path: Path) -> None:
    tmp, final = tmp_path / ".tmp", tmp_path / "final"
    tmp.write_bytes(b"first")
    publish_link(tmp, final)
    assert final.read_bytes() == b"first"
    assert not tmp.exists()
    tmp.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        publish_link(tmp, final)
    assert final.read_bytes() == b"first"
    assert not tmp.exists()


@pytest.mark.parametrize("length", [1, 200, 245, 255])
def test_temp_names_stay_valid_for_any_valid_target_name(tmp_path: Path, length: int) -> None:
    # NAME_MAX is 255 bytes: a target name that is valid must get a valid
    # temporary name beside it (it once grew by 18 bytes: ENAMETOOLONG).
    target = str(tmp_path / ("é" * (length // 2) + "x" * (length % 2)))
    tmp = temp_name(target)
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(".")
    assert len(os.fsencode(os.path.basename(tmp))) <= 255
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    assert temp_name(target) != temp_name(target)


def test_makedirs_gives_every_level_it_creates_the_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        (tmp_path / "there").mkdir(mode=0o755)
        assert makedirs(str(tmp_path / "there" / "a" / "b" / "c"))
        assert not makedirs(str(tmp_path / "there" / "a" / "b" / "c"))  # exists: fine
    finally:
        os.umask(old)
    assert (tmp_path / "there").stat().st_mode & 0o777 == 0o755  # not ours: untouched
    for level in ("a", "a/b", "a/b/c"):
        assert (tmp_path / "there" / level).stat().st_mode & 0o777 == 0o700, level
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError):
        makedirs(str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError):
        makedirs(str(tmp_path / "file" / "below"))
