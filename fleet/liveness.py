"""Who was heard from, and when, kept in memory and written in batches.

A heartbeat costs a dict update, never a database round trip: at a 30 s heartbeat a
large fleet sends thousands per second, and only *changes* need to reach the database
at once (camera fault, clock trouble); last-seen times are flushed every few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tillsyn_protocol import CameraHealth, Heartbeat


@dataclass(slots=True)
class Seen:
    at: float  # fleet clock, epoch s: what is written to the database and shown
    mono: float = 0.0  # monotonic s: silence is elapsed time, whatever the wall clock does
    heartbeat: Heartbeat | None = None
    skew_s: float | None = None


@dataclass(slots=True)
class Liveness:
    """Last contact per device; a device counts as silent after ``threshold_s``."""

    threshold_s: float
    # Injected for tests; steps of the fleet's wall clock never make a device look silent
    # (or alive): a last-seen time written just before a step stays comparable after it.
    mono: Callable[[], float] = time.monotonic
    _seen: dict[str, Seen] = field(default_factory=dict)
    _dirty: set[str] = field(default_factory=set)
    _online: set[str] = field(default_factory=set)
    _camera: dict[str, CameraHealth | None] = field(default_factory=dict)
    _camera_changed: dict[str, CameraHealth] = field(default_factory=dict)

    def baseline(
        self, device_id: str, at: float, *, online: bool, camera: CameraHealth | None = None
    ) -> None:
        """Seed from the database at start-up: silence counts from ``at``, not from zero."""
        self._seen[device_id] = Seen(at, self.mono())
        self._camera[device_id] = camera
        if online:
            self._online.add(device_id)

    def seen(self, device_id: str, now: float, heartbeat: Heartbeat | None = None) -> bool:
        """Record contact. Returns True when the device was not online before."""
        entry = self._seen.get(device_id)
        if entry is None:
            entry = self._seen[device_id] = Seen(now)
        entry.at, entry.mono = now, self.mono()
        if heartbeat is not None:
            entry.heartbeat = heartbeat
            entry.skew_s = round(heartbeat.ts - now, 3)
            if self._camera.get(device_id) is not heartbeat.camera:
                self._camera[device_id] = heartbeat.camera
                self._camera_changed[device_id] = heartbeat.camera
        self._dirty.add(device_id)
        was_offline = device_id not in self._online
        self._online.add(device_id)
        return was_offline

    def gone(self, device_id: str) -> None:
        self._online.discard(device_id)

    def is_online(self, device_id: str) -> bool:
        return device_id in self._online

    def silent(self) -> list[tuple[str, float]]:
        """Online devices not heard from within the threshold, with their last contact."""
        limit = self.mono() - self.threshold_s
        out = [(d, self._seen[d].at) for d in self._online if self._seen[d].mono < limit]
        for device_id, _ in out:
            self._online.discard(device_id)
        return out

    def drain(self) -> dict[str, Seen]:
        """The entries changed since the last drain, for one batched write."""
        out = {d: self._seen[d] for d in self._dirty}
        self._dirty.clear()
        return out

    def drain_camera(self) -> dict[str, CameraHealth]:
        """Camera health changes since the last drain: only these need a database read."""
        out, self._camera_changed = self._camera_changed, {}
        return out

    def ages(self) -> list[float]:
        now = self.mono()
        return [now - s.mono for d, s in self._seen.items() if d in self._online]

    def online_count(self) -> int:
        return len(self._online)
