"""Window arithmetic: agreed local times of day -> real (UTC) windows, with explicit DST rules.

Rules (those of RFC 5545 for DTSTART):
- a local time that does not exist (spring forward) is read with the offset before the gap,
  so 02:30 on the spring-forward night becomes 03:30 summer time: shifted forward, once;
- a local time that happens twice (fall back) is its first occurrence: one check, not two;
- a window's length is real elapsed time, so a window across a transition is still as
  long as agreed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

STOCKHOLM = ZoneInfo("Europe/Stockholm")


@dataclass(frozen=True, slots=True, order=True)
class Occurrence:
    start: datetime  # aware, UTC
    end: datetime  # aware, UTC
    local_date: date
    agreed: time

    def contains(self, instant: datetime) -> bool:
        return self.start <= instant < self.end


def resolve_local(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The one real instant (UTC) of an agreed local time on a local date."""
    naive = datetime.combine(day, at.replace(tzinfo=None, fold=0))
    # fold=0 means: ambiguous -> first occurrence; nonexistent -> offset before the gap.
    return naive.replace(tzinfo=tz).astimezone(UTC)


def occurrence(day: date, at: time, length: timedelta, tz: ZoneInfo) -> Occurrence:
    start = resolve_local(day, at, tz)
    return Occurrence(start, start + length, day, at)


def occurrences_between(
    times: Iterable[time],
    length: timedelta,
    start: datetime,
    end: datetime,
    *,
    tz: ZoneInfo = STOCKHOLM,
    weekdays: frozenset[int] = frozenset(range(7)),
) -> Iterator[Occurrence]:
    """Windows overlapping [start, end), in time order. ``weekdays``: 0 = Monday."""
    agreed = sorted(set(times))
    # One extra day back: a long window that crosses a DST change spans one more local day.
    first = start.astimezone(tz).date() - timedelta(days=2 + length.days)
    last = end.astimezone(tz).date() + timedelta(days=1)
    found: list[Occurrence] = []
    day = first
    while day <= last:
        if day.weekday() in weekdays:
            for at in agreed:
                occ = occurrence(day, at, length, tz)
                if occ.end > start and occ.start < end:
                    found.append(occ)
        day += timedelta(days=1)
    yield from sorted(found)


def current_or_next(
    times: Iterable[time],
    length: timedelta,
    now: datetime,
    *,
    tz: ZoneInfo = STOCKHOLM,
    weekdays: frozenset[int] = frozenset(range(7)),
    horizon: timedelta = timedelta(days=8),
) -> Occurrence | None:
    """The window open at ``now``, else the next one to open (within the horizon)."""
    for occ in occurrences_between(times, length, now, now + horizon, tz=tz, weekdays=weekdays):
        return occ
    return None
