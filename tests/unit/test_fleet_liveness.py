"""Heartbeat silence is elapsed (monotonic) time: wall-clock steps neither hide nor fake it."""

from __future__ import annotations

from fleet.liveness import Liveness, facts_of
from tests.unit.service_support import heartbeat
from tillsyn_protocol import Heartbeat


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_silence_counts_elapsed_time_not_wall_time() -> None:
    mono = Mono()
    live = Liveness(threshold_s=3, mono=mono)
    assert live.seen("dev-a1", now=1_000.0)  # first contact: was not online
    # The fleet's wall clock jumps an hour ahead; a heartbeat arrives stamped with it.
    mono.t += 1
    assert not live.seen("dev-a1", now=4_601.0)
    mono.t += 2.5
    assert live.silent() == []  # 2.5 s of real silence, whatever the wall clock says
    mono.t += 1
    assert live.silent() == [("dev-a1", 4_601.0)]  # 3.5 s: silent, with its last contact
    assert not live.is_online("dev-a1")
    assert live.silent() == []  # reported once


def test_the_fleets_own_reading_lag_is_not_silence() -> None:
    """Heartbeats still unread in the fleet's socket are not silence: the threshold is
    extended by the reading lag, and judged at once when the fleet has caught up."""
    mono = Mono()
    live = Liveness(threshold_s=3, mono=mono)
    live.seen("dev-a1", now=1_000.0)
    mono.t += 4
    assert live.silent(lag_s=2.0) == []  # 4 s since the last one read, but 2 s unread
    assert live.is_online("dev-a1")
    assert [d for d, _ in live.silent(lag_s=0.5)] == ["dev-a1"]


def test_baseline_counts_silence_from_start_up() -> None:
    mono = Mono()
    live = Liveness(threshold_s=3, mono=mono)
    live.baseline("dev-a1", 50.0, online=True)
    mono.t += 2
    assert live.silent() == []
    assert live.ages() == [2.0]
    mono.t += 2
    assert [d for d, _ in live.silent()] == ["dev-a1"]


def _hb(ts: float, *, fw: str = "1.2.0", synced: bool = True) -> Heartbeat:
    return heartbeat(ts, fw=fw, synced=synced)


def test_last_seen_writes_are_throttled_but_fact_changes_go_at_once() -> None:
    mono = Mono()
    live = Liveness(threshold_s=120, mono=mono, write_every_s=10)
    live.seen("dev-a1", 1_000.0, _hb(1_000.0))
    assert set(live.drain()) == {"dev-a1"}  # first heartbeat: written
    live.seen("dev-a1", 1_002.0, _hb(1_002.0))
    assert live.drain() == {}  # same facts, 2 s later: waits for the 10 s write
    live.seen("dev-a1", 1_003.0, _hb(1_003.0, fw="1.3.0"))
    drained = live.drain()
    assert drained["dev-a1"].facts == ("1.3.0", True)  # new firmware: at once
    live.seen("dev-a1", 1_004.0, _hb(1_004.0 + 3600, fw="1.3.0"))
    assert set(live.drain()) == {"dev-a1"}  # skew crossed pre-flight's limit: at once
    live.seen("dev-a1", 1_015.0, _hb(1_015.0 + 3600, fw="1.3.0"))
    assert set(live.drain()) == {"dev-a1"}  # 11 s since the last write


def test_heartbeat_facts_are_shared_between_devices() -> None:
    # Memory per device: 10,000 devices on one firmware keep one facts object.
    assert facts_of(_hb(1.0)) is facts_of(_hb(2.0))
    assert facts_of(_hb(1.0)) is not facts_of(_hb(1.0, synced=False))


def test_what_connecting_and_heartbeating_keeps_per_device_is_small() -> None:
    """10,000 known devices come online and heartbeat: liveness keeps their numbers in
    columns, so what stays per device is the online and dirty sets' slots and a few
    doubles (about 0.13 KB), not an object and five floats per device (0.22 KB, and
    floats replaced on every heartbeat, which fragmented the heap)."""
    import tracemalloc

    ids = [f"dev-sim-{i:06d}" for i in range(10_000)]
    live = Liveness(threshold_s=120, mono=Mono())
    for d in ids:
        live.baseline(d, 900.0, online=False)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for r in range(3):
            for d in ids:
                live.seen(d, 1_000.0 + r, _hb(1_000.0 + r))
            assert len(live.drain()) == (len(ids) if r == 0 else 0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown / len(ids) < 160, grown / len(ids)
    assert live.online_count() == len(ids)
