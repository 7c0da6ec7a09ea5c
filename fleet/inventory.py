"""Equipment inventory: device records, their certificates, enrollments and history.

Tables (registered with the database through ``fleet/db.py``):

- :class:`DeviceRecord`: one per paired device id (= one installation): hardware serial,
  kind, site, resident, plan, lifecycle state, who paired it and when, what it replaced;
- :class:`DeviceCertificate`: every certificate the fleet CA issued to a device, with its
  status (active, pending confirmation after a renewal, retired, revoked);
- :class:`DeviceHistory`: append-only lifecycle events (enrolled, paired, commissioned,
  renewed, swapped, retired, returned), kept after the device is gone;
- :class:`Enrollment`: RFC 8628 device authorizations (only hashes of the codes);
- :class:`CommissioningRun`: the post-pairing test, step by step.

A device id is never reused: a returned device that is installed again enrolls with a
new key and so gets a new id; its serial links the two records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, Index
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, Session, SQLModel, col, select

from tillsyn_protocol import DeviceKind

from .models import Device
from .query import among

__all__ = [
    "CSV_COLUMNS",
    "IN_SERVICE",
    "CertStatus",
    "CommissioningRun",
    "DeviceCertificate",
    "DeviceHistory",
    "DeviceRecord",
    "Enrollment",
    "EnrollmentStatus",
    "Lifecycle",
    "RunStatus",
    "add_history",
    "certificates_expiring",
    "code_hash",
    "inventory_rows",
    "to_csv",
]


class Lifecycle(StrEnum):
    COMMISSIONING = "commissioning"  # paired, certificate issued, test not passed yet
    LIVE = "live"  # commissioning test passed: in service for its resident
    FAILED = "commissioning_failed"  # test failed; can be re-tested
    RETIRED = "retired"  # service ended; certificate revoked
    SWAPPED_OUT = "swapped_out"  # replaced by another device; certificate revoked
    RETURNED = "returned"  # hardware back in stock; resident link removed


IN_SERVICE = (Lifecycle.COMMISSIONING, Lifecycle.LIVE, Lifecycle.FAILED)


class CertStatus(StrEnum):
    ACTIVE = "active"
    PENDING = "pending"  # renewal issued, device has not confirmed it uses it yet
    RETIRED = "retired"  # superseded by a confirmed renewal (and revoked)
    REVOKED = "revoked"  # swap, retirement, return


class EnrollmentStatus(StrEnum):
    PENDING = "pending"  # waiting for a technician
    APPROVED = "approved"  # certificate issued, not yet picked up by the device
    DELIVERED = "delivered"  # device has its credentials
    DENIED = "denied"  # a technician refused it


class RunStatus(StrEnum):
    WAITING = "waiting"  # for the device to connect
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"


def _enum(enum: type[StrEnum]) -> Column[str]:
    return Column(SAEnum(enum, native_enum=False, length=32, validate_strings=True))


def code_hash(code: str) -> str:
    """Only hashes of device and user codes are stored (a database dump reveals no code)."""
    return hashlib.sha256(code.encode()).hexdigest()


class DeviceRecord(SQLModel, table=True):
    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=64)
    serial: str = Field(index=True, max_length=64)
    kind: DeviceKind = Field(default=DeviceKind.CAMERA, sa_column=_enum(DeviceKind))
    site: str | None = Field(default=None, max_length=64, index=True)
    resident_id: str | None = Field(default=None, max_length=64)
    plan_id: str | None = Field(default=None, max_length=64)
    state: Lifecycle = Field(default=Lifecycle.COMMISSIONING, sa_column=_enum(Lifecycle))
    enrollment_id: int | None = None
    paired_at: float
    paired_by: str = Field(max_length=64)
    live_at: float | None = None
    ended_at: float | None = None
    ended_by: str | None = Field(default=None, max_length=64)
    replaces: str | None = Field(default=None, max_length=64)
    replaced_by: str | None = Field(default=None, max_length=64)


class DeviceCertificate(SQLModel, table=True):
    serial: str = Field(primary_key=True, max_length=40)  # hex
    device_id: str = Field(index=True, max_length=64)
    status: CertStatus = Field(sa_column=_enum(CertStatus))
    not_before: float
    not_after: float
    renew_after: float
    issued_at: float
    request_id: str | None = Field(default=None, max_length=64)  # renewal req
    public_key_sha256: str = Field(max_length=64)
    pem: str = Field(max_length=8192)
    ended_at: float | None = None
    reason: str | None = Field(default=None, max_length=32)


Index(
    "ix_devicecertificate_status",
    col(DeviceCertificate.status),
    col(DeviceCertificate.not_after),
)


class DeviceHistory(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=64)
    serial: str | None = Field(default=None, index=True, max_length=64)
    ts: float
    action: str = Field(max_length=32)
    actor: str = Field(max_length=64)
    detail: str = Field(default="{}", max_length=2000)  # JSON


class Enrollment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    device_code_hash: str = Field(unique=True, max_length=64)
    user_code_hash: str = Field(index=True, max_length=64)
    serial: str = Field(index=True, max_length=64)
    kind: DeviceKind = Field(sa_column=_enum(DeviceKind))
    firmware: str = Field(max_length=32)
    device_id: str = Field(index=True, max_length=64)
    csr: str = Field(max_length=8192)
    status: EnrollmentStatus = Field(
        default=EnrollmentStatus.PENDING, sa_column=_enum(EnrollmentStatus)
    )
    created_at: float
    expires_at: float
    interval_s: int
    last_poll_at: float | None = None
    decided_at: float | None = None
    decided_by: str | None = Field(default=None, max_length=64)
    cert_serial: str | None = Field(default=None, max_length=40)
    delivered_at: float | None = None


class CommissioningRun(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=64)
    enrollment_id: int | None = Field(default=None, index=True)
    technician: str = Field(max_length=64)
    status: RunStatus = Field(default=RunStatus.WAITING, sa_column=_enum(RunStatus))
    steps: str = Field(default="[]", max_length=4000)  # JSON list of {step, ok, at, detail}
    error: str | None = Field(default=None, max_length=200)
    started_at: float
    finished_at: float | None = None

    def step_list(self) -> list[dict[str, Any]]:
        data = json.loads(self.steps)
        return data if isinstance(data, list) else []


def add_history(
    session: Session,
    *,
    device_id: str,
    serial: str | None,
    ts: float,
    action: str,
    actor: str,
    **detail: Any,
) -> DeviceHistory:
    entry = DeviceHistory(
        device_id=device_id,
        serial=serial,
        ts=ts,
        action=action,
        actor=actor,
        detail=json.dumps(detail, sort_keys=True, default=str)[:2000],
    )
    session.add(entry)
    return entry


# --- listing and export ------------------------------------------------------------------

CSV_COLUMNS = [
    "device_id",
    "serial",
    "kind",
    "state",
    "site",
    "resident_id",
    "plan_id",
    "firmware",
    "connectivity",
    "reported_state",
    "cert_serial",
    "cert_expires_at",
    "paired_at",
    "paired_by",
    "live_at",
    "ended_at",
    "replaces",
    "replaced_by",
]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def inventory_rows(
    session: Session,
    *,
    kind: DeviceKind | None = None,
    site: str | None = None,
    state: str | None = None,
    serial: str | None = None,
    device_ids: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Every device the fleet knows, joined with its record and current certificate.

    Devices registered without pairing (the foundation's ``devices add``) appear with
    state ``registered`` and no serial.
    """
    stmt = select(Device, DeviceRecord).join(
        DeviceRecord, col(DeviceRecord.device_id) == col(Device.id), isouter=True
    )
    if device_ids is not None:
        stmt = stmt.where(among(Device.id, list(device_ids)))
    if kind is not None:
        stmt = stmt.where(Device.kind == kind)
    if site is not None:
        stmt = stmt.where((DeviceRecord.site == site) | (Device.site == site))
    if serial is not None:
        stmt = stmt.where(DeviceRecord.serial == serial)
    certs = _current_certs(session)
    rows: list[dict[str, Any]] = []
    for device, record in session.exec(stmt.order_by(col(Device.id))).all():
        row_state = record.state.value if record else "registered"
        if state is not None and row_state != state:
            continue
        cert = certs.get(device.id)
        rows.append(
            {
                "device_id": device.id,
                "serial": record.serial if record else None,
                "kind": device.kind.value,
                "state": row_state,
                "site": (record.site if record else None) or device.site,
                "resident_id": (record.resident_id if record else None) or device.resident_id,
                "plan_id": record.plan_id if record else None,
                "firmware": device.firmware,
                "connectivity": device.connectivity.value,
                "reported_state": device.reported_state.value,
                "cert_serial": cert.serial if cert else None,
                "cert_expires_at": _iso(cert.not_after) if cert else None,
                "cert_not_after": cert.not_after if cert else None,
                "paired_at": _iso(record.paired_at) if record else None,
                "paired_by": record.paired_by if record else None,
                "live_at": _iso(record.live_at) if record else None,
                "ended_at": _iso(record.ended_at) if record else None,
                "replaces": record.replaces if record else None,
                "replaced_by": record.replaced_by if record else None,
            }
        )
    return rows


def _current_certs(session: Session) -> dict[str, DeviceCertificate]:
    """Per device, the active certificate (or the newest, if none is active)."""
    out: dict[str, DeviceCertificate] = {}
    stmt = select(DeviceCertificate).order_by(col(DeviceCertificate.issued_at))
    for cert in session.exec(stmt):
        have = out.get(cert.device_id)
        if (
            have is None
            or have.status is not CertStatus.ACTIVE
            or (cert.status is CertStatus.ACTIVE)
        ):
            out[cert.device_id] = cert
    return out


def certificates_expiring(
    session: Session, *, before: float, device_ids: Iterable[str] | None = None
) -> Sequence[DeviceCertificate]:
    stmt = (
        select(DeviceCertificate)
        .where(
            col(DeviceCertificate.status).in_([CertStatus.ACTIVE, CertStatus.PENDING]),
            DeviceCertificate.not_after < before,
        )
        .order_by(col(DeviceCertificate.not_after))
    )
    if device_ids is not None:
        stmt = stmt.where(among(DeviceCertificate.device_id, list(device_ids)))
    return session.exec(stmt).all()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    # A spreadsheet must never run a cell as a formula (CSV injection).
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return buf.getvalue()
