"""broker.launcher.free_port: ports for servers the tests start a moment later."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from broker import launcher
from broker.launcher import free_port


def test_free_ports_are_below_the_ephemeral_range_and_free() -> None:
    """Not a port an outgoing connection can take between the pick and the server's bind
    (a port from ``bind(0)`` can: "address already in use" in a full run), and free."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(20_000 <= p < low for p in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free indeed


def test_a_port_in_use_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        taken = free_port()
        held.bind(("127.0.0.1", taken))
        held.listen()
        other = free_port()
        picks = iter([taken, other])
        monkeypatch.setattr(launcher.random, "randint", lambda lo, hi: next(picks))
        assert launcher.free_port() == other
