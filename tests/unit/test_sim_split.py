"""The simulator deals its devices out to its worker processes in turn."""

from __future__ import annotations

from pathlib import Path

from firmware_agent.sim import SimSettings, device_ids
from firmware_agent.sim_control import Coordinator


def _settings(n: int) -> SimSettings:
    return SimSettings(
        ca_file=Path("ca.crt"),
        cert_dir=Path("certs"),
        command_keys=[Path("key.pub")],
        state_root=Path("state"),
        device_ids=device_ids(n),
    )


def test_devices_in_id_order_go_to_every_process_in_turn() -> None:
    chunks = Coordinator(_settings(10), 4)._chunks
    assert [len(c) for c in chunks] == [3, 3, 2, 2]
    assert sorted(d for c in chunks for d in c) == device_ids(10)
    # Any run of consecutive ids (a fleet part) is spread over all of them.
    first_four = set(device_ids(4))
    assert all(len(first_four & set(c)) == 1 for c in chunks)


def test_fewer_devices_than_processes_leaves_none_empty() -> None:
    assert Coordinator(_settings(2), 4)._chunks == [["dev-sim-000000"], ["dev-sim-000001"]]
