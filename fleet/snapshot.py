"""Everything reconciliation reads about many devices, in a handful of queries.

One query per table (``IN`` lists in chunks, or the whole table for a full pass) instead of
a few per device: a per-device reconcile cost 1-2 ms on SQLite, which is tens of seconds
of the database thread for 10,000 devices. The rows are ORM objects of the caller's
session, so what the pass changes (a check opened, a command superseded) is what the
rest of the pass sees; the lists are filtered by their *current* state when used.
Windows, which no pass changes, are plain tuples (:class:`WindowSpec`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, TypeVarTuple, cast, overload

from sqlalchemy import func
from sqlalchemy import select as core_select
from sqlalchemy.orm import InstrumentedAttribute, QueryableAttribute, defer
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import Select, SelectOfScalar

from .models import Command, CommandStatus, Device, Window
from .plan_models import ARMING_STATES, Check, EscalationStep, StepStatus, VisitLink
from .query import MAX_PADDED, among

CHUNK = MAX_PADDED  # ids per IN list: well below every backend's bound on parameters
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class WindowSpec(NamedTuple):
    """An active window as reconciliation reads it: a tuple, not an ORM object. Nothing
    a pass does changes a window, and a window start loads 10,000 of them: five values
    each, not an object with its instrumentation and a ``created_at`` to parse."""

    start_local: str
    duration_s: int
    tz: str
    weekdays: str
    active: bool = True


AnyWindow = Window | WindowSpec  # what window arithmetic takes


@dataclass(slots=True)
class DeviceData:
    """One device and what reconciling it needs."""

    device: Device
    windows: list[AnyWindow] = field(default_factory=list)  # active ones
    checks: list[Check] = field(default_factory=list)  # loaded arming, by start; may settle
    pending: list[Command] = field(default_factory=list)  # loaded pending; the ledger appends
    steps: list[EscalationStep] = field(default_factory=list)  # open and due at load time
    visited: set[int] = field(default_factory=set)  # ids of ended checks a visit stands for
    # Start of the first arming check past the loaded ones (``checks`` end at the horizon):
    # all that the next edge needs of the checks beyond it.
    later_check: float | None = None

    def arming(self) -> list[Check]:
        """Checks that (still) want the device armed."""
        return [c for c in self.checks if c.state in ARMING_STATES]

    def pending_now(self) -> list[Command]:
        return [c for c in self.pending if c.status is CommandStatus.PENDING]


def devices() -> SelectOfScalar[Device]:
    """Devices as the storm's paths load them: without ``created_at``, which nothing
    there reads and which SQLite returns as text, parsed into an aware datetime for every
    device loaded (loaded on first access instead, if ever)."""
    return select(Device).options(defer(cast("QueryableAttribute[Any]", Device.created_at)))


def chunks(ids: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


@overload
def rows(
    session: Session,
    stmt: SelectOfScalar[T],
    column: InstrumentedAttribute[Any] | Any,
    ids: Sequence[str] | None,
) -> Iterator[T]: ...


@overload
def rows(
    session: Session,
    stmt: Select[*Ts],
    column: InstrumentedAttribute[Any] | Any,
    ids: Sequence[str] | None,
) -> Iterator[tuple[*Ts]]: ...


def rows(
    session: Session,
    stmt: Any,
    column: InstrumentedAttribute[Any] | Any,
    ids: Sequence[str] | None,
) -> Iterator[Any]:
    """The statement's rows (objects, or tuples for several columns), for these device ids
    (``None``: every device)."""
    if ids is None:
        yield from session.exec(stmt)
        return
    for part in chunks(ids):
        yield from session.exec(stmt.where(among(column, part)))


def active_windows(session: Session, ids: Sequence[str] | None) -> Iterator[tuple[str, WindowSpec]]:
    """(device id, window) of the active windows of these devices (``None``: all)."""
    w = Window.__table__.c  # type: ignore[attr-defined]
    # (Core columns: sqlmodel's select is typed for up to four)
    stmt: Any = core_select(w.device_id, w.start_local, w.duration_s, w.tz, w.weekdays).where(
        w.active
    )
    for device_id, start_local, duration_s, tz, weekdays in rows(
        session, stmt, Window.device_id, ids
    ):
        yield device_id, WindowSpec(start_local, duration_s, tz, weekdays)


def load(
    session: Session, device_ids: Sequence[str] | None, now: float, horizon_s: float
) -> dict[str, DeviceData]:
    """Devices (all for ``None``) with their windows, the arming checks that start before
    ``now + horizon_s`` (and the start of each device's first one after that), pending
    commands, due escalation steps, and visit links of checks whose window has ended.

    Only the start of the first later check: the pass decides nothing beyond the horizon,
    and the next edge of a check is never earlier than its start minus the pre-flight.
    Loading every check of the edge horizon (eight days, 8-16 rows per device) was a
    quarter of a window start's database time and of every full pass."""
    ids = None if device_ids is None else sorted(set(device_ids))
    data = {d.id: DeviceData(d) for d in rows(session, devices(), Device.id, ids)}
    ids = None if ids is None else list(data)
    if not data:
        return data
    for owner, spec in active_windows(session, ids):
        if owner in data:
            data[owner].windows.append(spec)
    stmt = select(Check).where(
        col(Check.state).in_(ARMING_STATES), Check.start_at < now + horizon_s
    )
    ended: list[Check] = []
    for c in sorted(rows(session, stmt, Check.device_id, ids), key=_check_order):
        if c.device_id in data:
            data[c.device_id].checks.append(c)
            if c.start_at <= now and c.end_at <= now:
                ended.append(c)
    later = (
        select(Check.device_id, func.min(Check.start_at))
        .where(col(Check.state).in_(ARMING_STATES), Check.start_at >= now + horizon_s)
        .group_by(col(Check.device_id))
    )
    for device_id, start in rows(session, later, Check.device_id, ids):
        if device_id is not None and device_id in data:
            data[device_id].later_check = start
    pending = select(Command).where(Command.status == CommandStatus.PENDING)
    for cmd in rows(session, pending, Command.device_id, ids):
        if cmd.device_id in data:
            data[cmd.device_id].pending.append(cmd)
    for device_id, step in _step_rows(session, ids, col(EscalationStep.due_at) <= now):
        if device_id in data:
            data[device_id].steps.append(step)
    visited = {c.id for c in ended}
    linked: set[int] = set()
    for part in chunks(sorted(i for i in visited if i is not None)):
        stmt_links = select(VisitLink.check_id).where(among(VisitLink.check_id, part))
        linked.update(i for i in session.exec(stmt_links) if i is not None)
    for c in ended:
        if c.id in linked and c.device_id in data:
            data[c.device_id].visited.add(c.id)
    return data


def deadlines(
    session: Session, device_ids: Sequence[str] | None, now: float
) -> dict[str, list[float]]:
    """Due times of open escalation steps after ``now``, by device (after the pass: the
    steps it started count)."""
    out: dict[str, list[float]] = defaultdict(list)
    for device_id, step in _step_rows(session, device_ids, col(EscalationStep.due_at) > now):
        out[device_id].append(step.due_at)
    return out


def _step_rows(
    session: Session, ids: Sequence[str] | None, *where: Any
) -> Iterable[tuple[str, EscalationStep]]:
    """Open steps with the device of their check (steps of checks with no device are not a
    device's business, as before)."""
    stmt = (
        select(EscalationStep, Check.device_id)
        .join(Check, col(Check.id) == col(EscalationStep.check_id))
        .where(EscalationStep.status == StepStatus.OPEN, *where)
    )
    for step, device_id in rows(session, stmt, Check.device_id, ids):
        if device_id is not None:
            yield device_id, step


def _check_order(c: Check) -> tuple[float, int]:
    return (c.start_at, c.id or 0)
