"""Recovery's edge cases and the consumer lock's failures, on the blocking core
(`atempstore._filestore._owners`) with a real store layout in tmp_path."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from atempstore._filestore import _owners
from atempstore._filestore._names import Layout, claimed_name
from tests.conftest import lock_is_held, mounted_tmpfs, open_fds

DEAD = "0123456789abcdef"


def _layout(root: Path) -> Layout:
    for area in ("tmp", "new", "cur", ".consumers"):
        (root / area).mkdir(parents=True)
    return Layout(str(root))


def _dead_owner(layout: Layout, *names: str) -> None:
    """A consumer that claimed ``names`` and died: its lock file, unlocked."""
    Path(layout.lock_path(DEAD)).write_text("1 host\n")
    for name in names:
        Path(layout.dirs["cur"], claimed_name(name, DEAD)).write_text(name)


def test_a_claim_whose_name_is_back_in_new_stays_and_so_does_its_lock_file(
    tmp_path: Path,
) -> None:
    # new/<name> exists (redelivered meanwhile): giving back would replace
    # it, so the claimed copy stays in cur/ and the dead owner's lock file
    # stays, so that the claim is still known as a dead owner's.
    layout = _layout(tmp_path)
    _dead_owner(layout, "a", "b")
    Path(layout.dirs["new"], "a").write_text("redelivered")
    assert _owners.recover(layout, None) == ["b"]
    assert Path(layout.dirs["new"], "a").read_text() == "redelivered"
    assert Path(layout.dirs["new"], "b").read_text() == "b"
    assert os.listdir(layout.dirs["cur"]) == [claimed_name("a", DEAD)]
    assert os.path.exists(layout.lock_path(DEAD))
    assert not lock_is_held(layout.lock_path(DEAD))


def test_a_claim_taken_by_a_faster_recover_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _layout(tmp_path)
    _dead_owner(layout, "a")
    real = _owners.give_back

    def raced(layout_: Layout, claimed: str, name: str) -> None:
        # Another recover() moved it between our listing and our rename.
        os.rename(os.path.join(layout_.dirs["cur"], claimed), os.path.join(tmp_path, "elsewhere"))
        real(layout_, claimed, name)

    monkeypatch.setattr(_owners, "give_back", raced)
    assert _owners.recover(layout, None) == []  # not ours to report
    assert not os.path.exists(layout.lock_path(DEAD))  # nothing left of that owner


def _leftovers(layout: Layout) -> tuple[Path, Path]:
    # A crash between creating <owner>.lock.tmp and renaming it leaves it;
    # once it is old nobody can be about to rename it.
    stale = Path(layout.consumers, "aaaaaaaaaaaaaaaa.lock.tmp")
    fresh = Path(layout.consumers, "bbbbbbbbbbbbbbbb.lock.tmp")
    for path in (stale, fresh):
        path.write_text("")
    old = time.time() - 2 * _owners._STALE_LOCK_TMP
    os.utime(stale, (old, old))
    return stale, fresh


def test_stale_temporary_lock_files_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    stale, fresh = _leftovers(layout)
    _dead_owner(layout, "a")
    assert _owners.recover(layout, None) == ["a"]
    assert not stale.exists()
    assert fresh.exists()


@pytest.mark.xfail(
    strict=True,
    reason="defect: recover() returns early when no consumer is dead (`if not dead: return`)"
    " and never reaches the removal of stale <owner>.lock.tmp files; a consumer that"
    " crashed before its rename had no claims, so its leftover stays until some other"
    " consumer happens to die",
)
def test_stale_temporary_lock_files_are_removed_when_nobody_is_dead(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    stale, fresh = _leftovers(layout)
    assert _owners.recover(layout, None) == []
    assert not stale.exists()
    assert fresh.exists()


def test_recover_without_a_consumers_directory_and_with_foreign_files(tmp_path: Path) -> None:
    # A store prepared by an older version has no .consumers/, and cur/ may
    # hold a file that is no claim: neither is an error, neither is touched.
    layout = _layout(tmp_path)
    os.rmdir(layout.consumers)
    Path(layout.dirs["cur"], "not-a-claim").write_text("")
    assert _owners.recover(layout, None) == []
    assert os.listdir(layout.dirs["cur"]) == ["not-a-claim"]


def test_a_lock_error_while_probing_is_raised_and_closes_the_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ENOLCK (NFS without locks) is no answer to "is it alive?": recover
    # raises it rather than guess, and closes what it opened.
    layout = _layout(tmp_path)
    _dead_owner(layout, "a")

    def enolck(fd: int) -> bool:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(_owners, "try_lock_exclusive", enolck)
    before = open_fds()
    with pytest.raises(OSError, match="No locks available"):
        _owners.recover(layout, None)
    assert open_fds() == before
    assert os.listdir(layout.dirs["cur"]) == [claimed_name("a", DEAD)]


def test_taking_the_consumer_lock_on_a_full_disk_leaves_nothing(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=4k") as small:
        layout = _layout(small)
        filler = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(filler, b"x" * 4096)
        finally:
            os.close(filler)
        owners = _owners.Owners(layout)
        before = open_fds()
        with pytest.raises(OSError, match="No space left"):
            owners.take()
        assert owners.current is None
        assert os.listdir(layout.consumers) == []
        assert open_fds() == before


def test_forget_inherited_without_an_owner_only_renews_the_mutex(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    owners = _owners.Owners(layout)
    owners.mutex.acquire()  # as if another thread held it at fork()
    owners.forget_inherited()
    assert owners.mutex.acquire(blocking=False)
    assert owners.current is None
