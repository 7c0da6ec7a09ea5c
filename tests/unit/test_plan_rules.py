"""Care plan -> nights -> checks, over every night of 2026-2030 in Europe/Stockholm.

Expected instants come from a brute-force reference that only converts UTC -> local (it
never uses ``fold``), so it does not share the implementation's approach.
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.plan_rules import (
    Pause,
    Planned,
    PlanRuleError,
    PlanSpec,
    Shift,
    night_at,
    night_bounds,
    night_slots,
    parse_escalation,
    parse_nights,
    parse_times,
    planned_between,
    planned_night,
    recheck_window,
    validate_times,
)

TZ = ZoneInfo("Europe/Stockholm")
CET, CEST = timedelta(hours=1), timedelta(hours=2)
FIRST, LAST = date(2025, 12, 31), date(2030, 12, 31)  # every night touching 2026-2030
ALL_NIGHTS = [FIRST + timedelta(days=i) for i in range((LAST - FIRST).days + 1)]
# The nights that contain a DST change (the change happens on the Sunday morning).
SPRING_NIGHTS = {date(2026, 3, 28), date(2027, 3, 27), date(2028, 3, 25), date(2029, 3, 24),
                 date(2030, 3, 30)}  # fmt: skip
FALL_NIGHTS = {date(2026, 10, 24), date(2027, 10, 30), date(2028, 10, 28), date(2029, 10, 27),
               date(2030, 10, 26)}  # fmt: skip

# Sets chosen to hit the gap, the fold, the collisions and the night boundary.
CRITICAL = [
    ([time(22), time(2), time(6)], 600),
    ([time(2), time(3)], 600),  # 02:00 and 03:00 collide in spring
    ([time(2, 30), time(3, 30), time(2), time(3)], 600),
    ([time(2), time(2, 30), time(3), time(3, 30), time(4)], 1800),
    ([time(2, 59, 59), time(3, 0, 0, 0)], 1),
    ([time(1, 55), time(2, 5), time(2, 15), time(3, 5)], 600),
    ([time(11, 59), time(12, 0), time(0, 0)], 60),
    ([time(2, 10), time(3), time(3, 10)], 600),  # 02:10 -> 03:10 collides, moves to 03:20
]


def reference(day: date, at: time) -> tuple[datetime, str]:
    """(UTC instant, normal|gap|fold) by brute force over the two offsets."""
    naive = datetime.combine(day, at)
    hits = [
        (naive - off).replace(tzinfo=UTC)
        for off in (CET, CEST)
        if (naive - off).replace(tzinfo=UTC).astimezone(TZ).replace(tzinfo=None) == naive
    ]
    if len(hits) == 2:
        return min(hits), "fold"
    if hits:
        return hits[0], "normal"
    return (naive - CET).replace(tzinfo=UTC), "gap"


def check_night(night: date, times: list[time], window_s: int) -> None:
    window = timedelta(seconds=window_s)
    slots = night_slots(night, times, window, TZ)
    # One per agreed time: never two, never none.
    assert Counter(s.agreed for s in slots) == Counter(set(times))
    lo, hi = night_bounds(night, TZ)
    for s in slots:
        assert s.night == night
        assert s.end - s.start == window  # real elapsed time
        assert lo <= s.start < hi
        day = night if s.agreed >= time(12) else night + timedelta(days=1)
        expect, kind = reference(day, s.agreed)
        assert s.start >= expect  # shifted forward, never back
        if s.shift is Shift.DST_COLLISION:
            assert night in SPRING_NIGHTS  # only that night makes windows collide
        elif kind == "gap":
            assert night in SPRING_NIGHTS and s.shift is Shift.DST_GAP and s.start == expect
        else:
            assert s.shift is Shift.NONE and s.start == expect
            if kind == "fold":
                assert night in FALL_NIGHTS
    ordered = sorted(slots)
    for a, b in itertools.pairwise(ordered):
        assert a.end <= b.start, f"{night}: {a.agreed} and {b.agreed} overlap"


@pytest.mark.parametrize(("times", "window_s"), CRITICAL)
def test_every_night_2026_2030_one_check_per_agreed_time(times, window_s) -> None:
    for night in ALL_NIGHTS:
        check_night(night, times, window_s)


@settings(max_examples=300, deadline=None)
@given(
    st.sets(st.integers(0, 24 * 60 - 1), min_size=1, max_size=8),
    st.sampled_from([60, 300, 600, 900, 1800]),
    st.sampled_from(sorted(SPRING_NIGHTS | FALL_NIGHTS) + ALL_NIGHTS[::97]),
)
def test_random_plans_on_dst_and_ordinary_nights(minutes, window_s, night) -> None:
    times = [time(m // 60, m % 60) for m in minutes]
    try:
        validate_times(times, timedelta(seconds=window_s))
    except PlanRuleError:
        return  # plans that fail validation never reach the rules
    check_night(night, times, window_s)


def test_spring_forward_2027_collisions_resolved_explicitly() -> None:
    slots = night_slots(
        date(2027, 3, 27), [time(2), time(2, 30), time(3), time(3, 30)], timedelta(minutes=10), TZ
    )
    got = {s.agreed: (s.start.astimezone(TZ).strftime("%H:%M %Z"), s.shift) for s in slots}
    assert got == {
        time(3): ("03:00 CEST", Shift.NONE),  # exists: kept
        time(3, 30): ("03:30 CEST", Shift.NONE),
        time(2): ("03:10 CEST", Shift.DST_COLLISION),  # gap -> 03:00 taken -> after it
        time(2, 30): ("03:40 CEST", Shift.DST_COLLISION),
    }


def test_spring_forward_existing_times_closer_than_a_window_keep_order() -> None:
    slots = night_slots(date(2026, 3, 28), [time(1, 31), time(3)], timedelta(minutes=30), TZ)
    got = [(s.agreed, s.start.astimezone(TZ).strftime("%H:%M %Z"), s.shift) for s in slots]
    assert got == [
        (time(1, 31), "01:31 CET", Shift.NONE),
        (time(3), "03:01 CEST", Shift.DST_COLLISION),  # 29 real minutes after 01:31
    ]


def test_fall_back_2027_time_that_happens_twice_is_checked_once_the_first_time() -> None:
    slots = night_slots(date(2027, 10, 30), [time(2, 30)], timedelta(minutes=10), TZ)
    assert len(slots) == 1
    assert slots[0].start.astimezone(TZ).strftime("%H:%M %Z") == "02:30 CEST"


def test_whole_years_each_night_and_time_exactly_once() -> None:
    spec = PlanSpec(times=(time(22), time(2), time(3)), window=timedelta(minutes=10), tz=TZ)
    lo = datetime(2026, 1, 1, tzinfo=TZ).astimezone(UTC)
    hi = datetime(2031, 1, 1, tzinfo=TZ).astimezone(UTC)
    # Query in uneven chunks: boundaries must neither drop nor repeat a check.
    found = []
    cursor = lo
    while cursor < hi:
        nxt = min(hi, cursor + timedelta(hours=37, minutes=13))
        found += [pc.slot for pc in planned_between(spec, cursor, nxt) if pc.slot.start >= cursor]
        cursor = nxt
    keys = Counter((s.night, s.agreed) for s in found)
    assert max(keys.values()) == 1
    # 2025-12-31's night has its 02:00 and 03:00 in 2026; 2030-12-31's 22:00 is in 2030.
    assert len(keys) == 3 * 1826
    assert all(s.end - s.start == timedelta(minutes=10) for s in found)


def test_nights_map_to_the_evening_they_begin() -> None:
    monday = date(2027, 1, 4)
    assert night_at(datetime(2027, 1, 5, 1, 0, tzinfo=TZ), TZ) == monday
    assert night_at(datetime(2027, 1, 4, 22, 0, tzinfo=TZ), TZ) == monday
    assert night_at(datetime(2027, 1, 4, 11, 59, tzinfo=TZ), TZ) == monday - timedelta(days=1)
    # Monday to Friday nights: the Saturday-morning 02:00 is Friday's night and happens.
    spec = PlanSpec(
        times=(time(22), time(2)), window=timedelta(minutes=10), tz=TZ, nights=parse_nights("01234")
    )
    friday, saturday = date(2027, 1, 8), date(2027, 1, 9)
    assert len(planned_night(spec, friday)) == 2
    assert planned_night(spec, saturday) == []
    assert planned_night(spec, friday)[1].slot.start.astimezone(TZ).date() == saturday


def test_opt_out_pause_and_validity() -> None:
    night = date(2027, 2, 10)
    hospital = Pause(
        datetime(2027, 2, 10, 23, 0, tzinfo=TZ).timestamp(),
        datetime(2027, 2, 11, 3, 0, tzinfo=TZ).timestamp(),
    )
    spec = PlanSpec(
        times=(time(22), time(2), time(4)),
        window=timedelta(minutes=10),
        tz=TZ,
        valid_from=night,
        valid_until=night + timedelta(days=1),
        opt_outs=frozenset({night + timedelta(days=1)}),
        pauses=(hospital,),
    )
    assert [pc.status for pc in planned_night(spec, night)] == [
        Planned.SCHEDULED,
        Planned.PAUSED,
        Planned.SCHEDULED,
    ]
    assert {pc.status for pc in planned_night(spec, night + timedelta(days=1))} == {
        Planned.OPTED_OUT
    }
    assert planned_night(spec, night - timedelta(days=1)) == []
    assert planned_night(spec, night + timedelta(days=2)) == []


def test_recheck_window_is_open_within_the_delay() -> None:
    assert recheck_window(1000, 1200, 600) == (1600, 2200)
    assert recheck_window(1000, 300, 600) == (1000, 1300)  # window longer than the delay


def test_validation_names_the_field() -> None:
    with pytest.raises(PlanRuleError, match="check_times: the same time twice"):
        parse_times(["22:00", "22:00:00"])
    with pytest.raises(PlanRuleError, match="at least one window length apart"):
        validate_times([time(23, 55), time(0, 0)], timedelta(minutes=10))
    with pytest.raises(PlanRuleError, match="must end with a visit"):
        parse_escalation(["visit", "call"])
    with pytest.raises(PlanRuleError, match="nights"):
        parse_nights("0178")
    assert parse_times(["02:00", "22:00"]) == (time(22), time(2))  # in night order
