"""Durable replay protection: the highest applied command sequence number.

The file is replaced atomically: write a temporary file in the same directory, flush and
fsync it, ``os.replace`` it over the old one, then fsync the directory so the rename
itself survives a power cut. A reader therefore sees either the old or the new number,
never a torn write.

A file that exists but cannot be read or parsed is a :class:`StoreError` and the agent
refuses to start. Failing closed is deliberate: treating a corrupt counter as 0 would
make every token the fleet ever signed for this device (still within its validity
time) acceptable again, so whoever can corrupt the file could replay an old ``arm`` or
``look``. A device that refuses to start stays LOCKED and shows up offline, which the
fleet answers with a physical visit; a technician then resets the state explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

from .errors import StoreError

__all__ = ["SeqStore", "new_boot_id"]

log = logging.getLogger(__name__)

FILENAME = "seq.json"
_TMP_PREFIX = ".seq."
_MAX_SEQ = 2**53
_MAX_FILE_BYTES = 4096


def new_boot_id() -> str:
    """A random id for one start of the agent, reported in ``status``."""
    return secrets.token_hex(8)


class SeqStore:
    """The persisted highest applied sequence number of one device."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILENAME
        # Stable for the lifetime of this store, i.e. of one agent start.
        self.boot_id = new_boot_id()
        self._saved: int | None = None

    def load(self) -> int:
        """The last saved sequence number; 0 if nothing was ever saved."""
        try:
            if self.path.stat().st_size > _MAX_FILE_BYTES:
                raise StoreError(self.path, "file too large")
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._saved = 0
            return 0
        except OSError as exc:
            raise StoreError(self.path, f"cannot read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreError(self.path, "corrupt: not JSON") from None
        if not isinstance(data, dict) or data.get("v") != 1:
            raise StoreError(self.path, "corrupt: unknown format")
        seq = data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SEQ:
            raise StoreError(self.path, "corrupt: seq is not an integer in range")
        self._saved = seq
        return seq

    def save(self, seq: int) -> None:
        """Durably record ``seq``; it never goes backwards."""
        if not 0 <= seq <= _MAX_SEQ:
            raise StoreError(self.path, f"seq {seq} out of range")
        if self._saved is not None and seq < self._saved:
            raise StoreError(self.path, f"refusing to lower seq {self._saved} to {seq}")
        payload = json.dumps({"v": 1, "seq": seq}).encode() + b"\n"
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=_TMP_PREFIX, suffix=".tmp")
        except OSError as exc:
            raise StoreError(self.path, f"cannot write: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            Path(tmp).replace(self.path)
            self._fsync_dir()
        except OSError as exc:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise StoreError(self.path, f"cannot write: {exc.strerror}") from None
        self._saved = seq

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files left by a crash between write and rename."""
        with contextlib.suppress(OSError):
            for stale in self.state_dir.glob(f"{_TMP_PREFIX}*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
                    log.info("removed stale temporary file %s", stale.name)

    def _fsync_dir(self) -> None:
        fd = os.open(self.state_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
