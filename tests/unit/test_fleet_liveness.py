"""Heartbeat silence is elapsed (monotonic) time: wall-clock steps neither hide nor fake it."""

from __future__ import annotations

from fleet.liveness import Liveness


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


def test_baseline_counts_silence_from_start_up() -> None:
    mono = Mono()
    live = Liveness(threshold_s=3, mono=mono)
    live.baseline("dev-a1", 50.0, online=True)
    mono.t += 2
    assert live.silent() == []
    assert live.ages() == [2.0]
    mono.t += 2
    assert [d for d, _ in live.silent()] == ["dev-a1"]
