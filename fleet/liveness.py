"""Who was heard from, and when, kept in memory and written in batches.

A heartbeat costs a dict update, never a database round trip: at a 30 s heartbeat a
large fleet sends thousands per second, and only *changes* need to reach the database
at once (camera fault, clock trouble); last-seen times are flushed every few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tillsyn_protocol import CameraHealth, Heartbeat


@dataclass(slots=True)
class Seen:
    at: float  # fleet clock, epoch s
    heartbeat: Heartbeat | None = None
    skew_s: float | None = None


@dataclass(slots=True)
class Liveness:
    """Last contact per device; a device counts as silent after ``threshold_s``."""

    threshold_s: float
    _seen: dict[str, Seen] = field(default_factory=dict)
    _dirty: set[str] = field(default_factory=set)
    _online: set[str] = field(default_factory=set)

    def baseline(self, device_id: str, at: float, *, online: bool) -> None:
        """Seed from the database at start-up: silence counts from ``at``, not from zero."""
        self._seen[device_id] = Seen(at)
        if online:
            self._online.add(device_id)

    def seen(self, device_id: str, now: float, heartbeat: Heartbeat | None = None) -> bool:
        """Record contact. Returns True when the device was not online before."""
        entry = self._seen.get(device_id)
        if entry is None:
            entry = self._seen[device_id] = Seen(now)
        entry.at = now
        if heartbeat is not None:
            entry.heartbeat = heartbeat
            entry.skew_s = round(heartbeat.ts - now, 3)
        self._dirty.add(device_id)
        was_offline = device_id not in self._online
        self._online.add(device_id)
        return was_offline

    def gone(self, device_id: str) -> None:
        self._online.discard(device_id)

    def is_online(self, device_id: str) -> bool:
        return device_id in self._online

    def silent(self, now: float) -> list[tuple[str, float]]:
        """Online devices not heard from within the threshold, with their last contact."""
        limit = now - self.threshold_s
        out = [(d, self._seen[d].at) for d in self._online if self._seen[d].at < limit]
        for device_id, _ in out:
            self._online.discard(device_id)
        return out

    def drain(self) -> dict[str, Seen]:
        """The entries changed since the last drain, for one batched write."""
        out = {d: self._seen[d] for d in self._dirty}
        self._dirty.clear()
        return out

    def camera(self, device_id: str) -> CameraHealth | None:
        entry = self._seen.get(device_id)
        return entry.heartbeat.camera if entry and entry.heartbeat else None

    def ages(self, now: float) -> list[float]:
        return [now - s.at for d, s in self._seen.items() if d in self._online]

    def online_count(self) -> int:
        return len(self._online)
