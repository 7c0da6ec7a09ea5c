"""Care plan arithmetic: agreed times of day -> nights -> checks, with explicit DST rules.

Pure code: no database, no clock (``now`` is always an argument), no I/O.

**Nights.** A night is named by the local date on which it begins and runs from local noon
to the next local noon (:data:`NIGHT_SPLIT`). An agreed time at or after noon belongs to
the night that begins that day; one before noon to the night that began the day before:
a 02:00 check on Tuesday morning belongs to *Monday's night*. Everything a plan says
about nights speaks of that date:

- ``nights`` (days of week, 0 = Monday) are the evenings a night begins on: ``"01234"``
  means Monday to Friday nights, so there is a 02:00 check on Saturday morning but not
  on Sunday morning;
- an opt-out is for one night (all its checks);
- validity dates are the first and last night;
- a pause (hospital stay, travel) covers every check whose real start lies inside it.

**DST rules** (Europe/Stockholm, but any ``zoneinfo`` zone):

- a time that happens twice (fall back) is its first occurrence: one check, not two;
- a time that does not exist (spring forward) is shifted forward by the length of the gap
  (RFC 5545: 02:30 becomes 03:30 summer time), so it still gets exactly one check;
- **collision**: on the spring-forward night a check may land on another one's window: a
  shifted time on an existing one (02:00 and 03:00 both become 03:00 summer time), or two
  existing times closer in real time than on the clock (01:31 and 03:00 are 29 minutes
  apart that night). Checks keep their order in real time (at the same instant, the time
  that exists goes first) and **a check that would start before the previous one has
  ended starts when it ends**: 02:00 -> 03:10 with 10-minute windows, 03:00 -> 03:01
  after a 30-minute 01:31. Every agreed time keeps its own check, no two windows of a
  night overlap, and every window lasts exactly the agreed length in real time.

Plans must space their agreed times at least one window length apart on the clock
(checked by :func:`validate_times`), so that only the spring-forward night can collide.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

NIGHT_SPLIT = time(12, 0)
DAY = timedelta(days=1)
ESCALATION_ACTIONS = ("call", "visit")


class Shift(StrEnum):
    NONE = "none"
    DST_GAP = "dst_gap"  # agreed time does not exist tonight: shifted forward by the gap
    DST_COLLISION = "dst_collision"  # ... and moved on past another check's window


class Planned(StrEnum):
    SCHEDULED = "scheduled"
    OPTED_OUT = "opted_out"
    PAUSED = "paused"


class PlanRuleError(ValueError):
    """A plan that cannot be turned into checks: names the field and why."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name}: {why}")
        self.field = field_name
        self.why = why


@dataclass(frozen=True, slots=True, order=True)
class Slot:
    """One occurrence of one agreed time in one night, in real (UTC) time."""

    start: datetime
    end: datetime
    night: date
    agreed: time
    shift: Shift = Shift.NONE

    @property
    def local_date(self) -> date:
        return local_date_of(self.night, self.agreed)


@dataclass(frozen=True, slots=True)
class Pause:
    start: float  # epoch s
    end: float | None  # None: until further notice

    def covers(self, instant: float) -> bool:
        return self.start <= instant and (self.end is None or instant < self.end)


@dataclass(frozen=True, slots=True)
class PlanSpec:
    """What the rules need from a care plan (the table row maps onto this)."""

    times: tuple[time, ...]
    window: timedelta
    tz: ZoneInfo
    nights: frozenset[int] = frozenset(range(7))
    valid_from: date | None = None
    valid_until: date | None = None
    opt_outs: frozenset[date] = frozenset()
    pauses: tuple[Pause, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class PlannedCheck:
    slot: Slot
    status: Planned


# --- nights --------------------------------------------------------------------------


def night_of(local_day: date, agreed: time) -> date:
    """The night an agreed time on a local date belongs to."""
    return local_day if agreed >= NIGHT_SPLIT else local_day - DAY


def local_date_of(night: date, agreed: time) -> date:
    """The local date on which an agreed time of a night falls."""
    return night if agreed >= NIGHT_SPLIT else night + DAY


def night_at(instant: datetime, tz: ZoneInfo) -> date:
    """The night that a real instant lies in (by local wall time)."""
    local = instant.astimezone(tz)
    return night_of(local.date(), local.time())


def night_bounds(night: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """Real start and end of a night: local noon to the next local noon."""
    start = datetime.combine(night, NIGHT_SPLIT, tzinfo=tz).astimezone(UTC)
    end = datetime.combine(night + DAY, NIGHT_SPLIT, tzinfo=tz).astimezone(UTC)
    return start, end


# --- one night -----------------------------------------------------------------------


def _resolve(day: date, at: time, tz: ZoneInfo) -> tuple[datetime, bool]:
    """(instant, exists). Ambiguous -> first occurrence; nonexistent -> shifted by the gap."""
    naive = datetime.combine(day, at.replace(tzinfo=None, fold=0))
    instant = naive.replace(tzinfo=tz).astimezone(UTC)
    exists = instant.astimezone(tz).replace(tzinfo=None) == naive
    return instant, exists


def night_slots(night: date, times: Iterable[time], window: timedelta, tz: ZoneInfo) -> list[Slot]:
    """Exactly one slot per agreed time for this night, none overlapping, in time order."""
    resolved = []
    for at in sorted(set(times), key=lambda t: (t < NIGHT_SPLIT, t)):
        instant, exists = _resolve(local_date_of(night, at), at, tz)
        resolved.append((instant, not exists, (at < NIGHT_SPLIT, at), at))
    slots: list[Slot] = []
    for instant, shifted, _order, at in sorted(resolved):
        start = instant
        shift = Shift.DST_GAP if shifted else Shift.NONE
        if slots and start < slots[-1].end:  # only on a spring-forward night
            start, shift = slots[-1].end, Shift.DST_COLLISION
        slots.append(Slot(start, start + window, night, at, shift))
    return slots


def is_opted_out(spec: PlanSpec, night: date) -> bool:
    return night in spec.opt_outs


def night_runs(spec: PlanSpec, night: date) -> bool:
    """Whether the plan has checks in this night at all (validity and days of week)."""
    if spec.valid_from is not None and night < spec.valid_from:
        return False
    if spec.valid_until is not None and night > spec.valid_until:
        return False
    return night.weekday() in spec.nights


def planned_night(spec: PlanSpec, night: date) -> list[PlannedCheck]:
    """The checks of one night with what the plan says about each."""
    if not night_runs(spec, night):
        return []
    out = []
    for slot in night_slots(night, spec.times, spec.window, spec.tz):
        if is_opted_out(spec, night):
            status = Planned.OPTED_OUT
        elif any(p.covers(slot.start.timestamp()) for p in spec.pauses):
            status = Planned.PAUSED
        else:
            status = Planned.SCHEDULED
        out.append(PlannedCheck(slot, status))
    return out


def nights_between(start: datetime, end: datetime, tz: ZoneInfo) -> list[date]:
    """Every night that a slot overlapping [start, end) could belong to."""
    first = night_at(start, tz) - DAY  # a long window may reach back past noon
    last = night_at(end, tz)
    return [first + DAY * i for i in range((last - first).days + 1)]


def planned_between(spec: PlanSpec, start: datetime, end: datetime) -> list[PlannedCheck]:
    """Checks whose window overlaps [start, end), in time order (each exactly once)."""
    out = [
        pc
        for night in nights_between(start, end, spec.tz)
        for pc in planned_night(spec, night)
        if pc.slot.end > start and pc.slot.start < end
    ]
    return sorted(out, key=lambda pc: pc.slot)


# --- rechecks ------------------------------------------------------------------------


def recheck_window(not_seen_at: float, delay_s: float, window_s: float) -> tuple[float, float]:
    """A recheck window that is open within ``delay_s`` of the not-seen outcome.

    It ends at the recheck deadline and lasts the plan's window length (starting no
    earlier than the outcome), so a look is possible until the deadline and not after.
    """
    end = not_seen_at + delay_s
    return max(not_seen_at, end - window_s), end


# --- validation ----------------------------------------------------------------------


def parse_time(text: str) -> time:
    try:
        at = time.fromisoformat(text)
    except ValueError:
        raise PlanRuleError("check_times", f"not a time of day: {text[:16]!r}") from None
    if at.tzinfo is not None or at.microsecond:
        raise PlanRuleError("check_times", f"use HH:MM or HH:MM:SS: {text[:16]!r}")
    return at


def format_time(at: time) -> str:
    return at.strftime("%H:%M:%S") if at.second else at.strftime("%H:%M")


def parse_times(texts: Iterable[str]) -> tuple[time, ...]:
    times = [parse_time(t) for t in texts]
    if len(set(times)) != len(times):
        raise PlanRuleError("check_times", "the same time twice")
    return tuple(sorted(times, key=lambda t: (t < NIGHT_SPLIT, t)))


def validate_times(times: Sequence[time], window: timedelta) -> None:
    """At least one time, windows at least one window length apart (around the clock)."""
    if not times:
        raise PlanRuleError("check_times", "at least one check time is needed")
    if window <= timedelta(0) or window > timedelta(hours=6):
        raise PlanRuleError("window_s", "must be between 1 s and 6 h")
    secs = sorted(t.hour * 3600 + t.minute * 60 + t.second for t in times)
    gaps = [b - a for a, b in itertools.pairwise(secs)]
    gaps.append(secs[0] + 86400 - secs[-1])
    if min(gaps) < window.total_seconds():
        raise PlanRuleError("check_times", "check times must be at least one window length apart")


def parse_nights(text: str) -> frozenset[int]:
    if not text or any(c not in "0123456" for c in text) or len(set(text)) != len(text):
        raise PlanRuleError("nights", "days of week as digits 0-6 (0 = Monday), each once")
    return frozenset(int(c) for c in text)


def parse_escalation(steps: Sequence[str]) -> tuple[str, ...]:
    if not steps or len(steps) > 5:
        raise PlanRuleError("escalation", "one to five steps")
    for step in steps:
        if step not in ESCALATION_ACTIONS:
            raise PlanRuleError("escalation", f"unknown step {step[:16]!r}: call or visit")
    if steps[-1] != "visit":
        raise PlanRuleError("escalation", "the chain must end with a visit")
    return tuple(steps)


def load_tz(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PlanRuleError("tz", f"unknown time zone {name[:64]!r}") from None


def dumps_list(items: Iterable[str]) -> str:
    return json.dumps(list(items), separators=(",", ":"))
