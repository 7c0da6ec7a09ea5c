"""Who was heard from, and when, kept in memory and written in batches.

A heartbeat costs a dict update, never a database round trip: at a 30 s heartbeat a
large fleet sends thousands per second, and only *changes* need to reach the database
at once (camera fault, clock trouble, new firmware); a device's last-seen time is written
at most every ``write_every_s`` (batched, every liveness tick).

Heartbeats of online devices are recorded in the MQTT network thread
(:meth:`Liveness.seen_if_online`), everything else on the event loop: one lock guards
the state, held for a few dictionary operations at a time.

Replicas sharing ingest (a shared subscription) each hear only a share of every device's
messages, so silence in one replica's memory is only a candidate: every replica writes
what it heard to the database, and the leader asks it before marking a device silent
(:func:`confirm_silent`).
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlmodel import Session, select

from tillsyn_protocol import CameraHealth, Heartbeat

from . import snapshot
from .checks import CLOCK_SKEW_LIMIT_S
from .models import Device


class Facts(NamedTuple):
    """What the database keeps of a heartbeat besides the time. Interned (one shared
    tuple per distinct value, :func:`facts_of`): 10,000 devices on one firmware hold one
    object, not 10,000 heartbeat models (about 1 KB each)."""

    fw: str
    clock_synced: bool


_FACTS: dict[tuple[str, bool], Facts] = {}


def facts_of(heartbeat: Heartbeat) -> Facts:
    key = (heartbeat.fw, heartbeat.clock_synced)
    facts = _FACTS.get(key)
    if facts is None:
        facts = _FACTS.setdefault(key, Facts(*key))  # bounded: firmware versions x 2
    return facts


@dataclass(slots=True)
class Seen:
    """One device's last contact, as :meth:`Liveness.drain` hands it to the writer."""

    at: float  # fleet clock, epoch s: what is written to the database and shown
    mono: float = 0.0  # monotonic s: silence is elapsed time, whatever the wall clock does
    facts: Facts | None = None  # None: contact without a heartbeat (an ack, a status)
    skew_s: float | None = None


def _too_far(skew: float) -> bool:
    return abs(skew) > CLOCK_SKEW_LIMIT_S  # (NaN, no skew known: False)


def _opt(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(slots=True)
class Liveness:
    """Last contact per device; a device counts as silent after ``threshold_s``.

    Kept in columns (a slot per device in float arrays), not an object per device: a
    heartbeat then overwrites numbers in place instead of allocating new float objects,
    which, long-lived and scattered over the allocator's pools, kept memory of the first
    contact of 10,000 devices from being given back. NaN stands for "none" in them."""

    threshold_s: float
    # Injected for tests; steps of the fleet's wall clock never make a device look silent
    # (or alive): a last-seen time written just before a step stays comparable after it.
    mono: Callable[[], float] = time.monotonic
    # Last-seen of a device that heartbeats often is written at most this often (and at
    # most a quarter of the threshold: other replicas read it to judge silence).
    write_every_s: float = 10.0
    _slot: dict[str, int] = field(default_factory=dict)
    _at: array[float] = field(default_factory=lambda: array("d"))
    _mono: array[float] = field(default_factory=lambda: array("d"))
    _skew: array[float] = field(default_factory=lambda: array("d"))
    # What the database has (as of the last drain): decides whether a write is due.
    _written_at: array[float] = field(default_factory=lambda: array("d"))
    _written_skew: array[float] = field(default_factory=lambda: array("d"))
    _facts: list[Facts | None] = field(default_factory=list)
    _written_facts: list[Facts | None] = field(default_factory=list)
    _dirty: set[str] = field(default_factory=set)
    _online: set[str] = field(default_factory=set)
    _camera: dict[str, CameraHealth | None] = field(default_factory=dict)
    _camera_changed: dict[str, CameraHealth] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.write_every_s = min(self.write_every_s, self.threshold_s / 4)

    def _new_slot(self, device_id: str, at: float, written_at: float) -> int:
        i = self._slot[device_id] = len(self._at)
        self._at.append(at)
        self._mono.append(0.0)
        self._skew.append(math.nan)
        self._written_at.append(written_at)
        self._written_skew.append(math.nan)
        self._facts.append(None)
        self._written_facts.append(None)
        return i

    def baseline(
        self, device_id: str, at: float, *, online: bool, camera: CameraHealth | None = None
    ) -> None:
        """Seed from the database at start-up: silence counts from ``at``, not from zero."""
        with self._lock:
            i = self._slot.get(device_id)
            if i is None:
                i = self._new_slot(device_id, at, at)
            self._at[i], self._mono[i], self._written_at[i] = at, self.mono(), at
            self._skew[i] = self._written_skew[i] = math.nan
            self._facts[i] = self._written_facts[i] = None
            self._camera[device_id] = camera
            if online:
                self._online.add(device_id)

    def seen(self, device_id: str, now: float, heartbeat: Heartbeat | None = None) -> bool:
        """Record contact. Returns True when the device was not online before."""
        with self._lock:
            was_offline = device_id not in self._online
            self._record(device_id, now, heartbeat)
            return was_offline

    def seen_if_online(self, device_id: str, now: float, heartbeat: Heartbeat) -> bool:
        """Record a heartbeat of a device that is online (the network thread's fast path);
        False, recording nothing, if it is not: coming back is the event loop's business
        (a database write and a reconcile), so it goes through :meth:`seen` there."""
        with self._lock:
            if device_id not in self._online:
                return False
            self._record(device_id, now, heartbeat)
            return True

    def _record(self, device_id: str, now: float, heartbeat: Heartbeat | None) -> None:
        i = self._slot.get(device_id)
        if i is None:
            i = self._new_slot(device_id, now, math.nan)
        self._at[i], self._mono[i] = now, self.mono()
        if heartbeat is not None:
            self._facts[i] = facts_of(heartbeat)
            self._skew[i] = round(heartbeat.ts - now, 3)
            if self._camera.get(device_id) is not heartbeat.camera:
                self._camera[device_id] = heartbeat.camera
                self._camera_changed[device_id] = heartbeat.camera
        self._dirty.add(device_id)
        self._online.add(device_id)

    def gone(self, device_id: str) -> None:
        with self._lock:
            self._online.discard(device_id)

    def is_online(self, device_id: str) -> bool:
        return device_id in self._online

    def silent(self, lag_s: float = 0.0) -> list[tuple[str, float]]:
        """Online devices not heard from within the threshold, with their last contact.
        ``lag_s``: how far the fleet's own reading is behind; a heartbeat still waiting in
        the socket is not silence, so the threshold is extended by that much."""
        with self._lock:
            limit = self.mono() - self.threshold_s - max(0.0, lag_s)
            slot, mono, at = self._slot, self._mono, self._at
            out = [(d, at[slot[d]]) for d in self._online if mono[slot[d]] < limit]
            for device_id, _ in out:
                self._online.discard(device_id)
            return out

    def heard_elsewhere(self, device_id: str, at: float, now: float) -> None:
        """Another replica heard the device at ``at`` (fleet clock, ``now`` being this
        moment): it is online, and its silence counts from then."""
        with self._lock:
            i = self._slot.get(device_id)
            if i is None:
                i = self._new_slot(device_id, at, at)
            self._at[i] = max(self._at[i], at)
            self._mono[i] = self.mono() - max(0.0, now - at)
            self._online.add(device_id)

    def _due(self, i: int, every_s: float) -> bool:
        written = self._written_at[i]
        if math.isnan(written) or self._at[i] - written >= every_s:
            return True
        facts = self._facts[i]
        if facts is None:
            return False
        if facts is not self._written_facts[i]:  # interned: identity is equality
            return True  # what pre-flight checks and the inventory read: at once
        # Pre-flight asks whether the skew is past the limit: a crossing is written at once.
        return _too_far(self._skew[i]) != _too_far(self._written_skew[i])

    def drain(self) -> dict[str, Seen]:
        """Entries whose write is due, as copies (the network thread goes on updating the
        columns while the database thread writes these). The rest stay dirty."""
        out: dict[str, Seen] = {}
        every = self.write_every_s
        with self._lock:
            for d in self._dirty:
                i = self._slot[d]
                if self._due(i, every):
                    at, facts, skew = self._at[i], self._facts[i], self._skew[i]
                    out[d] = Seen(at, self._mono[i], facts, _opt(skew))
                    self._written_at[i], self._written_facts[i] = at, facts
                    self._written_skew[i] = skew
            self._dirty.difference_update(out)
        return out

    def drain_camera(self) -> dict[str, CameraHealth]:
        """Camera health changes since the last drain: only these need a database read."""
        with self._lock:
            out, self._camera_changed = self._camera_changed, {}
        return out

    def ages(self) -> list[float]:
        with self._lock:
            now, slot, mono = self.mono(), self._slot, self._mono
            return [now - mono[slot[d]] for d in self._online]

    def online_count(self) -> int:
        return len(self._online)


def confirm_silent(
    session: Session, live: Liveness, silent: list[tuple[str, float]], now: float
) -> list[tuple[str, float]]:
    """The devices of ``silent`` (from :meth:`Liveness.silent`) that no replica heard within
    the threshold; the others are put back online. Runs on the database thread."""
    if not silent:
        return []
    ids = [device_id for device_id, _ in silent]
    stmt = select(Device.id, Device.last_seen)
    last_seen = dict(snapshot.rows(session, stmt, Device.id, ids))
    out = []
    for device_id, at in silent:
        seen = last_seen.get(device_id)
        if seen is not None and seen > max(at, now - live.threshold_s):
            live.heard_elsewhere(device_id, seen, now)
        else:
            out.append((device_id, at))
    return out
