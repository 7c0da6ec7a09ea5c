"""Database tables (SQLModel). The database is the truth; everything in memory is a cache."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import Column, Index, UniqueConstraint
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel

from tillsyn_protocol import CameraHealth, CommandKind, DeviceKind, LockState


def utcnow() -> datetime:
    return datetime.now(UTC)


class Connectivity(StrEnum):
    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


class CommandStatus(StrEnum):
    PENDING = "pending"  # sent or to be sent, no ack yet
    APPLIED = "applied"
    REFUSED = "refused"
    EXPIRED = "expired"  # delivery deadline passed with no ack
    SUPERSEDED = "superseded"  # a newer command for the device made it moot


class VisitCause(StrEnum):
    DEVICE_OFFLINE = "device_offline"
    ARM_UNCONFIRMED = "arm_unconfirmed"
    CAMERA_FAULT = "camera_fault"
    NOT_SEEN_TWICE = "not_seen_twice"
    OPTED_OUT = "opted_out"
    # Care plans (fleet/checks.py): staff saw something wrong; a check ended with no
    # outcome and the plan escalates that; pre-flight found the clock or lock state off.
    SOMETHING_WRONG = "something_wrong"
    NO_OUTCOME = "no_outcome"
    CLOCK_UNSYNCED = "clock_unsynced"
    LOCK_MISMATCH = "lock_mismatch"


class VisitStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    CLOSED = "closed"


def _enum(enum: type[StrEnum]) -> Column[str]:
    # Stored as plain strings so a new member never needs a schema migration.
    return Column(SAEnum(enum, native_enum=False, length=32, validate_strings=True))


class Device(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    kind: DeviceKind = Field(default=DeviceKind.CAMERA, sa_column=_enum(DeviceKind))
    resident_id: str | None = Field(default=None, max_length=64, index=True)
    site: str | None = Field(default=None, max_length=64)
    # Team/area whose night staff and technicians may see and use it; None: IT admins only.
    team: str | None = Field(default=None, max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    firmware: str | None = Field(default=None, max_length=32)
    connectivity: Connectivity = Field(default=Connectivity.UNKNOWN, sa_column=_enum(Connectivity))
    offline_since: float | None = None  # epoch s; identifies the current outage
    last_seen: float | None = None  # epoch s, written in batches from memory
    boot_id: str | None = Field(default=None, max_length=64)
    reported_state: LockState = Field(default=LockState.LOCKED, sa_column=_enum(LockState))
    reported_at: float | None = None
    armed_until: float | None = None
    camera: CameraHealth | None = Field(default=None, sa_column=_enum(CameraHealth))
    clock_synced: bool | None = None
    clock_skew_s: float | None = None
    next_seq: int = 1  # next sequence number to sign for this device
    device_last_seq: int = 0  # highest seq the device says it applied
    # A commissioning test (fleet/commissioning.py) drives the device until then (epoch s):
    # reconciliation leaves it alone. Expires by itself, so a crashed test cannot pin it.
    hold_until: float | None = None


class Window(SQLModel, table=True):
    """An agreed window: local time of day and length (the full care plan comes later)."""

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    start_local: str = Field(max_length=8)  # HH:MM:SS in ``tz``
    duration_s: int
    weekdays: str = Field(default="0123456", max_length=7)  # 0 = Monday
    tz: str = Field(default="Europe/Stockholm", max_length=64)
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class Command(SQLModel, table=True):
    """The ledger: every signed command, tracked until acknowledged or moot."""

    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    jti: str = Field(unique=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    seq: int
    kind: CommandKind = Field(sa_column=_enum(CommandKind))
    until: float | None = None  # arm: window end
    look_id: str | None = Field(default=None, max_length=64)
    staff_id: str | None = Field(default=None, max_length=64)
    token: str = Field(max_length=2048)
    status: CommandStatus = Field(default=CommandStatus.PENDING, sa_column=_enum(CommandStatus))
    reason: str | None = Field(default=None, max_length=32)
    created_at: float
    expires_at: float  # delivery deadline
    attempts: int = 0
    last_sent_at: float | None = None
    acked_at: float | None = None


Index("ix_command_pending", Command.status, Command.device_id)


class Visit(SQLModel, table=True):
    """A physical visit replacing a digital check that cannot happen."""

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=160)  # once per cause: the dedup key
    device_id: str | None = Field(default=None, index=True, max_length=64)
    resident_id: str | None = Field(default=None, max_length=64)
    cause: VisitCause = Field(sa_column=_enum(VisitCause))
    due_at: float
    raised_at: float
    evidence: str = Field(default="{}", max_length=4000)  # JSON
    status: VisitStatus = Field(default=VisitStatus.OPEN, sa_column=_enum(VisitStatus))
    device_back_at: float | None = None  # device came back before the visit was closed
    closed_at: float | None = None
    closed_by: str | None = Field(default=None, max_length=64)
    outcome: str | None = Field(default=None, max_length=200)


class Look(SQLModel, table=True):
    """Who looked, when, for how long: filled from the command and the device's events."""

    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    staff_id: str = Field(max_length=64)
    requested_at: float
    started_at: float | None = None
    ended_at: float | None = None
    duration_s: float | None = None
    end_reason: str | None = Field(default=None, max_length=32)
    # Video phones: whether the resident answered the call; False counts as not seen.
    answered: bool | None = None


class AuditEvent(SQLModel, table=True):
    """Append-only, hash-chained log of every command, ack, look and change."""

    id: int | None = Field(default=None, primary_key=True)
    ts: float
    actor: str = Field(max_length=64)
    action: str = Field(max_length=48, index=True)
    subject: str | None = Field(default=None, max_length=64, index=True)
    detail: str = Field(default="{}", max_length=4000)  # JSON
    # Unique: two writers that read the same last entry cannot both append (no fork).
    prev_hash: str = Field(max_length=64, unique=True)
    hash: str = Field(max_length=64, unique=True)
