"""The device's lock state machine: time and input in, actions out. No I/O.

    LOCKED --arm--> ARMED --look--> VIEWING
      ^               |  ^            |
      +--disarm/end---+  +--look cap--+   (window end or disarm: straight to LOCKED)

The five invariants of the design brief, enforced here and nowhere else:

1. Boots LOCKED; an error, an unsynchronised clock or a failed verification leaves it LOCKED.
2. ARMED only on a valid ``arm`` token and only until its window end; :meth:`tick` re-locks
   then, even if no ``disarm`` ever arrives.
3. VIEWING only from ARMED, only on a valid ``look`` token, for at most the cap.
4. Tokens are for this device, within their validity time, and carry a sequence number
   above the last applied one, which the shell persists (``PersistSeq``) before acting.
5. Every transition is an action the shell reports.

Deadlines are kept twice: in wall time (what the token says) and in monotonic time (how
long that was when it arrived), and whichever comes first wins. A wall clock stepped back
can then never keep a camera armed longer than the window's real length.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import RefusalReason, TokenError
from .messages import AckResult, CommandKind, LockState
from .tokens import CommandClaims, peek_ids, verify

DEFAULT_LOOK_CAP_S = 60
_RECENT_JTIS = 32


@dataclass(frozen=True, slots=True)
class Clock:
    """A reading of the device's clocks: wall (epoch s), monotonic (s), and NTP status."""

    wall: float
    mono: float
    synced: bool = True


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersistSeq:
    """Write the highest applied sequence number durably before anything else happens."""

    seq: int


@dataclass(frozen=True, slots=True)
class CameraOn:
    look_id: str
    staff: str
    max_s: float


@dataclass(frozen=True, slots=True)
class CameraOff:
    reason: str
    look_id: str | None = None
    duration_s: float | None = None
    staff: str | None = None


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: LockState | None
    new: LockState
    reason: str


@dataclass(frozen=True, slots=True)
class AckOut:
    jti: str | None
    seq: int | None
    cmd: CommandKind | None
    result: AckResult
    state: LockState
    reason: RefusalReason | None = None


Action = PersistSeq | CameraOn | CameraOff | StateChanged | AckOut


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: LockState
    since: float
    armed_until: float | None
    view_until: float | None
    look_id: str | None
    last_seq: int


# Which commands may be applied in which state; everything else is WRONG_STATE.
_ALLOWED: Mapping[CommandKind, frozenset[LockState]] = {
    CommandKind.ARM: frozenset({LockState.LOCKED, LockState.ARMED, LockState.VIEWING}),
    CommandKind.DISARM: frozenset(LockState),
    CommandKind.LOOK: frozenset({LockState.ARMED}),
}


class DeviceMachine:
    """Pure lock state machine of one device."""

    def __init__(
        self,
        *,
        device_id: str,
        keys: Mapping[str, Ed25519PublicKey],
        last_seq: int,
        now: Clock,
        look_cap_s: float = DEFAULT_LOOK_CAP_S,
    ) -> None:
        self.device_id = device_id
        self._keys = dict(keys)
        self._look_cap_s = look_cap_s
        self._last_seq = last_seq
        self._recent: deque[str] = deque(maxlen=_RECENT_JTIS)
        self._state = LockState.LOCKED
        self._since = now.wall
        self._armed_wall = self._armed_mono = 0.0
        self._view_wall = self._view_mono = 0.0
        self._view_start_mono = 0.0
        self._look_id: str | None = None
        self._staff: str | None = None
        self._camera_ok = True

    # --- reading ---------------------------------------------------------------------

    @property
    def state(self) -> LockState:
        return self._state

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def snapshot(self) -> Snapshot:
        armed = self._state is not LockState.LOCKED
        viewing = self._state is LockState.VIEWING
        return Snapshot(
            state=self._state,
            since=self._since,
            armed_until=self._armed_wall if armed else None,
            view_until=self._view_wall if viewing else None,
            look_id=self._look_id if viewing else None,
            last_seq=self._last_seq,
        )

    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`tick` must next be called, if any."""
        if self._state is LockState.VIEWING:
            return min(self._view_mono, self._armed_mono)
        if self._state is LockState.ARMED:
            return self._armed_mono
        return None

    def boot_actions(self) -> list[Action]:
        """Fail closed at start: whatever the camera was doing, it is off now."""
        return [CameraOff("boot"), StateChanged(None, LockState.LOCKED, "boot")]

    # --- inputs ----------------------------------------------------------------------

    def tick(self, now: Clock) -> list[Action]:
        """Apply the local timers: window end, look cap, lost clock sync."""
        if self._state is LockState.LOCKED:
            return []
        if not now.synced:
            return self._lock(now, "clock_unsynced")
        if now.wall >= self._armed_wall or now.mono >= self._armed_mono:
            return self._lock(now, "window_end")
        if self._state is LockState.VIEWING and (
            now.wall >= self._view_wall or now.mono >= self._view_mono
        ):
            actions = self._end_look(now, "look_cap")
            return [*actions, self._set(LockState.ARMED, now, "look_cap")]
        return []

    def camera_fault(self, now: Clock) -> list[Action]:
        """The camera broke: end any look; no look can start until it is restored."""
        self._camera_ok = False
        actions = self.tick(now)
        if self._state is LockState.VIEWING:
            actions += self._end_look(now, "camera_fault")
            actions.append(self._set(LockState.ARMED, now, "camera_fault"))
        return actions

    def lock(self, now: Clock, reason: str) -> list[Action]:
        """Lock from outside the token rules (the shell could not persist, is stopping...).

        Only ever towards safety: it can end a look and a window, never start one.
        """
        return self._lock(now, reason)

    def camera_restored(self) -> None:
        self._camera_ok = True

    def handle(self, token: str | bytes, now: Clock) -> list[Action]:
        """Verify and apply one command token; always ends with exactly one AckOut."""
        actions = self.tick(now)
        try:
            claims = self._admit(token, now)
        except TokenError as exc:
            jti, seq, cmd = peek_ids(token)
            return [*actions, AckOut(jti, seq, cmd, AckResult.REFUSED, self._state, exc.reason)]
        if claims is None:  # the same token again: its first ack may have been lost
            jti, seq, cmd = peek_ids(token)
            return [*actions, AckOut(jti, seq, cmd, AckResult.DUPLICATE, self._state)]
        self._last_seq = claims.seq
        self._recent.append(claims.jti)
        actions.append(PersistSeq(claims.seq))
        actions += self._apply(claims, now)
        actions.append(AckOut(claims.jti, claims.seq, claims.cmd, AckResult.APPLIED, self._state))
        return actions

    # --- internals -------------------------------------------------------------------

    def _admit(self, token: str | bytes, now: Clock) -> CommandClaims | None:
        if not now.synced:
            raise TokenError(RefusalReason.CLOCK_UNSYNCED)
        claims = verify(token, keys=self._keys, device_id=self.device_id, now=now.wall)
        if claims.seq <= self._last_seq:
            if claims.jti in self._recent:
                return None
            raise TokenError(RefusalReason.REPLAYED, f"seq {claims.seq} <= {self._last_seq}")
        if self._state not in _ALLOWED[claims.cmd]:
            raise TokenError(RefusalReason.WRONG_STATE, f"{claims.cmd} in {self._state}")
        if claims.cmd is CommandKind.ARM and claims.until is not None and claims.until <= now.wall:
            raise TokenError(RefusalReason.WINDOW_OVER)
        if claims.cmd is CommandKind.LOOK and not self._camera_ok:
            raise TokenError(RefusalReason.CAMERA_FAULT)
        return claims

    def _apply(self, claims: CommandClaims, now: Clock) -> list[Action]:
        match claims.cmd:
            case CommandKind.ARM:
                assert claims.until is not None
                self._armed_wall = float(claims.until)
                self._armed_mono = now.mono + (claims.until - now.wall)
                if self._state is LockState.VIEWING:
                    # A shortened window also shortens a look in progress.
                    self._view_wall = min(self._view_wall, self._armed_wall)
                    self._view_mono = min(self._view_mono, self._armed_mono)
                    return []
                if self._state is LockState.ARMED:
                    return []
                return [self._set(LockState.ARMED, now, "arm")]
            case CommandKind.DISARM:
                return self._lock(now, "disarm")
            case CommandKind.LOOK:
                assert claims.max_s is not None and claims.look is not None
                assert claims.staff is not None
                cap = min(float(claims.max_s), self._look_cap_s)
                self._view_wall = min(now.wall + cap, self._armed_wall)
                self._view_mono = min(now.mono + cap, self._armed_mono)
                self._view_start_mono = now.mono
                self._look_id, self._staff = claims.look, claims.staff
                return [
                    CameraOn(claims.look, claims.staff, self._view_mono - now.mono),
                    self._set(LockState.VIEWING, now, "look"),
                ]

    def _lock(self, now: Clock, reason: str) -> list[Action]:
        actions: list[Action] = []
        if self._state is LockState.VIEWING:
            actions += self._end_look(now, reason)
        if self._state is not LockState.LOCKED:
            actions.append(self._set(LockState.LOCKED, now, reason))
        return actions

    def _end_look(self, now: Clock, reason: str) -> list[Action]:
        # The real time the camera was on, as the shell's timer ended it.
        duration = max(0.0, now.mono - self._view_start_mono)
        off = CameraOff(reason, self._look_id, round(duration, 3), self._staff)
        self._look_id = self._staff = None
        return [off]

    def _set(self, new: LockState, now: Clock, reason: str) -> StateChanged:
        old, self._state, self._since = self._state, new, now.wall
        return StateChanged(old, new, reason)
