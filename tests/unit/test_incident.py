"""The platform incident detector (fleet/incident.py): pure, on a made-up monotonic clock."""

from __future__ import annotations

import itertools

from sqlmodel import Session, select

from fleet.db import init_db, make_engine
from fleet.incident import SHARE_FLOOR, Closed, Detector, Opened, last_open, record
from fleet.models import AuditEvent
from fleet.plan_models import OutboxEvent


def detector(**over: float) -> Detector:
    ids = itertools.count(1)
    values: dict[str, float] = {
        "min_devices": 20,
        "min_share": 0.2,
        "window_s": 300,
        "link_down_s": 90,
        "close_share": 0.8,
        "settle_s": 60,
    } | over
    return Detector(**values, new_id=lambda: f"inc-{next(ids)}")  # type: ignore[arg-type]


def feed(d: Detector, points: list[tuple[float, int, bool]]) -> list[Opened | Closed]:
    out = []
    for t, online, link in points:
        change = d.observe(t, online=online, link_up=link)
        if change is not None:
            out.append(change)
    return out


def test_a_mass_disconnect_opens_one_incident_and_closes_when_most_are_back() -> None:
    d = detector()
    steady = [(float(t), 1000, True) for t in range(0, 100, 2)]
    # 400 devices drop over 30 s (heartbeat silence is spread over the heartbeat interval).
    drop = [(100.0 + t, 1000 - 40 * (t // 3 + 1), True) for t in range(0, 30, 3)]
    back = [(140.0 + t, 600 + 40 * (t // 3 + 1), True) for t in range(0, 30, 3)]
    held = [(170.0 + t, 1000, True) for t in range(0, 120, 2)]
    changes = feed(d, steady + drop + back + held)
    assert len(changes) == 2
    opened, closed = changes
    assert isinstance(opened, Opened) and isinstance(closed, Closed)
    assert (opened.incident_id, opened.reason, opened.online_before) == (
        "inc-1",
        "mass_disconnect",
        1000,
    )
    assert opened.offline >= 20
    assert (closed.incident_id, closed.lost, closed.back) == ("inc-1", 400, 400)
    assert not d.active


def test_a_few_devices_leaving_is_not_an_incident() -> None:
    d = detector()
    points = [(float(t), 1000 - t // 20, True) for t in range(0, 600, 2)]  # 30 in 10 min
    assert feed(d, points) == []  # never 20 within 5 minutes


def test_share_of_a_small_fleet_but_never_below_the_floor() -> None:
    small = detector()
    assert feed(small, [(0, 10, True), (5, 10, True), (10, 7, True)]) != []  # 30 % of 10
    tiny = detector()
    assert feed(tiny, [(0, 5, True), (10, 3, True)]) == []  # 2 < floor of 3
    assert SHARE_FLOOR == 3


def test_fleet_broker_link_down_longer_than_the_offline_threshold() -> None:
    d = detector()
    points = [(0.0, 50, True)] + [(float(t), 50, False) for t in range(1, 100, 2)]
    (opened,) = feed(d, points)
    assert isinstance(opened, Opened) and opened.reason == "broker_link"
    assert opened.offline == 0
    # The link comes back and the devices with it: closes after settling, not at once.
    assert feed(d, [(100.0, 50, True), (150.0, 50, True)]) == []
    (closed,) = feed(d, [(161.0, 50, True)])
    assert isinstance(closed, Closed) and closed.reason == "broker_link"


def test_a_short_link_blip_is_not_an_incident() -> None:
    d = detector()
    assert feed(d, [(0.0, 50, True), (30.0, 50, False), (80.0, 50, False), (85.0, 50, True)]) == []


def test_one_outage_is_one_incident_even_when_it_wobbles() -> None:
    d = detector(settle_s=30)
    points = [(0.0, 100, True), (10.0, 40, True)]  # opens
    points += [(20.0, 90, True), (35.0, 60, True), (40.0, 95, True)]  # back, again down
    points += [(t, 100, True) for t in (50.0, 60.0, 75.0, 80.0)]
    changes = feed(d, points)
    assert [type(c) for c in changes] == [Opened, Closed]


def test_an_incident_left_open_by_a_previous_process_is_found_again(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'f.db'}")
    init_db(engine)
    with Session(engine) as s:
        assert last_open(s) is None
        record(s, Opened("inc-a", "mass_disconnect", 120, 100), now=1.0, fleet=130)
        assert last_open(s) == ("inc-a", "mass_disconnect", 120)
        record(s, Closed("inc-a", "mass_disconnect", 30.0, 100, 100), now=2.0, fleet=130)
        assert last_open(s) is None
        kinds = [e.kind for e in s.exec(select(OutboxEvent)).all()]
        assert kinds == ["incident.opened", "incident.closed"]
        details = [e.detail for e in s.exec(select(AuditEvent)).all()]
        assert all("dev-" not in d and "res-" not in d for d in details)  # counts only
    engine.dispose()
    d = detector(settle_s=0)
    d.resume("inc-b", "broker_link", 100, now=0.0)
    assert d.active and feed(d, [(1.0, 50, True)]) == []
    (closed,) = feed(d, [(2.0, 90, True)])
    assert isinstance(closed, Closed) and closed.incident_id == "inc-b"
