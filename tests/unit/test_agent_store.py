"""SeqStore: durable, atomic, never lowered, and fail-closed on corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from firmware_agent import SeqStore, StoreError
from firmware_agent.store import FILENAME


def test_absent_is_zero_and_save_load_round_trip(tmp_path: Path) -> None:
    store = SeqStore(tmp_path / "state")
    assert store.load() == 0
    store.save(7)
    store.save(42)
    assert SeqStore(tmp_path / "state").load() == 42
    assert json.loads((tmp_path / "state" / FILENAME).read_text()) == {"v": 1, "seq": 42}


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    store = SeqStore(tmp_path / "a" / "b")
    store.save(1)
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700


def test_never_lowered(tmp_path: Path) -> None:
    store = SeqStore(tmp_path)
    store.save(10)
    with pytest.raises(StoreError, match="refusing to lower"):
        store.save(9)
    assert SeqStore(tmp_path).load() == 10


def test_a_fresh_store_refuses_to_lower_after_load(tmp_path: Path) -> None:
    SeqStore(tmp_path).save(10)
    store = SeqStore(tmp_path)
    store.load()
    with pytest.raises(StoreError):
        store.save(3)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{garbage",
        b"\xff\xfe\x00\x01",
        b"[]",
        b'{"v": 1}',
        b'{"v": 2, "seq": 5}',
        b'{"v": 1, "seq": "5"}',
        b'{"v": 1, "seq": -1}',
        b'{"v": 1, "seq": true}',
        b'{"v": 1, "seq": 1.5}',
        b'{"v": 1, "seq": 99999999999999999999}',
        b"x" * 10_000,
    ],
)
def test_corrupt_file_fails_closed(tmp_path: Path, content: bytes) -> None:
    """A corrupt counter is never read as 0: that would re-open every old token."""
    (tmp_path / FILENAME).write_bytes(content)
    with pytest.raises(StoreError) as info:
        SeqStore(tmp_path).load()
    assert info.value.path == tmp_path / FILENAME
    assert "corrupt" in info.value.why or "too large" in info.value.why


def test_unreadable_file_fails_closed(tmp_path: Path) -> None:
    (tmp_path / FILENAME).mkdir()  # a directory where the file should be
    with pytest.raises(StoreError, match="cannot read"):
        SeqStore(tmp_path).load()


def test_replace_is_atomic_and_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write temp in the same dir, fsync it, rename over, fsync the directory."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(self: Path, target: Path) -> Path:
        assert self.parent == tmp_path, "the temporary file must be in the same directory"
        calls.append(("replace", self.name))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    SeqStore(tmp_path).save(5)
    kinds = [c[0] if c[0] == "replace" else f"fsync-{c[1]}" for c in calls]
    assert kinds == ["fsync-file", "replace", "fsync-dir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_failed_write_keeps_the_old_value_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SeqStore(tmp_path)
    store.save(5)

    def broken(self: Path, target: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", broken)
    with pytest.raises(StoreError, match="No space left"):
        store.save(6)
    monkeypatch.undo()
    assert SeqStore(tmp_path).load() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".seq.abc.tmp").write_text("half")
    store = SeqStore(tmp_path)
    store.remove_stale_temporaries()
    assert not (tmp_path / ".seq.abc.tmp").exists()
    assert store.load() == 0


def test_boot_id_is_stable_per_start(tmp_path: Path) -> None:
    a, b = SeqStore(tmp_path), SeqStore(tmp_path)
    assert a.boot_id == a.boot_id
    assert a.boot_id != b.boot_id
    assert len(a.boot_id) == 16
