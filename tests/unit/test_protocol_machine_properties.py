"""Hypothesis drives the pure DeviceMachine through random nights and checks the privacy
invariants after every step.

The test plays three parts:

- the *fleet*, minting tokens (valid, stale, foreign, forged, garbage, replayed, reordered);
- the *shell*, turning the machine's actions into a camera that is on or off and a
  persisted sequence number (the last ``PersistSeq``), ticking the machine at every step and
  at exactly ``next_deadline()`` when its timer fires, and rebooting it;
- the *truth*: real time, a wall clock that may jump (wall = real + offset) and a
  monotonic clock (mono = real + an offset that changes at every reboot).

Every time is a multiple of 1/4 s, so all the float arithmetic here and in the machine is
exact and deadlines can be hit to the instant.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tillsyn_protocol import (
    Ack,
    AckOut,
    AckResult,
    Action,
    CameraOff,
    CameraOn,
    Clock,
    CommandClaims,
    CommandKind,
    DeviceMachine,
    LockState,
    PersistSeq,
    RefusalReason,
    SigningKey,
    StateChanged,
    decode,
    encode,
    keyring,
    sign,
)
from tillsyn_protocol import machine as machine_module
from tillsyn_protocol import tokens as tk
from tillsyn_protocol.messages import MAX_TOKEN_BYTES

DEVICE = "dev-home01"
OTHER_DEVICE = "dev-home02"
FLEET = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(b"\x11" * 32))
ROGUE = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(b"\x22" * 32))
# A rogue key that names the fleet's kid: verification must fail on the signature.
IMPOSTOR = SigningKey(ROGUE.private_key, FLEET.kid)
KEYS = keyring(FLEET.public_key)
FLEET_PUBLIC_RAW = FLEET.public_key.public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw
)
T0 = 1_800_000_000.0  # 2027-01-15
RECENT_JTIS = machine_module._RECENT_JTIS

LOCKED, ARMED, VIEWING = LockState.LOCKED, LockState.ARMED, LockState.VIEWING
APPLIED, DUPLICATE, REFUSED = AckResult.APPLIED, AckResult.DUPLICATE, AckResult.REFUSED
R = RefusalReason

# What the design allows: look only from ARMED; arm (also re-arm) and disarm in any state.
ALLOWED = {
    CommandKind.ARM: {LOCKED, ARMED, VIEWING},
    CommandKind.DISARM: {LOCKED, ARMED, VIEWING},
    CommandKind.LOOK: {ARMED},
}


def quarters(low: int, high: int) -> st.SearchStrategy[float]:
    return st.integers(min_value=low * 4, max_value=high * 4).map(lambda q: q / 4)


TIME_STEPS = st.sampled_from([0.25, 1, 4.75, 5, 29.75, 30, 59.75, 60, 61, 600, 3600, 86_400]) | (
    quarters(0, 4 * 3600)
)
WALL_JUMPS = st.sampled_from([-86_400, -3600, -61, -5, -0.25, 0.25, 5, 61, 3600, 86_400]) | (
    quarters(-7200, 7200)
)
ARM_LENGTHS = st.sampled_from([-3600, -1, 0, 1, 2, 30, 61, 600, 3600, 4 * 3600, 86_400]) | (
    st.integers(min_value=1, max_value=86_400)
)
LOOK_MAX = st.sampled_from([1, 2, 30, 59, 60, 61, 120, 600]) | st.integers(1, tk.MAX_LOOK_S)
LOOK_TTL = st.sampled_from([1, 5, 30, 120])
DISARM_TTL = st.sampled_from([1, 30, 3600, 6 * 3600])
# Tokens are mostly minted on the device's own wall clock (fleet and device agree), sometimes
# on true time (the device's wall clock has jumped away from it).
BASIS = st.sampled_from(["wall", "wall", "wall", "real"])
COMMANDS = st.sampled_from(CommandKind)
# How long after the fleet minted it (and after the shell's last tick) a token arrives, and
# how far the wall clock stepped in between: the machine's own tick inside handle() must
# apply the timers first.
LATE = st.sampled_from([0.0, 0.0, 0.0, 0.25, 1.0, 30.0, 60.0, 600.0]) | quarters(0, 7200)
JUMP = st.sampled_from([0.0, 0.0, 0.0, -3600.0, -5.0, -0.25, 0.25, 5.0, 3600.0])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_json(claims: CommandClaims) -> bytes:
    return json.dumps(claims.model_dump(mode="json", exclude_none=True)).encode()


def hand_signed(claims: CommandClaims, alg: str) -> str:
    hdr = b64(json.dumps({"alg": alg, "typ": tk.TOKEN_TYPE, "kid": FLEET.kid}).encode())
    signing_input = f"{hdr}.{b64(claims_json(claims))}"
    if alg == "HS256":  # the classic confusion attack: the public key as HMAC secret
        mac = hmac.new(FLEET_PUBLIC_RAW, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"
    return f"{signing_input}."


@dataclass(frozen=True)
class Sent:
    """A token as the fleet (or an attacker) sent it, and what it claims to be."""

    token: str | bytes
    label: str
    claims: CommandClaims | None = None  # readable claims (signed or not)
    fixed: frozenset[RefusalReason] | None = None  # verify refuses it with one of these
    genuine: bool = False  # signed by the fleet's key


@dataclass
class Truth:
    """What the device must be doing, computed from real time and the applied commands."""

    look_cap: float
    last_seq: int
    state: LockState = LOCKED
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_JTIS))
    camera_ok: bool = True
    arm_wall: float = 0.0  # `until` of the arm applied last
    arm_real_end: float = 0.0  # real time of that arm + (until - wall at that arm)
    view_wall: float = 0.0
    view_real_end: float = 0.0
    look_cap_real: float = 0.0  # min(max_s, look cap) of the look in progress

    def tick(self, real: float, wall: float, synced: bool) -> None:
        if self.state is LOCKED:
            return
        if not synced or wall >= self.arm_wall or real >= self.arm_real_end:
            self.state = LOCKED
        elif self.state is VIEWING and (wall >= self.view_wall or real >= self.view_real_end):
            self.state = ARMED

    def apply(self, claims: CommandClaims, real: float, wall: float) -> None:
        self.last_seq = claims.seq
        self.recent.append(claims.jti)
        match claims.cmd:
            case CommandKind.ARM:
                assert claims.until is not None
                self.arm_wall = claims.until
                self.arm_real_end = real + (claims.until - wall)
                if self.state is VIEWING:
                    self.view_wall = min(self.view_wall, self.arm_wall)
                    self.view_real_end = min(self.view_real_end, self.arm_real_end)
                else:
                    self.state = ARMED
            case CommandKind.DISARM:
                self.state = LOCKED
            case CommandKind.LOOK:
                assert claims.max_s is not None
                cap = min(float(claims.max_s), self.look_cap)
                self.look_cap_real = cap
                self.view_wall = min(wall + cap, self.arm_wall)
                self.view_real_end = min(real + cap, self.arm_real_end)
                self.state = VIEWING


class DeviceNights(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.machine: DeviceMachine | None = None
        self.real = T0
        self.offset = 0.0  # wall - real
        self.mono_offset = 1000.0 - T0  # mono - real; changes at every reboot
        self.synced = True
        self.fleet_seq = 0
        self.jtis = 0  # jti are counted, not random, so every run replays exactly
        self.pool: list[Sent] = []
        # The shell.
        self.persisted = 0  # the last PersistSeq written
        self.persisted_at_boot = 0
        self.camera_on = False
        self.camera_on_at = 0.0
        self.camera_on_max_s = 0.0
        self.reported: LockState | None = None  # from StateChanged actions
        self.reported_since = 0.0  # wall time of the last StateChanged
        self.truth = Truth(look_cap=60.0, last_seq=0)

    # --- clocks and the shell -------------------------------------------------------------

    @property
    def wall(self) -> float:
        return self.real + self.offset

    def clock(self) -> Clock:
        return Clock(wall=self.wall, mono=self.real + self.mono_offset, synced=self.synced)

    def dev(self) -> DeviceMachine:
        assert self.machine is not None
        return self.machine

    def shell(self, actions: Iterable[Action]) -> None:
        for action in actions:
            match action:
                case PersistSeq(seq=seq):
                    # Strictly increasing over the whole run, reboots included.
                    assert seq > self.persisted, (seq, self.persisted)
                    self.persisted = seq
                case CameraOn():
                    assert not self.camera_on, "camera switched on twice"
                    self.camera_on = True
                    self.camera_on_at = self.real
                    self.camera_on_max_s = action.max_s
                case CameraOff():
                    if self.camera_on and action.look_id is not None:
                        assert action.duration_s == self.real - self.camera_on_at
                    self.camera_on = False
                case StateChanged(old=old, new=new):
                    assert old == self.reported, (old, self.reported)
                    assert old != new
                    self.reported = new
                    self.reported_since = self.wall
                    event(f"transition {action.reason}")
                case AckOut():
                    pass

    def tick(self) -> list[Action]:
        actions = self.dev().tick(self.clock())
        assert not any(isinstance(a, PersistSeq | CameraOn | AckOut) for a in actions)
        self.truth.tick(self.real, self.wall, self.synced)
        self.shell(actions)
        return actions

    def boot(self, look_cap: float | None = None) -> None:
        if look_cap is not None:
            self.truth.look_cap = look_cap
        self.machine = DeviceMachine(
            device_id=DEVICE,
            keys=KEYS,
            last_seq=self.persisted,
            now=self.clock(),
            look_cap_s=self.truth.look_cap,
        )
        self.persisted_at_boot = self.persisted
        self.truth = Truth(look_cap=self.truth.look_cap, last_seq=self.persisted)
        self.reported = None
        self.shell(self.machine.boot_actions())
        self.reported_since = self.wall
        assert not self.camera_on
        assert self.machine.state is LOCKED
        assert self.machine.snapshot().state is LOCKED
        assert self.machine.last_seq == self.persisted

    # --- the fleet ----------------------------------------------------------------------

    def next_seq(self) -> int:
        self.fleet_seq += 1
        return self.fleet_seq

    def jti(self) -> str:
        self.jtis += 1
        return f"j{self.jtis:x}"

    def base(self, basis: str) -> int:
        return int(self.wall if basis == "wall" else self.real)

    def claims(
        self,
        cmd: CommandKind,
        *,
        seq: int,
        start: int,
        exp: int,
        aud: str = DEVICE,
        until: int | None = None,
        max_s: int = 60,
    ) -> CommandClaims:
        extra: dict[str, Any] = {}
        match cmd:
            case CommandKind.ARM:
                extra["until"] = exp if until is None else until
            case CommandKind.LOOK:
                extra.update(staff="nurse.anna", max_s=max_s, look=f"lk{seq}")
            case CommandKind.DISARM:
                pass
        return CommandClaims(
            iss=tk.ISSUER,
            aud=aud,
            jti=self.jti(),
            seq=seq,
            iat=start,
            nbf=start,
            exp=exp,
            cmd=cmd,
            **extra,
        )

    def valid_claims(self, cmd: CommandKind, *, seq: int, basis: str = "wall") -> CommandClaims:
        start = self.base(basis)
        exp = start + {CommandKind.ARM: 1800, CommandKind.DISARM: 600, CommandKind.LOOK: 30}[cmd]
        return self.claims(cmd, seq=seq, start=start, exp=exp)

    def genuine(self, claims: CommandClaims, label: str) -> Sent:
        return Sent(sign(claims, FLEET), label, claims=claims, genuine=True)

    # --- expectations -------------------------------------------------------------------

    def expect(self, sent: Sent) -> tuple[AckResult, set[RefusalReason | None]]:
        truth = self.truth
        if not self.synced:
            return REFUSED, {R.CLOCK_UNSYNCED}
        if sent.fixed is not None:
            return REFUSED, set(sent.fixed)
        claims = sent.claims
        assert claims is not None
        if claims.aud != DEVICE:
            return REFUSED, {R.WRONG_AUDIENCE}
        if self.wall + tk.NBF_LEEWAY_S < claims.nbf:
            return REFUSED, {R.NOT_YET_VALID}
        if self.wall >= claims.exp:
            return REFUSED, {R.EXPIRED}
        if claims.seq <= truth.last_seq:
            if claims.jti in truth.recent:
                return DUPLICATE, {None}
            return REFUSED, {R.REPLAYED}
        if truth.state not in ALLOWED[claims.cmd]:
            return REFUSED, {R.WRONG_STATE}
        if claims.until is not None and claims.until <= self.wall:
            return REFUSED, {R.WINDOW_OVER}
        if claims.cmd is CommandKind.LOOK and not truth.camera_ok:
            return REFUSED, {R.CAMERA_FAULT}
        return APPLIED, {None}

    def deliver(
        self,
        sent: Sent,
        *,
        as_bytes: bool = False,
        pretick: bool = False,
        late: float = 0.0,
        jump: float = 0.0,
    ) -> None:
        self.pool.append(sent)
        machine = self.dev()
        self.real += late
        self.offset += jump
        if pretick:  # the shell's timer ran just before the message arrived
            self.tick()
        token = sent.token.encode() if as_bytes and isinstance(sent.token, str) else sent.token
        clock = self.clock()
        # Timer effects alone, on a copy: what a refused token must leave behind.
        shadow = copy.copy(machine)
        timer_actions = shadow.tick(clock)
        after_timer = shadow.snapshot()
        self.truth.tick(self.real, self.wall, self.synced)
        result, reasons = self.expect(sent)

        actions = machine.handle(token, clock)

        acks = [a for a in actions if isinstance(a, AckOut)]
        assert len(acks) == 1, actions
        ack = acks[0]
        assert actions[-1] is ack
        assert actions[: len(timer_actions)] == timer_actions
        event(f"{sent.label}: {ack.result.value} {ack.reason or ''}")
        assert (ack.result, ack.reason) in {(result, r) for r in reasons}, (sent.label, ack)
        assert ack.state is machine.state
        if sent.claims is not None and (sent.genuine or sent.fixed is not None):
            assert (ack.jti, ack.seq, ack.cmd) == (
                sent.claims.jti,
                sent.claims.seq,
                sent.claims.cmd,
            )
        # The ack can always be published as an Ack message, and read back by the fleet.
        message = Ack(
            ts=max(0.0, self.wall), jti=ack.jti, seq=ack.seq, cmd=ack.cmd, result=ack.result,
            reason=ack.reason, state=ack.state,
        )  # fmt: skip
        assert decode(Ack, encode(message)) == message
        if ack.result is APPLIED:
            assert sent.claims is not None
            effects = actions[len(timer_actions) : -1]
            assert effects, "applied without persisting"
            assert effects[0] == PersistSeq(sent.claims.seq), effects
            assert not any(isinstance(a, PersistSeq) for a in effects[1:])
            assert sent.claims.seq > self.persisted_at_boot
            self.truth.apply(sent.claims, self.real, self.wall)
            self.shell(actions)
            if sent.claims.cmd is CommandKind.LOOK:
                assert isinstance(effects[1], CameraOn)
                assert effects[1].max_s == min(
                    self.truth.look_cap_real, self.truth.arm_real_end - self.real
                )
                assert effects[1].staff == sent.claims.staff
        else:
            # Nothing but the timers happened: same state, same counters, nothing persisted.
            assert actions[:-1] == timer_actions
            assert machine.snapshot() == after_timer
            self.shell(actions)

    # --- rules: initial state ------------------------------------------------------------

    @initialize(
        look_cap=st.sampled_from([60.0, 30.0, 600.0, 10.25]),
        persisted=st.sampled_from([0, 1, 1000]),
        offset=st.sampled_from([0.0, 0.5, -3600.0]),
    )
    def first_boot(self, look_cap: float, persisted: int, offset: float) -> None:
        self.persisted = persisted
        self.fleet_seq = persisted
        self.offset = offset
        self.boot(look_cap)

    # --- rules: time ---------------------------------------------------------------------

    @rule(dt=TIME_STEPS)
    def time_passes(self, dt: float) -> None:
        """Real time advances; the shell's timer fires at every deadline on the way."""
        target = self.real + dt
        while (deadline := self.dev().next_deadline()) is not None:
            at = deadline - self.mono_offset
            if at > target:
                break
            assert at > self.real
            self.real = at
            assert self.tick(), "a deadline passed without effect"
        self.real = target
        self.tick()

    @rule(dt=TIME_STEPS)
    def time_passes_timer_late(self, dt: float) -> None:
        """The shell was busy: the next tick comes late, after the deadline."""
        self.real += dt
        self.tick()

    @precondition(
        lambda self: self.machine is not None and self.machine.next_deadline() is not None
    )
    @rule()
    def timer_fires_exactly(self) -> None:
        deadline = self.dev().next_deadline()
        assert deadline is not None
        at = deadline - self.mono_offset
        assert at > self.real, "deadline already due but not acted on"
        was = self.dev().state
        self.real = at
        actions = self.tick()
        assert actions, "the timer fired at next_deadline() and nothing happened"
        assert self.dev().state is not was
        ends = [a for a in actions if isinstance(a, CameraOff)]
        if was is VIEWING:
            assert ends and ends[0].duration_s is not None
            assert ends[0].duration_s <= self.truth.look_cap_real

    @rule(jump=WALL_JUMPS)
    def wall_clock_jumps(self, jump: float) -> None:
        self.offset += jump
        self.tick()

    @rule(synced=st.sampled_from([True, True, False]))
    def clock_sync(self, synced: bool) -> None:
        self.synced = synced
        self.tick()

    @rule(mono_start=quarters(0, 100_000))
    def reboot(self, mono_start: float) -> None:
        self.mono_offset = mono_start - self.real  # the monotonic clock restarts
        self.boot()

    @rule()
    def camera_fault(self) -> None:
        was = self.dev().state
        actions = self.dev().camera_fault(self.clock())
        assert not any(isinstance(a, PersistSeq | CameraOn | AckOut) for a in actions)
        self.truth.camera_ok = False
        self.truth.tick(self.real, self.wall, self.synced)
        if self.truth.state is VIEWING:
            self.truth.state = ARMED
        self.shell(actions)
        if was is VIEWING:
            assert not self.camera_on

    @rule()
    def camera_restored(self) -> None:
        self.dev().camera_restored()
        self.truth.camera_ok = True
        self.tick()

    # --- rules: fresh tokens from the fleet ----------------------------------------------

    @rule(
        length=ARM_LENGTHS,
        basis=BASIS,
        as_bytes=st.booleans(),
        pretick=st.booleans(),
        late=LATE,
        jump=JUMP,
    )
    def arm(
        self, length: int, basis: str, as_bytes: bool, pretick: bool, late: float, jump: float
    ) -> None:
        start, seq = self.base(basis), self.next_seq()
        if length > 0:
            claims = tk.arm(DEVICE, seq=seq, now=start, until=start + length, jti=self.jti())
        else:  # a window already over: deliverable only until its end, so now expired
            until = start + length
            claims = self.claims(CommandKind.ARM, seq=seq, start=until - 120, exp=until)
        sent = self.genuine(claims, "arm")
        self.deliver(sent, as_bytes=as_bytes, pretick=pretick, late=late, jump=jump)

    @rule(ttl=DISARM_TTL, basis=BASIS, pretick=st.booleans(), late=LATE, jump=JUMP)
    def disarm(self, ttl: int, basis: str, pretick: bool, late: float, jump: float) -> None:
        claims = tk.disarm(
            DEVICE, seq=self.next_seq(), now=self.base(basis), ttl_s=ttl, jti=self.jti()
        )
        self.deliver(self.genuine(claims, "disarm"), pretick=pretick, late=late, jump=jump)

    @rule(
        max_s=LOOK_MAX,
        ttl=LOOK_TTL,
        basis=BASIS,
        staff=st.sampled_from(["nurse.anna", "B-2", "x_y"]),
        pretick=st.booleans(),
        late=LATE,
        jump=JUMP,
    )
    def look(
        self, max_s: int, ttl: int, basis: str, staff: str, pretick: bool, late: float,
        jump: float,
    ) -> None:  # fmt: skip
        seq = self.next_seq()
        claims = tk.look(
            DEVICE, seq=seq, now=self.base(basis), staff=staff, max_s=max_s,
            look_id=f"lk{seq}", ttl_s=ttl, jti=self.jti(),
        )  # fmt: skip
        self.deliver(self.genuine(claims, "look"), pretick=pretick, late=late, jump=jump)

    @rule(cmd=COMMANDS, basis=BASIS)
    def mint_and_hold(self, cmd: CommandKind, basis: str) -> None:
        """Minted now with a fresh seq, delivered later (reordered) through `redeliver`."""
        claims = self.valid_claims(cmd, seq=self.next_seq(), basis=basis)
        self.pool.append(self.genuine(claims, f"held {cmd.value}"))

    @precondition(lambda self: bool(self.pool))
    @rule(
        back=st.integers(0, 2) | st.integers(0, 10_000),
        as_bytes=st.booleans(),
        late=LATE,
        jump=JUMP,
    )
    def redeliver(self, back: int, as_bytes: bool, late: float, jump: float) -> None:
        """Any earlier token again: a replay, a duplicate, or a held one arriving late."""
        sent = self.pool[len(self.pool) - 1 - back % len(self.pool)]
        label = sent.label if sent.label.startswith("again") else f"again {sent.label}"
        again = Sent(sent.token, label, sent.claims, sent.fixed, sent.genuine)
        self.deliver(again, as_bytes=as_bytes, late=late, jump=jump)

    # --- rules: fleet-signed but not applicable ------------------------------------------

    @rule(
        cmd=COMMANDS,
        kind=st.sampled_from(["foreign", "expired", "early"]),
        skew=st.sampled_from([0, 1, 4, 5, 6, 7, 94]),
    )
    def stale_or_foreign(self, cmd: CommandKind, kind: str, skew: int) -> None:
        start, seq = self.base("wall"), self.next_seq()
        match kind:
            case "foreign":
                claims = self.claims(cmd, seq=seq, start=start, exp=start + 600, aud=OTHER_DEVICE)
            case "expired":
                claims = self.claims(cmd, seq=seq, start=start - 100, exp=start - skew)
            case _:  # nbf ahead of the device: within the leeway (<= 5 s) or not
                nbf = start + skew
                claims = self.claims(cmd, seq=seq, start=nbf, exp=nbf + 600)
        self.deliver(self.genuine(claims, kind))

    # --- rules: not from the fleet -------------------------------------------------------

    @rule(
        cmd=COMMANDS,
        kind=st.sampled_from(["impostor", "unknown_kid", "alg_none", "hs256", "tampered"]),
        high_seq=st.booleans(),
        extra=st.integers(min_value=1, max_value=86_400),
    )
    def forged(self, cmd: CommandKind, kind: str, high_seq: bool, extra: int) -> None:
        # An attacker may pick any seq: a huge one must not poison the device's counter.
        seq = 2**53 if high_seq else self.fleet_seq + 1
        claims = self.valid_claims(cmd, seq=seq)
        match kind:
            case "impostor":
                sent = Sent(sign(claims, IMPOSTOR), kind, claims, frozenset({R.BAD_SIGNATURE}))
            case "unknown_kid":
                sent = Sent(sign(claims, ROGUE), kind, claims, frozenset({R.UNKNOWN_KEY}))
            case "alg_none" | "hs256":
                alg = "none" if kind == "alg_none" else "HS256"
                sent = Sent(hand_signed(claims, alg), kind, claims, frozenset({R.BAD_ALGORITHM}))
            case _:
                # A genuine token whose claims were edited in transit (a longer window).
                header, _, signature = sign(claims, FLEET).split(".")
                edited = claims.model_copy(update={"exp": claims.exp + extra})
                if cmd is CommandKind.ARM:
                    edited = edited.model_copy(update={"until": edited.exp})
                token = f"{header}.{b64(claims_json(edited))}.{signature}"
                sent = Sent(token, kind, edited, frozenset({R.BAD_SIGNATURE}))
        self.deliver(sent)

    @rule(
        kind=st.sampled_from(["garbage", "truncated", "oversize"]),
        blob=st.binary(max_size=MAX_TOKEN_BYTES + 100),
        as_text=st.booleans(),
        cmd=COMMANDS,
        size=st.integers(min_value=0, max_value=3000),
    )
    def junk(self, kind: str, blob: bytes, as_text: bool, cmd: CommandKind, size: int) -> None:
        whole = sign(self.valid_claims(cmd, seq=self.fleet_seq + 1), FLEET)
        token: str | bytes
        match kind:
            case "garbage":
                token = blob.decode("latin-1") if as_text else blob
                if len(token) > MAX_TOKEN_BYTES:
                    reasons = {R.TOO_LARGE}
                else:  # by chance it might even parse as a header without our algorithm
                    reasons = {R.MALFORMED, R.BAD_ALGORITHM}
            case "truncated":
                token = whole[: size % len(whole)]
                reasons = {R.MALFORMED, R.BAD_SIGNATURE}
            case _:
                pad = "A" * max(size, MAX_TOKEN_BYTES + 1 - len(whole))
                token = whole + pad if as_text else pad + whole
                reasons = {R.TOO_LARGE}
        self.deliver(Sent(token, kind, fixed=frozenset(reasons)))

    @rule(
        length=st.sampled_from([2, 60, 61, 3600]) | st.integers(min_value=1, max_value=7200),
        max_s=LOOK_MAX,
    )
    def arm_then_look(self, length: int, max_s: int) -> None:
        """The usual night: the window opens and staff look in right away."""
        start = self.base("wall")
        until = start + length
        arm_ = tk.arm(DEVICE, seq=self.next_seq(), now=start, until=until, jti=self.jti())
        self.deliver(self.genuine(arm_, "arm"))
        seq = self.next_seq()
        claims = tk.look(
            DEVICE, seq=seq, now=start, staff="nurse.anna", max_s=max_s, look_id=f"lk{seq}",
            jti=self.jti(),
        )  # fmt: skip
        self.deliver(self.genuine(claims, "look"))

    # --- invariants, after every step ----------------------------------------------------

    @invariant()
    def camera_on_iff_viewing(self) -> None:
        if self.machine is not None:
            assert self.camera_on == (self.machine.state is VIEWING)

    @invariant()
    def machine_agrees_with_truth(self) -> None:
        if self.machine is None:
            return
        assert self.machine.state is self.truth.state
        assert self.machine.last_seq == self.truth.last_seq
        assert self.reported is self.machine.state, "a transition went unreported"
        snap = self.machine.snapshot()
        assert snap.state is self.machine.state
        assert snap.since == self.reported_since
        assert snap.last_seq == self.truth.last_seq
        if snap.state is LOCKED:
            assert snap.armed_until is None and snap.view_until is None
            assert snap.look_id is None
        else:
            assert snap.armed_until == self.truth.arm_wall
        if snap.state is VIEWING:
            assert snap.view_until == self.truth.view_wall
            assert snap.look_id is not None
        if self.machine.state is LOCKED:
            assert self.machine.next_deadline() is None

    @invariant()
    def look_never_outlasts_its_cap(self) -> None:
        if self.machine is None or self.machine.state is not VIEWING:
            return
        on_for = self.real - self.camera_on_at
        assert on_for < self.truth.look_cap_real  # min(max_s, look cap)
        assert on_for < self.camera_on_max_s

    @invariant()
    def armed_only_inside_the_window(self) -> None:
        if self.machine is None or self.machine.state is LOCKED:
            return
        assert self.synced
        assert self.wall < self.truth.arm_wall  # wall time
        assert self.real < self.truth.arm_real_end  # real time

    @invariant()
    def persisted_counter_is_the_machines(self) -> None:
        if self.machine is not None:
            assert self.machine.last_seq == self.persisted
            assert self.persisted >= self.persisted_at_boot


DeviceNights.TestCase.settings = settings(max_examples=500, stateful_step_count=50, deadline=None)
TestDeviceNights = DeviceNights.TestCase


# --- example-based regressions --------------------------------------------------------------


def _machine(last_seq: int = 0) -> DeviceMachine:
    return DeviceMachine(device_id=DEVICE, keys=KEYS, last_seq=last_seq, now=Clock(T0, 0.0))


def test_a_night() -> None:
    """Arm, look to the cap, look again, window end: exact instants and durations."""
    m = _machine()
    arm_ = sign(tk.arm(DEVICE, seq=1, now=T0, until=int(T0) + 600), FLEET)
    actions = m.handle(arm_, Clock(T0, 0.0))
    assert actions[0] == PersistSeq(1)
    assert m.state is ARMED and m.next_deadline() == 600.0
    look1 = tk.look(DEVICE, seq=2, now=T0 + 10, staff="nurse.anna", max_s=90, look_id="a1")
    actions = m.handle(sign(look1, FLEET), Clock(T0 + 10, 10.0))
    assert actions[0] == PersistSeq(2)
    assert actions[1] == CameraOn("a1", "nurse.anna", 60.0)  # the device's own cap wins
    assert m.next_deadline() == 70.0
    assert m.tick(Clock(T0 + 69.75, 69.75)) == []
    ended = m.tick(Clock(T0 + 70, 70.0))
    assert ended[0] == CameraOff("look_cap", "a1", 60.0, "nurse.anna")
    assert m.state is ARMED
    look2 = tk.look(DEVICE, seq=3, now=T0 + 580, staff="b", max_s=60, look_id="a2")
    actions = m.handle(sign(look2, FLEET), Clock(T0 + 580, 580.0))
    assert actions[1] == CameraOn("a2", "b", 20.0)  # the window ends first
    ended = m.tick(Clock(T0 + 600, 600.0))
    assert ended[0] == CameraOff("window_end", "a2", 20.0, "b")
    assert m.state is LOCKED and m.next_deadline() is None


def test_wall_clock_stepped_back_does_not_extend_the_window() -> None:
    m = _machine()
    m.handle(sign(tk.arm(DEVICE, seq=1, now=T0, until=int(T0) + 600), FLEET), Clock(T0, 0.0))
    # The wall clock goes back an hour at mono 100: the window still ends at mono 600.
    assert m.tick(Clock(T0 - 3600 + 100, 100.0)) == []
    assert m.next_deadline() == 600.0
    assert m.tick(Clock(T0 - 3600 + 600, 600.0))[-1] == StateChanged(ARMED, LOCKED, "window_end")


def test_reboot_forgets_nothing_that_matters() -> None:
    m = _machine()
    token = sign(tk.arm(DEVICE, seq=5, now=T0, until=int(T0) + 600), FLEET)
    assert m.handle(token, Clock(T0, 0.0))[-1].result is APPLIED
    assert m.handle(token, Clock(T0 + 1, 1.0))[-1].result is DUPLICATE
    rebooted = _machine(last_seq=5)
    ack = rebooted.handle(token, Clock(T0 + 2, 0.5))[-1]
    assert (ack.result, ack.reason) == (REFUSED, R.REPLAYED)
    assert rebooted.state is LOCKED


def _label_probe(payload: dict[str, Any]) -> str:
    """An unsigned token (alg none) with arbitrary claims: refused, but its ack is labelled
    from the claims it carries."""
    hdr = b64(json.dumps({"alg": "none", "typ": tk.TOKEN_TYPE, "kid": FLEET.kid}).encode())
    return f"{hdr}.{b64(json.dumps(payload).encode())}."


# Regression: peek_ids() once tested `cmd in {...}` on the unverified claim, so an unhashable
# cmd (list/object) raised TypeError out of handle() instead of a refusal ack.
@pytest.mark.parametrize("cmd", [["arm"], {"arm": 1}])
def test_unhashable_cmd_in_a_refused_token_is_still_acked(cmd: Any) -> None:
    actions = _machine().handle(_label_probe({"cmd": cmd, "jti": "x", "seq": 5}), Clock(T0, 0.0))
    assert actions[-1] == AckOut("x", 5, None, REFUSED, LOCKED, R.BAD_ALGORITHM)


# Regression: peek_ids() once echoed any str.isalnum() jti (Unicode letters and digits),
# which Ack.jti (^[A-Za-z0-9_-]{1,64}$) refuses, so the refusal ack could not be published.
@pytest.mark.parametrize("jti", ["ä1", "²", "١٢٣", "a\n", "x" * 65])
def test_refusal_ack_labels_are_publishable(jti: str) -> None:
    ack = _machine().handle(_label_probe({"cmd": "arm", "jti": jti, "seq": 5}), Clock(T0, 0.0))[-1]
    assert isinstance(ack, AckOut) and ack.reason is R.BAD_ALGORITHM
    assert (ack.jti, ack.seq, ack.cmd) == (None, 5, CommandKind.ARM)
    Ack(ts=T0, jti=ack.jti, seq=ack.seq, cmd=ack.cmd, result=ack.result, reason=ack.reason,
        state=ack.state)  # fmt: skip


def test_refusal_acks_drop_unusable_labels() -> None:
    probe = _label_probe({"cmd": "config", "jti": "a/b", "seq": -4})
    ack = _machine().handle(probe, Clock(T0, 0.0))[-1]
    assert ack == AckOut(None, None, None, REFUSED, LOCKED, R.BAD_ALGORITHM)
    probe = _label_probe({"cmd": "look", "jti": "ok-1_", "seq": True})
    ack = _machine().handle(probe, Clock(T0, 0.0))[-1]
    assert (ack.jti, ack.seq, ack.cmd) == ("ok-1_", None, CommandKind.LOOK)
