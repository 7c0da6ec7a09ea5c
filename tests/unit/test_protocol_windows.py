"""Window arithmetic over every day of 2026-2030 in Europe/Stockholm, DST nights included.

The expected instants come from an independent reference that only converts UTC -> local
(never local -> UTC with ``fold``), so it does not share the implementation's approach.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tillsyn_protocol.windows import (
    STOCKHOLM,
    Occurrence,
    current_or_next,
    occurrence,
    occurrences_between,
    resolve_local,
)

TZ = ZoneInfo("Europe/Stockholm")
AGREED = [
    time(2, 0), time(2, 30), time(2, 59), time(3, 0), time(1, 30), time(22, 0), time(23, 59),
    time(0, 0),
]  # fmt: skip
FIRST_DAY, LAST_DAY = date(2026, 1, 1), date(2030, 12, 31)
ALL_DAYS = [FIRST_DAY + timedelta(days=i) for i in range((LAST_DAY - FIRST_DAY).days + 1)]
SPRING_FORWARD = {date(y, 3, d) for y, d in [(2026, 29), (2027, 28), (2028, 26), (2029, 25),
                                             (2030, 31)]}  # fmt: skip
FALL_BACK = {date(y, 10, d) for y, d in [(2026, 25), (2027, 31), (2028, 29), (2029, 28),
                                         (2030, 27)]}  # fmt: skip
CET, CEST = timedelta(hours=1), timedelta(hours=2)


def local_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0, 0), tzinfo=TZ)


def reference_instant(day: date, at: time) -> tuple[datetime, str]:
    """(UTC instant, 'normal' | 'gap' | 'fold') of an agreed time, by brute force."""
    naive = datetime.combine(day, at)
    matches = [
        (naive - off).replace(tzinfo=UTC)
        for off in (CET, CEST)
        if (naive - off).replace(tzinfo=UTC).astimezone(TZ).replace(tzinfo=None) == naive
    ]
    if len(matches) == 2:
        return min(matches), "fold"  # happens twice: the first one
    if len(matches) == 1:
        return matches[0], "normal"
    # Does not exist (spring forward): read with the offset before the gap (CET).
    return (naive - CET).replace(tzinfo=UTC), "gap"


@cache
def all_occurrences(length: timedelta, weekdays: frozenset[int]) -> list[Occurrence]:
    return list(
        occurrences_between(
            AGREED,
            length,
            local_midnight(FIRST_DAY),
            local_midnight(LAST_DAY + timedelta(days=1)),
            weekdays=weekdays,
        )
    )


EVERY_DAY = frozenset(range(7))
LENGTHS = [timedelta(minutes=1), timedelta(minutes=30), timedelta(hours=2), timedelta(hours=9)]


def test_dst_dates_are_the_ones_zoneinfo_knows() -> None:
    gaps = {d for d in ALL_DAYS if reference_instant(d, time(2, 30))[1] == "gap"}
    folds = {d for d in ALL_DAYS if reference_instant(d, time(2, 30))[1] == "fold"}
    assert gaps == SPRING_FORWARD
    assert folds == FALL_BACK


@pytest.mark.parametrize("length", LENGTHS, ids=str)
def test_exactly_one_occurrence_per_agreed_time_per_day(length: timedelta) -> None:
    occs = all_occurrences(length, EVERY_DAY)
    inside = [o for o in occs if FIRST_DAY <= o.local_date <= LAST_DAY]
    counts = Counter((o.local_date, o.agreed) for o in inside)
    assert set(counts.values()) == {1}, "some agreed time happens twice on one date"
    expected = {(d, at) for d in ALL_DAYS for at in AGREED}
    assert set(counts) == expected, "some agreed time is missing on some date"
    # The query range spans exactly these dates, plus windows still open at its start.
    outside = [o for o in occs if not FIRST_DAY <= o.local_date <= LAST_DAY]
    assert all(o.end > local_midnight(FIRST_DAY) for o in outside)
    assert occs == sorted(occs)


@pytest.mark.parametrize("length", LENGTHS, ids=str)
def test_every_instant_and_length_matches_the_reference(length: timedelta) -> None:
    kinds: Counter[str] = Counter()
    for occ in all_occurrences(length, EVERY_DAY):
        if not FIRST_DAY <= occ.local_date <= LAST_DAY:
            continue
        expected, kind = reference_instant(occ.local_date, occ.agreed)
        kinds[kind] += 1
        assert occ.start == expected, (occ.local_date, occ.agreed, kind)
        assert occ.start.utcoffset() == timedelta(0)
        # Real length is the agreed length, DST or not.
        assert occ.end - occ.start == length
        assert occ.end.timestamp() - occ.start.timestamp() == length.total_seconds()
        local = occ.start.astimezone(TZ)
        if kind == "gap":  # shifted forward by the size of the gap, once
            assert local.replace(tzinfo=None) == datetime.combine(occ.local_date, occ.agreed) + (
                CEST - CET
            )
        else:
            assert (local.date(), local.time()) == (occ.local_date, occ.agreed)
            if kind == "fold":
                assert local.utcoffset() == CEST  # the first 02:30 is still summer time
    # 02:00, 02:30 and 02:59 fall in the gap on 5 nights and in the fold on 5 nights.
    assert kinds["gap"] == 15
    assert kinds["fold"] == 15
    assert kinds["normal"] == len(ALL_DAYS) * len(AGREED) - 30


def test_spring_forward_0230_is_0330_summer_time() -> None:
    start = resolve_local(date(2027, 3, 28), time(2, 30), STOCKHOLM)
    assert start == datetime(2027, 3, 28, 1, 30, tzinfo=UTC)
    assert start.astimezone(TZ).replace(tzinfo=None) == datetime(2027, 3, 28, 3, 30)
    assert start.astimezone(TZ).utcoffset() == CEST
    occs = list(
        occurrences_between(
            [time(2, 30)], timedelta(minutes=30), local_midnight(date(2027, 3, 28)),
            local_midnight(date(2027, 3, 29)),
        )
    )  # fmt: skip
    assert [o.start for o in occs] == [datetime(2027, 3, 28, 1, 30, tzinfo=UTC)]


def test_fall_back_0230_is_the_first_occurrence() -> None:
    start = resolve_local(date(2027, 10, 31), time(2, 30), STOCKHOLM)
    assert start == datetime(2027, 10, 31, 0, 30, tzinfo=UTC)
    occs = list(
        occurrences_between(
            [time(2, 30)], timedelta(minutes=30), local_midnight(date(2027, 10, 31)),
            local_midnight(date(2027, 11, 1)),
        )
    )  # fmt: skip
    assert [o.start for o in occs] == [datetime(2027, 10, 31, 0, 30, tzinfo=UTC)]
    # Not also at the second 02:30 (01:30 UTC): one check, not two.
    assert all(not o.contains(datetime(2027, 10, 31, 1, 45, tzinfo=UTC)) for o in occs)


def test_window_across_transitions_keeps_its_real_length() -> None:
    two_hours = timedelta(hours=2)
    spring = occurrence(date(2027, 3, 28), time(1, 30), two_hours, STOCKHOLM)
    assert spring.start == datetime(2027, 3, 28, 0, 30, tzinfo=UTC)
    # On the clock on the wall that is 01:30 -> 04:30: three wall hours, two real ones.
    assert spring.end.astimezone(TZ).time() == time(4, 30)
    autumn = occurrence(date(2027, 10, 31), time(1, 30), two_hours, STOCKHOLM)
    assert autumn.start == datetime(2027, 10, 30, 23, 30, tzinfo=UTC)
    assert autumn.end.astimezone(TZ).time() == time(2, 30)  # the second 02:30
    assert autumn.end.astimezone(TZ).utcoffset() == CET


@pytest.mark.parametrize(
    "weekdays", [frozenset({0, 2, 4}), frozenset({6}), frozenset({5, 6})], ids=sorted
)
def test_weekdays_filter(weekdays: frozenset[int]) -> None:
    length = timedelta(minutes=30)
    occs = [o for o in all_occurrences(length, weekdays) if FIRST_DAY <= o.local_date <= LAST_DAY]
    assert {o.local_date.weekday() for o in occs} == set(weekdays)
    expected = {(d, at) for d in ALL_DAYS if d.weekday() in weekdays for at in AGREED}
    assert Counter((o.local_date, o.agreed) for o in occs) == Counter(expected)
    # The weekday is that of the local date, not of the UTC instant (00:00 local is the
    # previous day in UTC).
    midnight = [o for o in occs if o.agreed == time(0, 0)]
    assert all(o.start.date() != o.local_date for o in midnight)


def test_no_weekdays_means_no_windows() -> None:
    now = datetime(2027, 5, 1, tzinfo=UTC)
    assert current_or_next(AGREED, timedelta(hours=1), now, weekdays=frozenset()) is None


# --- current_or_next ----------------------------------------------------------------------


def reference_current_or_next(
    times: list[time], length: timedelta, now: datetime, weekdays: frozenset[int]
) -> tuple[list[datetime], datetime | None]:
    """(starts of the windows open at now, start of the next window within 8 days)."""
    today = now.astimezone(TZ).date()
    starts = [
        reference_instant(today + timedelta(days=k), at)[0]
        for k in range(-4, 10)
        if (today + timedelta(days=k)).weekday() in weekdays
        for at in times
    ]
    open_ = sorted(s for s in starts if s <= now < s + length)
    upcoming = sorted(s for s in starts if now < s < now + timedelta(days=8))
    return open_, (upcoming[0] if upcoming else None)


@settings(max_examples=400, deadline=None)
@given(
    now=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
    )
    | st.sampled_from(
        # Around every DST night: the transitions themselves and the agreed times.
        [
            datetime.combine(d, time(h, m), tzinfo=UTC) + timedelta(seconds=s)
            for d in sorted(SPRING_FORWARD | FALL_BACK)
            for h in (0, 1, 2)
            for m in (0, 29, 30, 59)
            for s in (-1, 0, 1)
        ]
    ),
    times=st.lists(st.sampled_from(AGREED), min_size=1, max_size=4, unique=True),
    length=st.sampled_from(
        [timedelta(seconds=1), timedelta(minutes=30), timedelta(hours=3), timedelta(hours=23.5)]
    )
    | st.integers(min_value=1, max_value=48 * 3600).map(lambda s: timedelta(seconds=s)),
    weekdays=st.frozensets(st.integers(min_value=0, max_value=6), min_size=1),
)
def test_current_or_next(
    now: datetime, times: list[time], length: timedelta, weekdays: frozenset[int]
) -> None:
    got = current_or_next(times, length, now, weekdays=weekdays)
    open_, upcoming = reference_current_or_next(times, length, now, weekdays)
    if open_:
        assert got is not None
        assert got.contains(now), "inside a window but got another one"
        assert got.start == open_[0]
    elif upcoming is None:
        assert got is None
    else:
        assert got is not None
        assert not got.contains(now)
        assert got.start == upcoming, "not the next window to open"
    if got is not None:
        assert got.end - got.start == length
        assert got.local_date.weekday() in weekdays
        assert got.agreed in times


def test_occurrence_contains_is_half_open() -> None:
    occ = occurrence(date(2027, 6, 1), time(22, 0), timedelta(minutes=30), STOCKHOLM)
    assert occ.contains(occ.start)
    assert occ.contains(occ.end - timedelta(microseconds=1))
    assert not occ.contains(occ.end)
    assert not occ.contains(occ.start - timedelta(microseconds=1))


def test_current_or_next_boundaries() -> None:
    length = timedelta(minutes=30)
    first = occurrence(date(2027, 6, 1), time(22, 0), length, STOCKHOLM)
    second = occurrence(date(2027, 6, 2), time(1, 30), length, STOCKHOLM)
    times = [time(22, 0), time(1, 30)]
    assert current_or_next(times, length, first.start - timedelta(seconds=1)) == first
    assert current_or_next(times, length, first.start) == first
    assert current_or_next(times, length, first.end - timedelta(microseconds=1)) == first
    assert current_or_next(times, length, first.end) == second  # end is exclusive
    assert current_or_next(times, length, second.start + timedelta(minutes=1)) == second


# Regression: occurrences_between looked back only 1 + length.days local days; a window of
# 23h01m-24h (or n days + that) crossing spring-forward reaches one local day further and was
# missed, so current_or_next skipped an open window.
def test_long_window_across_spring_forward_is_found() -> None:
    length = timedelta(hours=23, minutes=59)
    opened = occurrence(date(2027, 3, 27), time(23, 59), length, STOCKHOLM)  # Saturday
    now = datetime(2027, 3, 29, 0, 30, tzinfo=TZ)  # Monday, 00:30 CEST
    assert opened.contains(now)
    found = list(occurrences_between([time(23, 59)], length, now, now + timedelta(minutes=1)))
    assert opened in found
    assert current_or_next([time(23, 59)], length, now, weekdays=frozenset({5})) == opened
